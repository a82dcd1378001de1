"""ggml RPC over plain TCP between node agents, authenticated with the mesh secret (``--rpc-direct``).

The QUIC tunnel (``rpc_tunnel``) is the default: encrypted, and nothing but the QUIC port listens on
the network. Its cost is aioquic's pure-Python work per datagram, which a split pays on every token
(one blocking RPC round trip per worker, a few KB of activations each way): measured, it keeps a
split well below the decode speed of stock RPC. This path trades the encryption for speed: the
worker's agent listens on TCP beside its QUIC endpoint, the host's agent connects to it, and the two
prove to each other that they hold the mesh secret (HMAC-SHA256 challenge and response, both ways,
over fresh nonces) before the worker connects the session to its ggml-rpc-server, which still binds
127.0.0.1 only. After that, bytes are copied unchanged between kernel sockets, one read and one
write per chunk. Use it on networks you trust not to read or alter traffic: the RPC bytes (the
prompt's activations, not the weights) cross in the clear.

    server = RpcDirectServer(secret, lookup, host="10.0.0.5")   # worker: port = await tg.start(server.run)
    client = RpcTunnelClient(mesh.connect, direct=RpcDirectDialer(secret, node_id, addr_of))  # host
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable

from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, TaskStatus

from meshllm.transport import FrameDecoder, FrameError, decode_message, encode_message

__all__ = ["MAX_HEADER", "READ_SIZE", "RpcDirectDialer", "RpcDirectServer", "Traffic", "copy_both_ways", "nodelay"]

log = logging.getLogger(__name__)

MAX_HEADER = 4096  # a handshake frame; it names a target (a model name)
HANDSHAKE_TIMEOUT = 5.0
READ_SIZE = 4 * 1024 * 1024  # whatever has arrived, in one piece (weights cross at load in MBs)
Lookup = Callable[[str], int | None]


@dataclass
class Traffic:
    """Bytes a tunnel carried: ``sent`` from the host's side towards the worker, ``received`` back."""

    sent: int = 0
    received: int = 0
    sessions: int = 0


class DirectAuthError(Exception):
    """The other side does not hold the mesh secret, or broke the handshake."""


def _mac(secret: bytes, role: bytes, *parts: str) -> str:
    return hmac.new(secret, b"meshllm-rpc-direct|" + role + b"|" + "|".join(parts).encode(),
                    hashlib.sha256).hexdigest()


def nodelay(tcp: anyio.abc.SocketStream) -> None:
    """Every RPC message is latency-bound: never let Nagle hold one back."""
    tcp.extra(SocketAttribute.raw_socket).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Frames:
    """Length-prefixed JSON frames on a TCP stream during the handshake; bytes after the last
    frame are kept for the pipe."""

    def __init__(self, tcp: anyio.abc.SocketStream) -> None:
        self.tcp = tcp
        self.decoder = FrameDecoder(max_size=MAX_HEADER)

    async def send(self, message: dict[str, object]) -> None:
        await self.tcp.send(encode_message(message, max_size=MAX_HEADER))

    async def receive(self) -> dict[str, object]:
        while (frame := self.decoder.pop()) is None:
            try:
                self.decoder.feed(await self.tcp.receive(MAX_HEADER))
            except anyio.EndOfStream:
                raise DirectAuthError("the connection closed during the handshake") from None
        return decode_message(frame)

    def rest(self) -> bytes:
        return self.decoder.take_rest()


async def copy_both_ways(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream, *, early_to_b: bytes = b"",
                         early_to_a: bytes = b"", traffic: Traffic | None = None) -> str:
    """Pipe ``a`` <-> ``b`` until either side ends; ``traffic`` (if given) counts a->b as sent and
    b->a as received, as the bytes go."""
    counts = traffic if traffic is not None else Traffic()
    counts.sessions += 1
    ended: list[str] = []

    async def one_way(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, early: bytes, forward: bool,
                      scope: anyio.CancelScope) -> None:
        try:
            if early:
                _count(counts, forward, len(early))
                await dst.send(early)
            while True:
                data = await src.receive(READ_SIZE)
                _count(counts, forward, len(data))
                await dst.send(data)
        except anyio.EndOfStream:
            ended.append("closed")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            ended.append(f"broke: {exc!r}")
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(one_way, a, b, early_to_b, True, tg.cancel_scope)
        tg.start_soon(one_way, b, a, early_to_a, False, tg.cancel_scope)
    return ended[0] if ended else "cancelled"


