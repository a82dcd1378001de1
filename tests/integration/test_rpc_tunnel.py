"""The RPC tunnel on real parts: two QUIC endpoints (127.0.0.1 host, 127.0.0.2 worker), a real
ggml-rpc-server on the worker's loopback, and a real llama-server on the host that reaches it only
through the tunnel. Bytes cross unchanged, greedy output equals a solo llama-server, a refused
target closes the connection cleanly, and a worker that goes away makes llama-server exit."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.tunnels.rpc import RpcTunnelClient, RpcTunnelServer
from meshllm.tunnels.service import serve_streams
from meshllm.store.identity import NodeIdentity
from meshllm.testing.engines import running
from meshllm.transport import PeerConnection, QuicEndpoint, StreamKind
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

MESH = "rpc-tunnel-test"
SECRET = b"rpc tunnel test secret, 32 bytes"
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Pair:
    host: QuicEndpoint
    worker: QuicEndpoint
    client: RpcTunnelClient
    ports: dict[str, int]  # the worker's targets: model name -> local rpc-server port

    @property
    def worker_id(self) -> str:
        return self.worker.node_id


@asynccontextmanager
async def tunnel_pair() -> AsyncIterator[Pair]:
    """A host and a worker endpoint with the tunnel installed; the worker's targets start empty."""
    host, worker = (QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), MESH, SECRET, host=h)
                    for h in ("127.0.0.1", "127.0.0.2"))
    ports: dict[str, int] = {}
    serve_streams(worker, [RpcTunnelServer(lambda target: ("127.0.0.1", ports[target]) if target in ports else None)])

    async def connect(node_id: str) -> PeerConnection:
        return host.peer(node_id) or await host.connect(*worker.address)

    client = RpcTunnelClient(connect)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        await tg.start(worker.run)
        await tg.start(client.run)
        yield Pair(host, worker, client, ports)
        tg.cancel_scope.cancel()


