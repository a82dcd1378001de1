"""Split participants without the model file fetch only their share of it (issue 16 item 5).

What a user notices: a model no node holds alone is split across three nodes although only one of them
(or none) has the file; each node without it fetches only the GGUF header and the tensors it holds,
from the hub or from the node that has it, over the mesh; each uses little more disk than its share;
the split answers exactly as one llama-server on the whole file does. A piece that differs from the
mesh's copy in one byte is refused, and the model's condition says which tensor and where.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshllm.engine.sparse import allocated_bytes
from meshllm.engine.tensors import file_table
from meshllm.engine.tinygguf import write_dense
from meshllm.testing.hubserver import HubServer
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, wait_for
from tests.integration.test_mesh import greedy

pytestmark = pytest.mark.engine

REPO, FILE, MODEL = "org/split-fetch-GGUF", "split-fetch.gguf", "split-fetch"
SOURCE = f"{REPO}/{FILE}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 layers of about 2.4 MB each, small embeddings: a share is mostly layers (F32: every backend
    computes it identically)."""
    return write_dense(tmp_path_factory.mktemp("splitfetch") / FILE, n_layer=8, n_embd=256, n_ff=512, n_vocab=512,
                       seed=11)


@pytest.fixture
def hub(weights: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add(REPO, FILE, weights)
        yield server


@pytest.fixture
def solo(engine_dir: Path, weights: Path, tmp_path: Path) -> Iterator[str]:
    """One plain llama-server on the whole file: the reference output."""
    port = free_port()
    with (tmp_path / "solo.log").open("wb") as log:
        proc = subprocess.Popen([str(engine_dir / "llama-server"), "--model", str(weights), "--alias", MODEL,
                                 "--host", "127.0.0.1", "--port", str(port), "--n-gpu-layers", "0", "--no-webui"],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, timeout=60, what="solo")
            yield url
        finally:
            proc.kill()
            proc.wait()


def cap(weights: Path, fraction: float) -> str:
    return f"{int(weights.stat().st_size * fraction)}B"


def start(mesh: Mesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, host: str, *extra: str,
          models: tuple[str, ...] = ()) -> NodeProcess:
    """A node with a models folder of its own (empty unless the test put the file there)."""
    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / f"models-{name}"))
    return mesh.start(name, host, *extra, models=models)


def condition(node: NodeProcess) -> dict[str, Any]:
    for entry in node.status()["models"]:
        if entry["name"] == MODEL and entry["condition"]:
            return dict(entry["condition"])
    return {}


def node_ids(nodes: tuple[NodeProcess, ...]) -> dict[str, NodeProcess]:
    wait_for(lambda: all(len(n.status()["nodes"]) == len(nodes) for n in nodes), timeout=30, what="the mesh")
    return {str(n.status()["node"]["id"]): n for n in nodes}


def shares(tmp_path: Path, names: list[str], weights: Path) -> dict[str, dict[str, int]]:
    """Per node without the file: bytes fetched, disk its copy takes, bytes of the tensors it holds."""
    table = file_table(weights)
    sizes = {t.name: t.nbytes for t in table.tensors}
    found = {}
    for name in names:
        for record in (tmp_path / f"models-{name}").glob(".split/*/*.tensors.json"):
            data = json.loads(record.read_text())
            copy = record.with_name(record.name.removesuffix(".tensors.json"))
            found[name] = {"fetched": int(data["fetched"]), "disk": allocated_bytes(copy),
                           "share": sum(sizes[t] for t in data["tensors"]), "header": table.data_offset}
    return found


def report(found: dict[str, dict[str, int]], weights: Path) -> None:
    total = weights.stat().st_size
    for name, f in sorted(found.items()):
        print(f"node {name}: fetched {f['fetched']:,} B of the {total:,} B file ({f['fetched'] / total:.1%}), "
              f"disk {f['disk']:,} B (st_blocks), its tensors {f['share']:,} B, header {f['header']:,} B")
    for f in found.values():
        assert f["share"] <= f["fetched"] <= 1.01 * f["share"] + 65536  # its tensors (the header is read apart)
        assert f["disk"] <= 1.05 * f["share"] + f["header"] + 4096, f
        assert f["share"] < 0.6 * total


