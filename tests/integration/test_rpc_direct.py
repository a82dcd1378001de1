"""The mesh's RPC key (engine patch 0004) and the direct path it makes safe (``--rpc-direct``).

A ggml-rpc-server started with ``GGML_RPC_SECRET`` serves no command to a client that cannot prove
the key and keeps serving the ones that can; a llama-server holding the key splits onto it with the
same greedy output. With ``--rpc-direct`` the host's llama-server connects to the worker's
rpc-server straight, on the worker's address, and asks for the unsealed channel (the default path is
the same connection, sealed: test_rpc_sealed.py)."""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import anyio
import pytest

from meshllm.engine.rpc_auth import RPC_SECRET_ENV, RpcAuthError, authenticate, rpc_key
from meshllm.testing.engines import running
from tests.conftest import free_port
from tests.integration.nodes import Mesh, wait_for
from tests.integration.test_mesh import greedy
from tests.integration.test_split import MODEL, cap, condition, node_id, solo, split_model, wait_for_all

__all__ = ["solo", "split_model"]  # fixtures used here

pytestmark = pytest.mark.engine

KEY = rpc_key(b"s" * 32)


def rpc_server(engine: Path, model: Path, port: int, log: Path, key: str) -> AbstractContextManager[object]:
    """A ggml-rpc-server on 127.0.0.1 that demands ``key``."""
    return running([str(engine / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "--gguf", str(model)],
                   log, env={**os.environ, RPC_SECRET_ENV: key})


async def hello_answered(port: int, key: str | None) -> bool:
    """Whether the rpc-server answers a HELLO command (after proving ``key``, or with no handshake)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as tcp:
        if key is not None:
            await authenticate(tcp, key)
        await tcp.send(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))  # RPC_CMD_HELLO, no caps
        try:
            with anyio.fail_after(10):  # without a handshake the server gives up on it after 5 s
                return len(await tcp.receive()) > 0
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return False


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_an_rpc_server_with_the_key_serves_only_clients_that_prove_it(engine_dir: Path, split_model: Path,
                                                                      tmp_path: Path) -> None:
    port = free_port()
    with rpc_server(engine_dir, split_model, port, tmp_path / "rpc.log", KEY):
        wait_for(lambda: listening(port), timeout=30, what="the rpc-server")
        assert not anyio.run(hello_answered, port, None)  # no handshake: closed, no command served
        with pytest.raises(RpcAuthError):  # the wrong key: the server's answer does not check out
            anyio.run(hello_answered, port, rpc_key(b"x" * 32))
        assert anyio.run(hello_answered, port, KEY)  # and it still serves those that prove it
    assert "Refused a client connection" in (tmp_path / "rpc.log").read_text()


def test_llama_server_with_the_wrong_key_does_not_load_onto_the_worker(engine_dir: Path, split_model: Path,
                                                                       tmp_path: Path) -> None:
    port, api = free_port(), free_port()
    with rpc_server(engine_dir, split_model, port, tmp_path / "rpc.log", KEY):
        wait_for(lambda: listening(port), timeout=30, what="the rpc-server")
        host = subprocess.run([str(engine_dir / "llama-server"), "--model", str(split_model), "--port", str(api),
                               "--rpc", f"127.0.0.1:{port}", "-ngl", "99", "--no-webui"],
                              env={**os.environ, RPC_SECRET_ENV: rpc_key(b"x" * 32)}, capture_output=True,
                              timeout=60)
    assert host.returncode != 0
    assert b"RPC server does not hold GGML_RPC_SECRET" in host.stdout + host.stderr


def test_a_split_over_the_direct_path_gives_the_same_output(mesh: Mesh, split_model: Path, solo: str) -> None:
    vram = cap(split_model, 0.8)
    a = mesh.start("a", "127.0.0.2", "--rpc-direct", "--max-vram", vram, models=(str(split_model),))
    b = mesh.start("b", "127.0.0.3", "--standby", "--rpc-direct", "--max-vram", vram, "--join", a.token())
    wait_for_all((a, b))
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=90, what="the split to be ready")
    nodes = {node_id(n): n for n in (a, b)}
    host = nodes[condition(a)["nodes"][0]]
    worker_id = condition(a)["workers"][0]
    assert greedy(a.api, MODEL) == greedy(solo, MODEL)
    entry = next(m for m in host.status()["models"] if m["name"] == MODEL)
    direct = next(w["direct"] for w in entry["workers"] if w["node"] == worker_id)
    assert direct.startswith("127.0.0.") and not direct.startswith("127.0.0.1:")  # the worker's own address
    pid = next(s["pid"] for s in entry["servers"] if s["phase"] == "ready")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--rpc") + 1].decode() == direct  # llama-server connects to the worker itself
    assert b"GGML_RPC_CLEAR=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")  # unsealed (patch 0005)
    assert not host.status()["rpc_tunnels"]  # and no tunnel carries its bytes
