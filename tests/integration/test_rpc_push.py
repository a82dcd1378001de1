"""Activations from one worker to the next, not back through the host (engine patch 0006), and the
handshake gate that makes room for a host instead of turning it away.

What a user notices: with three nodes, the hidden state leaving the first worker's layers reaches the
second worker over a connection of their own (proving the mesh's key, sealed like the host's), so the
host's link carries a token's activations once instead of once per worker, and the output is
unchanged. And clients that open connection after connection and trickle their key handshakes cannot
lock a host out of a worker: the oldest unfinished handshake is cut to make room for a new one.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from meshllm.engine.rpc_auth import RPC_DELTA_ENV, RPC_PUSH_ENV, RPC_SECRET_ENV
from meshllm.engine.tinygguf import write_dense
from meshllm.testing.engines import engine_pids, running
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, wait_for
from tests.integration.test_mesh import greedy
from tests.integration.test_rpc_direct import KEY, listening
from tests.integration.test_rpc_sealed import tricklers
from tests.integration.test_split import MODEL, cap, condition, node_id, solo, split_model, wait_for_all

__all__ = ["solo", "split_model"]  # fixtures used here

pytestmark = pytest.mark.engine


def stats(path: Path) -> dict[str, tuple[int, int, int]]:
    """A worker's GGML_RPC_STATS file: command -> (count, bytes in, bytes out)."""
    rows = (line.split() for line in path.read_text().splitlines())
    return {name: (int(count), int(bytes_in), int(bytes_out)) for name, count, bytes_in, bytes_out in rows}


@contextmanager
def two_worker_split(engine_dir: Path, model: Path, tmp_path: Path, *, push: bool,
                     delta: bool = False) -> Iterator[tuple[str, list[Path]]]:
    """Two keyed rpc-servers, each counting its commands, and a llama-server split over them (the first
    worker holds the first layers, the second the rest and the output); yields its URL and the two
    stats files, which are complete once the host has stopped."""
    tmp_path.mkdir()
    ports = [free_port(), free_port()]
    files = [tmp_path / f"stats-{port}.txt" for port in ports]
    with ExitStack() as stack:
        for port, file in zip(ports, files, strict=True):
            stack.enter_context(running(
                [str(engine_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "--gguf", str(model)],
                tmp_path / f"rpc-{port}.log", env={**os.environ, RPC_SECRET_ENV: KEY, "GGML_RPC_STATS": str(file)}))
            wait_for(lambda port=port: listening(port), timeout=30, what="an rpc-server")
        env = {**os.environ, RPC_SECRET_ENV: KEY, "GGML_RPC_HASH_THRESHOLD": "1", "GGML_RPC_LOAD_BY_NAME": "1"}
        if push:
            env[RPC_PUSH_ENV] = "1"
        if delta:
            env[RPC_DELTA_ENV] = "1"
        api = free_port()
        url = f"http://127.0.0.1:{api}"
        with running([str(engine_dir / "llama-server"), "--model", str(model), "--alias", MODEL, "--port", str(api),
                      "--rpc", ",".join(f"127.0.0.1:{port}" for port in ports), "-ngl", "99", "--no-webui"],
                     tmp_path / f"host-{api}.log", env=env):
            wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout=60,
                     what="the split host")
            yield url, files
        # the host has stopped: each worker writes its counts when the connection ends
        wait_for(lambda: all(file.exists() for file in files), timeout=10, what="the workers' counts")


