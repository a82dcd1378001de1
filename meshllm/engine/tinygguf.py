"""Synthetic GGUF models with random weights, for tests and benchmarks.

There is no model hub on the machines meshllm is tested on, and real models are too big for unit and integration
tests. This module writes models that llama.cpp loads and runs like real ones: a dense Llama (arch ``llama``), a
Qwen3-style mixture of experts (arch ``qwen3moe``) or a Qwen2-style one with a shared expert beside the routed
ones (arch ``qwen2moe``, kind ``moe-shared``), with a SentencePiece-style vocabulary and a ChatML chat template,
so ``/completion`` and ``/v1/chat/completions`` both work. The text they write is gibberish, but greedy decoding
(temperature 0) is deterministic: the same seed gives the same file, byte for byte, and the same output.

The same code writes benchmark-sized models with a real architecture's shapes (presets ``3b``, ``8b``, ``48b``,
``30b-a3b``), which give realistic speed and loading figures without downloading weights. Such files are tens of
gigabytes, so tensors are streamed to disk one chunk at a time: only one random block (about a million values) is
held in memory, and tensors larger than it reuse that block, each from its own random offset. The block length is a
prime, so consecutive rows of a matrix are different shifts of it and no two rows are equal.

Two choices keep the output readable: rows of ``output`` (the LM head) for control and byte tokens are zero, so the
greedy choice is always a word piece (the largest random logit is positive), and norms are ones so activations stay
in range and never overflow F16.

Random models have many near-tied logits. On the big presets, llama-server's prompt cache (a repeated prompt is
re-evaluated from its last token, a different batch shape) can change a greedy continuation; send
``"cache_prompt": false`` where byte-identical outputs across requests matter. The tiny shapes are not affected.
"""

from __future__ import annotations

import argparse
import itertools
import os
import string
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Literal, cast

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "CHATML_TEMPLATE",
    "PRESETS",
    "ModelShape",
    "main",
    "write_dense",
    "write_moe",
    "write_shaped",
]

