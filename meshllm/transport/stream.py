"""One multiplexed QUIC stream as an anyio-friendly byte channel, and the header naming its kind.

A peer connection carries many streams at once; each opens with one small frame naming its kind
(gossip, HTTP tunnel, RPC tunnel, control, blackboard) so the receiving endpoint can hand it to the right
handler. After the header a stream is plain bytes in both directions (``ByteChannel``).

The connection feeds a ``Stream`` from aioquic's event callback (``_on_*`` methods: they only
buffer and wake, and never raise); tasks use ``send``/``receive``. ``receive`` returns ``b""`` at
end of stream and raises ``StreamReset``/``ConnectionLost`` when the stream or connection broke.
"""

from __future__ import annotations

from enum import Enum
from types import TracebackType
from typing import Protocol

import anyio
import anyio.lowlevel

from meshllm.state.schema import NodeId
from meshllm.transport.errors import ErrorCode, FrameError, StreamReset, TransportError
from meshllm.transport.framing import MAX_FRAME, FrameChannel, decode_message, encode_message

__all__ = ["MessageStream", "Stream", "StreamKind", "decode_stream_header", "encode_stream_header"]

MAX_HEADER = 256


class StreamKind(Enum):
    GOSSIP = "gossip"
    HTTP = "http"
    RPC = "rpc"
    CONTROL = "control"
    BOARD = "board"  # gossip of the blackboard's own document (gossip.board)


def encode_stream_header(kind: StreamKind) -> bytes:
    return encode_message({"kind": kind.value}, max_size=MAX_HEADER)


def decode_stream_header(payload: bytes) -> StreamKind:
    kind = decode_message(payload).get("kind")
    try:
        return StreamKind(kind)
    except ValueError:
        raise FrameError(f"unknown stream kind {str(kind)[:32]!r}") from None


class StreamOwner(Protocol):
    """What a stream needs from its connection (``PeerConnection`` implements it)."""

    @property
    def node_id(self) -> NodeId: ...

    def _stream_write(self, stream_id: int, data: bytes, *, end: bool) -> None: ...

    async def _stream_wait_room(self, stream: Stream) -> None: ...

    def _stream_abort(self, stream_id: int, code: int, *, send: bool, receive: bool) -> None: ...

    def _stream_done(self, stream: Stream) -> None: ...


