"""Expert importance: routing statistics read from llama-imatrix's file layout, cached per model file, replicated
as a blob, and the documented fallback when there are none."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from meshllm.engine.tinygguf import write_moe
from meshllm.errors import ModelError
from meshllm.moe.importance import (
    RoutingStats,
    counts_from_imatrix,
    expert_ranks,
    from_blob,
    load_importance,
    model_key,
    read_stats,
    skew,
    stats_path,
    store_blob,
    to_blob,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_CACHE_DIR", str(tmp_path / "cache"))


def _imatrix(path: Path, counts: dict[int, list[int]]) -> Path:
    """A file laid out as llama-imatrix writes it: ``<tensor>.in_sum2`` and ``<tensor>.counts`` per weight."""
    writer = gguf.GGUFWriter(path, "llama")  # the arch key is ignored by readers of imatrix files
    writer.add_string("general.type", "imatrix")
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([[7.0]], dtype=np.float32))
    for layer, row in counts.items():
        for kind in ("gate", "up", "down"):
            name = f"blk.{layer}.ffn_{kind}_exps.weight"
            writer.add_tensor(name + ".in_sum2", np.ones((len(row), 8), dtype=np.float32))
            writer.add_tensor(name + ".counts", np.array([row], dtype=np.float32).T.reshape(len(row), 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _model(path: Path, *, seed: int = 0) -> Path:
    return write_moe(path, n_layer=3, n_expert=4, n_vocab=300, seed=seed)


def test_expert_counts_are_read_per_layer_and_dense_tensors_are_ignored(tmp_path: Path) -> None:
    path = _imatrix(tmp_path / "imatrix.gguf", {1: [5, 0, 9, 2], 2: [4, 4, 4, 4]})
    assert counts_from_imatrix(path) == {1: (5, 0, 9, 2), 2: (4, 4, 4, 4)}


def test_an_imatrix_of_a_dense_model_or_a_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no per-expert counts"):
        counts_from_imatrix(_imatrix(tmp_path / "dense.gguf", {}))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="not a readable imatrix"):
        counts_from_imatrix(tmp_path / "junk.gguf")


def _cache_stats(model: Path, counts: dict[int, tuple[int, ...]]) -> RoutingStats:
    stats = RoutingStats(fingerprint=model_key(model), selections=max(map(sum, counts.values())), counts=counts)
    store_blob(to_blob(stats))
    return stats


def test_cached_statistics_give_each_experts_share_per_layer(tmp_path: Path) -> None:
    model = _model(tmp_path / "moe.gguf")
    _cache_stats(model, {1: (6, 0, 2, 0), 2: (1, 1, 1, 1)})
    # layer 0 is dense (no routed experts): an empty list keeps layer numbers aligned
    assert load_importance(model) == [[], [0.75, 0.0, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]
    ranks = expert_ranks(load_importance(model), n_layer=3, n_expert=4)
    assert ranks == [[0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 2, 3]]


def test_statistics_follow_the_model_not_its_name(tmp_path: Path) -> None:
    model = _model(tmp_path / "moe.gguf")
    _cache_stats(model, {0: (3, 1, 0, 0)})
    copy = _model(tmp_path / "renamed.gguf")
    # the same layout (and so the same header) with other weights: another model, another routing
    other = _model(tmp_path / "other.gguf", seed=1)
    assert load_importance(copy) == [[0.75, 0.25, 0.0, 0.0]]
    assert load_importance(other) is None  # the documented fallback: id order
    assert expert_ranks(load_importance(other), n_layer=1, n_expert=4) == [[0, 1, 2, 3]]
    assert load_importance(tmp_path / "missing.gguf") is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF and then nothing")
    assert load_importance(tmp_path / "junk.gguf") is None


def test_a_cache_file_for_another_fingerprint_is_not_trusted(tmp_path: Path) -> None:
    model = _model(tmp_path / "moe.gguf")
    path = stats_path(model_key(model))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fingerprint": "1:abc", "selections": 4, "counts": {"0": [3, 1]}}))
    assert read_stats(model) is None
    path.write_text("{not json")
    assert load_importance(model) is None


def test_the_blob_is_small_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    counts = {layer: tuple(int(c) for c in rng.integers(0, 50_000, 128)) for layer in range(48)}
    stats = RoutingStats(fingerprint="123:abcdef", selections=8 * 16384, counts=counts)
    blob = to_blob(stats)
    assert from_blob(blob) == stats
    assert len(blob) < 40_000  # Qwen3-30B-A3B's 48 x 128 counts: tens of kilobytes at most
    with pytest.raises(ValueError, match="damaged"):
        from_blob(blob[:-9] + "!!!!")
    with pytest.raises(ValueError, match="fingerprint"):
        store_blob(to_blob(RoutingStats(fingerprint="", selections=1, counts={0: (1,)})))


def test_a_blob_from_a_peer_cannot_name_a_file_outside_the_cache(tmp_path: Path) -> None:
    hostile = RoutingStats(fingerprint="1:ab/../../../escaped", selections=1, counts={0: (1,)})
    with pytest.raises(ValueError, match="not a model fingerprint"):
        store_blob(to_blob(hostile))
    assert not list(tmp_path.rglob("escaped*"))


def test_skew_of_uniform_and_concentrated_routing() -> None:
    uniform = skew([10] * 16)
    assert uniform["top_share"] == pytest.approx(0.25)
    assert uniform["entropy_bits"] == pytest.approx(4.0)
    concentrated = skew([97, 1, 1, 1, 0, 0, 0, 0])
    assert concentrated["top_share"] == pytest.approx(0.98)
    assert concentrated["entropy_bits"] < 0.3 < math.log2(8)
    assert skew([0, 0])["top_share"] == 0.0


def test_an_engine_without_llama_imatrix_says_how_to_get_it(tmp_path: Path) -> None:
    from meshllm.moe.importance import compute_routing_stats

    model = _model(tmp_path / "moe.gguf")
    with pytest.raises(ModelError, match="llama-imatrix is missing: rebuild the engine"):
        compute_routing_stats(model, engine_dir=tmp_path, text="x")