async def echo_server(tg: anyio.abc.TaskGroup) -> int:
    """A TCP echo server on 127.0.0.1 (a stand-in rpc-server for the byte-level tests)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def echo(tcp: anyio.abc.SocketStream) -> None:
        async with tcp:
            try:
                async for data in tcp:
                    await tcp.send(data)
            except anyio.BrokenResourceError:
                pass

    async def serve() -> None:
        async with listener:
            await listener.serve(echo)

    tg.start_soon(serve)
    return int(listener.extra(anyio.abc.SocketAttribute.local_port))


async def read_until_closed(tcp: anyio.abc.SocketStream, *, timeout: float = 10) -> bytes:
    received = bytearray()
    with anyio.fail_after(timeout):
        try:
            async for data in tcp:
                received += data
        except anyio.BrokenResourceError:
            pass
    return bytes(received)


async def test_bytes_cross_unchanged_both_ways_and_sessions_are_independent() -> None:
    async with tunnel_pair() as pair, anyio.create_task_group() as tg:
        pair.ports["m"] = await echo_server(tg)
        port = await pair.client.open(pair.worker_id, "m")
        assert await pair.client.open(pair.worker_id, "m") == port  # reused
        payload = os.urandom(3 << 20)
        async with await anyio.connect_tcp("127.0.0.1", port) as a, \
                await anyio.connect_tcp("127.0.0.1", port) as b:
            await b.send(b"ping")
            async with anyio.create_task_group() as io:
                io.start_soon(a.send, payload)
                received = bytearray()
                with anyio.fail_after(30):
                    while len(received) < len(payload):
                        received += await a.receive()
            assert bytes(received) == payload
            assert await b.receive() == b"ping"
            await a.send_eof()
            assert await read_until_closed(a) == b""  # EOF passed on, the session closed
        tg.cancel_scope.cancel()


async def test_an_unknown_target_or_a_dead_rpc_server_is_refused_cleanly() -> None:
    async with tunnel_pair() as pair:
        pair.ports["stopped"] = free_port()  # nothing listens there
        for target in ("nope", "stopped"):
            port = await pair.client.open(pair.worker_id, target)
            async with await anyio.connect_tcp("127.0.0.1", port) as tcp:
                await tcp.send(b"hello")
                assert await read_until_closed(tcp) == b""
        conn = pair.host.peer(pair.worker_id)
        assert conn is not None and not conn.closed  # refusals close streams, not the connection
        async with anyio.create_task_group() as tg:
            pair.ports["nope"] = await echo_server(tg)  # the target appears: the same port now works
            async with await anyio.connect_tcp("127.0.0.1", await pair.client.open(pair.worker_id, "nope")) as tcp:
                await tcp.send(b"late")
                with anyio.fail_after(10):
                    assert await tcp.receive() == b"late"
            tg.cancel_scope.cancel()


@asynccontextmanager
async def echo_session(pair: Pair, tg: anyio.abc.TaskGroup) -> AsyncIterator[tuple[int, anyio.abc.SocketStream]]:
    """A tunnel to an echo server as target ``m``, and a TCP session through it that echoed once."""
    pair.ports["m"] = await echo_server(tg)
    port = await pair.client.open(pair.worker_id, "m")
    async with await anyio.connect_tcp("127.0.0.1", port) as tcp:
        await tcp.send(b"x")
        with anyio.fail_after(10):
            assert await tcp.receive() == b"x"
        yield port, tcp


async def test_close_ends_the_listener_and_its_sessions() -> None:
    async with tunnel_pair() as pair, anyio.create_task_group() as tg:
        async with echo_session(pair, tg) as (port, tcp):
            await pair.client.close(pair.worker_id, "m")
            assert await read_until_closed(tcp) == b""
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)
        assert pair.client.port(pair.worker_id, "m") is None
        tg.cancel_scope.cancel()


async def test_a_broken_connection_closes_the_tcp_side() -> None:
    async with tunnel_pair() as pair, anyio.create_task_group() as tg:
        async with echo_session(pair, tg) as (port, tcp):
            conn = pair.host.peer(pair.worker_id)
            assert conn is not None
            conn.close()
            assert await read_until_closed(tcp) == b""
        tg.cancel_scope.cancel()


# -- with the engine ------------------------------------------------------------------------------
async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
            try:
                await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                return
            except OSError:
                await anyio.sleep(0.05)


async def wait_healthy(http: httpx.AsyncClient, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    with anyio.fail_after(timeout):
        while True:
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}"
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await anyio.sleep(0.05)


def rpc_server(engine: Path, model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """A worker's ggml-rpc-server on 127.0.0.1 that loads its layers from its own copy (``--gguf``)."""
    with log.open("wb") as out:
        return subprocess.Popen([str(engine / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                 "-t", "1", "--gguf", str(model)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def llama_server(engine: Path, model: Path, port: int, *, rpc: int | None) -> list[str]:
    cmd = [str(engine / "llama-server"), "-m", str(model), "--port", str(port), "-t", "1", "-c", "256",
           "--no-warmup"]
    return cmd + (["--rpc", f"127.0.0.1:{rpc}", "-ngl", "99"] if rpc is not None else [])


async def complete(http: httpx.AsyncClient) -> str:
    reply = await http.post("/completion", json={"prompt": PROMPT, "n_predict": 24, "temperature": 0,
                                                 "top_k": 1, "cache_prompt": False})
    reply.raise_for_status()
    return str(reply.json()["content"])


@pytest.fixture
def split_env() -> dict[str, str]:
    return dict(os.environ, GGML_RPC_HASH_THRESHOLD="1")  # the worker loads every weight from its file


async def test_llama_server_through_the_tunnel_matches_solo_and_a_lost_worker_makes_it_exit(
        engine_dir: Path, tiny_dense: Path, tmp_path: Path, split_env: dict[str, str]) -> None:
    port = free_port()
    with running(llama_server(engine_dir, tiny_dense, port, rpc=None), tmp_path / "solo.log") as solo:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=120) as http:
            await wait_healthy(http, solo)
            expected = await complete(http)
    assert expected

    async with tunnel_pair() as pair:
        rpc_port = free_port()
        rpc = rpc_server(engine_dir, tiny_dense, rpc_port, tmp_path / "rpc.log")
        try:
            await wait_listening(rpc_port, rpc)
            pair.ports[tiny_dense.stem] = rpc_port
            tunnel = await pair.client.open(pair.worker_id, tiny_dense.stem)
            port = free_port()
            cmd = llama_server(engine_dir, tiny_dense, port, rpc=tunnel)
            with running(cmd, tmp_path / "split.log", split_env) as split:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                                             timeout=120) as http:
                    await wait_healthy(http, split)
                    assert "Accepted client connection" in (tmp_path / "rpc.log").read_text()  # via the tunnel
                    assert await complete(http) == expected
                    assert await complete(http) == expected

                    rpc.kill()  # the worker's rpc-server dies
                    rpc.wait()
                    with pytest.raises(httpx.HTTPError):
                        await complete(http)
                with anyio.fail_after(30):
                    while split.poll() is None:  # llama-server aborts instead of hanging
                        await anyio.sleep(0.1)
                assert split.returncode != 0
        finally:
            if rpc.poll() is None:
                rpc.kill()
                rpc.wait()

        # the mesh connection outlives the session, and a restarted worker serves a new host
        conn = pair.host.peer(pair.worker_id)
        assert conn is not None and not conn.closed
        stream = await conn.open_stream(StreamKind.RPC)  # the endpoint still serves RPC streams
        await stream.aclose()
        rpc = rpc_server(engine_dir, tiny_dense, rpc_port, tmp_path / "rpc2.log")
        try:
            await wait_listening(rpc_port, rpc)
            port = free_port()
            with running(llama_server(engine_dir, tiny_dense, port, rpc=tunnel), tmp_path / "split2.log",
                         split_env) as split:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                                             timeout=120) as http:
                    await wait_healthy(http, split)
                    assert await complete(http) == expected
        finally:
            rpc.kill()
            rpc.wait()


async def test_llama_server_given_an_unknown_target_fails_to_start(
        engine_dir: Path, tiny_dense: Path, tmp_path: Path, split_env: dict[str, str]) -> None:
    async with tunnel_pair() as pair:
        tunnel = await pair.client.open(pair.worker_id, "not-served-here")
        port = free_port()
        with running(llama_server(engine_dir, tiny_dense, port, rpc=tunnel), tmp_path / "split.log",
                     split_env) as split:
            with anyio.fail_after(60):
                while split.poll() is None:
                    await anyio.sleep(0.1)
            assert split.returncode != 0
        conn = pair.host.peer(pair.worker_id)
        assert conn is not None and not conn.closed
