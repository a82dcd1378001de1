"""Synthetic GGUF models: read back with gguf's own reader, the way llama.cpp would see them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from meshllm.engine import tinygguf
from meshllm.engine.tinygguf import PRESETS, ModelShape, write_dense, write_moe, write_shaped

N_RESERVED = 3 + 256 + 2  # <unk> <s> </s>, byte tokens, ChatML markers


def field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    assert found is not None, key
    return found.contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def test_dense_layout_and_hparams(tmp_path: Path) -> None:
    path = write_dense(tmp_path / "dense.gguf", n_layer=3, n_embd=64, n_ff=96, n_head=8, n_head_kv=2, n_vocab=400)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name").startswith("meshllm-synthetic-dense")
    assert field(reader, "llama.block_count") == 3
    assert field(reader, "llama.attention.head_count_kv") == 2
    found = tensors(reader)
    per_block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{name}.weight" for i in range(3) for name in per_block}
    assert set(found) == expected
    # GGUF order (ne[0] first): the row length comes first.
    assert list(found["token_embd.weight"].shape) == [64, 400]
    assert list(found["blk.0.attn_k.weight"].shape) == [64, 16]
    assert list(found["blk.2.ffn_down.weight"].shape) == [96, 64]


def test_moe_layout_and_expert_metadata(tmp_path: Path) -> None:
    path = write_moe(tmp_path / "moe.gguf", n_layer=1, n_ff=32, n_expert=4, n_expert_used=2)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "qwen3moe"
    assert field(reader, "qwen3moe.expert_count") == 4
    assert field(reader, "qwen3moe.expert_used_count") == 2
    assert field(reader, "qwen3moe.expert_feed_forward_length") == 32
    assert field(reader, "qwen3moe.attention.key_length") == 16
    assert field(reader, "qwen3moe.attention.value_length") == 16
    found = tensors(reader)
    assert list(found["blk.0.ffn_gate_inp.weight"].shape) == [64, 4]
    assert list(found["blk.0.ffn_gate_exps.weight"].shape) == [64, 32, 4]
    assert list(found["blk.0.ffn_up_exps.weight"].shape) == [64, 32, 4]
    assert list(found["blk.0.ffn_down_exps.weight"].shape) == [32, 64, 4]
    assert list(found["blk.0.attn_q_norm.weight"].shape) == [16]
    assert list(found["blk.0.attn_k_norm.weight"].shape) == [16]


def test_tokenizer(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_dense(tmp_path / "m.gguf"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == len(types) == len(field(reader, "tokenizer.ggml.scores")) == 512
    assert len(set(tokens)) == 512
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert types[3:259] == [gguf.TokenType.BYTE] * 256
    assert {"▁", "a", "▁h", "▁he", "▁hel", "▁hell", "▁hello", "▁the"} <= set(tokens)  # "hello" is one token
    assert (field(reader, "tokenizer.ggml.unknown_token_id"), field(reader, "tokenizer.ggml.bos_token_id")) == (0, 1)
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def test_f16_matrices_with_f32_norms(tmp_path: Path) -> None:
    found = tensors(gguf.GGUFReader(write_moe(tmp_path / "m.gguf", n_layer=1, dtype="f16")))
    assert found["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert found["blk.0.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert found["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.all(found["output_norm.weight"].data == 1.0)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    def written(name: str, seed: int) -> bytes:
        return write_moe(tmp_path / name, n_layer=1, seed=seed).read_bytes()

    assert written("a.gguf", 7) == written("b.gguf", 7)
    assert written("a.gguf", 7) != written("c.gguf", 8)


def test_big_tensors_reuse_a_block_without_repeating_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a block of 4,093 values (a prime), every matrix here takes the path that big models take.
    monkeypatch.setattr(tinygguf, "_BLOCK", 4093)
    found = tensors(gguf.GGUFReader(write_dense(tmp_path / "m.gguf", n_layer=1, n_vocab=1000)))
    embd = found["token_embd.weight"].data
    assert embd.shape == (1000, 64)
    assert np.isfinite(embd).all() and 0.015 < float(embd.std()) < 0.025
    assert len(np.unique(embd, axis=0)) == 1000
    head = found["output.weight"].data
    assert not head[:N_RESERVED].any()  # control and byte tokens never win a greedy pick
    assert np.all(np.abs(head[N_RESERVED:]).max(axis=1) > 0)
    assert not np.array_equal(embd, head)


def test_no_partial_file_left_behind(tmp_path: Path) -> None:
    path = write_dense(tmp_path / "m.gguf")
    assert path.exists() and not (tmp_path / "m.gguf.part").exists()


@pytest.mark.parametrize(
    ("name", "params"),
    [("3b", 3.02e9), ("8b", 7.24e9), ("30b-a3b", 30.13e9)],
)
def test_benchmark_presets_have_real_sizes(name: str, params: float) -> None:
    assert PRESETS[name].n_params == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_embd": 60, "n_head": 8},
        {"n_head": 4, "n_head_kv": 3},
        {"n_vocab": 261},
        {"dtype": "q8"},
        {"kind": "moe", "n_expert": 2, "n_expert_used": 3},
        {"n_layer": 0},
    ],
)
def test_invalid_shapes_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ModelShape(**bad)


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        write_shaped(tmp_path / "m.gguf", "70b")


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    argv = ["--kind", "moe", "--n-layer", "1", "--n-expert", "4", "--dtype", "f16", "-o", str(out)]
    assert tinygguf.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert field(reader, "qwen3moe.block_count") == 1
    assert field(reader, "qwen3moe.expert_count") == 4
    assert tinygguf.main(["--n-embd", "62", "-o", str(tmp_path / "bad.gguf")]) == 2