class Stream:
    """A bidirectional byte stream to one peer. Not for concurrent use by several readers."""

    def __init__(self, owner: StreamOwner, stream_id: int, kind: StreamKind, *,
                 chunk: int) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self.kind = kind
        self._chunk = chunk
        self._buffer = bytearray()
        self._fin_received = False
        self._recv_error: TransportError | None = None
        self._readable: anyio.Event | None = None
        self._send_closed = False  # FIN sent or sending impossible
        self._send_error: TransportError | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Stream {self.kind.value} #{self.stream_id} to {self._owner.node_id}>"

    @property
    def peer_id(self) -> NodeId:
        return self._owner.node_id

    # -- for tasks ----------------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        """Send all of ``data``; waits while this stream's unacknowledged bytes exceed the limit.

        Like ``receive`` with data buffered, it does not yield (nor see a cancellation) unless it
        has to wait: these run once per tunnelled token, and an anyio checkpoint costs more than
        the rest of the call."""
        view = memoryview(data)
        while True:
            self._check_sendable()
            await self._owner._stream_wait_room(self)
            self._check_sendable()
            self._owner._stream_write(self.stream_id, bytes(view[:self._chunk]), end=False)
            view = view[self._chunk:]
            if not view:
                return

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes, waiting for at least one; ``b""`` once the peer sent EOF."""
        while not self._buffer:
            if self._closed:
                raise TransportError(f"{self!r} is closed")
            if self._recv_error is not None:
                raise self._recv_error
            if self._fin_received:
                await anyio.lowlevel.checkpoint()
                return b""
            self._readable = anyio.Event()
            await self._readable.wait()
        chunk = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return chunk

    async def send_eof(self) -> None:
        """Finish the sending side (the peer reads ``b""``); receiving goes on."""
        await anyio.lowlevel.checkpoint()
        self._check_sendable()
        self._send_fin()

    def reset(self, code: int = ErrorCode.CANCELLED) -> None:
        """Abort both directions at once; the peer's reads and writes fail with ``StreamReset``."""
        if self._closed:
            return
        self._owner._stream_abort(self.stream_id, code, send=not self._send_closed,
                                  receive=not self._fin_received and self._recv_error is None)
        self._send_closed = True
        self._fail_locally(StreamReset(f"{self!r} was reset locally", code=code))

    async def aclose(self) -> None:
        """Finish sending (EOF) if not done, stop reading anything unread, and forget the stream."""
        if not self._closed:
            if not self._send_closed and self._send_error is None:
                try:
                    self._send_fin()
                except TransportError:
                    pass  # the connection or stream broke meanwhile: nothing left to finish
            self._owner._stream_abort(
                self.stream_id, ErrorCode.NO_ERROR, send=False,
                receive=not self._fin_received and self._recv_error is None)
            self._fail_locally(None)
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            await self.aclose()
        else:
            self.reset(ErrorCode.CANCELLED)

    # -- internals ----------------------------------------------------------------------------
    def _check_sendable(self) -> None:
        if self._closed:
            raise TransportError(f"{self!r} is closed")
        if self._send_error is not None:
            raise self._send_error
        if self._send_closed:
            raise TransportError(f"{self!r}: send after send_eof")

    def _send_fin(self) -> None:
        self._send_closed = True
        self._owner._stream_write(self.stream_id, b"", end=True)

    def _fail_locally(self, error: TransportError | None) -> None:
        self._closed = True
        self._buffer.clear()
        if error is not None:
            self._recv_error = self._recv_error or error
            self._send_error = self._send_error or error
        self._wake()
        self._owner._stream_done(self)

    def _wake(self) -> None:
        if self._readable is not None:
            self._readable.set()
            self._readable = None

    @property
    def _wants_room(self) -> bool:
        """Whether a writer may still wait for send room (not closed or failed)."""
        return not self._closed and self._send_error is None and not self._send_closed

    # -- for the connection's event callback: buffer and wake, never raise ---------------------
    def _on_data(self, data: bytes, fin: bool) -> None:
        if self._closed:
            return
        self._buffer += data
        self._fin_received = self._fin_received or fin
        self._wake()

    def _on_reset(self, code: int) -> None:
        self._recv_error = self._recv_error or StreamReset(
            f"{self!r} was reset by the peer (code {code:#x})", code=code)
        self._wake()

    def _on_stop_sending(self, code: int) -> None:
        self._send_error = self._send_error or StreamReset(
            f"{self!r}: the peer stopped reading (code {code:#x})", code=code)

    def _on_connection_lost(self, error: TransportError) -> None:
        self._recv_error = self._recv_error or error
        self._send_error = self._send_error or error
        self._wake()


class MessageStream:
    """Whole messages (frames) over a ``Stream``, in the shape gossip's ``MessageChannel`` wants.

    ``receive`` raises ``anyio.EndOfStream`` at the peer's clean EOF and ``anyio.BrokenResourceError``
    (from the ``TransportError``) when the stream or connection broke or a frame was malformed, so
    code written against anyio streams needs no transport-specific handling.
    """

    def __init__(self, stream: Stream, *, max_size: int = MAX_FRAME) -> None:
        self.stream = stream
        self._frames = FrameChannel(stream, max_size=max_size)

    @property
    def peer_id(self) -> NodeId:
        return self.stream.peer_id

    async def send(self, message: bytes) -> None:
        try:
            await self._frames.send_frame(message)
        except TransportError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def receive(self) -> bytes:
        try:
            frame = await self._frames.receive_frame()
        except TransportError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        if frame is None:
            raise anyio.EndOfStream
        return frame

    async def send_eof(self) -> None:
        try:
            await self.stream.send_eof()
        except TransportError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        await self.stream.aclose()
