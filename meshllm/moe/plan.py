"""Expert shard planning: how many shards the nodes can hold, and which experts each shard keeps. Pure.

An expert shard is a standalone GGUF with the whole trunk (attention, norms, embeddings, shared experts)
and a subset of each MoE layer's routed experts; every node runs its own llama-server on its own shard, so
nothing crosses the network while it decodes. The rules:

1. The *core*: in every layer, the ``core`` most important experts (``importance.expert_ranks``) are in
   every shard. ``core = max(expert_used_count, ceil(core_fraction x expert_count))``, at most every expert;
   ``core_fraction`` defaults to one half (``CORE_FRACTION``). A shard thus always keeps at least
   ``expert_used_count`` experts per layer, which llama.cpp needs to route a token.
2. The *rest* (each layer's other experts, in importance order) is dealt round-robin over the shards,
   ``copies`` times: with 2 copies every expert lives on two nodes, so one node's loss loses no expert; with
   1, on exactly one. Each shard keeps ``core + ceil(copies x rest / shards)`` experts per layer (at most).
3. The shard count: the most nodes (largest free capacity first, ties by node id), from all of them down to
   two, whose smallest can hold a shard with the 1.1x rule (``FIT_FACTOR``): 2 copies when that fits, else
   1. None fits: ``NoShards`` with the figures.

Shard ``i`` of a layout runs on ``nodes[i]``. Everything is a function of its arguments, so every node
computes the same shards from the same document.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.state.schema import NodeId

__all__ = [
    "CORE_FRACTION", "FIT_FACTOR", "NoShards", "ShardLayout", "composition_digest", "core_size", "experts_per_shard",
    "plan_layout", "shard_experts",
]

CORE_FRACTION = 0.5  # share of each layer's experts, by importance, that every shard keeps
FIT_FACTOR = 1.1  # a node holds a shard when its free capacity is at least this times the shard's size


@dataclass(frozen=True)
class ShardLayout:
    """``shards`` shards of ``experts`` experts per layer each (``core`` of them shared by all), every
    non-core expert on ``copies`` of them; shard ``i`` runs on ``nodes[i]``."""

    shards: int
    experts: int
    core: int
    copies: int
    shard_bytes: int
    nodes: tuple[NodeId, ...]


@dataclass(frozen=True)
class NoShards:
    reason: str  # CamelCase, for the model's condition
    message: str


def _fmt(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def core_size(n_expert: int, n_used: int, core_fraction: float = CORE_FRACTION) -> int:
    """Experts per layer every shard keeps (rule 1)."""
    fraction = min(1.0, max(0.0, core_fraction))
    return min(n_expert, max(n_used, math.ceil(fraction * n_expert)))


def experts_per_shard(n_expert: int, core: int, shards: int, copies: int) -> int:
    """The most experts per layer any one shard keeps (rule 2)."""
    return min(n_expert, core + math.ceil(copies * (n_expert - core) / shards))


def plan_layout(*, n_expert: int, n_used: int, trunk_bytes: int, expert_bytes: int, capacities: Mapping[NodeId, int],
                core_fraction: float = CORE_FRACTION) -> ShardLayout | NoShards:
    """The shard count, size and nodes for a model of this shape over nodes with these free capacities."""
    core = core_size(n_expert, n_used, core_fraction)
    ranked = sorted(capacities.items(), key=lambda item: (-item[1], item[0]))
    if len(ranked) < 2:
        return NoShards("TooFewNodes", f"expert sharding needs two server nodes or more; {len(ranked)} offer capacity")
    for count in range(len(ranked), 1, -1):
        nodes = ranked[:count]
        smallest = nodes[-1][1]
        for copies in (2, 1):
            experts = experts_per_shard(n_expert, core, count, copies)
            size = trunk_bytes + experts * expert_bytes
            if smallest >= FIT_FACTOR * size:
                return ShardLayout(count, experts, core, copies, size, tuple(nid for nid, _ in nodes))
    two = experts_per_shard(n_expert, core, 2, 1)
    need = FIT_FACTOR * (trunk_bytes + two * expert_bytes)
    return NoShards("NoCapacity", f"the smallest expert shard ({two} of {n_expert} experts per layer, core {core}) "
                                  f"needs {_fmt(need)} on each of two nodes; the second largest free capacity is "
                                  f"{_fmt(ranked[1][1])}")


def shard_experts(ranks: Sequence[Sequence[int]], *, core: int, shards: int, copies: int,
                  index: int) -> tuple[tuple[int, ...], ...]:
    """The experts shard ``index`` keeps in each layer ``ranks`` covers (ids, ascending): that layer's core
    and its round-robin share of the rest (rules 1 and 2)."""
    if not 0 <= index < shards:
        raise ValueError(f"shard {index} of {shards}")
    layers = []
    for order in ranks:
        rest = order[core:]
        mine = {e for j, e in enumerate(rest) for c in range(min(copies, shards)) if (j * copies + c) % shards == index}
        layers.append(tuple(sorted({*order[:core], *mine})))
    return tuple(layers)


def composition_digest(experts: Sequence[Sequence[int]]) -> str:
    """A short digest of which experts a shard keeps (names its file, with the source's fingerprint)."""
    text = ";".join(",".join(map(str, layer)) for layer in experts)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
