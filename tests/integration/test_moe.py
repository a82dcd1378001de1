"""Expert sharding with real node processes: an MoE model no node can hold alone, split by experts.

What a user notices: the model is served by three nodes, each running its own llama-server on its own
shard file (the trunk and some experts); a conversation (a session key) always lands on the same node,
different ones spread over the nodes; nothing goes over RPC between the nodes while they answer; when a
node dies, its sessions are answered by the others within seconds. A shard that keeps every expert
answers exactly as the whole model does, and bad input (a truncated MoE file, an architecture the
detector does not know, a mesh too small for any shard) gets a clear reason and no crash loop.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import httpx
import pytest

from meshllm.api.sessions import rendezvous
from meshllm.engine.tinygguf import write_moe
from meshllm.moe.detect import detect_moe
from meshllm.moe.importance import expert_ranks
from meshllm.moe.plan import composition_digest, shard_experts
from meshllm.testing.engines import engine_pids
from tests.integration.nodes import Mesh, NodeProcess, wait_for
from tests.integration.test_mesh import greedy
from tests.integration.test_placement import cli
from tests.conftest import free_port
from tests.integration.test_split import cap, condition, node_id, wait_for_all

pytestmark = pytest.mark.engine

MODEL = "moe-shards"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen3moe: 8 experts, 2 used per token, F32 (every node computes it identically)."""
    return write_moe(tmp_path_factory.mktemp("moe") / f"{MODEL}.gguf", n_layer=2, n_expert=8, n_expert_used=2, seed=5)