def test_no_node_has_the_file_each_fetches_its_share_from_the_hub(mesh: Mesh, hub: HubServer, weights: Path,
                                                                 solo: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    a = start(mesh, monkeypatch, tmp_path, "a", "127.0.0.2", "--max-vram", cap(weights, 0.5), models=(SOURCE,))
    token = a.token()
    b = start(mesh, monkeypatch, tmp_path, "b", "127.0.0.3", "--standby", "--max-vram", cap(weights, 0.35),
              "--join", token)
    c = start(mesh, monkeypatch, tmp_path, "c", "127.0.0.4", "--standby", "--max-vram", cap(weights, 0.35),
              "--join", token)
    ids = node_ids((a, b, c))
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=120, what="the split to be ready")
    ready = condition(a)
    assert ids[ready["nodes"][0]] is a and sorted(ids[w].state_dir.name for w in ready["workers"]) == ["b", "c"]
    found = shares(tmp_path, ["a", "b", "c"], weights)
    print(f"hub sent {hub.bytes_sent:,} B in all; whole file {weights.stat().st_size:,} B")
    report(found, weights)
    assert set(found) == {"a", "b", "c"}  # the host too holds only its share
    assert hub.bytes_sent < 1.1 * weights.stat().st_size  # the three shares make one file, plus headers
    assert all(not (tmp_path / f"models-{n}" / FILE).exists() for n in "abc")
    assert greedy(a.api, MODEL) == greedy(solo, MODEL)


def test_the_peer_that_has_the_file_serves_the_shares_over_the_mesh(mesh: Mesh, weights: Path, solo: str,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # the hub is out of reach
    (tmp_path / "models-a").mkdir()
    (tmp_path / "models-a" / FILE).write_bytes(weights.read_bytes())
    a = start(mesh, monkeypatch, tmp_path, "a", "127.0.0.2", "--max-vram", cap(weights, 0.3), models=(SOURCE,))
    token = a.token()
    b = start(mesh, monkeypatch, tmp_path, "b", "127.0.0.3", "--standby", "--max-vram", cap(weights, 0.5),
              "--join", token)
    c = start(mesh, monkeypatch, tmp_path, "c", "127.0.0.4", "--standby", "--max-vram", cap(weights, 0.35),
              "--join", token)
    ids = node_ids((a, b, c))
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=120, what="the split to be ready")
    ready = condition(a)
    assert ids[ready["nodes"][0]] is b and sorted(ids[w].state_dir.name for w in ready["workers"]) == ["a", "c"]
    found = shares(tmp_path, ["a", "b", "c"], weights)
    report(found, weights)
    assert set(found) == {"b", "c"}  # a serves its layers from its own whole file
    assert greedy(b.api, MODEL) == greedy(solo, MODEL)


def test_a_piece_differing_in_one_tensor_is_refused_with_the_tensor_named(mesh: Mesh, hub: HubServer,
                                                                          weights: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    victim = next(t for t in file_table(weights).tensors if t.name == "blk.7.ffn_down.weight")  # the worker's
    hub.files[(REPO, FILE)].corrupt_at = victim.offset + victim.nbytes // 2
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    (tmp_path / "models-a").mkdir()
    (tmp_path / "models-a" / FILE).write_bytes(weights.read_bytes())
    a = start(mesh, monkeypatch, tmp_path, "a", "127.0.0.2", "--max-vram", cap(weights, 0.8), models=(SOURCE,))
    b = start(mesh, monkeypatch, tmp_path, "b", "127.0.0.3", "--standby", "--max-vram", cap(weights, 0.5),
              "--join", a.token())
    node_ids((a, b))
    seen: dict[str, Any] = {}

    def failed() -> bool:  # the worker tries again every 30 s: keep the condition that said why
        seen.update(condition(a))
        return seen.get("reason") == "WorkerFailed"

    wait_for(failed, timeout=60, what="the worker's failure")
    message = seen["message"]
    print(message)
    assert "blk.7.ffn_down.weight" in message and "differs from the mesh's copy" in message, message
    assert shares(tmp_path, ["b"], weights).get("b", {}).get("share", 0) < victim.nbytes  # never kept
