"""Is a GGUF file a mixture-of-experts model meshllm can split by experts, and what shape is it?

The answer comes from the header alone (``moe.header``): the architecture, ``<arch>.expert_count`` and
``<arch>.expert_used_count``, the shared experts where the architecture has them, and the tensors that hold
one slice per expert. Only architectures in ``ARCHITECTURES`` are split: for them the slicing rule below is
checked against llama.cpp's loaders (``src/models/<arch>.cpp``): a shard with fewer experts loads as the
same architecture with a smaller ``expert_count``.

Per MoE layer, the tensors cut by expert are
- the experts' matrices: ``blk.N.ffn_{gate,up,down,gate_up}_exps.*`` (the expert is the outermost axis);
- the router: ``blk.N.ffn_gate_inp.weight`` (one row per expert) and its bias where there is one;
- the routing bias some architectures add (``blk.N.ffn_exp_probs_b.bias``, one value per expert).
Shared experts (``*_shexp``), attention, norms, embeddings and dense layers are kept whole (the trunk).

A file whose architecture is not in the table but carries ``<arch>.expert_count`` is an MoE model this
module does not know how to cut: ``MoeProblem`` says so, and the model is never split by experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from meshllm.errors import ModelError
from meshllm.moe.header import GgufHeader, TensorEntry, read_header

__all__ = ["ARCHITECTURES", "ArchRule", "MoeInfo", "MoeProblem", "detect_moe", "expert_tensor", "moe_of_header"]


@dataclass(frozen=True)
class ArchRule:
    """How one architecture keeps its experts."""

    shared: str = ""  # how shared experts show: "count" (<arch>.expert_shared_count), "tensors" (*_shexp)
    groups: bool = False  # group-limited routing (<arch>.expert_group_count): groups must stay whole
    note: str = ""


ARCHITECTURES: dict[str, ArchRule] = {
    "qwen3moe": ArchRule(note="Qwen3-MoE: 128 experts, 8 used (30B-A3B); no shared expert"),
    "qwen2moe": ArchRule(shared="tensors", note="Qwen1.5/2-MoE: one gated shared expert per layer (*_shexp)"),
    "olmoe": ArchRule(note="OLMoE: 64 experts, 8 used"),
    "llama": ArchRule(note="Mixtral: llama with expert_count (8 experts, 2 used)"),
    "mixtral": ArchRule(note="Mixtral under its own name, as some converters write it"),
    "glm4moe": ArchRule(shared="count", groups=True,
                        note="GLM-4.5: shared expert, routing bias (ffn_exp_probs_b), leading dense layers"),
    "deepseek2": ArchRule(shared="count", groups=True,
                          note="DeepSeek-V2/V3: shared experts, leading dense layers, group-limited routing"),
}

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias|scale)$")
_ROUTER = ("ffn_gate_inp", "ffn_exp_probs_b")


class MoeProblem(ModelError):
    """The file is an MoE model that cannot be split by experts; ``reason`` is a CamelCase word for
    the model's condition (UnknownMoeArchitecture, DamagedMoe, TruncatedModel, UnreadableModel)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class MoeInfo:
    """The shape of an MoE model, as the shard planner needs it."""

    arch: str
    n_layer: int
    n_expert: int
    n_used: int  # experts each token is routed to
    n_shared: int  # shared experts (always on, kept whole in every shard)
    moe_layers: tuple[int, ...]  # layers with routed experts (leading dense layers left out)
    expert_bytes: int  # bytes of one expert over every MoE layer (what a shard saves per expert it drops)
    file_bytes: int

    @property
    def trunk_bytes(self) -> int:
        """Everything but the routed experts: every shard holds it."""
        return self.file_bytes - self.n_expert * self.expert_bytes

    def shard_bytes(self, experts: int) -> int:
        """The size of a shard keeping ``experts`` experts per layer."""
        return self.trunk_bytes + experts * self.expert_bytes


def expert_tensor(name: str) -> int | None:
    """The layer of a tensor cut by expert (see the module docstring), or None for a trunk tensor."""
    match = _LAYER.match(name)
    if match is None:
        return None
    base = match.group(2)
    if base.endswith("_exps") or base in _ROUTER:
        return int(match.group(1))
    return None


def detect_moe(path: Path) -> MoeInfo | None:
    """The MoE shape of ``path``; None for a dense model. ``MoeProblem`` for an MoE model that cannot be
    split by experts, ``ModelError`` for a file that is not a whole GGUF."""
    try:
        header = read_header(path)
    except ModelError as exc:
        reason = "TruncatedModel" if "truncated" in str(exc) else "UnreadableModel"
        raise MoeProblem(reason, str(exc)) from None
    return moe_of_header(header)


def _int(header: GgufHeader, key: str) -> int:
    value = header.key(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def moe_of_header(header: GgufHeader) -> MoeInfo | None:
    """``detect_moe`` on a header already read."""
    arch, n_expert = header.arch, _int(header, "expert_count")
    if n_expert <= 0:
        return None
    rule = ARCHITECTURES.get(arch)
    if rule is None:
        raise MoeProblem("UnknownMoeArchitecture",
                         f"{header.path.name}: architecture {arch!r} has experts ({arch}.expert_count = {n_expert})"
                         f" but meshllm does not know how to split it by experts; known: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    n_used = _int(header, "expert_used_count")
    if not 1 <= n_used <= n_expert:
        raise MoeProblem("DamagedMoe", f"{header.path.name}: expert_used_count {n_used} is not within 1..{n_expert}")
    if rule.groups and _int(header, "expert_group_count") > 1:
        raise MoeProblem("UnsupportedMoe", f"{header.path.name}: {arch} routes within "
                         f"{_int(header, 'expert_group_count')} expert groups; shards would break the groups")
    sliced: dict[int, list[TensorEntry]] = {}
    for tensor in header.tensors:
        layer = expert_tensor(tensor.name)
        if layer is None:
            continue
        if tensor.dims[-1] != n_expert:
            raise MoeProblem("DamagedMoe", f"{header.path.name}: tensor {tensor.name} holds {tensor.dims[-1]} "
                             f"experts, the header says {n_expert}")
        sliced.setdefault(layer, []).append(tensor)
    layers = tuple(sorted(layer for layer, ts in sliced.items() if any(t.name.split(".")[2].endswith("_exps")
                                                                       for t in ts)))
    if not layers:
        raise MoeProblem("DamagedMoe", f"{header.path.name}: expert_count is {n_expert} but no *_exps tensor exists")
    expert_bytes = sum(t.nbytes for ts in sliced.values() for t in ts) // n_expert
    shared = _int(header, "expert_shared_count") if rule.shared == "count" else \
        int(any("_shexp" in t.name for t in header.tensors)) if rule.shared == "tensors" else 0
    return MoeInfo(arch=arch, n_layer=_int(header, "block_count"), n_expert=n_expert, n_used=n_used,
                   n_shared=shared, moe_layers=layers, expert_bytes=expert_bytes, file_bytes=header.file_size)
