"""The QUIC transport on real sockets (127.0.0.1 and 127.0.0.2): auth, stream kinds, robustness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pycrdt import Doc, Map

from meshllm.gossip import DocGossip
from meshllm.store.identity import NodeIdentity
from meshllm.transport import (AuthError, ConnectionLost, ErrorCode, FrameChannel, MessageStream,
                               PeerConnection, PeerEvent, QuicEndpoint, Stream, StreamKind,
                               StreamReset, TransportSettings)
from meshllm.transport._aioquic import send_backlog
from meshllm.transport.auth import Handshake, Role
from meshllm.transport.stream import encode_stream_header

pytestmark = pytest.mark.anyio

MESH = "test-mesh"
SECRET = b"correct horse battery staple 32b"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def endpoint(host: str = "127.0.0.1", *, secret: bytes = SECRET, mesh: str = MESH,
             settings: TransportSettings | None = None) -> QuicEndpoint:
    return QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), mesh, secret, host=host,
                        settings=settings)


@asynccontextmanager
async def running(*endpoints: QuicEndpoint) -> AsyncIterator[list[int]]:
    """Run the endpoints for the duration of the block; yields their ports."""
    async with anyio.create_task_group() as tg:
        ports = [await tg.start(e.run) for e in endpoints]
        yield ports
        tg.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def tagged_echo(conn: PeerConnection, stream: Stream) -> None:
    """Echo everything back after a tag naming the stream's kind (so routing is visible)."""
    await stream.send(stream.kind.value.encode() + b":")
    while data := await stream.receive():
        await stream.send(data)


def serve_echo(*endpoints: QuicEndpoint) -> None:
    for e in endpoints:
        for kind in StreamKind:
            e.on_stream(kind, tagged_echo)


async def roundtrip(conn: PeerConnection, kind: StreamKind, payload: bytes) -> bytes:
    """Send ``payload`` and EOF on a new stream; return everything read until the peer's EOF."""
    received = bytearray()
    async with await conn.open_stream(kind) as stream, anyio.create_task_group() as tg:
        async def write() -> None:
            await stream.send(payload)
            await stream.send_eof()
        tg.start_soon(write)
        while data := await stream.receive():
            received += data
    return bytes(received)


# -- streams ----------------------------------------------------------------------------------
async def test_every_stream_kind_echoes_both_ways_including_a_megabyte() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    serve_echo(a, b)
    async with running(a, b) as (_, port_b):
        there = await a.connect("127.0.0.2", port_b)
        back = b.peer(a.node_id)
        assert back is not None and there.node_id == b.node_id
        for kind in StreamKind:
            tag = kind.value.encode() + b":"
            assert await roundtrip(there, kind, b"ping") == tag + b"ping"
            assert await roundtrip(back, kind, b"pong") == tag + b"pong"
        big = os.urandom(1024 * 1024)
        assert await roundtrip(there, StreamKind.RPC, big) == b"rpc:" + big
        assert await roundtrip(back, StreamKind.HTTP, big) == b"http:" + big
        assert there.rtt > 0 and back.rtt > 0
        assert list(a.peers) == [b.node_id] and list(b.peers) == [a.node_id]
        for e in (a, b):  # each megabyte left and entered both sockets (there, and echoed back)
            stats, limit = e.stats, e.settings.max_datagram_size
            assert stats.bytes_sent > 2 * len(big) and stats.bytes_received > 2 * len(big)
            assert stats.datagrams_sent * limit >= stats.bytes_sent
            assert stats.datagrams_received * limit >= stats.bytes_received


async def test_a_hundred_concurrent_streams() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    serve_echo(b)
    results: dict[int, bytes] = {}
    async with running(a, b) as (_, port_b):
        conn = await a.connect("127.0.0.2", port_b)

        async def one(i: int) -> None:
            results[i] = await roundtrip(conn, StreamKind.GOSSIP, f"stream {i};".encode() * 200)

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
    assert results == {i: b"gossip:" + f"stream {i};".encode() * 200 for i in range(100)}


