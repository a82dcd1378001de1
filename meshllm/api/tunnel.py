"""HTTP across the mesh: a request for a model served by another node travels in one QUIC stream.

The node that received the request opens an HTTP-kind stream to the serving node and sends two
messages, the request head (JSON: method, path, query, headers) and the body, then EOF. The serving
node forwards it to its own llama-server and answers with the response head (JSON: status, headers)
followed by the body, one message per upstream chunk, then EOF. Streaming (SSE) therefore crosses
the mesh chunk by chunk, unchanged. Closing the stream early (the client hung up) makes the serving
node close its upstream request, which stops the generation.

A tunnelled request is only ever served locally by the receiving node: requests never hop twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from meshllm.api.upstream import UpstreamResponse

__all__ = ["TunnelResponse", "TunnelStream", "open_tunnel", "serve_tunnel"]

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024


class TunnelStream(Protocol):
    """Whole messages in both directions (``transport.MessageStream`` over a QUIC stream)."""

    async def send(self, message: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class TunnelResponse:
    status: int
    headers: list[tuple[str, str]]
    stream: TunnelStream

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            try:
                chunk = await self.stream.receive()
            except anyio.EndOfStream:
                return
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_tunnel(stream: TunnelStream, *, method: str, path: str, query: str,
                      headers: list[tuple[str, str]], body: bytes) -> TunnelResponse:
    """Send a request through ``stream``; returns once the response head has arrived."""
    head = {"method": method, "path": path, "query": query, "headers": headers}
    await stream.send(json.dumps(head).encode())
    await stream.send(body)
    await stream.send_eof()
    reply = _decode_head(await stream.receive())
    return TunnelResponse(int(reply["status"]), [(str(k), str(v)) for k, v in reply["headers"]], stream)


def _decode_head(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_HEAD:
        raise ValueError("tunnel head too large")
    head = json.loads(raw)
    if not isinstance(head, dict):
        raise ValueError("tunnel head is not a JSON object")
    return head


# Answers a tunnelled request locally: (method, path, query, headers, body) -> an upstream response
# whose head has arrived, or (status, headers, body) when it cannot be forwarded.
LocalForward = Callable[[str, str, str, list[tuple[str, str]], bytes],
                        Awaitable[UpstreamResponse | tuple[int, list[tuple[str, str]], bytes]]]


async def serve_tunnel(stream: TunnelStream, forward: LocalForward) -> None:
    """Serve one tunnelled request arriving on ``stream``. Never raises for a peer's bad input."""
    try:
        head = _decode_head(await stream.receive())
        body = await stream.receive()
        headers = [(str(k), str(v)) for k, v in head["headers"]]
        answer = await forward(str(head["method"]), str(head["path"]), str(head.get("query", "")),
                               headers, body)
    except (anyio.EndOfStream, anyio.BrokenResourceError, ValueError, KeyError, TypeError) as exc:
        log.warning("dropped a malformed tunnelled request: %s", exc)
        await stream.aclose()
        return
    try:
        if isinstance(answer, tuple):
            status, reply_headers, content = answer
            await stream.send(json.dumps({"status": status, "headers": reply_headers}).encode())
            await stream.send(content)
        else:
            await _relay(stream, answer)
        await stream.send_eof()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the requesting node went away: closing upstream (below) stops the generation
    finally:
        if not isinstance(answer, tuple):
            await answer.aclose()
        await stream.aclose()


async def _relay(stream: TunnelStream, upstream: UpstreamResponse) -> None:
    head = {"status": upstream.status_code, "headers": upstream.headers}
    await stream.send(json.dumps(head).encode())
    async for chunk in upstream:
        await stream.send(chunk)
