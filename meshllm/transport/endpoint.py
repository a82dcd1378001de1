"""One QUIC endpoint per node: a single UDP socket that both accepts and dials, and its peers.

Accepted and dialed connections share the socket (so ``--bind-port`` pins the one port a node
uses, and NAT mappings serve both directions); datagrams are routed to connections by QUIC
connection id. The endpoint keeps one authenticated connection per peer: when two exist (both
sides dialed at once, or a restarted peer redialed before its old connection timed out) both ends
keep the same one, chosen by a rule both can compute (``_rank``).

It owns the task group that runs incoming streams' handlers: connections announce streams from
aioquic's loop callbacks, where no task can be started, so they queue them on a memory object
stream that ``run`` drains into the group. It also sends a PING on every connection each
``ping_interval``, closes connections not heard from within ``peer_timeout``, and reports peers
up and down to listeners. That timeout is widened while this process's own event loop runs late
(``LoopHealth``), so a starved node does not mistake its own deafness for its peers' silence, and
outgoing handshakes take turns (``HandshakeBudget``), so a burst of redials cannot starve it.

The mesh secret it proves and demands can change while it runs (``switch_secret``, after a key
rotation): new handshakes use the new one, and connections already authenticated stay up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported without __all__
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from meshllm.state.schema import NodeId
from meshllm.store.identity import NodeIdentity
from meshllm.transport._aioquic import initial_decrypts
from meshllm.transport.auth import Handshake, Role
from meshllm.transport.budget import DialPriority, HandshakeBudget
from meshllm.transport.connection import Address, PeerConnection
from meshllm.transport.errors import ConnectionLost, ErrorCode, FrameError, TransportError
from meshllm.transport.health import LoopHealth
from meshllm.transport.refusals import RefusalLog
from meshllm.transport.stream import Stream, StreamKind
from meshllm.transport.tls import (TransportSettings, client_configuration, generate_credentials,
                                   server_configuration)

__all__ = ["EndpointStats", "PeerEvent", "PeerListener", "QuicEndpoint", "StreamHandler"]

log = logging.getLogger(__name__)

StreamHandler = Callable[[PeerConnection, Stream], Awaitable[None]]
MIN_INITIAL_DATAGRAM = 1200  # RFC 9000: a client's Initial is padded to at least this
RETIRE_LIMIT = 300.0  # seconds a replaced connection may stay open for the requests still on it
_now = time.monotonic


@dataclass(frozen=True)
class PeerEvent:
    """A peer became reachable (``up``) or its connection closed (``up`` is False)."""

    connection: PeerConnection
    up: bool

    @property
    def node_id(self) -> NodeId:
        return self.connection.node_id


PeerListener = Callable[[PeerEvent], None]


@dataclass
class EndpointStats:
    """Datagrams and bytes through the UDP socket (QUIC overhead included), for benchmarks."""

    datagrams_sent: int = 0
    bytes_sent: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0


_Job = tuple[StreamHandler, PeerConnection, Stream]


@dataclass
class _Running:
    transport: asyncio.DatagramTransport
    address: Address
    family: socket.AddressFamily
    jobs: MemoryObjectSendStream[_Job]  # incoming streams, from callbacks to the task group
    connections: set[PeerConnection] = field(default_factory=set)


def _literal(host: str, port: int, family: int) -> Address | None:
    """``(host, port)`` when ``host`` is an IP address of the socket's family, else None. Mesh
    addresses are literal IPs: resolving them through ``getaddrinfo`` took a thread each, and a
    node dialling many peers at once queued them behind asyncio's few executor threads."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    wanted = 6 if family == socket.AF_INET6 else 4
    return (str(ip), port) if ip.version == wanted else None


