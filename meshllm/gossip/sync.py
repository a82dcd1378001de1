"""Gossip of the state document: the Yjs sync protocol (pycrdt) between a node and its peers.

Each connected peer gets a session. A session starts with sync step 1 both ways (state vectors),
answered by step 2 (what the other side lacks), so two replicas that meet — at join, or when a
partition heals — converge in one round trip. After that:

- a change made on this node is sent as an update message to every session;
- an update received from a peer that was new to this replica is forwarded to every other session
  (a duplicate produces no change and goes no further), so changes flood the overlay once;
- the changes waiting in a session's outbox when its writer gets to run leave as one message (the
  updates merged, at most ``max_batch`` of them): on an idle node each change leaves at once, alone;
  under a burst of changes (a mesh forming, many nodes republishing their entries at once) the
  number of messages, and of datagrams and applies it costs every node downstream, follows what
  the node can send rather than how many changes were made. A receiver applies a merged update as
  one transaction and forwards it, merged, the same way. Without this, one node's backlog of a
  hundred small updates queued ahead of a new change delayed it by seconds at 100 nodes;
- every ``anti_entropy`` seconds one random peer is sent a 16-byte digest of this replica's whole
  state (``digest.state_digest``); if the peer's differs, it answers DIFFERS and sends step 1, this
  side sends step 1 back, and each answers the other's with step 2 (what it lacks), which repairs
  anything dropped on the way in both directions. Equal replicas, the usual case, exchange 18
  bytes instead of a state vector and a delete set (about 2 KB at 100 nodes). A peer of an older
  version ignores the digest (as a malformed message) and still pulls with step 1 itself.

Cost stays flat as the mesh grows when each node keeps a bounded number of sessions (the membership
layer chooses them). A session whose outbox overflows drops messages and resynchronises with step 1.
Malformed messages are logged and dropped: they never end the session or the node.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pycrdt import (
    Doc, TransactionEvent, YMessageType, YSyncMessageType, create_sync_message, create_update_message,
    handle_sync_message, merge_updates,
)

from meshllm.gossip.channel import MessageChannel
from meshllm.gossip.digest import DIGEST_SIZE, state_digest
from meshllm.state.schema import NodeId

__all__ = ["DocGossip", "GossipStats"]

log = logging.getLogger(__name__)

_EMPTY_UPDATE = b"\x00\x00"
# meshllm's own message type beside y-protocols' (sync 0, awareness 1, auth 2, query awareness 3)
DIGEST_MESSAGE = 0x6D
_PROBE, _DIFFERS = 0, 1


@dataclass
class GossipStats:
    """Counters for benchmarks and /api/status."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    dropped: int = 0
    malformed: int = 0
    merged: int = 0  # updates that left inside another one's message (batched)


@dataclass(frozen=True)
class _Update:
    """A change to send as an update message; the writer merges the ones queued together."""

    data: bytes


_Outgoing = bytes | _Update  # a whole message (sync steps, digests), or an update to batch


@dataclass
class _Session:
    peer_id: NodeId
    outbox: MemoryObjectSendStream[_Outgoing]
    resync: bool = False
    synced: anyio.Event = field(default_factory=anyio.Event)


