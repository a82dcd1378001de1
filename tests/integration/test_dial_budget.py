"""Dials take turns on real QUIC endpoints: queued dials wait without timing out, stale ones are dropped.

What a user would notice: a burst of redials does not make a node declare reachable peers dead (a
dial's timeout starts only when it may handshake), and a dial made pointless while it waited (the
peer dialled us meanwhile) costs no handshake.
"""

from __future__ import annotations

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.store.identity import NodeIdentity
from meshllm.transport import ErrorCode, HandshakeBudget, QuicEndpoint, TransportError

pytestmark = pytest.mark.anyio

MESH = "test-mesh"
SECRET = b"correct horse battery staple 32b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def endpoint(*, budget: HandshakeBudget | None = None) -> QuicEndpoint:
    return QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), MESH, SECRET, host="127.0.0.1",
                        budget=budget)


async def hold_the_only_slot(tg: anyio.abc.TaskGroup, budget: HandshakeBudget) -> anyio.Event:
    """Take ``budget``'s one slot until the returned event is set."""
    release = anyio.Event()

    async def hold(task_status: anyio.abc.TaskStatus[None]) -> None:
        async with budget.slot():
            task_status.started()
            await release.wait()

    await tg.start(hold)
    return release


async def test_a_queued_dial_waits_for_its_turn_and_its_timeout_starts_then() -> None:
    client, server = endpoint(budget=HandshakeBudget(1, reserve=0)), endpoint()
    async with anyio.create_task_group() as tg:
        await tg.start(client.run)
        port = await tg.start(server.run)
        release = await hold_the_only_slot(tg, client.budget)
        result: list[str] = []

        async def dial() -> None:
            conn = await client.connect("127.0.0.1", port, timeout=1.0)
            result.append(conn.node_id)

        tg.start_soon(dial)
        await anyio.sleep(1.5)  # longer than the dial's timeout, spent in line
        assert result == [] and client.budget.waiting == 1
        release.set()
        with anyio.fail_after(5):
            while not result:
                await anyio.sleep(0.01)
        assert result == [server.node_id]
        tg.cancel_scope.cancel()


async def test_a_dial_no_longer_needed_when_its_turn_comes_sends_nothing() -> None:
    client, server = endpoint(budget=HandshakeBudget(1, reserve=0)), endpoint()
    async with anyio.create_task_group() as tg:
        await tg.start(client.run)
        port = await tg.start(server.run)
        release = await hold_the_only_slot(tg, client.budget)
        wanted = [True]
        errors: list[TransportError] = []

        async def dial() -> None:
            try:
                await client.connect("127.0.0.1", port, timeout=1.0, needed=lambda: wanted[0])
            except TransportError as exc:
                errors.append(exc)

        tg.start_soon(dial)
        with anyio.fail_after(5):
            while client.budget.waiting != 1:  # the dial waits in line
                await anyio.sleep(0.01)
        wanted[0] = False  # say, the peer dialled us meanwhile
        release.set()
        with anyio.fail_after(5):
            while not errors:
                await anyio.sleep(0.01)
        assert errors[0].code == ErrorCode.NOT_NEEDED
        assert client.stats.datagrams_sent == 0 and server.peers == {}
        tg.cancel_scope.cancel()
