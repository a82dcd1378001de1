"""HTTP across the mesh: a request for a model served by another node travels in one QUIC stream.

Wire format, all in length-prefixed frames (``transport.framing``) on one HTTP-kind stream:

    requesting node                                serving node
    head {"method","path","query","headers"}  ->
    body                                      ->
                                              <-   head {"status","headers"}
                                              <-   body chunk, ... (never empty: one per upstream chunk)
                                              <-   FIN                      the response is complete
                                                   or: b"", {"error": msg}, FIN   the upstream broke mid-body
    FIN once it has read the whole response   ->
    or a reset (``CANCELLED``) when its client went away

The requesting node keeps its sending side open while the response comes, so that the serving node
hears at once (a stream reset) when the client goes away, even while llama-server is still working
on a non-streamed answer and nothing flows back yet; the serving node then closes its upstream
request, which stops the generation. A serving node whose upstream fails mid-body says so in a
trailer, so the requesting node never takes a cut answer for a whole one; a broken stream or
connection is an error on both sides, never a clean end.

A tunnelled request is only ever served locally by the receiving node: requests never hop twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from meshllm.jsonsafe import loads
from meshllm.errors import MeshError
from meshllm.state.schema import NodeId
from meshllm.transport import FrameChannel, PeerConnection, Stream, StreamKind, TransportError
from meshllm.transport.errors import ErrorCode

__all__ = ["Answer", "HttpTunnelClient", "HttpTunnelServer", "LocalForward", "TunnelBroken", "TunnelError",
           "TunnelRequest", "TunnelResponse", "TunnelStream", "TunnelUnavailable", "serve_tunnel"]

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024


class TunnelError(MeshError):
    """The tunnel failed a request; ``code`` is the transport's error code when there is one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TunnelUnavailable(TunnelError):
    """No response head came: the peer is unreachable, or the stream broke before it answered."""


class TunnelBroken(TunnelError):
    """The response began but did not end: the serving node's upstream broke, or the stream did."""


class TunnelStream(Protocol):
    """One QUIC stream as bytes (``transport.Stream``)."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self, max_bytes: int = 65536) -> bytes: ...

    async def send_eof(self) -> None: ...

    def reset(self, code: int = ErrorCode.CANCELLED) -> None: ...

    async def aclose(self) -> None: ...


class PeerLink(Protocol):
    """A connection to a peer that opens streams (``transport.PeerConnection``)."""

    async def open_stream(self, kind: StreamKind) -> Any: ...


class Connect(Protocol):
    """The connection to a node, dialling it if none is up (``MeshRuntime.connect``)."""

    async def __call__(self, node_id: NodeId, /) -> PeerLink: ...


@dataclass(frozen=True)
class TunnelRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


class Answer(Protocol):
    """A local response whose head has arrived; iterating it yields body chunks and raises if the
    upstream breaks; ``aclose`` releases it (keeping a pooled connection only after a whole body)."""

    status_code: int
    headers: list[tuple[str, str]]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


# Answers a tunnelled request on the serving node; never raises for upstream trouble (an error is an
# Answer with an error status).
LocalForward = Callable[[TunnelRequest], Awaitable[Answer]]


def _decode_head(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise ValueError("the stream ended before the head")
    if len(raw) > MAX_HEAD:
        raise ValueError("tunnel head too large")
    head = loads(raw)
    if not isinstance(head, dict):
        raise ValueError("tunnel head is not a JSON object")
    return head


def _headers(raw: Any) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in raw]


# -- the requesting node -------------------------------------------------------------------------

class TunnelResponse:
    """A tunnelled response whose head has arrived; iterate it for the body, then ``aclose()``."""

    def __init__(self, node: NodeId, status_code: int, headers: list[tuple[str, str]], stream: TunnelStream,
                 frames: FrameChannel) -> None:
        self.node = node
        self.status_code = status_code
        self.headers = headers
        self._stream = stream
        self._frames = frames
        self._complete = False
        self._closed = False

    def __aiter__(self) -> TunnelResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            frame = await self._frames.receive_frame()
        except TransportError as exc:
            raise TunnelBroken(f"the tunnel to node {self.node} broke mid-response: {exc}", code=exc.code) from exc
        if frame:
            return frame
        if frame is None:
            self._complete = True
            raise StopAsyncIteration
        raise TunnelBroken(f"node {self.node}: {await self._trailer()}")

    async def _trailer(self) -> str:
        try:
            trailer = loads(await self._frames.receive_frame() or b"{}")
            return str(trailer.get("error") or "the upstream broke mid-response")
        except (TransportError, ValueError, AttributeError):
            return "the upstream broke mid-response"

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """End the exchange: politely after a whole response, else with a reset (which makes the
        serving node stop its upstream request)."""
        if self._closed:
            return
        self._closed = True
        if self._complete:
            await self._stream.aclose()
        else:
            self._stream.reset(ErrorCode.CANCELLED)


class HttpTunnelClient:
    """Sends requests to other nodes' llama-servers through HTTP tunnel streams."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def request(self, node: NodeId, request: TunnelRequest) -> TunnelResponse:
        """Send ``request`` to ``node``; returns once the response head has arrived.

        Raises ``TunnelUnavailable`` when no head came. Two nodes that dialled each other at once keep
        one connection; a request that went out on the losing one never got an answer, so it goes
        again, on the connection that won."""
        try:
            return await self._attempt(node, request)
        except TunnelUnavailable as exc:
            if exc.code != ErrorCode.DUPLICATE:
                raise
        return await self._attempt(node, request)

    async def _attempt(self, node: NodeId, request: TunnelRequest) -> TunnelResponse:
        try:
            stream: TunnelStream = await (await self._connect(node)).open_stream(StreamKind.HTTP)
        except TransportError as exc:
            raise TunnelUnavailable(f"node {node} is unreachable: {exc}", code=exc.code) from exc
        frames = FrameChannel(stream)
        try:
            head = {"method": request.method, "path": request.path, "query": request.query,
                    "headers": request.headers}
            await frames.send_frame(json.dumps(head).encode())
            await frames.send_frame(request.body)
            reply = _decode_head(await frames.receive_frame())
            return TunnelResponse(node, int(reply["status"]), _headers(reply["headers"]), stream, frames)
        except TransportError as exc:
            stream.reset(ErrorCode.CANCELLED)
            raise TunnelUnavailable(f"node {node} did not answer: {exc}", code=exc.code) from exc
        except (ValueError, KeyError, TypeError) as exc:
            stream.reset(ErrorCode.CANCELLED)
            raise TunnelUnavailable(f"node {node} answered with a malformed head: {exc}") from exc
        except BaseException:
            stream.reset(ErrorCode.CANCELLED)  # cancelled (the client went away): stop the peer's upstream
            raise