def _count(traffic: Traffic, forward: bool, n: int) -> None:
    if forward:
        traffic.sent += n
    else:
        traffic.received += n


class RpcDirectServer:
    """The worker's TCP listener: authenticates each host, then connects it to the local rpc-server."""

    def __init__(self, secret: bytes, lookup: Lookup, *, host: str, port: int = 0) -> None:
        self.secret = secret
        self.lookup = lookup
        self.host = host
        self.port = port

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port,
                                                   family=socket.AF_INET)
        self.port = int(listener.listeners[0].extra(SocketAttribute.local_port))
        log.info("direct RPC listener on %s:%d (mesh-secret authenticated)", self.host, self.port)
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._session)

    async def _session(self, tcp: anyio.abc.SocketStream) -> None:
        peer = tcp.extra(SocketAttribute.remote_address)
        async with tcp:
            try:
                nodelay(tcp)
                frames = _Frames(tcp)
                with anyio.fail_after(HANDSHAKE_TIMEOUT):
                    target, early = await self._handshake(frames)
            except (DirectAuthError, FrameError, TimeoutError, OSError, anyio.BrokenResourceError) as exc:
                log.warning("direct RPC from %s refused: %s", peer, exc)
                return
            port = self.lookup(target)
            try:
                if port is None:
                    raise OSError(f"no rpc-server for {target!r} on this node")
                rpc = await anyio.connect_tcp("127.0.0.1", port)
            except OSError as exc:
                await frames.send({"ok": False, "error": str(exc)[:512]})
                return
            async with rpc:
                nodelay(rpc)
                await frames.send({"ok": True})
                how = await copy_both_ways(tcp, rpc, early_to_b=early)
                log.info("direct RPC from %s to %s ended: %s", peer, target, how)

    async def _handshake(self, frames: _Frames) -> tuple[str, bytes]:
        hello = await frames.receive()
        target, client_nonce = hello.get("target"), hello.get("nonce")
        if not isinstance(target, str) or not target or not isinstance(client_nonce, str):
            raise DirectAuthError("malformed hello")
        nonce = secrets.token_hex(16)
        await frames.send({"nonce": nonce, "mac": _mac(self.secret, b"server", client_nonce, nonce, target)})
        answer = await frames.receive()
        mac = answer.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(self.secret, b"client", nonce,
                                                                        client_nonce, target)):
            raise DirectAuthError("the host does not hold the mesh secret")
        return target, frames.rest()


class RpcDirectDialer:
    """The host's side: a TCP connection to a worker's direct listener, authenticated both ways."""

    def __init__(self, secret: bytes, address: Callable[[str], str | None]) -> None:
        self.secret = secret
        self.address = address  # node id -> "host:port" of its direct listener, None if it has none

    def available(self, node_id: str) -> bool:
        return self.address(node_id) is not None

    async def connect(self, node_id: str, target: str) -> tuple[anyio.abc.SocketStream, bytes]:
        """An authenticated session to ``target``'s rpc-server on ``node_id``, and any early bytes."""
        address = self.address(node_id)
        if address is None:
            raise OSError(f"node {node_id} offers no direct RPC")
        host, _, port = address.rpartition(":")
        tcp = await anyio.connect_tcp(host, int(port))
        try:
            nodelay(tcp)
            frames = _Frames(tcp)
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                nonce = secrets.token_hex(16)
                await frames.send({"target": target, "nonce": nonce})
                challenge = await frames.receive()
                server_nonce, mac = challenge.get("nonce"), challenge.get("mac")
                if not isinstance(server_nonce, str) or not isinstance(mac, str) or not hmac.compare_digest(
                        mac, _mac(self.secret, b"server", nonce, server_nonce, target)):
                    raise DirectAuthError(f"node {node_id} at {address} does not hold the mesh secret")
                await frames.send({"mac": _mac(self.secret, b"client", server_nonce, nonce, target)})
                reply = await frames.receive()
            if reply.get("ok") is not True:
                raise OSError(f"node {node_id}: {reply.get('error')}")
            return tcp, frames.rest()
        except BaseException:
            await tcp.aclose()
            raise
