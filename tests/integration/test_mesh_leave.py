"""A node that stops says so before it goes: two mesh runtimes on real QUIC (127.0.0.1, 127.0.0.2).

What a user notices: a node stopped with Ctrl-C or SIGTERM is gone from the others' view at once, as
its own departure (the death record names it as its author), not after their failure detector
gives up on it. That needs the node to leave while its gossip still runs: the stop order's point.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.node.mesh import MeshRuntime
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import MeshCredentials

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runtime(creds: MeshCredentials, host: str, *, seeds: tuple[str, ...] = ()) -> MeshRuntime:
    identity = NodeIdentity(Ed25519PrivateKey.generate())
    me = NodeStatus(id=identity.node_id, incarnation=1.0)
    return MeshRuntime(MeshState(), identity, creds, me=me, seeds=seeds, host=host)


async def until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


async def test_a_stopping_node_leaves_the_mesh_before_its_endpoint_closes() -> None:
    creds = MeshCredentials.create()
    a = runtime(creds, "127.0.0.1")
    async with anyio.create_task_group() as tg:
        me_a = await tg.start(a.run)
        b = runtime(creds, "127.0.0.2", seeds=tuple(me_a.addrs))
        b_scope = anyio.CancelScope()
        tg.start_soon(_run_in, b_scope, b)
        await until(lambda: set(a.state.alive_nodes()) == {a.identity.node_id, b.identity.node_id})
        await until(lambda: set(b.state.alive_nodes()) == set(a.state.alive_nodes()))
        b_id = b.identity.node_id
        b_scope.cancel()  # what the node's stop does to its mesh component, last
        await until(lambda: b_id in a.state.deaths(), timeout=5)
        assert a.state.deaths()[b_id].by == b_id  # its own departure, not a's verdict
        assert set(a.state.alive_nodes()) == {a.identity.node_id}
        tg.cancel_scope.cancel()


async def _run_in(scope: anyio.CancelScope, mesh: MeshRuntime) -> None:
    with scope:
        await mesh.run()
