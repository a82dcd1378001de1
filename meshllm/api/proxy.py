"""The proxy's one response path: send a request through a backend and relay the answer to the client.

Local and routed requests take the same path (``relay``), and HTTP semantics hold on it end to end:

- the client going away at any moment (waiting for a non-streamed answer included) cancels the
  exchange, and closing an unfinished backend response cancels the request upstream (llama-server
  stops generating);
- a backend that cannot answer becomes an OpenAI-shaped error with ``Retry-After`` (502/503);
- a backend that breaks after the response began ends a stream (SSE) with an error event,
  ``data: {"error": {...}}`` (the openai SDK raises on it instead of taking a cut answer for a whole
  one; on ``/v1/messages`` Anthropic's ``event: error``, on which the anthropic SDK raises), and cuts
  any other body short, so the client never mistakes it for a whole response; both are logged.

The body goes chunk by chunk as the backend delivers it, with one ``send`` per chunk and nothing else.
"""

from __future__ import annotations

import json
import logging

import anyio
from starlette.types import Receive, Send

from meshllm.api.backends import Backend, BackendResponse, ProxyRequest, forwardable
from meshllm.api.endpoints import is_anthropic
from meshllm.api.errors import BackendBroken, BackendUnavailable, error_body
from meshllm.tunnels.http import TunnelBroken

__all__ = ["relay", "send_error"]

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


async def relay(backend: Backend, request: ProxyRequest, receive: Receive, send: Send, *, what: str) -> None:
    """Send ``request`` through ``backend`` and relay the response; ``what`` names it in logs."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
        try:
            try:
                response = await backend.send(request)
            except BackendUnavailable as exc:
                log.warning("%s: %s", what, exc)
                await send_error(send, exc.status, str(exc), code=exc.code, retry_after=exc.retry_after,
                                 anthropic=is_anthropic(request.path))
                return
            try:
                await _relay_body(response, send, what, anthropic=request.path == "/v1/messages")
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            tg.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """The request body was read whole, so the next message is the client going away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _relay_body(response: BackendResponse, send: Send, what: str, *, anthropic: bool) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in forwardable(response.headers)]
    headers += [(b"content-length", v.encode("latin-1")) for k, v in response.headers
                if k.lower() == "content-length"]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    chunks = aiter(response)
    last = b"\n\n"
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except Exception as exc:  # whatever broke the upstream, the client must not take this for a whole answer
            await _broken(response, send, what, exc, last, anthropic=anthropic)
            return
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        last = chunk
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _broken(response: BackendResponse, send: Send, what: str, exc: Exception, last: bytes, *,
                  anthropic: bool) -> None:
    """End a response whose upstream broke: an error event ends a stream; any other body stays cut
    short (the server closes the connection when the response is left unfinished)."""
    if isinstance(exc, (BackendBroken, TunnelBroken)):
        log.warning("%s: the upstream broke mid-response: %s", what, exc)
    else:
        log.exception("%s: the upstream response failed", what)
    if not any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in response.headers):
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