@pytest.fixture
def solo(engine_dir: Path, moe_model: Path, tmp_path: Path) -> Iterator[str]:
    """One plain llama-server on the whole model: the reference output."""
    port = free_port()
    log = (tmp_path / "solo.log").open("wb")
    proc = subprocess.Popen([str(engine_dir / "llama-server"), "--model", str(moe_model), "--alias", MODEL,
                             "--host", "127.0.0.1", "--port", str(port), "--n-gpu-layers", "0", "--no-webui"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, timeout=60, what="solo server")
        yield url
    finally:
        proc.kill()
        proc.wait()
        log.close()


def served_requests(node: NodeProcess) -> int:
    """Requests the node's llama-server for the model has taken (its log's slot launches)."""
    log = node.state_dir / "logs" / f"{MODEL}.log"
    return log.read_text(errors="replace").count("launch_slot_") if log.exists() else 0


def ask(entry: NodeProcess, user: str, *, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{entry.api}/v1/chat/completions", timeout=timeout,
                      json={"model": MODEL, "user": user, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4, "temperature": 0})


def landed(entry: NodeProcess, user: str, nodes: list[NodeProcess]) -> NodeProcess:
    """The node whose llama-server answered ``user``'s request."""
    before = [served_requests(n) for n in nodes]
    response = ask(entry, user)
    assert response.status_code == 200, response.text
    grew = [n for n, count in zip(nodes, before, strict=True) if served_requests(n) > count]
    assert len(grew) == 1, [n.state_dir.name for n in grew]
    return grew[0]


def ready_shards(node: NodeProcess) -> dict[str, Any]:
    cond = condition(node, MODEL)
    return cond if cond.get("phase") == "Ready" and cond.get("ready") == cond.get("wanted") else {}


def shards_follow_the_statistics(nodes: list[NodeProcess], cache: Path) -> list[float]:
    """Each node's shard keeps the experts the computed routing statistics give it (core 4, 3 shards, 1 copy),
    not the id order; returns each shard's routing mass from the counts."""
    (stats_file,) = (cache / "moe-importance").glob("*.json")  # one computation, cached where it ran
    counts = {int(k): v for k, v in json.loads(stats_file.read_text())["counts"].items()}
    ranks = expert_ranks(load_counts(counts), n_layer=2, n_expert=8)
    assert ranks != [list(range(8))] * 2, "random routing matching id order would prove nothing"
    masses = []
    for node in nodes:
        (shard,) = (node.state_dir / "shards").glob("*.gguf")
        index = int(shard.name.rsplit("-", 1)[1].split("of")[0]) - 1
        kept = shard_experts(ranks, core=4, shards=3, copies=1, index=index)
        assert json.loads(shard.with_name(shard.name + ".json").read_text())["experts"] == composition_digest(kept)
        masses.append(sum(sum(counts[layer][e] for e in kept[layer]) / sum(counts[layer]) for layer in (0, 1)) / 2)
    return masses


def load_counts(counts: dict[int, list[int]]) -> list[list[float]]:
    return [[c / sum(counts[layer]) for c in counts[layer]] for layer in sorted(counts)]


def test_an_moe_model_no_node_holds_is_split_by_experts_and_sessions_stick(
        mesh: Mesh, moe_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"  # the nodes' cache: no routing statistics computed before
    monkeypatch.setenv("MESHLLM_CACHE_DIR", str(cache))
    vram = cap(moe_model, 0.95)  # no node holds it (0.95 < 1.1); a shard of 6 of 8 experts fits each
    a = mesh.start("a", "127.0.0.2", "--max-vram", vram, models=(str(moe_model),))
    token = a.token()
    b = mesh.start("b", "127.0.0.3", "--standby", "--max-vram", vram, "--join", token)
    c = mesh.start("c", "127.0.0.4", "--standby", "--max-vram", vram, "--join", token)
    nodes = [a, b, c]
    wait_for_all((a, b, c))
    wait_for(lambda: bool(ready_shards(a)), timeout=120, what="three expert shards to be ready")
    cond = ready_shards(a)
    assert cond["wanted"] == 3 and len(cond["nodes"]) == 3 and len(cond["shards"]) == 3, cond
    assert "split by experts into 3 shards" in cond["message"], cond

    # one shard file per node, each a whole qwen3moe with the core of 4 experts and its share of the other
    # 4 (2, 1 and 1: every expert on one node at least), smaller than the model
    files = [list((n.state_dir / "shards").glob("*.gguf")) for n in nodes]
    assert all(len(f) == 1 for f in files), files
    assert len({f[0].name for f in files}) == 3
    kept = []
    for (shard,) in files:
        info = detect_moe(shard)
        assert info is not None and info.n_used == 2
        kept.append(info.n_expert)
        assert shard.stat().st_size < moe_model.stat().st_size
    assert sorted(kept) == [5, 5, 6], kept
    described = cli(b, "describe", "model", MODEL).stdout
    assert "Expert shards:" in described and "/8 experts per layer" in described, described

    # the routing statistics were computed automatically, once, by one node (llama-imatrix), and every shard
    # was dealt from them; each shard shows the routing mass it keeps
    assert sum("computed by llama-imatrix" in n.log_text() for n in nodes) == 1
    print(next(line for n in nodes for line in n.log_text().splitlines() if "computed by llama-imatrix" in line))
    assert "expert order: routing statistics (" in cond["message"], cond
    masses = shards_follow_the_statistics(nodes, cache)
    shown = sorted(float(m) / 100 for m in re.findall(r"keeps ([\d.]+)% of routing mass", " ".join(cond["shards"])))
    assert shown == pytest.approx(sorted(masses), abs=0.001), (shown, masses)
    assert all(0.5 < m < 1.0 for m in masses) and "routing mass" in described

    # the same session key always reaches the same node, whichever node it enters by; keys spread
    users = [f"user-{i}" for i in range(12)]
    where = {user: landed(a, user, nodes) for user in users}
    assert len({n.state_dir.name for n in where.values()}) >= 2, {u: n.state_dir.name for u, n in where.items()}
    for user in users[:6]:
        assert landed(a, user, nodes) is where[user]
        assert landed(c, user, nodes) is where[user]
    # zero RPC between nodes: no rpc-server anywhere, no RPC tunnel carried a byte
    for node in nodes:
        status = node.status()
        assert all(t["sent"] == 0 and t["received"] == 0 for t in status["rpc_tunnels"]), status["rpc_tunnels"]
        assert not any(m["workers"] for m in status["models"])

    # kill a node serving some sessions (not the one requests enter by): they move to the others, each to the
    # node its session key ranks next, where it stays once the node is declared dead
    victim = next(n for n in (b, c) if n in where.values())
    alive = [n for n in nodes if n is not victim]
    ids = {node_id(n): n for n in nodes}
    moved = [u for u, n in where.items() if n is victim]
    stayed = [u for u, n in where.items() if n is not victim]
    extra = (f"more-{i}" for i in range(1000))  # sessions of the victim whose next node is either survivor
    nexts: dict[str, list[str]] = {n.state_dir.name: [] for n in alive}  # survivor -> sessions it takes over
    for user in [*moved, *extra]:
        if all(len(users) >= 2 for users in nexts.values()):
            break
        takes = nexts[next_node(user, ids, victim).state_dir.name]
        if ids.get(rendezvous("id:" + user, ids) or "") is victim and len(takes) < 2:
            takes.append(user)
    moved = [*nexts[next(n.state_dir.name for n in alive if n is not a)], *nexts[a.state_dir.name]]  # a's last
    assert victim.proc is not None
    victim.proc.kill()
    for pid in engine_pids(victim.state_dir):  # the machine is gone: its llama-server too
        subprocess.run(["kill", "-9", str(pid)], check=False)
    killed = time.monotonic()
    # right after the kill, before the mesh declares the node dead: every request of its sessions is
    # answered, by the node its key ranks next; none fails
    failures, wrong = 0, []
    for user in moved + moved:
        before = [served_requests(n) for n in alive]
        response = ask(a, user, timeout=30)
        failures += response.status_code != 200
        grew = [n for n, count in zip(alive, before, strict=True) if served_requests(n) > count]
        if grew != [next_node(user, ids, victim)]:
            wrong.append(user)
    took = time.monotonic() - killed
    print(f"a dead shard's sessions: {2 * len(moved)} requests in the {took:.1f} s after the kill, {failures} "
          f"failed, {len(wrong)} answered elsewhere than the node their key ranks next")
    assert failures == 0 and not wrong, wrong
    dead = next(nid for nid, n in ids.items() if n is victim)
    wait_for(lambda: any(m["id"] == dead and m["state"] == "dead" for m in a.status()["nodes"]), timeout=30,
             what="the victim declared dead")
    for user in moved:  # where the failover sent them is where they stay
        assert landed(a, user, alive) is next_node(user, ids, victim)
    for user in stayed:  # rendezvous hashing: the other sessions keep their node
        assert landed(a, user, alive) is where[user]


def next_node(user: str, ids: dict[str, NodeProcess], victim: NodeProcess) -> NodeProcess:
    """The node ``user``'s session key ranks first once ``victim`` is gone."""
    chosen = rendezvous("id:" + user, [nid for nid, n in ids.items() if n is not victim])
    assert chosen is not None
    return ids[chosen]


def test_a_shard_with_every_expert_answers_as_the_whole_model(mesh: Mesh, moe_model: Path, solo: str) -> None:
    """--split on two nodes with room for two copies of every expert: each shard keeps all 8 experts."""
    a = mesh.start("a", "127.0.0.2", "--split", models=(str(moe_model),))
    b = mesh.start("b", "127.0.0.3", "--standby", "--join", a.token())
    wait_for_all((a, b))
    wait_for(lambda: bool(ready_shards(a)), timeout=120, what="two expert shards to be ready")
    assert len(condition(a, MODEL)["nodes"]) == 2
    expected = greedy(solo, MODEL)
    assert expected[0] and expected[1]
    for user in ("x", "y", "z", "w"):
        client_a = httpx.post(f"{a.api}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0, "user": user})
        assert client_a.json()["choices"][0]["text"] == expected[0]


def truncated(source: Path, out: Path) -> Path:
    out.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
    return out


def unknown_arch(source: Path, out: Path) -> Path:
    """The same file with its architecture renamed: a string of the same length, so offsets hold."""
    data = source.read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8  # key, value type, string length
    assert data[at:at + 8] == b"qwen3moe"
    renamed = data[:at] + b"qwen9moe" + data[at + 8:]
    out.write_bytes(renamed.replace(b"qwen3moe.", b"qwen9moe."))
    assert struct.unpack("<Q", renamed[at - 8:at])[0] == 8
    return out


def test_a_truncated_moe_file_is_refused_at_start_with_one_line(mesh: Mesh, moe_model: Path, tmp_path: Path) -> None:
    bad = truncated(moe_model, tmp_path / f"{MODEL}.gguf")
    a = mesh.start("a", "127.0.0.2", "--split", models=(str(bad),))
    assert a.proc is not None and a.proc.wait(timeout=60) != 0
    assert "past the end of the file" in a.log_text() and not engine_pids(a.state_dir)


def damaged_routing(source: Path, out: Path) -> Path:
    """The same file claiming each token uses 99 of its 8 experts (a damaged header, whole otherwise)."""
    data = bytearray(source.read_bytes())
    key = b"qwen3moe.expert_used_count"
    at = data.index(key) + len(key)
    assert struct.unpack("<I", data[at:at + 4])[0] == 4  # a u32
    data[at + 4:at + 8] = struct.pack("<I", 99)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("damage, reason, says", [
    (unknown_arch, "UnknownMoeArchitecture", "qwen9moe"),
    (damaged_routing, "DamagedMoe", "expert_used_count 99"),
])
def test_an_moe_file_that_cannot_be_split_gets_a_clear_reason_and_no_crash_loop(
        mesh: Mesh, moe_model: Path, tmp_path: Path, damage: Callable[[Path, Path], Path], reason: str,
        says: str) -> None:
    bad = damage(moe_model, tmp_path / f"{MODEL}.gguf")
    a = mesh.start("a", "127.0.0.2", "--split", models=(str(bad),))
    b = mesh.start("b", "127.0.0.3", "--standby", "--join", a.token())
    wait_for_all((a, b))
    wait_for(lambda: condition(a, MODEL).get("reason") == reason, timeout=30, what=f"reason {reason}")
    cond = condition(a, MODEL)
    assert cond["phase"] == "Pending" and str(bad.name) in cond["message"] and says in cond["message"], cond
    # nothing was launched, so nothing crash-loops
    wait_for(lambda: not engine_pids(a.state_dir) and not engine_pids(b.state_dir), timeout=15,
             what="no engine process")
    answer = httpx.post(f"{b.api}/v1/completions", timeout=10, json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert answer.status_code == 503 and "error" in answer.json(), answer.text


def test_a_mesh_too_small_for_any_shard_says_so(mesh: Mesh, moe_model: Path) -> None:
    vram = cap(moe_model, 0.5)  # below even a shard of the core and one more expert
    a = mesh.start("a", "127.0.0.2", "--max-vram", vram, models=(str(moe_model),))
    b = mesh.start("b", "127.0.0.3", "--standby", "--max-vram", vram, "--join", a.token())
    wait_for_all((a, b))
    wait_for(lambda: condition(a, MODEL).get("reason") == "NoCapacity", timeout=30, what="reason NoCapacity")
    cond = condition(a, MODEL)
    assert cond["phase"] == "Pending" and "expert shard" in cond["message"], cond
    assert not engine_pids(a.state_dir)
