"""Refusals on real QUIC (in one process, 127.0.0.1/127.0.0.2): the dialer learns why it was refused, a
switched secret keeps the connections up and retires the old key, and a joining node gives up only
when every seed refused its credentials (never because a seed is silent)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import pull_quic_header
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.gossip.membership import JoinRefused, Membership
from meshllm.gossip.sync import DocGossip
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import key_id
from meshllm.transport import (AuthError, PeerConnection, QuicEndpoint, Refusal, Stream, StreamKind,
                               TransportSettings)

pytestmark = pytest.mark.anyio

MESH, SECRET, NEW = "mesh", b"a mesh secret of thirty-two bytes", b"the rotated secret, also 32 byte"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def endpoint(host: str = "127.0.0.1", *, secret: bytes = SECRET, mesh: str = MESH,
             retired: Callable[[str], bool] | None = None) -> QuicEndpoint:
    return QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), mesh, secret, host=host, retired=retired,
                        settings=TransportSettings(auth_timeout=2.0))


@asynccontextmanager
async def running(*endpoints: QuicEndpoint) -> AsyncIterator[list[int]]:
    async with anyio.create_task_group() as tg:
        yield [await tg.start(e.run) for e in endpoints]
        tg.cancel_scope.cancel()


async def echo(conn: PeerConnection, stream: Stream) -> None:
    while data := await stream.receive():
        await stream.send(data)


async def roundtrip(conn: PeerConnection, payload: bytes) -> bytes:
    async with await conn.open_stream(StreamKind.HTTP) as stream:
        await stream.send(payload)
        await stream.send_eof()
        received = b""
        while data := await stream.receive():
            received += data
        return received


@pytest.mark.parametrize(("stranger", "refusal"), [
    ({"mesh": "another mesh"}, Refusal.WRONG_MESH),
    ({"secret": b"not the secret, but 32 bytes long"}, Refusal.WRONG_SECRET),
    ({"secret": b"an old secret a rotation retired!"}, Refusal.RETIRED_KEY),
], ids=["wrong-mesh", "wrong-secret", "retired-key"])
async def test_the_dialer_learns_why_it_was_refused(stranger: dict[str, bytes], refusal: Refusal) -> None:
    member = endpoint("127.0.0.2", retired={key_id(b"an old secret a rotation retired!")}.__contains__)
    dialer = endpoint(**stranger)  # type: ignore[arg-type]
    async with running(member, dialer) as (port, _):
        with anyio.fail_after(3), pytest.raises(AuthError) as caught:
            await dialer.connect("127.0.0.2", port)
    assert caught.value.refusal is refusal
    assert str(refusal) in str(caught.value)
    assert member.peers == {} and dialer.peers == {}


async def test_a_switched_secret_keeps_connections_and_refuses_the_old_key() -> None:
    retired: set[str] = set()
    a, b = endpoint("127.0.0.1", retired=retired.__contains__), endpoint("127.0.0.2", retired=retired.__contains__)
    old_member = endpoint("127.0.0.1")
    for e in (a, b):
        e.on_stream(StreamKind.HTTP, echo)
    async with running(a, b, old_member) as (_, port_b, _):
        conn = await a.connect("127.0.0.2", port_b)
        assert await roundtrip(conn, b"before") == b"before"
        retired.add(key_id(SECRET))
        a.switch_secret(NEW)
        b.switch_secret(NEW)
        assert await roundtrip(conn, b"after") == b"after"  # the connection stayed up
        assert b.peers.keys() == {a.node_id}
        with anyio.fail_after(3), pytest.raises(AuthError) as caught:
            await old_member.connect("127.0.0.2", port_b)
        assert caught.value.refusal is Refusal.RETIRED_KEY
        newcomer = endpoint("127.0.0.1", secret=NEW)
        async with running(newcomer):
            with anyio.fail_after(3):
                fresh = await newcomer.connect("127.0.0.2", port_b)
            assert fresh.node_id == b.node_id


def joining(seeds: list[str], *, dial_timeout: float = 0.5,
            refusals: tuple[Refusal, ...] = tuple(Refusal)) -> tuple[Membership, QuicEndpoint]:
    identity = NodeIdentity(Ed25519PrivateKey.generate())
    node = QuicEndpoint(identity, MESH, b"this node holds a mistyped secret", host="127.0.0.1")
    state = MeshState()
    gossip = DocGossip(state.doc, node_id=identity.node_id)
    me = NodeStatus(id=identity.node_id, addrs=["127.0.0.1:1"])
    return Membership(state, gossip, node, me=me, seeds=seeds, join_seeds=seeds, join_refusals=refusals,
                      dial_timeout=dial_timeout), node


async def test_a_node_every_seed_refuses_gives_up_within_seconds() -> None:
    member = endpoint("127.0.0.2")
    async with running(member) as (port,):
        membership, node = joining([f"127.0.0.2:{port}"])
        started = anyio.current_time()
        async with running(node):
            with anyio.fail_after(5), pytest.raises(JoinRefused) as caught:
                await membership.run()
    assert caught.value.refusal is Refusal.WRONG_SECRET and caught.value.addr == f"127.0.0.2:{port}"
    print(f"\nrefused join gave up after {anyio.current_time() - started:.2f}s")


async def test_a_silent_seed_keeps_the_node_trying() -> None:
    """One seed refuses, the other never answers: the node keeps dialling the silent one."""
    member = endpoint("127.0.0.2")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.setblocking(False)
        attempts: set[bytes] = set()
        async with running(member) as (port,):
            seeds = [f"127.0.0.2:{port}", f"127.0.0.1:{silent.getsockname()[1]}"]
            membership, node = joining(seeds)
            async with running(node), anyio.create_task_group() as tg:
                await tg.start(membership.run)
                with anyio.fail_after(10):
                    while len(attempts) < 3:  # three dials of the silent seed, each a new connection id
                        await anyio.wait_readable(silent)
                        header = pull_quic_header(Buffer(data=silent.recv(2048)), host_cid_length=8)
                        attempts.add(header.destination_cid)
                tg.cancel_scope.cancel()


async def test_a_remembered_peer_of_another_mesh_does_not_end_the_node(caplog: pytest.LogCaptureFixture) -> None:
    """Restarted from its state folder, a node whose old peer's address now belongs to another mesh keeps
    running (address reuse, not stale credentials): only a wrong secret or a retired key end it."""
    other = endpoint("127.0.0.2", mesh="another mesh")
    async with running(other) as (port,):
        membership, node = joining([f"127.0.0.2:{port}"], refusals=(Refusal.WRONG_SECRET, Refusal.RETIRED_KEY))
        async with running(node), anyio.create_task_group() as tg:
            await tg.start(membership.run)
            with anyio.fail_after(10):
                while sum("belongs to mesh" in r.getMessage() for r in caplog.records) < 3:  # refused 3 times
                    await anyio.sleep(0.05)
            assert membership.refused is None and membership.joining
            tg.cancel_scope.cancel()
