"""A node agent that is killed leaves its llama-server running; started again, it adopts it.

What a user notices: restarting a crashed (SIGKILLed) node does not load the model a second time,
does not leave two llama-servers behind, and answers exactly as before; a llama-server that died
meanwhile, or one started with other settings, is replaced by a fresh one.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.nodes import NodeProcess, engine_pids

pytestmark = pytest.mark.engine

MODEL = "tiny-dense"


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    """Every node process a test starts, killed afterwards with whatever llama-server is left."""
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for node in started:
            node.kill_everything()


def _start(nodes: list[NodeProcess], state_dir: Path, engine_dir: Path, model: Path, *extra: str) -> NodeProcess:
    node = NodeProcess(models=[str(model)], state_dir=state_dir, engine_dir=engine_dir, extra=list(extra)).start()
    nodes.append(node)
    return node


def _kill_agent(node: NodeProcess) -> None:
    """SIGKILL the node agent alone: no shutdown path runs, its llama-server is in a session of its own."""
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()


def _greedy(node: NodeProcess) -> str:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
    response = httpx.post(f"{node.api}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


def _reasons(state_dir: Path) -> list[str]:
    """The event reasons the node recorded for the model, oldest first (read beside the running node: WAL)."""
    with sqlite3.connect(state_dir / "meshllm.db") as db:
        return [row[0] for row in db.execute("SELECT reason FROM events WHERE model = ? ORDER BY id", (MODEL,))]


def _wait_gone(pid: int, state_dir: Path, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pid in engine_pids(state_dir):
        assert time.monotonic() < deadline, f"llama-server {pid} still running"
        time.sleep(0.05)


def test_restarted_node_adopts_the_llama_server_it_left_running(
        tmp_path: Path, engine_dir: Path, tiny_dense: Path, nodes: list[NodeProcess]) -> None:
    state = tmp_path / "node"
    first = _start(nodes, state, engine_dir, tiny_dense)
    pid = first.wait_ready(MODEL)["pid"]
    before = _greedy(first)
    _kill_agent(first)
    assert engine_pids(state) == [pid]  # the agent is gone, its llama-server is not

    began = time.monotonic()
    second = _start(nodes, state, engine_dir, tiny_dense)
    server = second.wait_ready(MODEL)
    print(f"\nadopted llama-server ready {time.monotonic() - began:.2f}s after the node was started again")
    assert server["pid"] == pid and server["phase"] == "ready" and server["restarts"] == 0
    assert engine_pids(state) == [pid]
    assert _greedy(second) == before
    assert _reasons(state)[-2:] == ["Adopted", "Ready"]

    assert second.stop(signal.SIGTERM) == 0  # a clean stop still stops the adopted llama-server
    assert engine_pids(state) == []
    assert _reasons(state)[-1] == "Stopped"


def test_llama_server_that_died_while_the_node_was_down_is_started_afresh(
        tmp_path: Path, engine_dir: Path, tiny_dense: Path, nodes: list[NodeProcess]) -> None:
    state = tmp_path / "node"
    first = _start(nodes, state, engine_dir, tiny_dense)
    pid = first.wait_ready(MODEL)["pid"]
    before = _greedy(first)
    _kill_agent(first)
    os.killpg(pid, signal.SIGKILL)
    _wait_gone(pid, state)

    second = _start(nodes, state, engine_dir, tiny_dense)
    fresh = second.wait_ready(MODEL)["pid"]
    assert fresh != pid
    assert engine_pids(state) == [fresh]
    assert _greedy(second) == before
    assert "Adopted" not in _reasons(state)


def test_changed_settings_replace_the_adopted_llama_server(
        tmp_path: Path, engine_dir: Path, tiny_dense: Path, nodes: list[NodeProcess]) -> None:
    state = tmp_path / "node"
    first = _start(nodes, state, engine_dir, tiny_dense, "--threads", "1")
    pid = first.wait_ready(MODEL)["pid"]
    _kill_agent(first)

    second = _start(nodes, state, engine_dir, tiny_dense, "--threads", "2")
    fresh = second.wait_ready(MODEL)["pid"]
    assert fresh != pid
    _wait_gone(pid, state)
    assert engine_pids(state) == [fresh]
    cmdline = Path(f"/proc/{fresh}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--threads") + 1] == b"2"
    assert "Adopted" not in _reasons(state)
