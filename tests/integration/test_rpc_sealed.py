"""The sealed RPC channel (engine patch 0005), the default path of a split, and its handshake gate.

What a user notices: a split's RPC bytes cross straight between the host's llama-server and the
worker's rpc-server, sealed with keys only mesh members can derive, so nobody outside the mesh can
use a worker or read what crosses, and the split gives the same greedy output as one llama-server.
A client that trickles its key handshake holds nothing: the server gives up on it after 5 s however
slowly it sends, and a host that (re)connects meanwhile is served at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshllm.engine.rpc_auth import RPC_SECRET_ENV, RpcAuthError, rpc_key
from meshllm.testing.engines import running
from tests.conftest import free_port
from tests.integration.nodes import Mesh, wait_for
from tests.integration.test_mesh import greedy
from tests.integration.test_rpc_direct import KEY, hello_answered, listening, rpc_server
from tests.integration.test_split import MODEL, cap, condition, node_id, solo, split_model, wait_for_all

__all__ = ["solo", "split_model"]  # fixtures used here

pytestmark = pytest.mark.engine

HELLO = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)  # RPC_CMD_HELLO, no transport caps


def _mac(label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(KEY.encode(), label + a + b, hashlib.sha256).digest()


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Sealed:
    """A client of the sealed channel written from the patch's description with Python's own AES-GCM:
    if it talks to the engine, the engine seals as described."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        nonce_c = secrets.token_bytes(32)
        self.sock.sendall(b"RPCAUTH2" + nonce_c)
        reply = _recv(self.sock, 64)
        nonce_s, server_mac = reply[:32], reply[32:]
        assert hmac.compare_digest(server_mac, _mac(b"server2", nonce_c, nonce_s))
        self.sock.sendall(_mac(b"client2", nonce_s, nonce_c))
        self.tx, self.rx = AESGCM(_mac(b"c2s key", nonce_c, nonce_s)), AESGCM(_mac(b"s2c key", nonce_c, nonce_s))
        self.tx_seq = self.rx_seq = 0

    def record(self, plaintext: bytes) -> bytes:
        header = len(plaintext).to_bytes(4, "little")
        sealed = self.tx.encrypt(bytes(4) + self.tx_seq.to_bytes(8, "big"), plaintext, header)
        self.tx_seq += 1
        return header + sealed

    def receive(self) -> bytes:
        header = _recv(self.sock, 4)
        body = _recv(self.sock, int.from_bytes(header, "little") + 16)
        plaintext = self.rx.decrypt(bytes(4) + self.rx_seq.to_bytes(8, "big"), body, header)
        self.rx_seq += 1
        return plaintext


def closed_soon(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def test_the_sealed_channel_is_aes_gcm_and_a_tampered_record_ends_the_connection(engine_dir: Path,
                                                                                  split_model: Path,
                                                                                  tmp_path: Path) -> None:
    port = free_port()
    with rpc_server(engine_dir, split_model, port, tmp_path / "rpc.log", KEY):
        wait_for(lambda: listening(port), timeout=30, what="the rpc-server")
        client = Sealed(port)
        client.sock.sendall(client.record(HELLO))
        answer = client.receive()  # the HELLO answer, sealed with the server-to-client key
        assert int.from_bytes(answer[:8], "little") == len(answer) - 8 > 0
        client.sock.close()

        tampered = Sealed(port)
        record = bytearray(tampered.record(HELLO))
        record[6] ^= 1  # one bit of the ciphertext
        tampered.sock.sendall(bytes(record))
        assert closed_soon(tampered.sock)  # refused, nothing answered
        tampered.sock.close()
        assert anyio.run(hello_answered, port, KEY)  # and the server serves the next client
    assert "failed authentication" in (tmp_path / "rpc.log").read_text()


@contextmanager
def tricklers(port: int, count: int) -> Iterator[list[float]]:
    """``count`` clients that each send the key handshake one byte a second and, when the server
    closes them, connect again; yields how long each connection was held before the server closed it."""
    held: list[float] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    opened = time.monotonic()
                    for byte in b"RPCAUTH2" + bytes(32):
                        sock.sendall(bytes([byte]))
                        if stop.wait(1.0):
                            return
                        if select_closed(sock):
                            break
                    held.append(time.monotonic() - opened)
            except OSError:
                stop.wait(0.1)

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield held
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def select_closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (it sends nothing before the handshake completes)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


@contextmanager
def split_host(engine_dir: Path, model: Path, port: int, api: int, log: Path) -> Iterator[str]:
    with running([str(engine_dir / "llama-server"), "--model", str(model), "--alias", MODEL, "--port", str(api),
                  "--rpc", f"127.0.0.1:{port}", "-ngl", "99", "--no-webui"], log,
                 env={**os.environ, RPC_SECRET_ENV: KEY, "GGML_RPC_HASH_THRESHOLD": "1",
                      "GGML_RPC_LOAD_BY_NAME": "1"}):
        url = f"http://127.0.0.1:{api}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout=60,
                 what="the split host while clients trickle their handshakes")
        yield url


def test_clients_that_trickle_the_handshake_hold_nothing(engine_dir: Path, split_model: Path, solo: str,
                                                          tmp_path: Path) -> None:
    port = free_port()
    expected = greedy(solo, MODEL)
    with rpc_server(engine_dir, split_model, port, tmp_path / "rpc.log", KEY):
        wait_for(lambda: listening(port), timeout=30, what="the rpc-server")
        with tricklers(port, 4) as held:
            wait_for(lambda: len(held) >= 1, timeout=30, what="the server to give up on a trickling client")
            # the whole handshake has 5 s, however slowly it comes (one byte a second: 40 s to finish)
            assert all(4.0 <= h < 9.0 for h in held), held
            with split_host(engine_dir, split_model, port, free_port(), tmp_path / "host1.log") as url:
                assert greedy(url, MODEL) == expected
            # the host restarts while they still trickle: served again at once, not after them
            with split_host(engine_dir, split_model, port, free_port(), tmp_path / "host2.log") as url:
                assert greedy(url, MODEL) == expected
            assert all(h < 9.0 for h in held), held


def test_a_split_over_the_default_path_is_sealed_and_refuses_outsiders(mesh: Mesh, split_model: Path,
                                                                       solo: str) -> None:
    vram = cap(split_model, 0.8)
    a = mesh.start("a", "127.0.0.2", "--max-vram", vram, models=(str(split_model),))
    b = mesh.start("b", "127.0.0.3", "--standby", "--max-vram", vram, "--join", a.token())
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
    assert argv[argv.index(b"--rpc") + 1].decode() == direct  # straight to the worker, no agent in between
    env = dict(line.split(b"=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line)
    assert RPC_SECRET_ENV.encode() in env and b"GGML_RPC_CLEAR" not in env  # so it asks for the sealed channel
    assert not host.status()["rpc_tunnels"]

    where, port = direct.rsplit(":", 1)
    with socket.create_connection((where, int(port)), timeout=5) as outsider:  # no key: closed, nothing served
        outsider.sendall(HELLO)
        assert closed_soon(outsider)
    with pytest.raises(RpcAuthError):  # another mesh's key: the worker's answer does not check out
        anyio.run(_authenticate_direct, where, int(port), rpc_key(b"x" * 32))
    assert greedy(a.api, MODEL) == greedy(solo, MODEL)  # the split serves on


async def _authenticate_direct(host: str, port: int, key: str) -> None:
    from meshllm.engine.rpc_auth import authenticate
    async with await anyio.connect_tcp(host, port) as tcp:
        await authenticate(tcp, key)

