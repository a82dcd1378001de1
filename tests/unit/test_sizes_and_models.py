"""Parsing sizes, visible GPUs, resolving --model arguments, deterministic ports, the engine recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshllm.engine.build import find_engine, load_recipe
from meshllm.engine.capacity import detect_capacity, parse_size, visible_gpus
from meshllm.engine.models import resolve_model
from meshllm.engine.process import candidate_ports
from meshllm.errors import EngineError, ModelError


@pytest.mark.parametrize(("text", "expected"), [
    ("24", 24_000_000_000), ("24GB", 24_000_000_000), ("8MB", 8_000_000), ("512MiB", 512 * 2**20),
    ("1.5gb", 1_500_000_000), (" 64 KiB ", 65536),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12 parsecs", "-3GB", "1e9"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_resolve_model_paths(tmp_path: Path) -> None:
    good = tmp_path / "my-model.gguf"
    good.write_bytes(b"GGUF" + b"\0" * 60)
    resolved = resolve_model(str(good))
    assert (resolved.name, resolved.path, resolved.size_bytes) == ("my-model", good, 64)

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(str(not_gguf))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="unknown model 'no-such-thing'"):
        resolve_model("no-such-thing")


def test_ports_are_deterministic_per_key() -> None:
    first = list(zip(range(3), candidate_ports("node/a"), strict=False))
    again = list(zip(range(3), candidate_ports("node/a"), strict=False))
    other = next(candidate_ports("node/b"))
    assert first == again
    assert other != first[0][1]
    assert all(41000 <= port < 49000 for _, port in first)


def test_engine_cache_key_follows_the_pin_and_patches(tmp_path: Path) -> None:
    recipe = load_recipe()
    assert recipe.version == "11434.0.0" and len(recipe.sha256) == 64
    assert "ggml-rpc-server" in recipe.targets
    copy = tmp_path / "llama.cpp"
    shutil.copytree(recipe.folder, copy)
    assert load_recipe(copy).key("cpu") == recipe.key("cpu")
    assert recipe.key("cpu") != recipe.key("cuda")
    (copy / "patches" / "0001-x.patch").write_text("--- a\n+++ b\n")
    assert load_recipe(copy).key("cpu") != recipe.key("cpu")


def test_engine_dir_override_must_hold_the_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_ENGINE_DIR", str(tmp_path))
    with pytest.raises(EngineError, match="does not hold llama-server"):
        find_engine()


@pytest.mark.parametrize(("setting", "expected"), [
    (None, [0, 1, 2, 3]),  # unset: every GPU
    ("1", [1]),  # a node pinned to its GPU offers that one's memory, not the machine's
    ("2,0", [2, 0]),
    ("", []),  # hidden: the node falls back to system RAM
    ("-1", []),
    ("0,7,1", [0]),  # CUDA stops at the first index it does not have
    ("GPU-8f5e2a,1", ["GPU-8f5e2a", 1]),
])
def test_only_the_gpus_cuda_visible_devices_leaves_are_counted(setting: str | None,
                                                               expected: list[int | str]) -> None:
    assert visible_gpus(setting, 4) == expected


def test_capacity_counts_each_gpu_and_max_vram_takes_from_each_in_proportion() -> None:
    gib = 1 << 30
    two = lambda: [("NVIDIA RTX 4090", 24 * gib), ("NVIDIA A6000", 48 * gib)]  # noqa: E731
    full = detect_capacity(gpus=two)
    assert (full.bytes, full.gpu, full.devices) == (72 * gib, True, tuple(two()))
    capped = detect_capacity(max_vram=36 * gib, gpus=two)
    assert capped.bytes == 36 * gib
    assert capped.devices == (("NVIDIA RTX 4090", 12 * gib), ("NVIDIA A6000", 24 * gib))
    cpu = detect_capacity(max_vram=8 * gib, gpus=lambda: None)
    assert (cpu.bytes, cpu.gpu, cpu.devices) == (8 * gib, False, ())
