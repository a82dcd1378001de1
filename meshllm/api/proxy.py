"""The proxy's response helpers: whole errors, client disconnects, and the end of a broken response.

The one response path (``api.failover``) relays each proxied request through a backend, and HTTP
semantics hold on it end to end:

- the client going away at any moment (waiting for a non-streamed answer included) cancels the
  exchange (``cancel_on_disconnect``), and closing an unfinished backend response cancels the
  request upstream (llama-server stops generating);
- a backend that cannot answer becomes an OpenAI-shaped error with ``Retry-After`` (502/503,
  ``send_error``);
- a backend that breaks after the response began, where the request cannot be carried on
  elsewhere, ends a stream (SSE) with an error event, ``data: {"error": {...}}`` (the openai SDK
  raises on it instead of taking a cut answer for a whole one; on ``/v1/messages`` Anthropic's
  ``event: error``, on which the anthropic SDK raises), and cuts any other body short, so the client
  never mistakes it for a whole response; both are logged (``end_broken``).
"""

from __future__ import annotations

import json
import logging

import anyio
from starlette.types import Receive, Send

from meshllm.api.errors import BackendBroken, error_body
from meshllm.tunnels.http import TunnelBroken

__all__ = ["cancel_on_disconnect", "end_broken", "send_error"]

log = logging.getLogger(__name__)


async def send_error(send: Send, status: int, message: str, *, code: str, param: str | None = None,
                     retry_after: float | None = None, anthropic: bool = False) -> None:
    """A whole OpenAI-shaped error response (Anthropic-shaped with ``anthropic``)."""
    body = error_body(status, message, code=code, param=param, anthropic=anthropic)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """The request body was read whole, so the next message is the client going away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def end_broken(send: Send, what: str, exc: Exception, last: bytes, *, event_stream: bool,
                     anthropic: bool) -> None:
    """End a response whose upstream broke: an error event ends a stream; any other body stays cut
    short (the server closes the connection when the response is left unfinished). ``last`` is the
    last chunk the client got."""
    if isinstance(exc, (BackendBroken, TunnelBroken)):
        log.warning("%s: the upstream broke mid-response: %s", what, exc)
    else:
        log.error("%s: the upstream response failed", what, exc_info=exc)
    if not event_stream:
        return
    message = f"the response broke off: {exc}"
    if anthropic:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        event = b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    else:
        event = b"data: " + error_body(502, message, code="upstream_broken") + b"\n\n"
    if not last.endswith(b"\n\n"):  # end whatever event was cut, so the error is an event of its own
        event = b"\n\n" + event
    await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