async def test_send_waits_instead_of_buffering_without_limit() -> None:
    limit = 64 * 1024
    a, b = endpoint(settings=TransportSettings(send_buffer=limit)), endpoint("127.0.0.2")
    total = 0

    async def sink(conn: PeerConnection, stream: Stream) -> None:
        nonlocal total
        while data := await stream.receive():
            total += len(data)

    b.on_stream(StreamKind.RPC, sink)
    async with running(a, b) as (_, port_b):
        conn = await a.connect("127.0.0.2", port_b)
        peak = 0
        async with await conn.open_stream(StreamKind.RPC) as stream, \
                anyio.create_task_group() as tg:
            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, send_backlog(conn._quic, stream.stream_id))
                    await anyio.sleep(0)

            tg.start_soon(sample)
            await stream.send(os.urandom(4 * 1024 * 1024))
            await stream.send_eof()
            tg.cancel_scope.cancel()
        await wait_until(lambda: total == 4 * 1024 * 1024)
    assert 0 < peak <= limit + limit // 4  # the limit plus at most one chunk in flight


async def test_message_streams_end_and_break_like_anyio_streams() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")

    async def once(conn: PeerConnection, stream: Stream) -> None:
        messages = MessageStream(stream)
        first = await messages.receive()
        if first == b"reset":
            stream.reset()
        else:
            await messages.send(first)  # then the endpoint closes the stream (EOF)

    b.on_stream(StreamKind.CONTROL, once)
    async with running(a, b) as (_, port_b):
        conn = await a.connect("127.0.0.2", port_b)
        messages = MessageStream(await conn.open_stream(StreamKind.CONTROL))
        assert messages.peer_id == b.node_id
        await messages.send(b"hi")
        assert await messages.receive() == b"hi"
        with pytest.raises(anyio.EndOfStream):
            await messages.receive()
        await messages.aclose()

        broken = MessageStream(await conn.open_stream(StreamKind.CONTROL))
        await broken.send(b"reset")
        with pytest.raises(anyio.BrokenResourceError):
            await broken.receive()
        await broken.aclose()


async def test_gossip_replicates_a_document_over_quic() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    doc_a: Doc[Map[int]] = Doc()
    doc_b: Doc[Map[int]] = Doc()
    map_a, map_b = doc_a.get("m", type=Map), doc_b.get("m", type=Map)
    gossip_a, gossip_b = DocGossip(doc_a, node_id=a.node_id), DocGossip(doc_b, node_id=b.node_id)

    async def attach(conn: PeerConnection, stream: Stream) -> None:
        await gossip_b.attach(MessageStream(stream))

    b.on_stream(StreamKind.GOSSIP, attach)
    map_a["before"] = 1
    try:
        async with running(a, b) as (_, port_b), anyio.create_task_group() as tg:
            conn = await a.connect("127.0.0.2", port_b)
            tg.start_soon(gossip_a.attach, MessageStream(await conn.open_stream(StreamKind.GOSSIP)))
            await wait_until(lambda: map_b.get("before") == 1)
            map_b["after"] = 2
            await wait_until(lambda: map_a.get("after") == 2)
            tg.cancel_scope.cancel()
    finally:
        gossip_a.close()
        gossip_b.close()


# -- authentication ---------------------------------------------------------------------------
@dataclass
class Observed:
    handlers: int = 0
    events: int = 0
    about: set[str] = field(default_factory=set)  # the peers the events were about


def observe(*endpoints: QuicEndpoint) -> Observed:
    seen = Observed()

    async def handler(conn: PeerConnection, stream: Stream) -> None:
        seen.handlers += 1

    def listener(event: PeerEvent) -> None:
        seen.events += 1
        seen.about.add(event.node_id)

    for e in endpoints:
        e.on_peer(listener)
        for kind in StreamKind:
            e.on_stream(kind, handler)
    return seen


