"""ggml RPC across the mesh: a split's host reaches its workers' ggml-rpc-servers through QUIC.

A worker's ggml-rpc-server binds 127.0.0.1 and demands the mesh's RPC key (``engine.rpc_auth``)
before any command, so only the mesh reaches it and only mesh members can use it. On the host,
``RpcTunnelClient.open(node, target)`` listens on a free 127.0.0.1 port that the host's
llama-server is given as ``--rpc 127.0.0.1:<port>``. Each TCP connection accepted there gets
its own RPC-kind QUIC stream to the worker, which opens with one request frame naming the target (a
model name); the worker's ``RpcTunnelServer`` looks up the local ggml-rpc-server for it, connects,
and answers one reply frame: ok, or why not (unknown target, rpc-server not running). From then on
both ends pipe raw bytes, unchanged, until either side closes.

Any end of a session ends all of it: EOF or a broken stream on one side closes the other, so a
worker that goes away (its rpc-server died, its node or the link broke) shows up at the host's
llama-server as a closed RPC connection, and llama-server aborts (any RPC failure is fatal to it);
supervising that is the reconcilers' business.

This path is latency-bound: every decoded token waits for one RPC round trip per worker, through
host TCP, QUIC and worker TCP and back. So the pipes read as much as has arrived in one go (up to
``READ_SIZE``), forward it with one call, and take no extra task, copy or timer per chunk.

    client = RpcTunnelClient(mesh.connect, key=rpc_key(secret))          # host
    await tg.start(client.run)
    port = await client.open(worker_id, "gemma-3-270m")
    serve_streams(endpoint, [RpcTunnelServer(rpc_endpoints.get)])     # worker: target -> (host, port)

The worker's end is a stream service (``tunnels.service``) the node registers on its endpoint.

The tunnel is the slow way (the agents' Python carries every RPC message) and the fallback. By
default a worker's rpc-server listens on its node's address too (published as
``WorkerStatus.direct``), and the host's llama-server connects to it straight (``endpoint`` gives
that address once ``probe`` reached it): both prove the mesh's RPC key, then every message crosses
sealed with AES-256-GCM inside the engine (patch 0005), so no agent touches the bytes.
``--rpc-direct`` (``clear``) keeps the key but skips the sealing (trusted networks); a worker the host
cannot reach over TCP, or one started with ``--rpc-tunnel``, is reached through the tunnel.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, TaskStatus

from meshllm.engine.rpc_auth import RpcAuthError, authenticate
from meshllm.state.schema import ModelName, NodeId
from meshllm.transport import (FrameDecoder, FrameError, PeerConnection, Stream, StreamKind, TransportError,
                               decode_message, encode_message)
from meshllm.transport.errors import ErrorCode

__all__ = ["RpcTunnelClient", "RpcTunnelError", "RpcTunnelServer", "Traffic", "decode_reply",
           "decode_request", "encode_reply", "encode_request"]

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds for the request or the reply frame to arrive
CONNECT_TIMEOUT = 10.0  # seconds to reach the worker node, or the worker's rpc-server
PROTOCOL_VERSION = 1
PROBE_TIMEOUT = 3.0  # seconds a host waits for a worker to accept a test session before a split starts

MAX_HEADER = 4096  # a request or reply frame; it names a target (a model name)
READ_SIZE = 4 * 1024 * 1024  # whatever has arrived, in one piece (weights cross at load in MBs)

Connect = Callable[[NodeId], Awaitable[PeerConnection]]
Lookup = Callable[[ModelName], tuple[str, int] | None]  # target -> where its ggml-rpc-server listens
DirectLookup = Callable[[NodeId, ModelName], str | None]  # (worker node, target) -> "host:port" of a direct rpc-server


@dataclass
class Traffic:
    """Bytes a tunnel carried: ``sent`` from the host's side towards the worker, ``received`` back."""

    sent: int = 0
    received: int = 0
    sessions: int = 0


def nodelay(tcp: anyio.abc.SocketStream) -> None:
    """Every RPC message is latency-bound: never let Nagle hold one back."""
    tcp.extra(SocketAttribute.raw_socket).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RpcTunnelError(Exception):
    """A tunnel session could not start: the peer's reply said why, or it was malformed."""


# -- the request and reply frames ---------------------------------------------------------------
def encode_request(target: ModelName) -> bytes:
    """The frame a host sends first on an RPC stream: which ggml-rpc-server it wants."""
    return encode_message({"v": PROTOCOL_VERSION, "target": target}, max_size=MAX_HEADER)


