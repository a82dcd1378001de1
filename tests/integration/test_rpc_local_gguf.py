"""Zero-transfer loading (issue 5): a ggml-rpc-server given the model's GGUF (``--gguf``, our patch)
loads its layers from that file, so almost nothing crosses the RPC connection while the model loads,
and the split's greedy output is the same as with a stock worker that received every byte."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from meshllm.engine.tinygguf import write_dense
from meshllm.testing.tcp_relay import CountingTcpRelay
from meshllm.testing.engines import running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


def _wait(ok, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            if ok():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    pytest.fail(f"{what} not ready in {timeout} s")


def _split_run(engine: Path, model: Path, tmp: Path, *, local: bool) -> tuple[int, str]:
    """Load ``model`` split onto one worker; (bytes sent to the worker during load, greedy text)."""
    rpc_port, port = _free_port(), _free_port()
    worker = [str(engine / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1"]
    name = "local" if local else "stock"
    with running(worker + (["--gguf", str(model)] if local else []), tmp / f"rpc-{name}.log") as rpc:
        _wait(lambda: _listening(rpc_port), rpc, "ggml-rpc-server")
        relay = CountingTcpRelay(rpc_port)
        env = dict(os.environ, GGML_RPC_HASH_THRESHOLD="1")  # every weight is offered by hash
        cmd = [str(engine / "llama-server"), "-m", str(model), "--port", str(port), "-t", "1", "-c", "256",
               "--no-warmup", "--rpc", f"127.0.0.1:{relay.port}", "-ngl", "99"]
        try:
            with running(cmd, tmp / f"server-{name}.log", env) as server, \
                    httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=120) as http:
                _wait(lambda: http.get("/health").status_code == 200, server, "llama-server")
                sent = relay.to_server
                reply = http.post("/completion", json={"prompt": "hello world", "n_predict": 16,
                                                       "temperature": 0, "top_k": 1, "cache_prompt": False})
                reply.raise_for_status()
                return sent, reply.json()["content"]
        finally:
            relay.close()


def test_a_worker_with_the_gguf_loads_its_layers_from_disk(engine_dir: Path, tmp_path: Path) -> None:
    # a 32k x 128 F32 output head (16 MB) plus small layers: the worker holds all but the input embedding
    model = write_dense(tmp_path / "tiny-32k.gguf", n_vocab=32000, n_embd=128)
    stock_bytes, stock_text = _split_run(engine_dir, model, tmp_path, local=False)
    local_bytes, local_text = _split_run(engine_dir, model, tmp_path, local=True)
    assert stock_bytes > 16_000_000  # the stock worker received its weights
    assert local_bytes <= 0.01 * stock_bytes, (local_bytes, stock_bytes)
    assert local_text == stock_text and local_text