@pytest.mark.parametrize(("stranger", "match"), [
    ({"secret": b"another secret"}, "authentication failed"),
    ({"mesh": "other-mesh"}, "wrong mesh"),
], ids=["wrong-secret", "wrong-mesh"])
async def test_a_stranger_is_refused_on_both_sides(stranger: dict[str, Any], match: str) -> None:
    a, b, member = endpoint(**stranger), endpoint("127.0.0.2"), endpoint("127.0.0.3")
    seen = observe(a, b)
    async with running(a, b, member) as (port_a, port_b, _):
        with pytest.raises(AuthError, match=match):
            await a.connect("127.0.0.2", port_b)
        with pytest.raises(AuthError, match=match):
            await b.connect("127.0.0.1", port_a)
        await member.connect("127.0.0.2", port_b)  # b handles a later handshake: anything late came first
        await wait_until(lambda: seen.events == 1)
        assert a.peers == {} and list(b.peers) == [member.node_id]
    assert seen.handlers == 0 and seen.about == {member.node_id}  # the member came (and went), never the stranger


@dataclass(frozen=True)
class Forged:
    """An identity for the handshake that lies: ``node_id``/``public_bytes`` are not its key's."""

    node_id: str
    public_bytes: bytes
    private_key: Ed25519PrivateKey


class ForgingEndpoint(QuicEndpoint):
    """Knows the mesh secret, but authenticates with a forged identity."""

    def __init__(self, forged: Forged) -> None:
        super().__init__(NodeIdentity(forged.private_key), MESH, SECRET)
        self._forged = forged

    def _new_handshake(self, role: Role, channel_binding: bytes) -> Handshake:
        return Handshake(identity=self._forged, mesh_id=MESH,  # type: ignore[arg-type]
                         secret=SECRET, role=role, channel_binding=channel_binding)


def impostor_of(victim: NodeIdentity) -> Forged:
    return Forged(victim.node_id, victim.public_bytes, Ed25519PrivateKey.generate())


def mismatched_id() -> Forged:
    own = NodeIdentity(Ed25519PrivateKey.generate())
    return Forged("0123456789abcdef", own.public_bytes, own.private_key)


@pytest.mark.parametrize("forge", [impostor_of, lambda victim: mismatched_id()],
                         ids=["signature-by-another-key", "node-id-not-matching-key"])
async def test_a_forged_hello_is_refused(forge: Callable[[NodeIdentity], Forged]) -> None:
    honest = endpoint("127.0.0.2")
    forger = ForgingEndpoint(forge(NodeIdentity(Ed25519PrivateKey.generate())))
    seen = observe(honest)
    async with running(forger, honest) as (port_forger, port_honest):
        with pytest.raises(AuthError, match="refused by the peer"):
            await forger.connect("127.0.0.2", port_honest)
        with pytest.raises(AuthError):
            await honest.connect("127.0.0.1", port_forger)
        assert honest.peers == {}
    assert seen == Observed(0, 0)


async def test_streams_opened_before_auth_wait_for_it_or_die_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that opens a stream in its first flight: served only once authenticated."""
    original = PeerConnection._on_tls_ready

    def eager(self: PeerConnection) -> None:
        original(self)
        if self.is_dialer and not self.closed:
            stream_id = self._quic.get_next_available_stream_id()
            self._quic.send_stream_data(stream_id, encode_stream_header(StreamKind.CONTROL)
                                        + b"early", end_stream=True)

    monkeypatch.setattr(PeerConnection, "_on_tls_ready", eager)
    served: list[tuple[bool, bytes]] = []

    async def control(conn: PeerConnection, stream: Stream) -> None:
        served.append((conn.authenticated, await stream.receive()))

    stranger, member, honest = endpoint(secret=b"wrong"), endpoint(), endpoint("127.0.0.2")
    honest.on_stream(StreamKind.CONTROL, control)
    async with running(stranger, member, honest) as (_, _, port):
        with pytest.raises(AuthError):
            await stranger.connect("127.0.0.2", port)
        await member.connect("127.0.0.2", port)
        await wait_until(lambda: bool(served))
    assert served == [(True, b"early")]  # the member's stream, served once authenticated; never the stranger's


class SilentEndpoint(QuicEndpoint):
    """Completes QUIC's TLS handshake, then never says hello."""

    def _new_handshake(self, role: Role, channel_binding: bytes) -> Handshake:
        handshake = super()._new_handshake(role, channel_binding)
        handshake.start = lambda: b""  # type: ignore[method-assign]
        return handshake