def _ping_due(conn: PeerConnection, silent: float, interval: float) -> bool:
    """Whether this side should PING ``conn`` now (each PING and its ACK cost both loops a packet).

    The dialer pings a connection each interval it has been quiet; the acceptor hears those pings
    (and ACKs them), so it pings only when they seem late (1.5 intervals) and, every 10 intervals,
    for RTT samples of its own. Both sides still hear the other at least once an interval, so the
    detection promise (silence over ``peer_timeout``) is unchanged, at about a quarter fewer
    datagrams than both sides pinging whenever quiet for an interval."""
    if conn.is_dialer:
        return silent >= interval * 0.9 or conn.since_ping >= interval * 4
    return silent >= interval * 1.5 or conn.since_ping >= interval * 10


class QuicEndpoint:
    """This node's QUIC endpoint: dial peers, accept them, serve their streams by kind."""

    def __init__(self, identity: NodeIdentity, mesh_id: str, secret: bytes, *,
                 host: str = "127.0.0.1", port: int = 0,
                 settings: TransportSettings | None = None, health: LoopHealth | None = None,
                 budget: HandshakeBudget | None = None,
                 retired: Callable[[str], bool] | None = None) -> None:
        """``health`` and ``budget`` are shared by the endpoints of one process when several run in
        it (their owner then runs ``health``); by default the endpoint makes and runs its own.
        ``retired(kid)`` says whether a key rotation retired a key id: a peer proving one is refused
        as such (``Refusal.RETIRED_KEY``)."""
        self.identity = identity
        self.mesh_id = mesh_id
        self._secret = secret
        self._retired = retired
        self._host = host
        self._port = port
        self.settings = settings or TransportSettings()
        credentials = generate_credentials()
        self._fingerprint = credentials.fingerprint
        self._server_config = server_configuration(credentials, self.settings)
        self._client_config = client_configuration(self.settings)
        self._by_cid: dict[bytes, PeerConnection] = {}
        self._peers: dict[NodeId, PeerConnection] = {}
        self._went_silent: dict[NodeId, float] = {}  # last heard, of peers whose connection closed for silence
        self._retiring: dict[PeerConnection, float] = {}  # replaced, closed once its requests end
        self._handlers: dict[StreamKind, StreamHandler] = {}
        self._listeners: list[PeerListener] = []
        self._running: _Running | None = None
        self.stats = EndpointStats()
        self._owns_health = health is None
        self.health = health or LoopHealth()
        self.budget = budget or HandshakeBudget(self.settings.max_dials)
        self.handshake_s = 0.0  # how long this endpoint's dials take to authenticate lately (EWMA)
        self._refused = RefusalLog()

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    @property
    def address(self) -> Address:
        """The bound (host, port); only while running."""
        return self._require_running().address

    @property
    def peers(self) -> dict[NodeId, PeerConnection]:
        """The authenticated connection to each connected peer, by node id."""
        return dict(self._peers)

    def peer(self, node_id: NodeId) -> PeerConnection | None:
        return self._peers.get(node_id)

    def silent_for(self, node_id: NodeId) -> float | None:
        """Seconds since anything was heard from ``node_id``: on its connection, or, once that was closed
        because the peer stopped answering, since then until a new connection comes up (a dial to a node
        cut off hangs until the dial times out). None when not known (never connected, or closed cleanly)."""
        conn = self._peers.get(node_id)
        if conn is not None:
            return conn.silent_for
        heard = self._went_silent.get(node_id)
        return None if heard is None else _now() - heard

    def switch_secret(self, secret: bytes) -> None:
        """Prove and demand ``secret`` in every handshake from now on (a rotated mesh key). The
        connections already authenticated stay: both of their ends were members."""
        self._secret = secret

    def on_stream(self, kind: StreamKind, handler: StreamHandler) -> None:
        """Run ``handler(conn, stream)`` for each incoming stream of ``kind`` (replacing any).

        The stream is closed (EOF) when the handler returns and reset if it raises; streams of a
        kind without a handler are reset at once.
        """
        self._handlers[kind] = handler

    def on_peer(self, listener: PeerListener) -> Callable[[], None]:
        """Call ``listener(event)`` when a peer comes up or goes down; returns an unsubscribe.

        Listeners run in the event loop's callback: they must not block and should only enqueue
        work; an exception is logged and ignored.
        """
        self._listeners.append(listener)
        return partial(self._unsubscribe, listener)

    def _unsubscribe(self, listener: PeerListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind the UDP socket, report its port, and serve until cancelled; then close all peers."""
        if self._running is not None:
            raise RuntimeError("this endpoint is already running")
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._on_datagram), local_addr=(self._host, self._port))
        except OSError as exc:
            raise TransportError(f"cannot bind UDP {self._host}:{self._port}: {exc}") from exc
        sockname = transport.get_extra_info("sockname")
        family = socket.AF_INET6 if len(sockname) == 4 else socket.AF_INET
        jobs, incoming = anyio.create_memory_object_stream[_Job](math.inf)
        try:
            async with jobs, incoming, anyio.create_task_group() as tg:
                self._running = _Running(transport, (sockname[0], sockname[1]), family, jobs)
                if self._owns_health:
                    await tg.start(self.health.run)
                tg.start_soon(self._keepalive)
                task_status.started(sockname[1])
                async for job in incoming:
                    tg.start_soon(self._serve_stream, *job)
        finally:
            self._shutdown()

    async def connect(self, host: str, port: int, *, timeout: float | None = None,
                      priority: DialPriority = DialPriority.NORMAL,
                      needed: Callable[[], bool] | None = None) -> PeerConnection:
        """An authenticated connection to the node at ``host:port``.

        Raises ``AuthError`` if either side refuses the other, ``ConnectionLost`` if nothing
        answers within ``auth_timeout``, ``TimeoutError`` past ``timeout``. If the peer already
        has a connection with us that wins over this one, that connection is returned instead.
        The handshake waits for a slot in the handshake budget first (by ``priority``);
        ``timeout`` counts from when it has one, and a dial whose ``needed()`` turned false while
        it waited (the peer dialled us meanwhile, the link moved) raises ``TransportError`` with
        code ``NOT_NEEDED`` instead of spending a handshake.
        """
        running = self._require_running()
        address = _literal(host, port, running.family)
        if address is None:  # a name: resolved in a worker thread (asyncio's executor has a few)
            infos = await anyio.getaddrinfo(host, port, family=running.family, type=socket.SOCK_DGRAM)
            if not infos:
                raise TransportError(f"cannot resolve {host}")
            address = (str(infos[0][4][0]), int(infos[0][4][1]))
        async with self.budget.slot(priority=priority):
            if needed is not None and not needed():
                raise TransportError(f"the dial to {host}:{port} is no longer needed", code=ErrorCode.NOT_NEEDED)
            started = _now()
            with anyio.fail_after(timeout):
                conn = await self._dial(address)
            took = _now() - started
            self.handshake_s = took if not self.handshake_s else 0.8 * self.handshake_s + 0.2 * took
            return conn

    async def _dial(self, address: Address) -> PeerConnection:
        quic = QuicConnection(configuration=self._client_config)
        conn = self._new_connection(quic, address, binding=b"")
        self._route(conn, quic.host_cid)
        conn.start_dial()
        try:
            await conn.wait_authenticated()
        except ConnectionLost as exc:
            winner = self._peers.get(conn.node_id)
            if exc.code == ErrorCode.DUPLICATE and winner is not None:
                return winner
            raise
        finally:
            if not conn.authenticated and not conn.closed:
                conn.close(ErrorCode.NO_ERROR, "dial abandoned")
        return conn

    # -- internals ----------------------------------------------------------------------------
    def _require_running(self) -> _Running:
        if self._running is None:
            raise TransportError("the QUIC endpoint is not running")
        return self._running

    def _new_handshake(self, role: Role, channel_binding: bytes) -> Handshake:
        return Handshake(identity=self.identity, mesh_id=self.mesh_id, secret=self._secret,
                         role=role, channel_binding=channel_binding, retired=self._retired)

    def _new_connection(self, quic: QuicConnection, address: Address, *,
                        binding: bytes) -> PeerConnection:
        running = self._require_running()
        conn = PeerConnection(quic, address=address, local_id=self.node_id,
                              settings=self.settings, hooks=self,
                              new_handshake=self._new_handshake, send_datagram=self._send,
                              channel_binding=binding)
        running.connections.add(conn)
        return conn

    def _route(self, conn: PeerConnection, cid: bytes) -> None:
        self._by_cid[cid] = conn
        conn.cids.add(cid)

    def _send(self, data: bytes, addr: Address) -> None:
        running = self._running
        if running is not None and not running.transport.is_closing():
            running.transport.sendto(data, addr)
            self.stats.datagrams_sent += 1
            self.stats.bytes_sent += len(data)

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        self.stats.datagrams_received += 1
        self.stats.bytes_received += len(data)
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self._server_config.connection_id_length)
        except ValueError:
            return  # not QUIC
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            conn = self._accept(header.packet_type, header.version, header.destination_cid, data, addr)
        if conn is not None:
            conn.datagram_received(data, addr)

    def _accept(self, packet_type: QuicPacketType, version: int | None, cid: bytes, data: bytes,
                addr: Address) -> PeerConnection | None:
        """A new connection for a client's first Initial, or None: not an Initial, junk that does not
        decrypt (no slot spent on it), or no handshake slot free (all of them, or this source's share)."""
        running = self._running
        if (running is None or packet_type != QuicPacketType.INITIAL
                or len(data) < MIN_INITIAL_DATAGRAM
                or version not in self._server_config.supported_versions):
            return None
        if not initial_decrypts(data, host_cid_length=self._server_config.connection_id_length):
            self._refused.note(addr, "an Initial that does not decrypt")
            return None
        pending = [c for c in running.connections if not c.authenticated]
        if len(pending) >= self.settings.max_handshakes:
            self._refused.note(addr, f"{len(pending)} handshakes in progress")
            return None
        if sum(1 for c in pending if c.address[0] == addr[0]) >= self.settings.max_handshakes_per_source:
            self._refused.note(addr, f"{self.settings.max_handshakes_per_source} handshakes in progress from {addr[0]}")
            return None
        quic = QuicConnection(configuration=self._server_config,
                              original_destination_connection_id=cid)
        conn = self._new_connection(quic, addr, binding=self._fingerprint)
        self._route(conn, cid)
        self._route(conn, quic.host_cid)
        return conn

    def _shutdown(self) -> None:
        running = self._running
        if running is None:
            return
        for conn in list(running.connections):  # while running, so the close frames go out
            conn.close(ErrorCode.SHUTDOWN, "node shutting down")
        self._running = None
        running.transport.close()

    def _retire(self, conn: PeerConnection) -> None:
        """``conn`` lost to a better connection to the same peer: new streams take the new one, and
        ``conn`` closes once the requests on it (HTTP and RPC streams) have ended, so a tie-break
        between two nodes that dialled each other at once never cuts a response short."""
        if conn.busy:
            self._retiring.setdefault(conn, _now())
        else:
            conn.close(ErrorCode.DUPLICATE, "replaced by another connection")

    def _close_retired(self) -> None:
        for conn, since in list(self._retiring.items()):
            if conn.closed:
                del self._retiring[conn]
            elif not conn.busy or _now() - since > RETIRE_LIMIT:
                del self._retiring[conn]
                conn.close(ErrorCode.DUPLICATE, "replaced by another connection")

    async def _keepalive(self) -> None:
        interval = self.settings.ping_interval
        while True:
            await anyio.sleep(interval)
            self._close_retired()
            running = self._require_running()
            for conn in list(running.connections):
                silent = conn.silent_for
                if conn.authenticated and silent > self.settings.peer_timeout and silent > (
                        allowed := self.health.allowance(self.settings.peer_timeout, conn.last_heard)):
                    log.warning("%r: nothing heard for %.1fs (allowed %.1fs), closing", conn, silent, allowed)
                    if self._peers.get(conn.node_id) is conn:
                        self._went_silent[conn.node_id] = conn.last_heard
                    conn.close(ErrorCode.PEER_TIMEOUT, "peer stopped answering")
                elif not conn.closed and _ping_due(conn, silent, interval):
                    conn.ping()

    async def _serve_stream(self, handler: StreamHandler, conn: PeerConnection,
                            stream: Stream) -> None:
        try:
            await handler(conn, stream)
        except FrameError as exc:
            log.warning("%r: malformed frame, stream reset: %s", stream, exc)
            stream.reset(ErrorCode.HANDLER_FAILED)
        except TransportError as exc:
            log.debug("%r: %s", stream, exc)
            stream.reset(ErrorCode.HANDLER_FAILED)
        except Exception:
            log.exception("%r: handler failed", stream)
            stream.reset(ErrorCode.HANDLER_FAILED)
        else:
            await stream.aclose()
        finally:
            stream.reset(ErrorCode.CANCELLED)  # no-op unless cancelled before closing

    def _emit(self, event: PeerEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("peer listener %r failed", listener)

    def _rank(self, conn: PeerConnection) -> tuple[bool, bool, int]:
        """Higher wins: alive, then dialed by the lower node id, then dialed later."""
        alive = conn.silent_for < self.settings.peer_timeout / 2
        return alive, conn.dialed_by == min(conn.node_id, self.node_id), conn.dialed_at

    # -- ConnectionHooks: called from the loop callback, never raise --------------------------
    def cid_issued(self, conn: PeerConnection, cid: bytes) -> None:
        self._route(conn, cid)

    def cid_retired(self, conn: PeerConnection, cid: bytes) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]
        conn.cids.discard(cid)

    def authenticated(self, conn: PeerConnection) -> None:
        existing = self._peers.get(conn.node_id)
        if existing is not None and existing is not conn:
            if self._rank(existing) >= self._rank(conn):
                log.info("%r: keeping the existing connection %r", conn, existing)
                conn.close(ErrorCode.DUPLICATE, "a connection to this peer already exists")
                return
            self._retire(existing)
        self._peers[conn.node_id] = conn
        self._went_silent.pop(conn.node_id, None)
        log.info("%r: authenticated", conn)
        self._emit(PeerEvent(conn, up=True))

    def stream_opened(self, conn: PeerConnection, stream: Stream) -> None:
        handler = self._handlers.get(stream.kind)
        running = self._running
        if handler is None or running is None:
            log.warning("%r: no handler for %s streams, rejected", conn, stream.kind.value)
            stream.reset(ErrorCode.STREAM_REJECTED)
            return
        try:
            running.jobs.send_nowait((handler, conn, stream))
        except anyio.ClosedResourceError:  # shutting down
            stream.reset(ErrorCode.STREAM_REJECTED)

    def terminated(self, conn: PeerConnection) -> None:
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.cids.clear()
        self._retiring.pop(conn, None)
        if self._running is not None:
            self._running.connections.discard(conn)
        if self._peers.get(conn.node_id) is conn:
            del self._peers[conn.node_id]
            log.info("%r: disconnected: %s", conn, conn.close_error)
            self._emit(PeerEvent(conn, up=False))


class _Datagrams(asyncio.DatagramProtocol):
    """The UDP socket's protocol: hands every datagram to the endpoint's router."""

    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            self._on_datagram(data, (str(addr[0]), int(addr[1])))
        except Exception:
            log.exception("error handling a datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)
