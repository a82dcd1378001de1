"""The message channel gossip runs over: QUIC streams in production, memory streams in unit tests.

A channel carries whole messages (the transport frames them) between this node and one peer. It
follows pycrdt's ``Channel`` idea, async and bytes-only: ``send`` a message, ``receive`` the next
one; ``receive`` raises ``anyio.EndOfStream`` (or a closed-resource error) when the peer is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from meshllm.state.schema import NodeId

__all__ = ["MemoryChannel", "MessageChannel", "memory_channel_pair"]


class MessageChannel(Protocol):
    @property
    def peer_id(self) -> NodeId: ...

    async def send(self, message: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def aclose(self) -> None: ...


@dataclass
class MemoryChannel:
    """One end of an in-process channel pair."""

    peer_id: NodeId
    outgoing: MemoryObjectSendStream[bytes]
    incoming: MemoryObjectReceiveStream[bytes]

    async def send(self, message: bytes) -> None:
        await self.outgoing.send(message)

    async def receive(self) -> bytes:
        return await self.incoming.receive()

    async def aclose(self) -> None:
        await self.outgoing.aclose()
        await self.incoming.aclose()


def memory_channel_pair(a: NodeId, b: NodeId, *, buffer: int = 1024) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected channels: the first is node ``a``'s end (its peer is ``b``), the second ``b``'s."""
    a_to_b_send, a_to_b_recv = anyio.create_memory_object_stream[bytes](buffer)
    b_to_a_send, b_to_a_recv = anyio.create_memory_object_stream[bytes](buffer)
    return MemoryChannel(b, a_to_b_send, b_to_a_recv), MemoryChannel(a, b_to_a_send, a_to_b_recv)
