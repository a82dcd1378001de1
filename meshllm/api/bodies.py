"""Reading request bodies with a size limit and a deadline, and parsing JSON that may be hostile.

Both APIs read whole request bodies before they act (the proxy needs the model name, the control API
a list of manifests). A client that sends its body slowly, or not at all, must not hold a connection
and a task for ever (slowloris), and one that sends too much must not make the node buffer it: the
body is read within ``deadline`` seconds (else 408) and up to ``limit`` bytes (else 413, checked on
``Content-Length`` before anything is read). ``BodyLimit`` applies this to every request of an app
that changes state (the console's API); the proxy calls ``read_body`` itself.

JSON from clients is parsed with ``meshllm.jsonsafe.loads`` (re-exported here): a document nested a
thousand deep is a ``ValueError`` like any other malformed JSON, and so a 400.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshllm.api.errors import error_body
from meshllm.jsonsafe import loads

__all__ = ["BODY_DEADLINE", "BodyLimit", "BodyTimeout", "BodyTooLarge", "ClientGone", "loads", "read_body"]

BODY_DEADLINE = 30.0  # seconds a client has to send its whole request body


class BodyTooLarge(Exception):
    """The body is larger than the limit."""


class BodyTimeout(Exception):
    """The body did not arrive whole within the deadline."""


class ClientGone(Exception):
    """The client went away before its body was read."""


async def read_body(scope: Scope, receive: Receive, *, limit: int, deadline: float) -> bytes:
    """The whole request body (answering ``Expect: 100-continue`` on the way: the server sends the
    interim response when the body is first asked for)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge
    chunks, size, more = [], 0, True
    with anyio.move_on_after(deadline) as timer:
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            more = message.get("more_body", False)
    if timer.cancelled_caught:
        raise BodyTimeout
    return b"".join(chunks)


class BodyLimit:
    """ASGI middleware: the body of every request that may carry one (anything but GET/HEAD) is read
    first, within ``deadline`` and ``limit``, and replayed to the app; 413 or 408 otherwise."""

    def __init__(self, app: ASGIApp, *, limit: int, deadline: float) -> None:
        self.app = app
        self.limit = limit
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, limit=self.limit, deadline=self.deadline)
        except BodyTooLarge:
            await _refuse(send, 413, f"request body is larger than the limit of {self.limit} bytes",
                          code="request_too_large")
            return
        except BodyTimeout:
            await _refuse(send, 408, f"the request body did not arrive within {self.deadline:g} s",
                          code="request_timeout")
            return
        except ClientGone:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str, *, code: str) -> None:
    body = error_body(status, message, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
