"""Stream services: what a node serves on its QUIC endpoint, one stream kind each.

A tunnel's serving end is a ``StreamService``: the kind of stream it answers and a handler for one
incoming stream. The node builds its services and registers them on its endpoint before the endpoint
runs, so no peer's stream arrives at a kind nobody serves yet:

    serve_streams(endpoint, [RpcTunnelServer(workers.endpoint_for),
                             MessageService(StreamKind.HTTP, http_tunnel_handler)])

``message_opener`` is the other end of a ``MessageService``: it opens a stream of its kind to a node.
The endpoint runs each handler in its own task group; a handler should not raise (the endpoint
resets the stream and logs it if one does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from meshllm.state.schema import NodeId
from meshllm.transport import MessageStream, PeerConnection, QuicEndpoint, Stream, StreamKind

__all__ = ["Connect", "MessageOpener", "MessageService", "StreamService", "message_opener", "serve_streams"]

Connect = Callable[[str], Awaitable[PeerConnection]]  # a node id -> a connection to it, dialled if needed


class StreamService(Protocol):
    """Answers every incoming stream of one kind."""

    @property
    def kind(self) -> StreamKind: ...

    async def handle(self, conn: PeerConnection, stream: Stream, /) -> None: ...


@dataclass(frozen=True)
class MessageService:
    """A service that speaks whole messages (``transport.MessageStream``), e.g. the HTTP tunnel."""

    kind: StreamKind
    serve: Callable[[MessageStream], Awaitable[None]]

    async def handle(self, conn: PeerConnection, stream: Stream, /) -> None:
        await self.serve(MessageStream(stream))


def serve_streams(endpoint: QuicEndpoint, services: Iterable[StreamService]) -> None:
    """Register each service as its kind's handler on ``endpoint`` (replacing any before it)."""
    for service in services:
        endpoint.on_stream(service.kind, service.handle)


class MessageOpener(Protocol):
    """Opens a message stream of one kind to a node."""

    async def __call__(self, node_id: NodeId) -> MessageStream: ...


def message_opener(connect: Connect, kind: StreamKind) -> MessageOpener:
    """The client side of a ``MessageService``: a new stream of ``kind`` to a node, dialled if needed."""

    async def open_stream(node_id: NodeId) -> MessageStream:
        conn = await connect(node_id)
        return MessageStream(await conn.open_stream(kind))

    return open_stream