def decode_request(payload: bytes) -> ModelName:
    """The target named in a request frame's payload; ``FrameError`` if malformed."""
    target = decode_message(payload).get("target")
    if not isinstance(target, str) or not target:
        raise FrameError("RPC tunnel request without a target")
    return ModelName(target)


def encode_reply(error: str | None = None, *, code: str = "") -> bytes:
    """The worker's answer: ok (``error`` None), or an error message and a short code."""
    message: dict[str, Any] = {"ok": True} if error is None else {"ok": False, "error": error[:512],
                                                                   "code": code}
    return encode_message(message, max_size=MAX_HEADER)


def decode_reply(payload: bytes) -> None:
    """Return if the reply says ok; raise ``RpcTunnelError`` with the worker's reason if not."""
    try:
        message = decode_message(payload)
    except FrameError as exc:
        raise RpcTunnelError(f"malformed reply: {exc}") from None
    if message.get("ok") is True:
        return
    raise RpcTunnelError(f"{message.get('code') or 'refused'}: {message.get('error')}")


async def _receive_frame(stream: Stream) -> tuple[bytes, bytes]:
    """The first frame on ``stream`` and whatever raw bytes arrived after it."""
    decoder = FrameDecoder(max_size=MAX_HEADER)
    with anyio.fail_after(HEADER_TIMEOUT):
        while (frame := decoder.pop()) is None:
            data = await stream.receive(MAX_HEADER)
            if not data:
                raise FrameError("the stream ended before its header")
            decoder.feed(data)
    return frame, decoder.take_rest()


# -- the pipe ---------------------------------------------------------------------------------
async def _tcp_to_quic(tcp: anyio.abc.SocketStream, stream: Stream, traffic: Traffic) -> str:
    try:
        while True:
            data = await tcp.receive(READ_SIZE)
            traffic.sent += len(data)
            await stream.send(data)
    except anyio.EndOfStream:
        try:
            await stream.send_eof()
        except TransportError:
            pass
        return "TCP side closed"
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        stream.reset(ErrorCode.CANCELLED)
        return f"TCP side broke: {exc!r}"
    except TransportError as exc:
        return f"QUIC stream broke: {exc}"


async def _quic_to_tcp(stream: Stream, tcp: anyio.abc.SocketStream, early: bytes, traffic: Traffic) -> str:
    try:
        if early:
            traffic.received += len(early)
            await tcp.send(early)
        while data := await stream.receive(READ_SIZE):
            traffic.received += len(data)
            await tcp.send(data)
        await tcp.send_eof()
        return "QUIC side closed"
    except TransportError as exc:
        return f"QUIC stream broke: {exc}"
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        stream.reset(ErrorCode.CANCELLED)
        return f"TCP side broke: {exc!r}"


async def pipe(tcp: anyio.abc.SocketStream, stream: Stream, *, early: bytes = b"",
               traffic: Traffic | None = None) -> str:
    """Copy bytes both ways until either side ends (EOF or an error); returns how it ended.

    The first direction to end ends the session: its EOF is passed on, then both sides close (an
    RPC session is over once either party is gone; a half-open tunnel would only hide that)."""
    ended: list[str] = []
    counts = traffic if traffic is not None else Traffic()
    counts.sessions += 1
    async with anyio.create_task_group() as tg:
        async def run(direction: Callable[[], Awaitable[str]]) -> None:
            ended.append(await direction())
            tg.cancel_scope.cancel()

        tg.start_soon(run, lambda: _tcp_to_quic(tcp, stream, counts))
        tg.start_soon(run, lambda: _quic_to_tcp(stream, tcp, early, counts))
    return ended[0] if ended else "cancelled"