class DocGossip:
    """Keeps one ``Doc`` in sync with the replicas of the peers attached to it."""

    def __init__(self, doc: Doc[Any], *, node_id: NodeId, anti_entropy: float = 5.0, outbox_size: int = 256,
                 max_batch: int = 64, rng: random.Random | None = None) -> None:
        self.doc = doc
        self.node_id = node_id
        self.anti_entropy = anti_entropy
        self.outbox_size = outbox_size
        self.max_batch = max_batch
        self.rng = rng or random.Random()
        self.stats = GossipStats()
        self.sessions: dict[NodeId, _Session] = {}
        self.synced_once = anyio.Event()  # this replica has completed a sync with a peer at least once
        # While a peer's message is applied: (peer id, sync message type). Change observers read it
        # to tell which path delivered a change (a flooded update, or a step 2 repairing a gap).
        self.delivering: tuple[NodeId, int] | None = None
        self._digest: bytes | None = None  # of the current state; None once the doc changed
        self._subscription = doc.observe(self._on_transaction)

    def close(self) -> None:
        self.doc.unobserve(self._subscription)

    # -- outgoing ---------------------------------------------------------------------------
    def _on_transaction(self, event: TransactionEvent) -> None:
        """A change to the doc (ours, or new to us from a peer): send it on. Never raises."""
        self._digest = None
        update = bytes(event.update)
        if not update or update == _EMPTY_UPDATE:
            return
        change = _Update(update)
        for session in list(self.sessions.values()):
            if self.delivering is None or session.peer_id != self.delivering[0]:
                self._post(session, change)

    def _post(self, session: _Session, message: _Outgoing) -> None:
        try:
            session.outbox.send_nowait(message)
        except anyio.WouldBlock:
            self.stats.dropped += 1
            session.resync = True  # the writer asks for a full state comparison once it drains
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    # -- sessions ---------------------------------------------------------------------------
    async def attach(self, channel: MessageChannel, *,
                     task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run a session with the peer at the other end of ``channel`` until it closes."""
        send, receive = anyio.create_memory_object_stream[_Outgoing](self.outbox_size)
        session = _Session(channel.peer_id, send)
        previous = self.sessions.get(channel.peer_id)
        if previous is not None:
            previous.outbox.close()
        self.sessions[channel.peer_id] = session
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, session, channel, receive, tg.cancel_scope)
                self._post(session, create_sync_message(self.doc))
                task_status.started()
                await self._read(session, channel)
                tg.cancel_scope.cancel()
        finally:
            if self.sessions.get(channel.peer_id) is session:
                del self.sessions[channel.peer_id]
            send.close()
            with anyio.CancelScope(shield=True):
                try:
                    await channel.aclose()
                except Exception as exc:  # closing a broken channel must not end the node
                    log.debug("closing the gossip channel to %s: %s", channel.peer_id, exc)

    async def _write(self, session: _Session, channel: MessageChannel,
                     outbox: MemoryObjectReceiveStream[_Outgoing], scope: anyio.CancelScope) -> None:
        try:
            await self._drain(session, channel, outbox)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the channel broke: the session ends, the node carries on
        scope.cancel()

    async def _drain(self, session: _Session, channel: MessageChannel,
                     outbox: MemoryObjectReceiveStream[_Outgoing]) -> None:
        async with outbox:
            held: _Outgoing | None = None  # taken out while batching, sent next
            while True:
                item, held = (held, None) if held is not None else (await outbox.receive(), None)
                if isinstance(item, _Update):
                    message, held = self._batch(item, outbox)
                else:
                    message = item
                await channel.send(message)
                self.stats.messages_sent += 1
                self.stats.bytes_sent += len(message)
                if session.resync and held is None and outbox.statistics().current_buffer_used == 0:
                    session.resync = False
                    self._post(session, create_sync_message(self.doc))

    def _batch(self, first: _Update, outbox: MemoryObjectReceiveStream[_Outgoing]) -> tuple[bytes, _Outgoing | None]:
        """One update message for ``first`` and the updates queued right behind it (up to
        ``max_batch``), and the first other message met behind them (to be sent next, in order)."""
        updates = [first.data]
        held: _Outgoing | None = None
        while len(updates) < self.max_batch:
            try:
                item = outbox.receive_nowait()
            except anyio.WouldBlock:
                break
            if not isinstance(item, _Update):
                held = item
                break
            updates.append(item.data)
        self.stats.merged += len(updates) - 1
        return create_update_message(updates[0] if len(updates) == 1 else merge_updates(*updates)), held

    async def _read(self, session: _Session, channel: MessageChannel) -> None:
        while True:
            try:
                message = await channel.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            self.stats.messages_received += 1
            self.stats.bytes_received += len(message)
            self._handle(session, message)

    def digest(self) -> bytes:
        """This replica's state digest (kept until the document changes)."""
        if self._digest is None:
            self._digest = state_digest(self.doc)
        return self._digest

    def _handle_digest(self, session: _Session, message: bytes) -> None:
        """A peer's anti-entropy probe, or its answer that our replicas differ."""
        if len(message) == 2 + DIGEST_SIZE and message[1] == _PROBE:
            if message[2:] != self.digest():
                self._post(session, bytes([DIGEST_MESSAGE, _DIFFERS]))
                self._post(session, create_sync_message(self.doc))
        elif len(message) == 2 and message[1] == _DIFFERS:
            self._post(session, create_sync_message(self.doc))
        else:
            self.stats.malformed += 1

    def _handle(self, session: _Session, message: bytes) -> None:
        if message and message[0] == DIGEST_MESSAGE:
            self._handle_digest(session, message)
            return
        if not message or message[0] != YMessageType.SYNC:
            self.stats.malformed += 1
            return
        self.delivering = (session.peer_id, message[1] if len(message) > 1 else -1)
        try:
            reply = handle_sync_message(message[1:], self.doc)
        except Exception as exc:  # a peer's bytes must never take the node down
            self.stats.malformed += 1
            log.warning("dropped a malformed gossip message from %s: %s", session.peer_id, exc)
            return
        except BaseException as exc:
            if type(exc).__name__ != "PanicException":  # pycrdt's Rust panics are BaseExceptions
                raise
            self.stats.malformed += 1
            log.error("pycrdt panicked applying a gossip message from %s (dropped; anti-entropy "
                      "will retry): %s", session.peer_id, exc)
            return
        finally:
            self.delivering = None
        if reply is not None:
            self._post(session, reply)
        if len(message) > 1 and message[1] == YSyncMessageType.SYNC_STEP2:
            session.synced.set()
            self.synced_once.set()

    # -- anti-entropy -----------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Periodically compare this replica with one random peer's (and repair both if they differ)."""
        task_status.started()
        while True:
            await anyio.sleep(self.anti_entropy * self.rng.uniform(0.8, 1.2))
            if self.sessions:
                peer = self.rng.choice(sorted(self.sessions))
                self._post(self.sessions[peer], bytes([DIGEST_MESSAGE, _PROBE]) + self.digest())