DType = Literal["f32", "f16"]
Kind = Literal["dense", "moe", "moe-shared"]
Init = Literal["normal", "ones"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BLOCK = 1_048_573  # largest prime below 2**20: the period of the reused random block
_SCALE = 0.02
_NP_DTYPE: Mapping[str, np.dtype[np.floating]] = MappingProxyType({"f32": np.dtype("<f4"), "f16": np.dtype("<f2")})
_FILE_TYPE: Mapping[str, gguf.LlamaFileType] = MappingProxyType(
    {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
)
_ARCH: Mapping[str, str] = MappingProxyType({"dense": "llama", "moe": "qwen3moe", "moe-shared": "qwen2moe"})

_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unk, bos, eos
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_N_RESERVED = len(_SPECIALS) + 256 + len(_CHATML_TOKENS)  # tokens the LM head never picks greedily
_WORDS = (
    "hello world the of and to in is that it for was on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after words called "
    "just where most know model mesh llama token node"
).split()
_PIECES = (
    "ing ed er es ly tion re in on at en an or st th he nd ou ar al it is le se ve ent ion ter ers ate ment ness"
).split()


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The hyperparameters of a synthetic model; ``n_expert``/``n_expert_used`` only matter for the MoE kinds."""

    kind: Kind = "dense"
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 8
    n_expert_used: int = 2
    n_vocab: int = 512
    n_ctx: int = 2048
    dtype: DType = "f32"

    def __post_init__(self) -> None:
        if self.kind not in _ARCH:
            raise ValueError(f"kind must be one of {sorted(_ARCH)}, not {self.kind!r}")
        if self.dtype not in _NP_DTYPE:
            raise ValueError(f"dtype must be one of {sorted(_NP_DTYPE)}, not {self.dtype!r}")
        sizes = (self.n_layer, self.n_embd, self.n_ff, self.n_head, self.n_head_kv, self.n_ctx)
        if min(sizes) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_head must divide n_embd and n_head_kv must divide n_head")
        if self.n_vocab <= _N_RESERVED:
            raise ValueError(f"n_vocab must exceed {_N_RESERVED} (special, byte and ChatML tokens)")
        if self.kind != "dense" and not 1 <= self.n_expert_used <= self.n_expert:
            raise ValueError("a MoE needs 1 <= n_expert_used <= n_expert")

    @property
    def arch(self) -> str:
        return _ARCH[self.kind]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Number of weights in the file (all tensors, norms included)."""
        return sum(spec.n_elements for spec in _plan_tensors(self))

    @property
    def n_bytes(self) -> int:
        """Bytes of tensor data (without the header and alignment padding)."""
        return sum(spec.n_bytes for spec in _plan_tensors(self))


PRESETS: Mapping[str, ModelShape] = MappingProxyType(
    {
        "tiny": ModelShape(),
        "tiny-moe": ModelShape(kind="moe"),
        "tiny-moe-shared": ModelShape(kind="moe-shared"),
        # Llama-3.2-3B-like body with a 32k vocabulary: 3.02 B parameters, 6.0 GB in F16.
        "3b": ModelShape(
            n_layer=28, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8, n_vocab=32000, n_ctx=8192, dtype="f16"
        ),
        # Llama-3-8B-like body with a 32k vocabulary: 7.24 B parameters, 14.5 GB in F16.
        "8b": ModelShape(
            n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=32000, n_ctx=8192, dtype="f16"
        ),
        # Llama-3-70B-like body, 56 of its 80 layers, 32k vocabulary: 48.4 B parameters, 96.9 GB in F16 (more
        # than one 80 GB GPU holds: the issue-6 split across two GPUs).
        "48b": ModelShape(
            n_layer=56, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, n_vocab=32000, n_ctx=8192, dtype="f16"
        ),
        # Qwen3-30B-A3B-like MoE (128 experts, 8 used, 768 wide), half its query heads: 30.1 B parameters, 60 GB in F16.
        "30b-a3b": ModelShape(
            kind="moe",
            n_layer=48,
            n_embd=2048,
            n_ff=768,
            n_head=16,
            n_head_kv=4,
            n_expert=128,
            n_expert_used=8,
            n_vocab=151936,
            n_ctx=8192,
            dtype="f16",
        ),
    }
)


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: the last axis is GGUF's first dimension (ne[0])
    dtype: np.dtype[np.floating]
    init: Init = "normal"
    zero_rows: int = 0  # leading rows written as zeros

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return self.n_elements * self.dtype.itemsize


def write_dense(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_vocab: int = 512,
    n_ctx: int = 2048,
    dtype: DType = "f32",
    seed: int = 0,
) -> Path:
    """Write a dense Llama-architecture model with random weights and return its path."""
    shape = ModelShape(
        kind="dense",
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=n_vocab,
        n_ctx=n_ctx,
        dtype=dtype,
    )
    return write_shaped(path, shape, seed=seed)


def write_moe(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_expert: int = 8,
    n_expert_used: int = 2,
    n_vocab: int = 512,
    n_ctx: int = 2048,
    dtype: DType = "f32",
    seed: int = 0,
    shared: bool = False,
) -> Path:
    """Write a Qwen3-MoE-architecture model (``n_ff`` is each expert's width) and return its path; ``shared``: a
    Qwen2-MoE one instead, with one shared expert (as wide as the others) beside the routed ones."""
    shape = ModelShape(
        kind="moe-shared" if shared else "moe",
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_vocab=n_vocab,
        n_ctx=n_ctx,
        dtype=dtype,
    )
    return write_shaped(path, shape, seed=seed)


def write_shaped(path: str | os.PathLike[str], shape: str | ModelShape, *, seed: int = 0) -> Path:
    """Write a model of ``shape`` (a ``ModelShape`` or the name of one of ``PRESETS``) and return its path.

    The file appears under its name only once complete (it is written beside it as ``<name>.part`` first), so a
    benchmark may reuse an existing file.
    """
    if isinstance(shape, str):
        if shape not in PRESETS:
            raise ValueError(f"unknown preset {shape!r}; choose one of {sorted(PRESETS)}")
        shape = PRESETS[shape]
    final = Path(path)
    partial = final.with_name(final.name + ".part")
    writer = gguf.GGUFWriter(partial, shape.arch)
    try:
        _add_hparams(writer, shape)
        _add_tokenizer(writer, shape.n_vocab)
        specs = _plan_tensors(shape)
        for spec in specs:
            writer.add_tensor_info(spec.name, spec.shape, spec.dtype, spec.n_bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _stream_tensor_data(writer, specs, seed)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, final)
    return final


def _add_hparams(writer: gguf.GGUFWriter, shape: ModelShape) -> None:
    writer.add_name(f"meshllm-synthetic-{shape.kind}-{shape.n_layer}L-{shape.n_embd}d")
    writer.add_file_type(_FILE_TYPE[shape.dtype])
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(shape.n_vocab)
    if shape.kind != "dense":
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
        writer.add_expert_feed_forward_length(shape.n_ff)
    if shape.kind == "moe-shared":
        writer.add_expert_shared_feed_forward_length(shape.n_ff)


def _add_tokenizer(writer: gguf.GGUFWriter, n_vocab: int) -> None:
    tokens, scores, types = _vocabulary(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocabulary: specials, the 256 byte tokens, ChatML markers, then word pieces."""
    tt = gguf.TokenType
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *_CHATML_TOKENS]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL, *[tt.BYTE] * 256, tt.CONTROL, tt.CONTROL]
    scores = [0.0] * len(tokens)
    pieces = itertools.islice(_word_pieces(), n_vocab - len(tokens))
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(tt.NORMAL)
        scores.append(-float(rank))  # earlier pieces merge first
    return tokens, scores, [int(t) for t in types]


def _word_pieces() -> Iterator[str]:
    """Unique pieces: "▁", letters, digits, punctuation, common words, common pieces, then letter combinations.

    Each word comes with its prefixes ("▁t", "▁th", "▁the"): SentencePiece only reaches a piece through merges
    whose intermediate pieces are in the vocabulary, so this way "hello" becomes one token, not five.
    """
    seen: set[str] = set()
    letters = string.ascii_lowercase
    singles = [*string.ascii_letters, *string.digits, *string.punctuation]
    words = (f"▁{w}"[:end] for w in _WORDS for end in range(2, len(w) + 2))
    fillers = ("".join(combo) for length in itertools.count(2) for combo in itertools.product(letters, repeat=length))
    candidates = itertools.chain(
        ["▁"],
        singles,
        words,
        _PIECES,
        (f"▁{c}" for c in singles),
        itertools.chain.from_iterable((f"▁{f}", f) for f in fillers),
    )
    for piece in candidates:
        if piece not in seen:
            seen.add(piece)
            yield piece


def _plan_tensors(shape: ModelShape) -> list[_TensorSpec]:
    """Every tensor of the model in file order, with numpy-order shapes."""
    d, ff, hd = shape.n_embd, shape.n_ff, shape.head_dim
    q, kv = shape.n_head * hd, shape.n_head_kv * hd
    big, f32 = _NP_DTYPE[shape.dtype], _NP_DTYPE["f32"]
    specs = [_TensorSpec("token_embd.weight", (shape.n_vocab, d), big)]
    for i in range(shape.n_layer):
        blk = f"blk.{i}."
        specs += [
            _TensorSpec(blk + "attn_norm.weight", (d,), f32, "ones"),
            _TensorSpec(blk + "attn_q.weight", (q, d), big),
            _TensorSpec(blk + "attn_k.weight", (kv, d), big),
            _TensorSpec(blk + "attn_v.weight", (kv, d), big),
            _TensorSpec(blk + "attn_output.weight", (d, q), big),
            _TensorSpec(blk + "ffn_norm.weight", (d,), f32, "ones"),
        ]
        if shape.kind == "dense":
            specs += [
                _TensorSpec(blk + "ffn_gate.weight", (ff, d), big),
                _TensorSpec(blk + "ffn_up.weight", (ff, d), big),
                _TensorSpec(blk + "ffn_down.weight", (d, ff), big),
            ]
            continue
        n_exp = shape.n_expert
        if shape.kind == "moe":  # qwen3moe normalises queries and keys per head
            specs += [
                _TensorSpec(blk + "attn_q_norm.weight", (hd,), f32, "ones"),
                _TensorSpec(blk + "attn_k_norm.weight", (hd,), f32, "ones"),
            ]
        specs += [
            _TensorSpec(blk + "ffn_gate_inp.weight", (n_exp, d), f32),  # the router stays F32, as converters do
            _TensorSpec(blk + "ffn_gate_exps.weight", (n_exp, ff, d), big),
            _TensorSpec(blk + "ffn_up_exps.weight", (n_exp, ff, d), big),
            _TensorSpec(blk + "ffn_down_exps.weight", (n_exp, d, ff), big),
        ]
        if shape.kind == "moe-shared":  # qwen2moe: a gated shared expert every token goes through
            specs += [
                _TensorSpec(blk + "ffn_gate_inp_shexp.weight", (d,), f32),
                _TensorSpec(blk + "ffn_gate_shexp.weight", (ff, d), big),
                _TensorSpec(blk + "ffn_up_shexp.weight", (ff, d), big),
                _TensorSpec(blk + "ffn_down_shexp.weight", (d, ff), big),
            ]
    specs += [
        _TensorSpec("output_norm.weight", (d,), f32, "ones"),
        _TensorSpec("output.weight", (shape.n_vocab, d), big, zero_rows=_N_RESERVED),
    ]
    return specs


def _stream_tensor_data(writer: gguf.GGUFWriter, specs: Sequence[_TensorSpec], seed: int) -> None:
    """Write the data section one chunk at a time, laid out as ``GGUFWriter.write_tensor_data`` lays it out.

    ``write_tensor_data`` needs a whole tensor in memory; here no chunk exceeds ``_BLOCK`` values.
    """
    assert writer.fout is not None and len(writer.fout) == 1, "synthetic models are written as a single file"
    fout = cast(IO[bytes], writer.fout[0])
    block_rng, tensor_rng = np.random.default_rng(seed).spawn(2)
    blocks = _BlockCache(block_rng)
    for spec in specs:
        writer.write_padding(fout, fout.tell())
        for chunk in _tensor_chunks(spec, tensor_rng, blocks):
            fout.write(chunk.data)
        writer.write_padding(fout, spec.n_bytes)
    fout.flush()


class _BlockCache:
    """One random block of ``_BLOCK`` values, stored twice in a row so any window of ``_BLOCK`` values is a slice."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._values = (rng.standard_normal(_BLOCK, dtype=np.float32) * _SCALE).astype("<f4")
        self._by_dtype: dict[np.dtype[np.floating], npt.NDArray[np.floating]] = {}

    def doubled(self, dtype: np.dtype[np.floating]) -> npt.NDArray[np.floating]:
        if dtype not in self._by_dtype:
            once = self._values.astype(dtype)
            self._by_dtype[dtype] = np.concatenate([once, once])
        return self._by_dtype[dtype]


def _tensor_chunks(
    spec: _TensorSpec, rng: np.random.Generator, blocks: _BlockCache
) -> Iterator[npt.NDArray[np.floating]]:
    """The values of one tensor, flattened, in chunks of at most ``_BLOCK`` values."""
    total = spec.n_elements
    if spec.init == "ones":
        yield np.ones(total, dtype=spec.dtype)
        return
    zeros = min(total, spec.zero_rows * spec.shape[-1])
    if zeros:
        yield np.zeros(zeros, dtype=spec.dtype)
    rest = total - zeros
    if rest <= _BLOCK:  # small enough to draw fresh values
        yield (rng.standard_normal(rest, dtype=np.float32) * _SCALE).astype(spec.dtype)
        return
    doubled = blocks.doubled(spec.dtype)
    start = int(rng.integers(_BLOCK))
    while rest > 0:
        take = min(rest, _BLOCK)
        yield doubled[start : start + take]
        start = (start + take) % _BLOCK
        rest -= take


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m meshllm.engine.tinygguf", description="Write a synthetic GGUF model with random weights."
    )
    parser.add_argument("--kind", choices=sorted(_ARCH), help="default: the preset's kind")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for field in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_expert", "n_expert_used", "n_vocab", "n_ctx"):
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=int, help="overrides the preset")
    parser.add_argument("--dtype", choices=sorted(_NP_DTYPE), help="type of the matrices (norms are always f32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True, help="path of the .gguf file to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m meshllm.engine.tinygguf --kind moe --preset tiny -o model.gguf``."""
    args = _parse_args(argv)
    overrides = {
        key: value for key, value in vars(args).items() if value is not None and key not in ("preset", "seed", "output")
    }
    try:
        shape = replace(PRESETS[args.preset], **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = write_shaped(args.output, shape, seed=args.seed)
    size = path.stat().st_size
    print(f"{path}\t{size} bytes ({size / 1e9:.3f} GB, {shape.n_params / 1e6:.1f} M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