# -- worker side --------------------------------------------------------------------------------
class RpcTunnelServer:
    """The worker's end, a stream service for RPC streams: each is connected to the local
    ggml-rpc-server its request names."""

    kind = StreamKind.RPC

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    async def handle(self, conn: PeerConnection, stream: Stream, /) -> None:
        """One tunnel session. Never raises: the endpoint's task group runs it."""
        try:
            await self._serve(conn, stream)
        except Exception:  # a bug here must not reach the endpoint; the session just ends
            log.exception("%r: RPC tunnel session failed", stream)
            stream.reset(ErrorCode.HANDLER_FAILED)

    async def _serve(self, conn: PeerConnection, stream: Stream) -> None:
        try:
            frame, early = await _receive_frame(stream)
            target = decode_request(frame)
        except (FrameError, TimeoutError) as exc:
            log.warning("%r: bad RPC tunnel request from %s: %s", stream, conn.node_id, exc)
            stream.reset(ErrorCode.STREAM_REJECTED)
            return
        except TransportError:
            return  # the host went away before asking
        tcp = await self._connect(target, stream)
        if tcp is None:
            return
        async with tcp:
            try:
                await stream.send(encode_reply())
            except TransportError:
                return
            log.info("RPC tunnel from %s to %s opened", conn.node_id, target)
            how = await pipe(tcp, stream, early=early)
            log.info("RPC tunnel from %s to %s ended: %s", conn.node_id, target, how)
        await stream.aclose()

    async def _connect(self, target: ModelName, stream: Stream) -> anyio.abc.SocketStream | None:
        """A connection to ``target``'s ggml-rpc-server, or None after telling the host why not."""
        where = self._lookup(target)
        if where is None:
            await self._refuse(stream, f"no rpc-server for {target!r} on this node", "unknown_target")
            return None
        host, port = where
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                tcp = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError) as exc:
            await self._refuse(stream, f"rpc-server for {target!r} (port {port}) is not running: {exc}",
                               "rpc_unavailable")
            return None
        nodelay(tcp)
        return tcp

    async def _refuse(self, stream: Stream, reason: str, code: str) -> None:
        log.warning("%r: refused an RPC tunnel: %s", stream, reason)
        try:
            await stream.send(encode_reply(reason, code=code))
            await stream.send_eof()
        except TransportError:
            pass


# -- host side ----------------------------------------------------------------------------------
@dataclass
class _Listener:
    node_id: NodeId
    target: ModelName
    port: int
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    traffic: Traffic = field(default_factory=Traffic)


