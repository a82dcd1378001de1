"""Routing statistics from the real llama-imatrix: computed once per model file, cached by its fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshllm.moe.importance import ImatrixRun, calibration_text, compute_routing_stats, load_importance


def test_llama_imatrix_counts_every_routed_token_and_the_counts_are_cached(
        engine_dir: Path, tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_CACHE_DIR", str(tmp_path / "cache"))
    assert load_importance(tiny_moe) is None  # nothing computed yet: the planner falls back to id order
    run = ImatrixRun(ctx=128, chunks=6, threads=1)
    stats = compute_routing_stats(tiny_moe, engine_dir=engine_dir, text=calibration_text()[:40_000], run=run)
    # tiny-moe: 2 layers of 8 experts, 2 used per token; every token of every chunk is routed in every layer
    assert sorted(stats.counts) == [0, 1]
    assert all(len(row) == 8 and sum(row) == 6 * 128 * 2 for row in stats.counts.values())
    copy = tmp_path / "same-file-elsewhere.gguf"
    shutil.copyfile(tiny_moe, copy)
    shares = load_importance(copy)
    assert shares is not None and len(shares) == 2
    assert shares[0] == pytest.approx([c / (6 * 128 * 2) for c in stats.counts[0]])
