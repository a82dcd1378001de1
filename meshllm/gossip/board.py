"""Gossip of the blackboard's document, beside (not inside) the state document's.

The board is a document of its own (``state.board`` says why) and travels on streams of its own
kind (``StreamKind.BOARD``): a second ``DocGossip`` with the same protocol (flood of updates, digest
anti-entropy), run over the connections membership keeps. The dialling side of each connection
opens the stream, as for the state document, so every connected pair holds one board session; it
opens it again (backing off) when it was refused or broke while the connection lives on.

Every node relays the board, with or without ``--blackboard`` (which only opens the routes that read
and post): a mesh whose blackboard nodes are not linked to each other directly still carries their
posts, and a node that nobody posts through costs one idle session per connection. A peer of an
older version refuses the stream kind; the session ends and nothing else is affected.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskGroup, TaskStatus

from meshllm.gossip.sync import DocGossip
from meshllm.state.board import Board
from meshllm.state.schema import NodeId
from meshllm.transport import MessageStream, PeerConnection, PeerEvent, QuicEndpoint, Stream, StreamKind
from meshllm.transport.errors import TransportError

__all__ = ["BoardGossip"]

log = logging.getLogger(__name__)


class BoardGossip:
    """Keeps ``board`` in sync with the board of every peer ``endpoint`` is connected to."""

    def __init__(self, board: Board, endpoint: QuicEndpoint, *, node_id: NodeId, anti_entropy: float = 5.0,
                 retry: float = 1.0, max_retry: float = 30.0) -> None:
        self.board = board
        self.retry, self.max_retry = retry, max_retry
        self.endpoint = endpoint
        self.gossip = DocGossip(board.doc, node_id=node_id, anti_entropy=anti_entropy)

    @property
    def stats(self) -> dict[str, int]:
        s = self.gossip.stats
        return {"messages_sent": s.messages_sent, "bytes_sent": s.bytes_sent, "messages_received": s.messages_received,
                "bytes_received": s.bytes_received, "dropped": s.dropped, "malformed": s.malformed,
                "sessions": len(self.gossip.sessions)}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[PeerConnection](256)

        def on_peer(event: PeerEvent) -> None:
            if event.up and event.connection.is_dialer:
                try:
                    send.send_nowait(event.connection)
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    log.warning("board: could not open a session to %s", event.node_id)

        self.endpoint.on_stream(StreamKind.BOARD, self._accept)
        unsubscribe = self.endpoint.on_peer(on_peer)
        try:
            async with send, receive, anyio.create_task_group() as tg:
                for conn in self.endpoint.peers.values():  # connections made before this started
                    if conn.is_dialer:
                        tg.start_soon(self._dial, conn)
                tg.start_soon(self.gossip.run)
                tg.start_soon(self._dial_all, tg, receive)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            unsubscribe()
            self.gossip.close()

    async def _dial_all(self, tg: TaskGroup, connections: anyio.abc.ObjectReceiveStream[PeerConnection]) -> None:
        async for conn in connections:
            tg.start_soon(self._dial, conn)

    async def _accept(self, conn: PeerConnection, stream: Stream) -> None:
        await self.gossip.attach(MessageStream(stream))

    async def _dial(self, conn: PeerConnection) -> None:
        """Keep a board session on ``conn`` while it is this peer's connection: a stream refused (the
        peer started its board after its mesh, or is older) or broken is opened again, backing off."""
        delay = self.retry
        while not conn.closed and self.endpoint.peer(conn.node_id) is conn:
            started = anyio.current_time()
            try:
                stream = await conn.open_stream(StreamKind.BOARD)
                await self.gossip.attach(MessageStream(stream))
            except TransportError as exc:
                log.debug("board: no session with %s: %s", conn.node_id, exc)
            if anyio.current_time() - started > self.max_retry:
                delay = self.retry  # it had lasted: start backing off afresh
            await anyio.sleep(delay)
            delay = min(delay * 2, self.max_retry)