def test_activations_go_from_worker_to_worker_and_the_output_is_unchanged(engine_dir: Path, split_model: Path,
                                                                           solo: str, tmp_path: Path) -> None:
    expected = greedy(solo, MODEL)
    with two_worker_split(engine_dir, split_model, tmp_path / "via-host", push=False) as (url, via_host):
        assert greedy(url, MODEL) == expected
    with two_worker_split(engine_dir, split_model, tmp_path / "direct", push=True) as (url, direct):
        assert greedy(url, MODEL) == expected
    before = [stats(file) for file in via_host]
    after = [stats(file) for file in direct]
    assert not any("push_tensor" in counts or "await_tensor" in counts for counts in before)
    # one worker computes the first layers and now pushes their output to the other (one push per
    # token at least), which the host tells to wait for it
    first = next(i for i, counts in enumerate(after) if "push_tensor" in counts)
    pushes = after[first]["push_tensor"][0]
    assert pushes >= 32 and after[1 - first]["await_tensor"][0] == pushes
    # so at least one round trip a token fewer comes back to the host from that worker
    assert after[first]["get_tensor"][0] <= before[first]["get_tensor"][0] - 32
    logs = sorted(log.read_text() for log in (tmp_path / "direct").glob("rpc-*.log"))
    assert any("Sending activations to the worker at 127.0.0.1:" in log for log in logs), logs
    assert any("Accepted a worker's connection" in log for log in logs), logs


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense model wide enough (1024) for a 4 KB row of activations to stand out in the byte counts."""
    return write_dense(tmp_path_factory.mktemp("wide") / f"{MODEL}.gguf", n_layer=4, n_embd=1024, n_ff=256,
                       n_vocab=512, seed=5)


def test_a_worker_is_sent_no_rows_of_unused_embedding_branches(engine_dir: Path, wide_model: Path,
                                                                 tmp_path: Path) -> None:
    # llama.cpp builds the input embedding as a choice of three branches and computes one; the worker
    # holding the first layers used to receive the inputs of all three, three rows of activations a token
    # (engine patch 0007)
    with two_worker_split(engine_dir, wide_model, tmp_path / "split", push=False) as (url, files):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            client.completions.create(model=MODEL, prompt="Once", max_tokens=64, temperature=0,
                                      extra_body={"ignore_eos": True})
    hidden = 4 * 1024  # one row of activations, F32
    for counts in (stats(file) for file in files):
        graphs = counts.get("graph_compute", (0, 0, 0))[0] + counts.get("graph_recompute", (0, 0, 0))[0]
        assert graphs >= 64
        per_graph = counts["set_tensor"][1] / graphs  # bytes the host sent the worker for each token
        assert per_graph < 2 * hidden, (per_graph, counts)


def test_a_long_contexts_mask_crosses_as_what_changed(engine_dir: Path, split_model: Path, tmp_path: Path) -> None:
    # each decoded token the host sets the attention mask again: one entry per cell of context (2-4 bytes),
    # of which one changes; with patch 0008 only the changed bytes cross, and the output is the same
    prompt = " ".join(f"w{i}" for i in range(300))
    runs = {}
    for delta in (False, True):
        with two_worker_split(engine_dir, split_model, tmp_path / f"delta-{delta}", push=False,
                              delta=delta) as (url, files):
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0,
                                                   extra_body={"ignore_eos": True})
        counts = [stats(file) for file in files]
        sent = sum(c.get("set_tensor", (0, 0, 0))[1] + c.get("set_tensor_delta", (0, 0, 0))[1] for c in counts)
        runs[delta] = (answer.choices[0].text, answer.usage.prompt_tokens if answer.usage else 0, sent,
                       sum(c.get("set_tensor_delta", (0, 0, 0))[0] for c in counts))
    (text, prompt_tokens, whole, _), (text_delta, _, sent, deltas) = runs[False], runs[True]
    assert text_delta == text and prompt_tokens > 500
    assert deltas >= 64
    # at least 64 tokens x 2 workers x 1 KB of mask (> 500 cells of context, 2 bytes or more each) saved
    assert whole - sent >= 64 * 2 * 1024, (whole, sent)


def test_a_flood_of_stalled_handshakes_cannot_lock_the_host_out(engine_dir: Path, split_model: Path, solo: str,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    expected = greedy(solo, MODEL)
    log = tmp_path / "rpc.log"
    with running([str(engine_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "--gguf", str(split_model)],
                 log, env={**os.environ, RPC_SECRET_ENV: KEY}):
        wait_for(lambda: listening(port), timeout=30, what="the rpc-server")
        # more clients than the gate has room for (64), each trickling its handshake and reconnecting
        with tricklers(port, 80):
            wait_for(lambda: "unfinished key handshake(s) to make room" in log.read_text(), timeout=30,
                     what="the gate to cut the oldest handshakes")
            env = {**os.environ, RPC_SECRET_ENV: KEY, "GGML_RPC_HASH_THRESHOLD": "1", "GGML_RPC_LOAD_BY_NAME": "1"}
            for attempt in range(2):  # a host, then a restarted one, each served while the flood goes on
                api = free_port()
                with running([str(engine_dir / "llama-server"), "--model", str(split_model), "--alias", MODEL,
                              "--port", str(api), "--rpc", f"127.0.0.1:{port}", "-ngl", "99", "--no-webui"],
                             tmp_path / f"host{attempt}.log", env=env):
                    url = f"http://127.0.0.1:{api}"
                    wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout=60,
                             what="the split host during the flood")
                    assert greedy(url, MODEL) == expected


def test_a_three_stage_split_pushes_between_workers_and_recovers_when_the_pusher_dies(mesh: Mesh, split_model: Path,
                                                                                      solo: str) -> None:
    vram = cap(split_model, 0.45)  # any three nodes hold it (1.35 >= 1.1), no two do (0.9)
    # a declares the model but has no room for any of it, so it outlives whichever participant dies (a
    # --model leaves the mesh with the node that declared it)
    a = mesh.start("a", "127.0.0.2", "--max-vram", "1000B", models=(str(split_model),))
    token = a.token()
    others = [mesh.start(name, f"127.0.0.{i}", "--standby", "--max-vram", vram, "--join", token)
              for i, name in ((3, "b"), (4, "c"), (5, "d"), (6, "e"))]
    nodes = {node_id(n): n for n in wait_for_all((a, *others))}
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=120, what="the three-stage split")
    first = condition(a)
    assert len(first["workers"]) == 2, first
    host = nodes[first["nodes"][0]]
    entry = next(m for m in host.status()["models"] if m["name"] == MODEL)
    pid = next(s["pid"] for s in entry["servers"] if s["phase"] == "ready")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"{RPC_PUSH_ENV}=1".encode() in environ  # both workers are reached straight: they push
    expected = greedy(solo, MODEL)
    assert greedy(a.api, MODEL) == expected

    def engine_logs(node: NodeProcess) -> str:
        return "".join(log.read_text(errors="replace") for log in node.state_dir.rglob("*.log"))

    workers = [nodes[w] for w in first["workers"]]
    pusher = next(w for w in workers if "Sending activations to the worker at" in engine_logs(w))
    receiver = next(w for w in workers if w is not pusher)
    assert "Accepted a worker's connection" in engine_logs(receiver)
    spare = next(n for n in others if n not in (host, *workers))

    # the worker that pushes dies mid-decode: the other one, waiting for its push, lets go of the dead
    # host, and the split comes back with the spare node in its place, with the same output
    assert pusher.proc is not None
    with openai.OpenAI(base_url=f"{a.api}/v1", api_key="unused", max_retries=0) as client:
        chunks = iter(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=100_000,
                                                temperature=0, stream=True))
        next(chunks)
        pusher.proc.kill()
        for engine in engine_pids(pusher.state_dir):
            subprocess.run(["kill", "-9", str(engine)], check=False)
        with pytest.raises(openai.APIError):
            for _ in chunks:
                pass

    def replanned() -> bool:
        now = condition(a)
        return now.get("phase") == "Ready" and node_id(spare) in now.get("workers", []) + now.get("nodes", [])

    wait_for(replanned, timeout=120, what="the split to come back without the dead worker")
    assert greedy(a.api, MODEL) == expected