async def test_a_peer_that_never_authenticates_is_dropped_after_the_timeout() -> None:
    silent = SilentEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), MESH, SECRET)
    strict = endpoint("127.0.0.2", settings=TransportSettings(auth_timeout=0.5))
    seen = observe(strict)
    async with running(silent, strict) as (_, port):
        started = time.monotonic()
        with pytest.raises(AuthError, match="timed out"):
            await silent.connect("127.0.0.2", port)
        assert time.monotonic() - started < 4.0  # the server's 0.5 s, not the client's 5 s
    assert seen == Observed(0, 0)


async def test_connecting_to_nothing_fails_after_the_auth_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))
        port = sock.getsockname()[1]
    a = endpoint(settings=TransportSettings(auth_timeout=0.5))
    async with running(a):
        with pytest.raises(ConnectionLost, match="no QUIC handshake"):
            await a.connect("127.0.0.2", port)
        assert a.peers == {}


# -- malformed input --------------------------------------------------------------------------
@pytest.mark.parametrize("header", [
    b"\x00\x00\x00\x03abc",  # a frame that is not JSON
    b"\xff\xff\xff\xff",  # an oversize header frame
    b'\x00\x00\x00\x10{"kind":"bogus"}',  # an unknown kind
    os.urandom(64),
])
async def test_a_garbage_stream_is_reset_and_the_endpoint_carries_on(header: bytes) -> None:
    a, b, c = endpoint(), endpoint("127.0.0.2"), endpoint()
    serve_echo(b)
    async with running(a, b, c) as (_, port_b, _):
        conn = await a.connect("127.0.0.2", port_b)
        garbage = conn._open_stream_with_header(header, StreamKind.CONTROL)
        with pytest.raises(StreamReset) as caught:
            await garbage.receive()
        assert caught.value.code == ErrorCode.STREAM_REJECTED
        garbage.reset()
        assert await roundtrip(conn, StreamKind.CONTROL, b"still fine") == b"control:still fine"
        later = await c.connect("127.0.0.2", port_b)
        assert await roundtrip(later, StreamKind.HTTP, b"new peer") == b"http:new peer"


async def test_an_oversize_frame_resets_only_its_stream() -> None:
    a, b, c = endpoint(), endpoint("127.0.0.2"), endpoint()

    async def control(conn: PeerConnection, stream: Stream) -> None:
        channel = FrameChannel(stream, max_size=64 * 1024)
        while (message := await channel.receive_message()) is not None:
            await channel.send_message({"echo": message})

    b.on_stream(StreamKind.CONTROL, control)
    async with running(a, b, c) as (_, port_b, _):
        conn = await a.connect("127.0.0.2", port_b)
        async with await conn.open_stream(StreamKind.CONTROL) as bad:
            await bad.send(b"\x00\x10\x00\x00" + b"x" * 1000)  # announces 1 MiB
            with pytest.raises(StreamReset) as caught:
                while await bad.receive():
                    pass
            assert caught.value.code == ErrorCode.HANDLER_FAILED

        async with await conn.open_stream(StreamKind.CONTROL) as good:
            channel = FrameChannel(good)
            await channel.send_message({"n": 1})
            assert await channel.receive_message() == {"echo": {"n": 1}}
        later = await c.connect("127.0.0.2", port_b)
        assert later.authenticated and not conn.closed


# -- connection lifetime ----------------------------------------------------------------------
async def test_dialing_each_other_at_once_leaves_one_shared_connection() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    serve_echo(a, b)
    async with running(a, b) as (port_a, port_b):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.connect, "127.0.0.2", port_b)
            tg.start_soon(b.connect, "127.0.0.1", port_a)
        await wait_until(lambda: len(a.peers) == len(b.peers) == 1)
        ab, ba = a.peers[b.node_id], b.peers[a.node_id]
        assert (ab.dialed_by, ab.dialed_at) == (ba.dialed_by, ba.dialed_at)
        assert ab.dialed_by == min(a.node_id, b.node_id)
        assert await roundtrip(ab, StreamKind.GOSSIP, b"one") == b"gossip:one"


