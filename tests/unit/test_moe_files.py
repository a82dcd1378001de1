"""MoE files: detection from the header, shard files sliced right, session keys and rendezvous routing."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from meshllm.api.sessions import rendezvous, session_key
from meshllm.engine.models import file_fingerprint
from meshllm.engine.tinygguf import write_dense, write_moe
from meshllm.moe.detect import ARCHITECTURES, MoeProblem, detect_moe, expert_tensor
from meshllm.moe.importance import expert_ranks
from meshllm.moe.quality import quality_path, read_quality
from meshllm.moe.shard import shard_ready, write_shard
from meshllm.moe.spec import moe_spec_fields


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe")
    return {"qwen3moe": write_moe(folder / "q3.gguf", n_expert=8, n_expert_used=2),
            "qwen2moe": write_moe(folder / "q2.gguf", n_expert=6, n_expert_used=2, shared=True, seed=1),
            "dense": write_dense(folder / "dense.gguf")}


def test_the_table_covers_the_architectures_llama_cpp_splits() -> None:
    assert {"qwen3moe", "qwen2moe", "olmoe", "llama", "glm4moe", "deepseek2"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("name, layer", [
    ("blk.3.ffn_gate_exps.weight", 3), ("blk.0.ffn_down_exps.weight", 0), ("blk.12.ffn_gate_inp.weight", 12),
    ("blk.1.ffn_exp_probs_b.bias", 1), ("blk.1.ffn_gate_up_exps.weight", 1), ("blk.1.ffn_gate_inp_shexp.weight", None),
    ("blk.1.ffn_up_shexp.weight", None), ("blk.1.attn_q.weight", None), ("token_embd.weight", None),
])
def test_which_tensors_are_cut_by_expert(name: str, layer: int | None) -> None:
    assert expert_tensor(name) == layer


def test_detects_the_shape_of_moe_files_and_nothing_in_a_dense_one(models: dict[str, Path]) -> None:
    q3, q2 = detect_moe(models["qwen3moe"]), detect_moe(models["qwen2moe"])
    assert q3 is not None and (q3.arch, q3.n_expert, q3.n_used, q3.n_shared, q3.moe_layers) == ("qwen3moe", 8, 2, 0, (0, 1))
    assert q2 is not None and (q2.arch, q2.n_expert, q2.n_shared) == ("qwen2moe", 6, 1)
    # gate, up and down of 128 x 64 in F32 per layer, plus a router row of 64
    assert q3.expert_bytes == 2 * (3 * 128 * 64 * 4 + 64 * 4)
    assert q3.trunk_bytes + 8 * q3.expert_bytes == models["qwen3moe"].stat().st_size
    assert detect_moe(models["dense"]) is None


def test_bad_files_get_a_clear_reason(models: dict[str, Path], tmp_path: Path) -> None:
    data = models["qwen3moe"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeProblem) as truncated:
        detect_moe(cut)
    assert truncated.value.reason == "TruncatedModel" and "truncated" in str(truncated.value)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(MoeProblem, match="ends early"):
        detect_moe(header_cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(MoeProblem, match="not a GGUF"):
        detect_moe(junk)
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(data.replace(b"qwen3moe", b"qwen9moe"))
    with pytest.raises(MoeProblem) as unknown:
        detect_moe(renamed)
    assert unknown.value.reason == "UnknownMoeArchitecture" and "qwen9moe" in str(unknown.value)
    assert moe_spec_fields(renamed)["moe_problem"].startswith("UnknownMoeArchitecture: ")  # type: ignore[union-attr]


def tensors(path: Path) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_a_shard_holds_exactly_the_kept_experts_slices_and_the_rest_whole(models: dict[str, Path], arch: str,
                                                                          tmp_path: Path) -> None:
    source = models[arch]
    keep = {0: [5, 0, 3], 1: [1, 2, 4]}  # any order in; ascending ids out
    out = tmp_path / "shard.gguf"
    size = write_shard(source, out, keep)
    info = detect_moe(out)
    assert info is not None and info.n_expert == 3 and size == out.stat().st_size
    whole, shard = tensors(source), tensors(out)
    assert whole.keys() == shard.keys()
    for name, values in whole.items():
        layer = expert_tensor(name)
        expected = values if layer is None else values[sorted(keep[layer])]
        np.testing.assert_array_equal(shard[name], expected, err_msg=name)
    fields = gguf.GGUFReader(out).fields
    assert fields[f"{arch}.expert_count"].contents() == 3
    assert fields["tokenizer.ggml.tokens"].contents() == gguf.GGUFReader(source).fields["tokenizer.ggml.tokens"].contents()


def test_a_shard_keeping_every_expert_is_the_model_byte_for_byte(models: dict[str, Path], tmp_path: Path) -> None:
    source = models["qwen3moe"]
    out = tmp_path / "all.gguf"
    write_shard(source, out, {0: range(8), 1: range(8)})
    assert out.read_bytes() == source.read_bytes()


def test_a_written_shard_is_reused_only_while_it_is_whole_and_the_same(models: dict[str, Path], tmp_path: Path) -> None:
    source = models["qwen3moe"]
    out = tmp_path / "s.gguf"
    keep = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    write_shard(source, out, keep)
    fingerprint = file_fingerprint(source)
    assert shard_ready(out, source_fingerprint=fingerprint, experts=[keep[0], keep[1]])
    assert not shard_ready(out, source_fingerprint=fingerprint, experts=[keep[0], [0, 1, 2, 3]])
    assert not shard_ready(out, source_fingerprint="other", experts=[keep[0], keep[1]])
    out.write_bytes(out.read_bytes()[:-10])  # damaged on disk
    assert not shard_ready(out, source_fingerprint=fingerprint, experts=[keep[0], keep[1]])


def test_a_shard_refuses_fewer_experts_than_a_token_uses(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=">= 2"):
        write_shard(models["qwen3moe"], tmp_path / "x.gguf", {0: [0], 1: [1]})
    with pytest.raises(ValueError, match="one number"):
        write_shard(models["qwen3moe"], tmp_path / "x.gguf", {0: [0, 1], 1: [1, 2, 3]})
    assert not (tmp_path / "x.gguf.part").exists()


def test_quality_figures_beside_a_shard_become_one_line(tmp_path: Path) -> None:
    shard = tmp_path / "s.gguf"
    assert read_quality(shard) == ""
    quality_path(shard).write_text('{"agreement": 0.931, "perplexity": 5.2, "perplexity_full": 4.9}')
    assert read_quality(shard) == "agreement 93.1%, perplexity 5.20 (whole model 4.90)"


def test_importance_ranks_experts_most_used_first_and_falls_back_to_id_order() -> None:
    assert expert_ranks(None, n_layer=2, n_expert=3) == [[0, 1, 2], [0, 1, 2]]
    assert expert_ranks([[0.1, 0.5, 0.5], [1, 2]], n_layer=2, n_expert=3) == [[1, 2, 0], [0, 1, 2]]


def test_the_session_key_comes_from_the_header_the_body_or_the_conversation() -> None:
    chat = b'{"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}'
    assert session_key(chat, [("X-Session-Id", "abc")]) == "id:abc"
    assert session_key(b'{"session_id": "s1", "user": "u"}', []) == "id:s1"
    assert session_key(b'{"user": "alice", "messages": []}', []) == "id:alice"
    assert session_key(b'{"metadata": {"user_id": "bob"}}', []) == "id:bob"
    later_turn = (b'{"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", '
                  b'"content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]}')
    assert session_key(chat, []) == session_key(later_turn, [])  # one conversation, one key
    other = chat.replace(b"hi", b"yo")
    assert session_key(other, []) != session_key(chat, [])


def test_rendezvous_is_stable_and_moves_only_a_dead_nodes_keys() -> None:
    nodes = ["n1", "n2", "n3"]
    keys = [f"k{i}" for i in range(300)]
    first = {k: rendezvous(k, nodes) for k in keys}
    assert first == {k: rendezvous(k, list(reversed(nodes))) for k in keys}  # order does not matter
    assert all(40 < sum(v == n for v in first.values()) < 160 for n in nodes)  # spread
    after = {k: rendezvous(k, ["n1", "n3"]) for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != "n2")
    assert rendezvous("k", []) is None
