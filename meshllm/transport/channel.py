"""The byte-channel protocol the layers above the transport program against.

A QUIC ``Stream`` satisfies ``ByteChannel``, and so does ``MemoryByteChannel``: unit tests of
tunnels and framed protocols run over an in-memory pair, integration tests over real QUIC
(pycrdt's ``Channel`` is the model). End of stream is ``b""`` from ``receive``, as with
``os.read``; errors are exceptions. (Gossip's message channels are ``MessageStream`` over QUIC.)
"""

from __future__ import annotations

from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["ByteChannel", "MemoryByteChannel", "memory_byte_channel_pair"]

DEFAULT_RECEIVE = 65536


class ByteChannel(Protocol):
    """An ordered, reliable byte stream in both directions."""

    async def send(self, data: bytes) -> None:
        """Send all of ``data``, waiting while the channel's send buffer is full."""

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE) -> bytes:
        """Return up to ``max_bytes`` (at least one), or ``b""`` once the peer sent EOF."""

    async def send_eof(self) -> None:
        """Tell the peer nothing more will be sent; receiving continues."""


class MemoryByteChannel:
    """One end of an in-memory ``ByteChannel`` pair (for unit tests of the layers above)."""

    def __init__(self, outgoing: MemoryObjectSendStream[bytes],
                 incoming: MemoryObjectReceiveStream[bytes]) -> None:
        self._outgoing = outgoing
        self._incoming = incoming
        self._pending = b""

    async def send(self, data: bytes) -> None:
        if data:
            await self._outgoing.send(bytes(data))

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._incoming.receive()
            except anyio.EndOfStream:
                return b""
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    async def send_eof(self) -> None:
        await self._outgoing.aclose()

    async def aclose(self) -> None:
        await self._outgoing.aclose()
        await self._incoming.aclose()

    async def __aenter__(self) -> MemoryByteChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def memory_byte_channel_pair(*, buffer_chunks: int = 16) -> tuple[MemoryByteChannel,
                                                                  MemoryByteChannel]:
    """Two connected in-memory channels; each holds at most ``buffer_chunks`` unread sends."""
    a_out, b_in = anyio.create_memory_object_stream[bytes](buffer_chunks)
    b_out, a_in = anyio.create_memory_object_stream[bytes](buffer_chunks)
    return MemoryByteChannel(a_out, a_in), MemoryByteChannel(b_out, b_in)