class RpcTunnelClient:
    """The host's end: local TCP listeners whose connections each become a stream to a worker."""

    def __init__(self, connect: Connect, *, key: str = "", direct: DirectLookup | None = None,
                 clear: bool = False) -> None:
        self._connect = connect
        self.key = key  # the mesh's RPC key (rpc_auth.rpc_key): the host's llama-server proves it to workers
        self.clear = clear  # --rpc-direct: the host's llama-server asks for the unsealed channel
        self._direct = direct  # workers whose rpc-server llama-server may reach straight (None: --rpc-tunnel)
        self._unreachable: set[tuple[NodeId, ModelName]] = set()  # direct addresses the last probe could not reach
        self._listeners: dict[tuple[NodeId, ModelName], _Listener] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the listeners and their sessions until cancelled; then close them all."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._listeners.clear()

    def tunnels(self) -> list[dict[str, object]]:
        """The open tunnels and what they carried (for /api/status: bytes over RPC, e.g. at load)."""
        return [{"node": t.node_id, "target": t.target, "port": t.port, "sent": t.traffic.sent,
                 "received": t.traffic.received, "sessions": t.traffic.sessions}
                for t in self._listeners.values()]

    def port(self, node_id: NodeId, target: ModelName) -> int | None:
        """The local port of an open tunnel, else None."""
        listener = self._listeners.get((node_id, target))
        return listener.port if listener is not None else None

    def _direct_address(self, node_id: NodeId, target: ModelName) -> str | None:
        return self._direct(node_id, target) if self._direct is not None else None

    async def endpoint(self, node_id: NodeId, target: ModelName) -> str:
        """The ``host:port`` the host's llama-server is given for ``target``'s worker on ``node_id``:
        the worker's rpc-server itself when it publishes an address the last probe reached, else a
        tunnel's local port."""
        direct = self._direct_address(node_id, target)
        if direct and (node_id, target) not in self._unreachable:
            return direct
        return f"127.0.0.1:{await self.open(node_id, target)}"

    def tunnelled(self, endpoint: str) -> bool:
        """Whether ``endpoint`` is one of this node's tunnel listeners (not a worker's own rpc-server)."""
        return any(endpoint == f"127.0.0.1:{listener.port}" for listener in self._listeners.values())

    async def open(self, node_id: NodeId, target: ModelName) -> int:
        """The 127.0.0.1 port that tunnels to ``target``'s rpc-server on ``node_id`` (reused if open).

        Listening needs no connection to the worker yet: each accepted TCP connection dials (if
        needed) and asks the worker when it arrives, and is closed if that fails."""
        if (listener := self._listeners.get((node_id, target))) is not None:
            return listener.port
        if self._tg is None:
            raise RuntimeError("RpcTunnelClient.run is not running")
        multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0,
                                                family=socket.AF_INET)
        tcp_listener = multi.listeners[0]  # one address, one socket
        assert isinstance(tcp_listener, anyio.abc.SocketListener)
        port = int(tcp_listener.extra(SocketAttribute.local_port))
        listener = self._listeners[(node_id, target)] = _Listener(node_id, target, port)
        self._tg.start_soon(self._serve_listener, listener, tcp_listener)
        log.info("RPC tunnel to %s on %s listens on 127.0.0.1:%d", target, node_id, port)
        return port

    async def close(self, node_id: NodeId, target: ModelName) -> None:
        """Stop listening for that tunnel and end its sessions; a no-op if it is not open."""
        listener = self._listeners.pop((node_id, target), None)
        if listener is not None:
            listener.scope.cancel()
            await listener.done.wait()

    async def _serve_listener(self, listener: _Listener,
                              tcp_listener: anyio.abc.SocketListener) -> None:
        try:
            with listener.scope:
                async with tcp_listener, anyio.create_task_group() as sessions:
                    while True:
                        tcp = await tcp_listener.accept()
                        sessions.start_soon(self._session, listener, tcp)
        except Exception:  # accept failing (out of descriptors) ends this tunnel, not the node
            log.exception("RPC tunnel listener on 127.0.0.1:%d failed", listener.port)
        finally:
            if self._listeners.get((listener.node_id, listener.target)) is listener:
                del self._listeners[(listener.node_id, listener.target)]
            listener.done.set()

    async def _session(self, listener: _Listener, tcp: anyio.abc.SocketStream) -> None:
        """One TCP connection from llama-server, carried by its own QUIC stream. Never raises."""
        where = f"RPC tunnel to {listener.target} on {listener.node_id}"
        async with tcp:
            try:
                nodelay(tcp)
                stream, early = await self._start(listener)
            except (TransportError, RpcTunnelError, OSError, TimeoutError) as exc:
                log.warning("%s: connection refused: %s", where, exc)
                return
            except Exception:
                log.exception("%s: failed to start", where)
                return
            try:
                how = await pipe(tcp, stream, early=early, traffic=listener.traffic)
                log.info("%s: session ended: %s", where, how)
            finally:
                await stream.aclose()

    async def probe(self, node_id: NodeId, target: ModelName) -> str | None:
        """None when ``node_id``'s worker for ``target`` accepts a session now (its rpc-server
        running and reachable straight or through the mesh), else why not. The session is closed at
        once. A worker whose published address cannot be reached is used through the tunnel."""
        direct = self._direct_address(node_id, target)
        if direct:
            problem = await self._probe_direct(direct)
            if problem is None:
                self._unreachable.discard((node_id, target))
                return None
            log.warning("worker %s for %s: %s; trying the RPC tunnel", node_id, target, problem)
            self._unreachable.add((node_id, target))
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                stream, _ = await self._start(_Listener(node_id, target, 0))
        except TimeoutError:
            return f"no answer within {PROBE_TIMEOUT:g} s"
        except (TransportError, RpcTunnelError, OSError) as exc:
            return str(exc) or type(exc).__name__
        stream.reset(ErrorCode.CANCELLED)
        return None

    async def _probe_direct(self, direct: str) -> str | None:
        host, _, port = direct.rpartition(":")
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                async with await anyio.connect_tcp(host, int(port)) as tcp:
                    await authenticate(tcp, self.key)
        except TimeoutError:
            return f"no answer from {direct} within {PROBE_TIMEOUT:g} s (direct)"
        except (OSError, RpcAuthError, anyio.BrokenResourceError) as exc:
            return f"direct {direct}: {exc}"
        return None

    async def _start(self, listener: _Listener) -> tuple[Stream, bytes]:
        """A stream to the worker whose rpc-server accepted; the raw bytes that followed the reply."""
        with anyio.fail_after(CONNECT_TIMEOUT):
            conn = await self._connect(listener.node_id)
        if conn.node_id != listener.node_id:
            raise TransportError(f"dialled {listener.node_id} but reached {conn.node_id}")
        stream = await conn.open_stream(StreamKind.RPC)
        try:
            await stream.send(encode_request(listener.target))
            frame, early = await _receive_frame(stream)
            decode_reply(frame)
        except BaseException:
            stream.reset(ErrorCode.CANCELLED)
            raise
        return stream, early
