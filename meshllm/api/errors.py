"""OpenAI-shaped error responses, and the exceptions a backend raises when it cannot answer.

Clients written against the OpenAI API (the official SDKs, agents) parse
``{"error": {"message", "type", "param", "code"}}`` with a status and show the message; every error
the proxy returns goes through ``openai_error``. Backends (this node's llama-server, or a peer through
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


def error_body(status: int, message: str, *, code: str, param: str | None = None) -> bytes:
    """The JSON of an OpenAI error object (also the payload of an error event in a stream)."""
    return json.dumps({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                 "param": param, "code": code}}).encode()


def openai_error(status: int, message: str, *, code: str, param: str | None = None,
                 retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
