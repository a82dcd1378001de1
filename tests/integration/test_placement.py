"""The declarative control plane with real node processes: apply, placement, failover, prune.

What a user notices: models applied to a mesh of standby nodes come up on distinct nodes; when the
node serving one dies, a standby serves it again within seconds with the same output; applying the
set without a model stops its server everywhere; a model whose node left is served again by a
standby while people still ask for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshllm.testing.engines import engine_pids
from tests.integration.nodes import Mesh, NodeProcess, listed, wait_for
from tests.integration.test_mesh import greedy

pytestmark = pytest.mark.engine


def cli(node: NodeProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return node.cli(*args, stdin=stdin)


def manifest(*models: tuple[str, Path]) -> str:
    return json.dumps({"apiVersion": "meshllm/v1", "kind": "Mesh", "metadata": {"name": "test"},
                       "spec": {"models": [{"name": name, "source": str(path)} for name, path in models]}})


def ready_servers(node: NodeProcess, model: str) -> list[dict[str, Any]]:
    for entry in node.status()["models"]:
        if entry["name"] == model:
            return [s for s in entry["servers"] if s["phase"] == "ready"]
    return []


def condition(node: NodeProcess, model: str) -> dict[str, Any]:
    for entry in node.status()["models"]:
        if entry["name"] == model:
            return dict(entry["condition"])
    return {}


def start_standbys(mesh: Mesh, count: int) -> list[NodeProcess]:
    first = mesh.start("n0", "127.0.0.2", "--standby")
    token = first.token()
    nodes = [first] + [mesh.start(f"n{i}", f"127.0.0.{i + 2}", "--standby", "--join", token)
                       for i in range(1, count)]
    wait_for(lambda: all(len(n.status()["nodes"]) == count for n in nodes), timeout=30, what="the mesh to form")
    return nodes


def test_applied_models_are_placed_fail_over_and_are_pruned(mesh: Mesh, tiny_dense: Path,
                                                           tiny_moe: Path) -> None:
    nodes = start_standbys(mesh, 3)
    applied = cli(nodes[0], "apply", "-f", "-", stdin=manifest(("x", tiny_dense), ("y", tiny_moe)))
    assert applied.returncode == 0, applied.stderr
    wait_for(lambda: all(listed(n) == {"x", "y"} for n in nodes), timeout=60, what="x and y served")
    for model in ("x", "y"):
        wait_for(lambda m=model: condition(nodes[2], m).get("phase") == "Ready", timeout=10, what=f"{model} Ready")
    x_node, y_node = ready_servers(nodes[0], "x")[0]["node"], ready_servers(nodes[0], "y")[0]["node"]
    assert x_node != y_node
    ids = {n.status()["node"]["id"]: n for n in nodes}
    serving_x, client_side = ids[x_node], ids[y_node]
    before = greedy(client_side.api, "x")

    assert serving_x.proc is not None
    serving_x.proc.kill()
    for pid in engine_pids(serving_x.state_dir):  # the machine is gone: its llama-server too
        os.killpg(pid, signal.SIGKILL)
    killed = time.monotonic()
    survivors = [n for n in nodes if n is not serving_x]
    wait_for(lambda: all(any(s["node"] != x_node for s in ready_servers(n, "x")) for n in survivors),
             timeout=30, what="a standby to serve x")
    took = time.monotonic() - killed
    print(f"\nnode serving x killed: x served again by a standby after {took:.2f}s")
    assert took < 15 + 5  # 15 s plus the load of a tiny model
    standby = ready_servers(survivors[0], "x")[0]["node"]
    assert standby not in (x_node, y_node)
    assert greedy(client_side.api, "x") == before

    pruned = cli(client_side, "apply", "-f", "-", stdin=manifest(("y", tiny_moe)))
    assert pruned.returncode == 0, pruned.stderr
    assert "x" in pruned.stdout and "pruned" in pruned.stdout
    wait_for(lambda: all(listed(n) == {"y"} and not ready_servers(n, "x") for n in survivors), timeout=30,
             what="x to stop everywhere")
    wait_for(lambda: not engine_pids(ids[standby].state_dir), timeout=20, what="x's llama-server to exit")


def test_a_standby_serves_a_model_whose_node_left_while_it_is_asked_for(mesh: Mesh, tiny_dense: Path) -> None:
    owner = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    owner.wait_ready("tiny-dense")
    token = owner.token()
    standby = mesh.start("b", "127.0.0.3", "--standby", "--join", token)
    client = mesh.start("c", "127.0.0.4", "--client", "--join", token)
    wait_for(lambda: listed(client) == {"tiny-dense"}, timeout=30, what="C to see tiny-dense")
    before = greedy(client.api, "tiny-dense")  # a request: live demand for the model
    wait_for(lambda: "tiny-dense" in httpx.get(f"http://127.0.0.1:{standby.console}/api/demand").text,
             timeout=10, what="the request's demand to reach the standby")
    b_id, a_id = standby.status()["node"]["id"], owner.status()["node"]["id"]
    assert [s["node"] for s in ready_servers(client, "tiny-dense")] == [a_id]  # the owner, while alive

    assert owner.proc is not None
    owner.proc.kill()
    killed = time.monotonic()
    wait_for(lambda: [s["node"] for s in ready_servers(client, "tiny-dense")] == [b_id], timeout=30,
             what="the standby to take tiny-dense over")
    print(f"\nowner killed: the standby served its model after {time.monotonic() - killed:.2f}s")
    assert greedy(client.api, "tiny-dense") == before


def test_a_hot_model_gets_a_replica_on_the_standby(mesh: Mesh, tiny_dense: Path, tiny_moe: Path) -> None:
    nodes = start_standbys(mesh, 3)
    applied = cli(nodes[0], "apply", "-f", "-", stdin=manifest(("x", tiny_dense), ("y", tiny_moe)))
    assert applied.returncode == 0, applied.stderr
    wait_for(lambda: all(listed(n) == {"x", "y"} for n in nodes), timeout=60, what="x and y served")
    assert len(ready_servers(nodes[0], "x")) == 1
    with httpx.Client(base_url=nodes[0].api, timeout=30) as client:
        for _ in range(12):  # 12 a minute for x, none for y: x is hot
            reply = client.post("/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2})
            assert reply.status_code == 200
    wait_for(lambda: len(ready_servers(nodes[2], "x")) == 2, timeout=30, what="a second server for x")
    placed = {s["node"] for s in ready_servers(nodes[2], "x")} | {ready_servers(nodes[2], "y")[0]["node"]}
    assert len(placed) == 3  # the replica went to the node that served nothing
    leases = httpx.get(f"http://127.0.0.1:{nodes[1].console}/api/models/x").json()["leases"]
    assert sorted((le["slot"], le["hot"]) for le in leases) == [(0, False), (1, True)]


def test_a_draft_model_runs_beside_its_model_and_changes_no_output(mesh: Mesh, tiny_dense: Path,
                                                                    tmp_path: Path) -> None:
    from meshllm.engine.tinygguf import write_dense

    draft = write_dense(tmp_path / "draft.gguf", n_layer=3, seed=7)  # same vocabulary, other weights
    (node,) = start_standbys(mesh, 1)

    def apply(spec: dict[str, Any]) -> None:
        body = {"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": "m"}, "spec": spec}
        done = cli(node, "apply", "-f", "-", stdin=json.dumps(body))
        assert done.returncode == 0, done.stderr

    apply({"source": str(tiny_dense)})
    first = node.wait_ready("m")
    plain = greedy(node.api, "m")
    apply({"source": str(tiny_dense), "draft": str(draft)})
    def restarted() -> bool:
        ready = ready_servers(node, "m")  # read once: the server may change between two reads
        return bool(ready) and ready[0]["pid"] != first["pid"]

    wait_for(restarted, timeout=60, what="m restarted with its draft model")
    cmdline = Path(f"/proc/{ready_servers(node, 'm')[0]['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--model-draft" in cmdline and str(draft).encode() in cmdline
    assert greedy(node.api, "m") == plain  # speculative decoding keeps greedy output exactly
