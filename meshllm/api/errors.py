"""OpenAI-shaped error responses, and the exceptions a backend raises when it cannot answer.

Clients written against the OpenAI API (the official SDKs, agents) parse
``{"error": {"message", "type", "param", "code"}}`` with a status and show the message; every error
the proxy returns goes through ``openai_error`` (or ``error_body``), except on Anthropic's routes
(``/v1/messages...``), where the anthropic SDK expects ``{"type": "error", "error": {"type",
"message"}}`` and ``anthropic=True`` gives that shape. Backends (this node's llama-server, or a peer through
the mesh) fail in one of two ways, and the proxy answers each its own way:

    MeshError (meshllm.errors)
    └── BackendError            a backend could not answer a request
        ├── BackendUnavailable  before the response began: an error response (``status``, Retry-After)
        └── BackendBroken       after it began: an error event in a stream, or a cut connection
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

from meshllm.errors import MeshError

__all__ = ["BackendBroken", "BackendError", "BackendUnavailable", "error_body", "openai_error"]

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    502: "server_error",
    503: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


class BackendError(MeshError):
    """A backend could not answer a request."""


class BackendUnavailable(BackendError):
    """No response came: 503 when the backend could not be reached (it may come back: retry after
    ``retry_after`` s), 502 when it was reached but gave no valid response head."""

    def __init__(self, message: str, *, status: int = 503, code: str = "upstream_unavailable",
                 retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class BackendBroken(BackendError):
    """The response began but did not end: the upstream died or the path to it broke."""


def _error_object(status: int, message: str, *, code: str, param: str | None,
                  anthropic: bool) -> dict[str, object]:
    if anthropic:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_body(status: int, message: str, *, code: str, param: str | None = None, anthropic: bool = False) -> bytes:
    """The JSON of an OpenAI error object (also the payload of an error event in a stream); of an
    Anthropic one with ``anthropic``."""
    return json.dumps(_error_object(status, message, code=code, param=param, anthropic=anthropic)).encode()


def openai_error(status: int, message: str, *, code: str, param: str | None = None,
                 retry_after: float | None = None, anthropic: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(_error_object(status, message, code=code, param=param, anthropic=anthropic),
                        status_code=status, headers=headers)
