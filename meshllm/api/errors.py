"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Clients written against the OpenAI API (the official SDKs, agents) parse this shape and show the
message; every error the proxy returns goes through here.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

__all__ = ["openai_error"]

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    502: "server_error",
    503: "server_error",
}


def openai_error(status: int, message: str, *, code: str, param: str | None = None,
                 retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
