"""``meshllm apply|diff|get|describe|delete|drop`` against a real node process (an API-only ``--client``).

What a user notices: an applied manifest shows up in ``get models`` as desired state, a second diff
says nothing changes, a bad manifest is one line naming its place and changes nothing, and a Mesh
replaces the set. Whether a server starts for an applied model is placement's business, not tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.nodes import NodeProcess


@pytest.fixture
def node(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # a --client node needs no engine: engine_dir is never used
    node = NodeProcess(models=[], state_dir=tmp_path / "node", engine_dir=tmp_path / "no-engine",
                       extra=["--client"], allow_models=[tmp_path_factory.getbasetemp()]).start()
    try:
        _wait_console(node)
        yield node
    finally:
        node.kill_everything()


def _wait_console(node: NodeProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        node._check_alive()
        try:
            node.status()
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(f"console not up; log:\n{node.log_text()}")


def cli(node: NodeProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return node.cli(*args, stdin=stdin)


def models(node: NodeProcess) -> dict[str, Any]:
    done = cli(node, "get", "models", "-o", "json")
    assert done.returncode == 0, done.stderr
    return {m["name"]: m for m in json.loads(done.stdout)}


def test_apply_diff_get_describe_delete(node: NodeProcess, tmp_path: Path, tiny_dense: Path) -> None:
    folder = tmp_path / "manifests"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "tiny.gguf").write_bytes(tiny_dense.read_bytes())
    manifest = folder / "tiny.yaml"
    manifest.write_text("apiVersion: meshllm/v1\nkind: Model\nmetadata:\n  name: tiny\nspec:\n"
                        "  source: ./models/tiny.gguf\n  replicas: 2\n  ctxSize: 512\n")

    done = cli(node, "apply", "-f", str(manifest))
    assert (done.returncode, done.stdout) == (0, "model/tiny created\n"), done.stderr
    tiny = models(node)["tiny"]
    assert (tiny["origin"], tiny["replicas"], tiny["ctx_size"]) == ("manifest", 2, 512)
    assert tiny["source"] == str(folder / "models" / "tiny.gguf")  # relative to the manifest's folder
    assert tiny["condition"]["wanted"] == 2

    assert cli(node, "diff", "-f", str(manifest)).stdout == ""
    assert cli(node, "apply", "-f", str(manifest)).stdout == "model/tiny unchanged\n"
    table = cli(node, "get", "models").stdout.splitlines()
    assert table[0].split() == ["NAME", "CONDITION", "READY", "NODES", "REASON"]
    assert table[1].split()[:3] == ["tiny", "Pending", "0/2"]
    described = cli(node, "describe", "model", "tiny").stdout
    assert "Replicas:      2" in described and "Condition:     Pending" in described

    manifest.write_text(manifest.read_text().replace("replicas: 2", "replicas: 3"))
    assert cli(node, "diff", "-f", str(manifest)).stdout == "model/tiny configured\n    replicas: 2 -> 3\n"
    assert models(node)["tiny"]["replicas"] == 2

    done = cli(node, "delete", "-f", str(manifest))
    assert (done.returncode, done.stdout) == (0, "model/tiny deleted\n")
    assert models(node) == {}


def test_a_bad_manifest_exits_1_with_its_location_and_changes_nothing(node: NodeProcess, tiny_dense: Path) -> None:
    good = f"apiVersion: meshllm/v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {tiny_dense}}}\n"
    assert cli(node, "apply", "-f", "-", stdin=good).returncode == 0
    before = models(node)

    typo = good.replace("name: tiny", "name: other") + "---\n" + good.replace("source:", "sauce:").replace(
        "tiny}", "second}")
    done = cli(node, "apply", "-f", "-", stdin=typo)
    assert done.returncode == 1
    assert done.stderr.startswith("error: stdin: document 2: spec.sauce: unknown field (did you mean source?)")
    assert done.stderr.count("\n") == 1
    nowhere = tiny_dense.parent / "x.gguf"  # in a folder the node allows
    missing = good.replace("name: tiny", "name: other").replace(str(tiny_dense), str(nowhere))
    done = cli(node, "apply", "-f", "-", stdin=missing)  # valid here; the node finds no such file
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: stdin: document 1: spec.source: model file {nowhere} does not exist")
    assert models(node) == before


def test_a_mesh_replaces_the_set_and_drop_forgets_any_model(node: NodeProcess, tiny_dense: Path) -> None:
    def mesh(*names: str) -> str:
        listed = "".join(f"    - {{name: {n}, source: {tiny_dense}}}\n" for n in names)
        return f"apiVersion: meshllm/v1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  models:\n{listed}"

    assert cli(node, "apply", "-f", "-", stdin=mesh("a", "b")).stdout == "model/a created\nmodel/b created\n"
    done = cli(node, "apply", "-f", "-", stdin=mesh("b", "c"))
    assert done.stdout == "model/b unchanged\nmodel/c created\nmodel/a pruned\n"
    assert sorted(models(node)) == ["b", "c"]
    assert cli(node, "drop", "b").stdout.startswith("model/b dropped")
    assert sorted(models(node)) == ["c"]
    done = cli(node, "drop", "b")
    assert done.returncode == 1 and "'b' not found" in done.stderr