# -- the serving node ----------------------------------------------------------------------------

class HttpTunnelServer:
    """Answers HTTP tunnel streams from peers with ``forward``: the node's ``StreamService`` of the HTTP
    kind (``tunnels.service``)."""

    def __init__(self, forward: LocalForward) -> None:
        self._forward = forward

    @property
    def kind(self) -> StreamKind:
        return StreamKind.HTTP

    async def handle(self, conn: PeerConnection, stream: Stream, /) -> None:
        await serve_tunnel(stream, self._forward)


async def serve_tunnel(stream: TunnelStream, forward: LocalForward) -> None:
    """Serve one tunnelled request arriving on ``stream``. Never raises for a peer's bad input, a
    peer that goes away, or an upstream that breaks."""
    frames = FrameChannel(stream)
    try:
        head = _decode_head(await frames.receive_frame())
        body = await frames.receive_frame()
        if body is None:
            raise ValueError("the stream ended before the body")
        request = TunnelRequest(str(head["method"]), str(head["path"]), str(head.get("query", "")),
                                _headers(head["headers"]), body)
    except (TransportError, ValueError, KeyError, TypeError) as exc:
        log.warning("dropped a malformed tunnelled request: %s", exc)
        stream.reset(ErrorCode.STREAM_REJECTED)
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_requester, stream, tg.cancel_scope)
        try:
            await _answer(frames, forward, request)
        finally:
            tg.cancel_scope.cancel()


async def _watch_requester(stream: TunnelStream, scope: anyio.CancelScope) -> None:
    """The requesting node sends nothing after the body until it is done: a reset or a lost
    connection means its client went away, and the upstream request is cancelled."""
    try:
        while await stream.receive():
            pass
    except TransportError:
        scope.cancel()


async def _answer(frames: FrameChannel, forward: LocalForward, request: TunnelRequest) -> None:
    answer = await forward(request)
    try:
        await frames.send_frame(json.dumps({"status": answer.status_code, "headers": answer.headers}).encode())
        chunks = aiter(answer)
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except Exception as exc:  # whatever broke the upstream, the requesting node must hear of it
                log.warning("%s %s: the upstream broke mid-response: %s", request.method, request.path, exc)
                await frames.send_frame(b"")
                await frames.send_frame(json.dumps({"error": str(exc) or type(exc).__name__}).encode())
                return
            if chunk:
                await frames.send_frame(chunk)
    except TransportError as exc:
        log.debug("%s %s: the requesting node went away: %s", request.method, request.path, exc)
    finally:
        with anyio.CancelScope(shield=True):
            await answer.aclose()
