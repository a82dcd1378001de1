"""The direct RPC path (``--rpc-direct``): plain TCP between node agents, authenticated both ways
with the mesh secret. Only a host holding the secret reaches a worker's rpc-server; bytes cross
unchanged; a split over it gives the same greedy output as one llama-server."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

from meshllm.node.rpc_direct import DirectAuthError, RpcDirectDialer, RpcDirectServer
from tests.integration.nodes import Mesh
from tests.integration.test_mesh import greedy
from tests.integration.test_split import MODEL, cap, condition, node_id, solo, split_model, wait_for, wait_for_all

__all__ = ["solo", "split_model"]  # fixtures used here

SECRET = b"s" * 32


async def _echo(tcp: anyio.abc.SocketStream) -> None:
    async with tcp:
        try:
            while True:
                await tcp.send(await tcp.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


async def test_only_a_host_holding_the_mesh_secret_reaches_the_rpc_server() -> None:
    echo = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)
    server = RpcDirectServer(SECRET, {"m": echo_port}.get, host="127.0.0.1")
    async with echo, anyio.create_task_group() as tg:
        tg.start_soon(echo.serve, _echo)
        port = await tg.start(server.run)
        where = {"w": f"127.0.0.1:{port}"}.get
        tcp, early = await RpcDirectDialer(SECRET, where).connect("w", "m")
        async with tcp:
            payload = bytes(range(256)) * 4096  # 1 MiB, unchanged both ways
            await tcp.send(payload)
            got = bytearray(early)
            while len(got) < len(payload):
                got += await tcp.receive()
            assert bytes(got) == payload
        with pytest.raises(DirectAuthError):
            await RpcDirectDialer(b"x" * 32, where).connect("w", "m")  # a peer without the secret
        with pytest.raises(OSError, match="no rpc-server"):
            await RpcDirectDialer(SECRET, where).connect("w", "unknown")
        tg.cancel_scope.cancel()


@pytest.mark.engine
def test_a_split_over_the_direct_path_gives_the_same_output(mesh: Mesh, split_model: Path, solo: str) -> None:
    vram = cap(split_model, 0.8)
    a = mesh.start("a", "127.0.0.2", "--rpc-direct", "--max-vram", vram, models=(str(split_model),))
    wait_for(lambda: "token" in a.status(), timeout=60, what="a's API")
    b = mesh.start("b", "127.0.0.3", "--standby", "--rpc-direct", "--max-vram", vram, "--join", a.status()["token"])
    wait_for_all((a, b))
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=90, what="the split to be ready")
    nodes = {node_id(n): n for n in (a, b)}
    host = nodes[condition(a)["nodes"][0]]
    worker_id = condition(a)["workers"][0]
    assert nodes[worker_id].status()["node"]["rpc_direct"].startswith("127.0.0.")
    assert greedy(a.api, MODEL) == greedy(solo, MODEL)
    traffic = [t for t in host.status()["rpc_tunnels"] if t["node"] == worker_id]
    assert traffic and traffic[0]["sent"] > 0 and traffic[0]["received"] > 0
