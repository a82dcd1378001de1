"""Nodes serving models they must download, from a local server speaking the hub's protocol: the
status says Downloading with progress, then Ready, and its other models serve meanwhile; a catalog draft comes along and changes no greedy
output; two nodes on one machine fetch a file once."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.engine.tinygguf import write_dense
from meshllm.testing.hubserver import HubServer
from tests.integration.nodes import Mesh, NodeProcess, listed, wait_for
from tests.integration.test_mesh import greedy


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """The hub, and a models folder of the test's own, both passed to the node processes' environment."""
    with HubServer(rate=3 << 20) as server:  # a few seconds for a model: long enough to watch
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
        yield server


def phases(node: NodeProcess, model: str) -> list[tuple[str, str]]:
    for entry in node.status()["models"]:
        if entry["name"] == model:
            return [(s["phase"], s["message"]) for s in entry["servers"]]
    return []


def test_a_catalog_model_downloads_with_its_draft_then_serves_as_without_it(mesh: Mesh, hub: HubServer,
                                                                           tmp_path: Path) -> None:
    # 34 MB: huggingface_hub reports progress every 10 MB; slow until the test saw what it looks for
    hub.rate = 4 << 20
    model = write_dense(tmp_path / "m.gguf", n_vocab=32000, n_embd=128)
    draft = write_dense(tmp_path / "d.gguf", n_vocab=32000, n_embd=128, n_layer=1, seed=7)
    hub.add("unsloth/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", model)
    hub.add("unsloth/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q4_K_M.gguf", draft)
    name = "Qwen3-8B-Q4_K_M"

    local = write_dense(tmp_path / "local.gguf")
    # fuzzy: the catalog's Qwen3-8B-Q4_K_M; and a local model, served while the other downloads
    node = mesh.start("n0", "127.0.0.2", models=("Qwen3-8B", str(local)))
    seen: list[str] = []

    def downloading() -> bool:
        now = [message for phase, message in phases(node, name) if phase == "downloading"]
        seen.extend(now)
        served = "local" in listed(node)  # the hub is held slow: the download runs on while this serves
        return any("%" in message and "MB/s" in message for message in seen) and bool(now) and served

    wait_for(downloading, timeout=30, what="Downloading with progress in /api/status, the local model served")
    table = node.cli("get", "models")
    assert re.search(r"Downloading\s.*Downloading \d+%", table.stdout), table.stdout
    described = node.cli("describe", "model", name)
    assert "downloading" in described.stdout and "Downloading" in described.stdout, described.stdout
    hub.rate = None
    server = node.wait_ready(name, timeout=60)
    cmdline = Path(f"/proc/{server['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--model-draft" in cmdline
    folder = tmp_path / "models"
    for file, source in (("Qwen3-8B-Q4_K_M.gguf", model), ("Qwen3-0.6B-Q4_K_M.gguf", draft)):
        assert hashlib.sha256((folder / file).read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    with_draft = greedy(node.api, name)
    assert node.stop() == 0

    plain = mesh.start("n1", "127.0.0.3", "--no-draft", models=("Qwen3-8B",))
    server = plain.wait_ready(name, timeout=60)  # the files are there: no download this time
    assert b"--model-draft" not in Path(f"/proc/{server['pid']}/cmdline").read_bytes()
    assert greedy(plain.api, name) == with_draft
    assert hub.files[("unsloth/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf")].gets == 1


def test_two_nodes_on_one_machine_download_once(mesh: Mesh, hub: HubServer, tmp_path: Path) -> None:
    entry = hub.add("org/shared-GGUF", "shared.gguf", write_dense(tmp_path / "s.gguf", n_vocab=8000, n_embd=128))
    a = mesh.start("a", "127.0.0.2", models=("org/shared-GGUF/shared.gguf",))
    b = mesh.start("b", "127.0.0.3", models=("org/shared-GGUF/shared.gguf",))
    a.wait_ready("shared", timeout=60)
    b.wait_ready("shared", timeout=60)
    assert entry.gets == 1
    assert greedy(a.api, "shared") == greedy(b.api, "shared")
