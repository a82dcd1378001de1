"""``meshllm download`` and the draft options as a user meets them, against a local hub server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.engine.sources import SourcePolicy
from meshllm.engine.tinygguf import write_dense
from meshllm.errors import ModelError
from meshllm.node import NodeConfig, draft_for
from meshllm.testing.hubserver import HubServer


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
        yield server


def meshllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60,
                          env=os.environ)


def test_download_lists_the_catalog_then_fetches_a_model_and_its_draft(hub: HubServer, tmp_path: Path) -> None:
    model = write_dense(tmp_path / "m.gguf")
    draft = write_dense(tmp_path / "d.gguf", seed=3)
    hub.add("unsloth/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", model)
    hub.add("unsloth/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q4_K_M.gguf", draft)
    listed = meshllm("download")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("Qwen3-8B-Q4_K_M"))
    assert row.split()[1:3] == ["5.0", "GB"] and row.split()[-1] == "no"

    fetched = meshllm("download", "Qwen3-8B", "--draft")
    assert fetched.returncode == 0, fetched.stderr
    folder = tmp_path / "models"
    for name, source in (("Qwen3-8B-Q4_K_M.gguf", model), ("Qwen3-0.6B-Q4_K_M.gguf", draft)):
        assert hashlib.sha256((folder / name).read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    row = next(line for line in meshllm("download").stdout.splitlines() if line.startswith("Qwen3-8B-Q4_K_M"))
    assert row.split()[-1] == "yes"


@pytest.mark.parametrize(("args", "expected"), [
    (("download", "32B"), "fits several catalog models"),
    (("download", "org/r/missing.gguf"), "not found on"),
    (("download", "no-such-thing"), "is not a catalog model"),
    (("--model", "org/r/missing.gguf"), "not found on"),
])
def test_bad_references_are_one_line(hub: HubServer, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    done = meshllm(*args, "--state-dir", str(tmp_path)) if args[0] == "--model" else meshllm(*args)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and expected in done.stderr


def test_draft_options_and_catalog_pairing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path))
    assert draft_for(NodeConfig(), "Qwen3-32B") == "Qwen3-0.6B-Q4_K_M"  # 2% of the model: fetched with it
    assert draft_for(NodeConfig(no_draft=True), "Qwen3-32B") == ""
    assert draft_for(NodeConfig(draft="/d.gguf"), "Qwen3-32B") == "/d.gguf"
    assert draft_for(NodeConfig(), "GLM-4.7-Flash") == ""  # no pairing in the catalog
    local = write_dense(tmp_path / "mine.gguf")
    assert draft_for(NodeConfig(), str(local)) == ""
    known = write_dense(tmp_path / "Qwen3-8B-Q4_K_M.gguf")  # a catalog model's file, given by path
    assert draft_for(NodeConfig(), str(known)) == "Qwen3-0.6B-Q4_K_M"


def test_manifests_may_name_hub_references(tmp_path: Path) -> None:
    policy = SourcePolicy.for_node()
    policy.check("Qwen3-8B")
    policy.check("org/repo/file.gguf")
    policy.check("https://huggingface.co/org/repo/resolve/main/file.gguf")
    with pytest.raises(ModelError, match="not in a folder this node serves models from"):
        policy.check(str(tmp_path / "elsewhere.gguf"))
    with pytest.raises(ModelError, match="huggingface.co .* only, not on another host"):
        policy.check("http://10.0.0.1:8080/org/repo/resolve/main/file.gguf")


class StepClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


async def test_a_node_download_fails_in_one_line_then_is_tried_again(hub: HubServer, tmp_path: Path) -> None:
    import anyio

    from meshllm.engine.download import parse_reference
    from meshllm.reconcile.downloads import RETRY_FAILED, Downloads

    clock = StepClock()
    downloads = Downloads(folder=tmp_path / "models", clock=clock)
    reference = parse_reference("org/r/m.gguf")
    assert reference is not None
    async with anyio.create_task_group() as tg:
        await tg.start(downloads.run)
        assert downloads.want("org/r/m.gguf", reference).error == ""  # started
        with anyio.fail_after(30):
            while not (state := downloads.want("org/r/m.gguf", reference)).finished:
                await anyio.sleep(0.05)
        assert "not found on" in state.error and "\n" not in state.error
        hub.add("org/r", "m.gguf", write_dense(tmp_path / "m.gguf"))  # the file appears on the hub
        assert downloads.want("org/r/m.gguf", reference).error  # not tried again yet
        clock.t += RETRY_FAILED
        assert downloads.want("org/r/m.gguf", reference).error == ""  # tried again
        with anyio.fail_after(30):
            while not downloads.want("org/r/m.gguf", reference).finished:
                await anyio.sleep(0.05)
        assert downloads.want("org/r/m.gguf", reference).error == "" and reference.present(tmp_path / "models")
        tg.cancel_scope.cancel()