async def test_a_replaced_connection_finishes_the_request_on_it_first() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    serve_echo(b)
    async with running(a, b) as (_, port_b):
        first = await a.connect("127.0.0.2", port_b)
        stream = await first.open_stream(StreamKind.HTTP)
        await stream.send(b"before ")
        second = await a.connect("127.0.0.2", port_b)  # dialled later by the same side: it wins
        assert second is not first and a.peers[b.node_id] is second
        await anyio.sleep(1.5)  # past a keepalive tick: the request on the first is still open
        await stream.send(b"after")
        await stream.send_eof()
        received = bytearray()
        while data := await stream.receive():
            received += data
        assert bytes(received) == b"http:before after"
        await stream.aclose()
        await wait_until(lambda: first.closed, timeout=5)  # then the replaced connection goes
        assert not second.closed and b.peers[a.node_id].dialed_at == second.dialed_at


async def test_closing_a_connection_tells_both_sides() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    serve_echo(b)
    downs: list[str] = []
    b.on_peer(lambda event: None if event.up else downs.append(event.node_id))
    async with running(a, b) as (_, port_b):
        conn = await a.connect("127.0.0.2", port_b)
        stream = await conn.open_stream(StreamKind.GOSSIP)
        await conn.aclose()
        with pytest.raises(ConnectionLost):
            await stream.send(b"late")
        await wait_until(lambda: downs == [a.node_id], timeout=5)
        assert a.peers == {} and b.peers == {}
        assert a.silent_for(b.node_id) is None and b.silent_for(a.node_id) is None  # closed, not gone silent


async def test_a_stopped_endpoint_is_noticed_at_once() -> None:
    a, b = endpoint(), endpoint("127.0.0.2")
    async with running(a):
        async with anyio.create_task_group() as tg:
            port_b = await tg.start(b.run)
            conn = await a.connect("127.0.0.2", port_b)
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await conn.wait_closed()
        assert isinstance(conn.close_error, ConnectionLost)
        assert conn.close_error.code == ErrorCode.SHUTDOWN
        assert "node shutting down" in str(conn.close_error)
        assert a.peers == {}


CHILD = """
import pathlib, sys
import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from meshllm.store.identity import NodeIdentity
from meshllm.transport import QuicEndpoint

async def main() -> None:
    endpoint = QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), sys.argv[1],
                            bytes.fromhex(sys.argv[2]), host="127.0.0.2")
    async with anyio.create_task_group() as tg:
        port = await tg.start(endpoint.run)
        tmp = pathlib.Path(sys.argv[3] + ".tmp")
        tmp.write_text(str(port))
        tmp.rename(sys.argv[3])

anyio.run(main)
"""


async def test_a_killed_peer_is_detected_within_a_few_seconds(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    with (tmp_path / "child.log").open("wb") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, MESH, SECRET.hex(), str(port_file)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        await wait_until(port_file.exists, timeout=60)
        a = endpoint()
        downs: list[float] = []
        a.on_peer(lambda event: None if event.up else downs.append(time.monotonic()))
        async with running(a):
            conn = await a.connect("127.0.0.2", int(port_file.read_text()))
            child.kill()
            child.wait()
            killed = time.monotonic()
            with anyio.fail_after(15):
                await conn.wait_closed()
            assert isinstance(conn.close_error, ConnectionLost)
            assert conn.close_error.code == ErrorCode.PEER_TIMEOUT
            assert len(downs) == 1 and a.peers == {}
            # still known to be silent once its connection is gone: a request waiting on a dial to it moves
            silent = a.silent_for(conn.node_id)
            assert silent is not None and silent >= a.settings.peer_timeout
            print(f"killed peer detected after {downs[0] - killed:.2f}s")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def test_idle_connections_stay_up_on_pings() -> None:
    fast = TransportSettings(ping_interval=0.1, peer_timeout=0.5, idle_timeout=1.0)
    a, b = endpoint(settings=fast), endpoint("127.0.0.2", settings=fast)
    serve_echo(b)
    async with running(a, b) as (_, port_b):
        conn = await a.connect("127.0.0.2", port_b)
        await anyio.sleep(2.0)  # twice the QUIC idle timeout, four peer timeouts
        assert not conn.closed
        assert await roundtrip(conn, StreamKind.CONTROL, b"awake") == b"control:awake"
