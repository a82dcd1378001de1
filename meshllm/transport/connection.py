"""One QUIC connection to a peer: aioquic's sans-I/O state machine bridged to anyio tasks.

aioquic reports everything through events pulled after each datagram or timer. This module runs
those in the event-loop callback (``datagram_received``, timers) and keeps the callback side
small: it drives the auth handshake synchronously (so its outcome is ordered with every other
stream's events), buffers stream bytes into ``Stream`` objects, wakes waiting tasks, and tells the
endpoint through ``ConnectionHooks``. It never raises into the loop and never spawns tasks itself;
the endpoint owns the task group.

Until authentication completes, stream 0 carries the handshake and nothing else is served: streams
the peer opens early are held (at most ``MAX_EARLY_STREAMS``, ``MAX_EARLY_BYTES`` in all) and handed
out only once the peer is proven; if it never is, the connection closes and they are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.lowlevel
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from meshllm.state.schema import NodeId
from meshllm.transport._aioquic import AckPolicy, peer_certificate_der, send_backlog, smoothed_rtt
from meshllm.transport.auth import AUTH_STREAM_ID, AuthResult, Handshake, Role
from meshllm.transport.errors import (AuthError, ConnectionLost, ErrorCode, FrameError, Refusal,
                                      StreamReset, TransportError)
from meshllm.transport.framing import FrameDecoder
from meshllm.transport.stream import MAX_HEADER, Stream, StreamKind, decode_stream_header, \
    encode_stream_header
from meshllm.transport.tls import TransportSettings, certificate_fingerprint

__all__ = ["Address", "ConnectionHooks", "PeerConnection"]

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_EARLY_STREAMS = 16
MAX_EARLY_BYTES = 256 * 1024
HandshakeFactory = Callable[[Role, bytes], Handshake]

# aioquic's clock. The event loop's own (uvloop's has millisecond steps) would quantise every RTT
# sample to whole milliseconds; timers still go through ``loop.call_at``, which is within a
# millisecond of this clock under both asyncio and uvloop (both read CLOCK_MONOTONIC).
_now = time.monotonic


class ConnectionHooks(Protocol):
    """How a connection reports to its endpoint; called from the loop callback, must not raise."""

    def cid_issued(self, conn: PeerConnection, cid: bytes) -> None: ...

    def cid_retired(self, conn: PeerConnection, cid: bytes) -> None: ...

    def authenticated(self, conn: PeerConnection) -> None: ...

    def stream_opened(self, conn: PeerConnection, stream: Stream) -> None: ...

    def terminated(self, conn: PeerConnection) -> None: ...


class PeerConnection:
    """An authenticated connection to one peer node, multiplexing streams of every kind."""

    def __init__(self, quic: QuicConnection, *, address: Address, local_id: NodeId,
                 settings: TransportSettings, hooks: ConnectionHooks,
                 new_handshake: HandshakeFactory, send_datagram: Callable[[bytes, Address], None],
                 channel_binding: bytes = b"") -> None:
        self._quic = quic
        self._acks = AckPolicy(quic)
        self.address = address
        self.local_id = local_id
        self.is_dialer = quic.configuration.is_client
        self._settings = settings
        self._hooks = hooks
        self._new_handshake = new_handshake
        self._send_datagram = send_datagram
        self._loop = asyncio.get_running_loop()
        self._handshake = None if self.is_dialer else new_handshake(Role.SERVER, channel_binding)
        self._auth: AuthResult | None = None
        self._tls_done = False
        self._streams: dict[int, Stream] = {}
        self._headers: dict[int, FrameDecoder] = {}
        self._early: list[Stream] = []
        self._early_bytes = 0
        self._peer_streams_next = 1 if self.is_dialer else 4  # lowest peer stream id not yet seen
        self._peer_stream_gaps: set[int] = set()
        self._room_waiters: dict[int, anyio.Event] = {}
        self._pings = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._auth_timer = self._loop.call_later(settings.auth_timeout, self._on_auth_timeout)
        self._failure: TransportError | None = None
        self._finished = False
        self._settled = anyio.Event()  # authenticated or finished
        self._closed_event = anyio.Event()
        self.last_heard = self.opened_at = _now()
        self._pinged_at = 0.0
        self._busy_until = 0.0
        self.cids: set[bytes] = set()  # this connection's ids in the endpoint's routing table

    def __repr__(self) -> str:
        state = "closed" if self._finished else "up" if self._auth else "authenticating"
        return f"<PeerConnection {self.node_id} {self.address[0]}:{self.address[1]} {state}>"

    # -- public -------------------------------------------------------------------------------
    @property
    def node_id(self) -> NodeId:
        """The peer's node id (proven once authenticated; before that, claimed or ``"?"``)."""
        if self._auth is not None:
            return self._auth.node_id
        hello = self._handshake.peer_hello if self._handshake is not None else None
        return hello.node_id if hello is not None else NodeId("?")

    @property
    def public_key(self) -> bytes:
        return self._authenticated().public_key

    @property
    def dialed_by(self) -> NodeId:
        """The node id of the side that opened this connection."""
        return self.local_id if self.is_dialer else self.node_id

    @property
    def dialed_at(self) -> int:
        """When the dialer opened it (its wall clock, ns): orders two connections to one peer."""
        return self._authenticated().dialed_at

    @property
    def authenticated(self) -> bool:
        return self._auth is not None and not self._finished

    @property
    def closed(self) -> bool:
        return self._finished

    @property
    def close_error(self) -> TransportError | None:
        """Why the connection closed (``None`` while open)."""
        return self._failure if self._finished else None

    @property
    def busy(self) -> bool:
        """Whether a stream other than gossip is open (a tunnelled request, an RPC session)."""
        return any(stream.kind is not StreamKind.GOSSIP for stream in self._streams.values())

    @property
    def connected_for(self) -> float:
        return _now() - self.opened_at

    @property
    def idle_for(self) -> float:
        """Seconds since a stream other than gossip was last open (or since the connection opened)."""
        return 0.0 if self.busy else _now() - max(self.opened_at, self._busy_until)

    @property
    def since_ping(self) -> float:
        """Seconds since this side last sent a PING."""
        return _now() - self._pinged_at

    @property
    def silent_for(self) -> float:
        """Seconds since the last datagram from the peer."""
        return _now() - self.last_heard

    @property
    def rtt(self) -> float:
        """aioquic's smoothed round-trip time to the peer, in seconds."""
        return smoothed_rtt(self._quic)

    async def open_stream(self, kind: StreamKind) -> Stream:
        """A new stream of ``kind``; the peer's handler for that kind receives it."""
        await anyio.lowlevel.checkpoint()
        return self._open_stream_with_header(encode_stream_header(kind), kind)

    async def aclose(self, *, code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        self.close(code, reason)
        await anyio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """Send CONNECTION_CLOSE and release everything now (no draining period is awaited)."""
        if self._finished:
            return
        try:
            self._quic.close(error_code=code, reason_phrase=reason)
            self.transmit()
        except Exception:
            log.exception("%r: error while closing", self)
        self._finish(ConnectionLost(f"connection to {self.node_id} closed here: {reason}",
                                    code=code))

    # -- for the endpoint ---------------------------------------------------------------------
    def start_dial(self) -> None:
        self._quic.connect(self.address, now=_now())
        self.transmit()

    async def wait_authenticated(self) -> None:
        """Return once authenticated; raise why not (``AuthError``, ``ConnectionLost``)."""
        await self._settled.wait()
        if self._finished or self._auth is None:
            assert self._failure is not None
            raise self._failure

    def ping(self) -> None:
        """Send a QUIC PING: the peer's ACK refreshes ``last_heard`` (and aioquic's RTT)."""
        def send() -> None:
            self._quic.send_ping(next(self._pings))
            self._pinged_at = _now()
            self.transmit()
        if not self._finished:
            self._guarded(send)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self._finished:
            return
        now = self.last_heard = _now()
        try:
            self._quic.receive_datagram(data, addr, now=now)
            stream_data = self._process_events()
            defer = self._acks.received(now, stream_data=stream_data)
        except Exception:  # a bug here must not take the endpoint down with it
            log.exception("%r: error handling a datagram", self)
            self.close(ErrorCode.PROTOCOL, "internal error")
            return
        if defer and self._auth is not None and not self._finished and not self._room_waiters:
            self._arm_timer()  # nothing to send now; an ACK owed leaves on its timer
        else:
            self._transmit_soon()  # after every datagram of this wakeup: one ACK covers a burst

    def transmit(self) -> None:
        """Send what aioquic has queued, re-arm its timer, and wake writers that have room."""
        self._transmit_handle = None
        if self._finished:
            return
        now = _now()
        for data, addr in self._quic.datagrams_to_send(now=now):
            self._send_datagram(data, addr)
        self._acks.sent()
        self._arm_timer()
        if self._room_waiters:
            self._wake_writers()

    def _arm_timer(self) -> None:
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._on_timer)
        self._timer_at = timer_at

    # -- timers and events (loop callbacks) ---------------------------------------------------
    def _transmit_soon(self) -> None:
        if self._transmit_handle is None and not self._finished:
            self._transmit_handle = self._loop.call_soon(self._guarded, self.transmit)

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("%r: internal error", self)
            self.close(ErrorCode.PROTOCOL, "internal error")

    def _on_timer(self) -> None:
        def fire() -> None:
            now = max(self._timer_at or 0.0, _now())
            self._timer = self._timer_at = None
            self._quic.handle_timer(now=now)
            self._process_events()
            self.transmit()
        self._guarded(fire)

    def _on_auth_timeout(self) -> None:
        if self._auth is not None or self._finished:
            return
        limit = self._settings.auth_timeout
        if not self._tls_done:
            self._failure = ConnectionLost(
                f"no QUIC handshake with {self.address[0]}:{self.address[1]} within {limit:g}s",
                code=ErrorCode.AUTH_TIMEOUT)
        else:
            self._failure = AuthError(f"authentication did not finish within {limit:g}s",
                                      code=ErrorCode.AUTH_TIMEOUT)
        self.close(ErrorCode.AUTH_TIMEOUT, "authentication timed out")

    def _process_events(self) -> bool:
        """Handle aioquic's events; returns whether any carried stream data."""
        stream_data = False
        while not self._finished and (event := self._quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                stream_data = True
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream._on_reset(event.error_code)
                self._headers.pop(event.stream_id, None)
            elif isinstance(event, events.StopSendingReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream._on_stop_sending(event.error_code)
                    self._wake_writer(event.stream_id)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_tls_ready()
            elif isinstance(event, events.ConnectionIdIssued):
                self._hooks.cid_issued(self, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._hooks.cid_retired(self, event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event)
        return stream_data

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        code, reason = event.error_code, event.reason_phrase or "closed"
        by_app = event.frame_type is None
        if by_app and self._auth is None and code in (ErrorCode.AUTH_FAILED,
                                                      ErrorCode.AUTH_TIMEOUT):
            error: TransportError = AuthError(f"refused by the peer: {reason}", code=code,
                                              refusal=Refusal.from_reason(reason))
        elif not self._tls_done:
            error = ConnectionLost(f"no QUIC handshake with {self.address[0]}:{self.address[1]}: "
                                   f"{reason}", code=code)
        else:
            error = ConnectionLost(f"connection to {self.node_id} lost: {reason} (code {code:#x})",
                                   code=code if by_app else None)
        self._finish(error)

    def _finish(self, error: TransportError) -> None:
        if self._finished:
            return
        self._finished = True
        self._failure = self._failure or error
        for handle in (self._timer, self._transmit_handle, self._auth_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._transmit_handle = None
        for stream in list(self._streams.values()):
            stream._on_connection_lost(self._failure)
        for event in self._room_waiters.values():
            event.set()
        self._room_waiters.clear()
        self._early.clear()
        self._settled.set()
        self._closed_event.set()
        self._hooks.terminated(self)

    def _refuse(self, error: AuthError) -> None:
        log.warning("refused %s:%d (claims %s): %s", *self.address, self.node_id, error)
        self._failure = error
        self.close(error.code or ErrorCode.AUTH_FAILED, error.peer_reason)

    # -- authentication -----------------------------------------------------------------------
    def _on_tls_ready(self) -> None:
        self._tls_done = True
        if not self.is_dialer:
            return
        der = peer_certificate_der(self._quic)
        if der is None:
            self._refuse(AuthError("the peer presented no TLS certificate"))
            return
        self._handshake = self._new_handshake(Role.CLIENT, certificate_fingerprint(der))
        stream_id = self._quic.get_next_available_stream_id()
        assert stream_id == AUTH_STREAM_ID, "the auth stream must be the first stream"
        self._quic.send_stream_data(stream_id, self._handshake.start())

    def _on_auth_data(self, data: bytes, fin: bool) -> None:
        handshake = self._handshake
        if self._auth is not None or handshake is None:
            return  # after auth stream 0 only carries the FIN; before TLS nothing can arrive
        try:
            reply = handshake.receive(data)
            if fin and not handshake.done:
                raise AuthError("the peer ended the auth stream early")
        except AuthError as exc:
            self._refuse(exc)
            return
        if reply or handshake.done:
            self._quic.send_stream_data(AUTH_STREAM_ID, reply, end_stream=handshake.done)
        if handshake.done:
            self._on_authenticated(handshake.result)

    def _on_authenticated(self, result: AuthResult) -> None:
        self._auth = result
        self._auth_timer.cancel()
        early, self._early = self._early, []
        self._hooks.authenticated(self)  # may close this connection (a duplicate)
        self._settled.set()
        for stream in early:
            if not self._finished and stream.stream_id in self._streams:
                self._hooks.stream_opened(self, stream)

    def _authenticated(self) -> AuthResult:
        if self._auth is None:
            raise TransportError(f"{self!r} is not authenticated")
        return self._auth

    # -- streams ------------------------------------------------------------------------------
    def _open_stream_with_header(self, header: bytes, kind: StreamKind) -> Stream:
        if self._finished:
            assert self._failure is not None
            raise self._failure
        self._authenticated()
        stream_id = self._quic.get_next_available_stream_id()
        stream = Stream(self, stream_id, kind, chunk=max(1, self._settings.send_buffer // 4))
        self._streams[stream_id] = stream
        self._quic.send_stream_data(stream_id, header)
        self._transmit_soon()
        return stream

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        """Whether ``stream_id`` is a bidirectional stream the peer opens for the first time."""
        if stream_id % 4 != (1 if self.is_dialer else 0):
            return False  # ours, or unidirectional (meshllm opens none)
        if stream_id >= self._peer_streams_next:
            self._peer_stream_gaps.update(range(self._peer_streams_next, stream_id, 4))
            self._peer_streams_next = stream_id + 4
            return True
        if stream_id in self._peer_stream_gaps:
            self._peer_stream_gaps.discard(stream_id)
            return True
        return False

    def _on_stream_data(self, stream_id: int, data: bytes, fin: bool) -> None:
        if stream_id == AUTH_STREAM_ID:
            self._on_auth_data(data, fin)
            return
        if self._auth is None:
            self._early_bytes += len(data)
            if self._early_bytes > MAX_EARLY_BYTES:
                self._refuse(AuthError("too much stream data before authentication"))
                return
        if (stream := self._streams.get(stream_id)) is not None:
            stream._on_data(data, fin)
            return
        decoder = self._headers.get(stream_id)
        if decoder is None:
            if not self._is_new_peer_stream(stream_id):
                return  # a stream already closed here, or one we never accept
            decoder = self._headers[stream_id] = FrameDecoder(max_size=MAX_HEADER)
        self._on_header_data(stream_id, decoder, data, fin)

    def _on_header_data(self, stream_id: int, decoder: FrameDecoder, data: bytes,
                        fin: bool) -> None:
        try:
            decoder.feed(data)
            payload = decoder.pop()
            if payload is None:
                if fin:
                    raise FrameError("the stream ended before its header")
                return
            kind = decode_stream_header(payload)
        except FrameError as exc:
            del self._headers[stream_id]
            log.warning("%r: rejected stream %d: %s", self, stream_id, exc)
            self._stream_abort(stream_id, ErrorCode.STREAM_REJECTED, send=True, receive=not fin)
            return
        del self._headers[stream_id]
        stream = Stream(self, stream_id, kind, chunk=max(1, self._settings.send_buffer // 4))
        self._streams[stream_id] = stream
        rest = decoder.take_rest()
        if rest or fin:
            stream._on_data(rest, fin)
        if self._auth is not None:
            self._hooks.stream_opened(self, stream)
        elif len(self._early) < MAX_EARLY_STREAMS:
            self._early.append(stream)
        else:
            self._refuse(AuthError("too many streams before authentication"))

    # -- StreamOwner: called by Stream --------------------------------------------------------
    def _stream_write(self, stream_id: int, data: bytes, *, end: bool) -> None:
        if self._finished:
            assert self._failure is not None
            raise self._failure
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end)
        except (ValueError, RuntimeError) as exc:
            raise StreamReset(f"cannot send on stream {stream_id}: {exc}") from None
        self._transmit_soon()

    async def _stream_wait_room(self, stream: Stream) -> None:
        limit = self._settings.send_buffer
        while (stream._wants_room and not self._finished
               and send_backlog(self._quic, stream.stream_id) >= limit):
            event = self._room_waiters[stream.stream_id] = anyio.Event()
            await event.wait()

    def _wake_writers(self) -> None:
        low = self._settings.send_buffer // 2
        for stream_id in list(self._room_waiters):
            stream = self._streams.get(stream_id)
            if stream is None or not stream._wants_room or send_backlog(self._quic,
                                                                        stream_id) < low:
                self._wake_writer(stream_id)

    def _wake_writer(self, stream_id: int) -> None:
        if (event := self._room_waiters.pop(stream_id, None)) is not None:
            event.set()

    def _stream_abort(self, stream_id: int, code: int, *, send: bool, receive: bool) -> None:
        if self._finished:
            return
        if send:
            with contextlib.suppress(ValueError, RuntimeError):  # already finished that way
                self._quic.reset_stream(stream_id, code)
        if receive:
            with contextlib.suppress(ValueError, RuntimeError):
                self._quic.stop_stream(stream_id, code)
        self._transmit_soon()

    def _stream_done(self, stream: Stream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            if stream.kind is not StreamKind.GOSSIP:
                self._busy_until = _now()
        self._wake_writer(stream.stream_id)
