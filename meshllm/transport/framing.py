"""Length-prefixed frames and small JSON messages on top of a byte stream.

QUIC streams carry bytes, but the auth handshake, stream headers, gossip and control speak in
messages. A frame is a 4-byte big-endian length followed by that many payload bytes. The decoder is
incremental (feed whatever arrived, pop whole frames) and refuses a length above its maximum before
buffering anything, so a peer cannot make a node allocate a huge buffer with four bytes. Control
messages are JSON objects in one frame: readable in captures, no schema compiler, and small.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from meshllm.transport.channel import ByteChannel
from meshllm.transport.errors import FrameError

__all__ = ["MAX_FRAME", "FrameChannel", "FrameDecoder", "decode_message", "encode_frame",
           "encode_message"]

MAX_FRAME = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")


def encode_frame(payload: bytes, *, max_size: int = MAX_FRAME) -> bytes:
    """``payload`` with its length prefix; refuses payloads the peer's decoder would refuse."""
    if len(payload) > max_size:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the maximum of {max_size}")
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frames as bytes arrive.

    ``feed`` buffers bytes; ``pop`` returns the next whole frame or ``None``. An oversize length
    raises ``FrameError`` as soon as its four bytes are seen, and the decoder stays failed (a
    stream with a bad frame is not resynchronised: its remaining bytes have no trustworthy
    boundaries). Bytes after a popped frame are not inspected until the next ``pop``, so a stream
    may switch from frames to raw bytes (``take_rest``), as stream headers do.
    """

    def __init__(self, *, max_size: int = MAX_FRAME) -> None:
        self._max_size = max_size
        self._buffer = bytearray()
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        self._check_length()

    def pop(self) -> bytes | None:
        """The next complete frame's payload, or ``None`` until more bytes arrive."""
        if self._failed is not None:
            raise self._failed
        if len(self._buffer) < _LENGTH.size:
            return None
        self._check_length()
        (length,) = _LENGTH.unpack_from(self._buffer)
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_LENGTH.size:end])
        del self._buffer[:end]
        return payload

    def decode(self, data: bytes) -> list[bytes]:
        """Feed ``data`` and return every frame now complete."""
        self.feed(data)
        frames = []
        while (frame := self.pop()) is not None:
            frames.append(frame)
        return frames

    def take_rest(self) -> bytes:
        """Remove and return the buffered bytes that follow the frames popped so far."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def finish(self) -> None:
        """Call at end of stream: a partial frame left over is an error."""
        if self._buffer:
            raise FrameError(f"stream ended inside a frame ({len(self._buffer)} bytes left over)")

    def _check_length(self) -> None:
        if len(self._buffer) < _LENGTH.size:
            return
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > self._max_size:
            self._failed = FrameError(
                f"frame length {length} exceeds the maximum of {self._max_size}")
            self._buffer.clear()
            raise self._failed


def encode_message(message: Mapping[str, Any], *, max_size: int = MAX_FRAME) -> bytes:
    """One frame holding ``message`` as compact JSON."""
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    return encode_frame(payload, max_size=max_size)


def decode_message(payload: bytes) -> dict[str, Any]:
    """The JSON object in a frame's payload; anything else is a ``FrameError``."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError(f"expected a JSON object, got {type(message).__name__}")
    return message


class FrameChannel:
    """Frames and JSON messages over any ``ByteChannel`` (a QUIC ``Stream``, a memory pair)."""

    def __init__(self, channel: ByteChannel, *, max_size: int = MAX_FRAME,
                 read_size: int = 65536) -> None:
        self.channel = channel
        self._max_size = max_size
        self._read_size = read_size
        self._decoder = FrameDecoder(max_size=max_size)

    async def send_frame(self, payload: bytes) -> None:
        await self.channel.send(encode_frame(payload, max_size=self._max_size))

    async def send_message(self, message: Mapping[str, Any]) -> None:
        await self.channel.send(encode_message(message, max_size=self._max_size))

    async def receive_frame(self) -> bytes | None:
        """The next frame, or ``None`` at a clean end of stream; ``FrameError`` if malformed."""
        while (frame := self._decoder.pop()) is None:
            data = await self.channel.receive(self._read_size)
            if not data:
                self._decoder.finish()
                return None
            self._decoder.feed(data)
        return frame

    async def receive_message(self) -> dict[str, Any] | None:
        frame = await self.receive_frame()
        return None if frame is None else decode_message(frame)
