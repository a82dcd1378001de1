"""The order in which a model's expert shards keep experts, and the quality figure it gives each shard.

Every node writing a shard of a model must deal the same experts, so the order is read from the document
(see ``moe.importance`` for where statistics come from), first that exists:

1. ``ModelSpec.expert_ranks``: an order the spec carries (source ``spec``);
2. the file's ``ExpertImportance`` once ``ready``: each layer's experts by routing selections, most first
   (source ``statistics``);
3. the ``ExpertImportance`` ``failed``: expert id order, 0, 1, 2, ... (source ``id``).

While the statistics are missing or ``computing``, there is no order: shards wait (``Waiting``), since an
order changed later would rewrite every shard and restart its server.

The free quality figure of a shard is its *routing mass*: the share of the calibration text's routing
selections, per MoE layer, that went to experts the shard keeps (mean over layers, and the lowest layer).
100% for a shard with every expert; a selection of a dropped expert goes to the next best kept one, so it
is the share of routing decisions the shard makes exactly as the whole model would. It needs counts, so
with the id order it is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.moe.importance import decode_counts, routing_mass
from meshllm.state.schema import ExpertImportance, ImportancePhase, ModelSpec

__all__ = ["ExpertOrder", "Waiting", "expert_order", "mass_line", "order_note"]


@dataclass(frozen=True)
class ExpertOrder:
    """Per MoE layer (in ``moe_layers`` order), expert ids most important first; the counts behind them."""

    ranks: tuple[tuple[int, ...], ...]
    counts: Mapping[int, tuple[int, ...]] | None
    source: str  # "spec", "statistics" or "id"


@dataclass(frozen=True)
class Waiting:
    message: str


def _ids(n_expert: int, layers: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(n_expert)) for _ in range(layers))


def _entry_counts(entry: ExpertImportance | None) -> dict[int, tuple[int, ...]] | None:
    if entry is None or entry.phase is not ImportancePhase.READY:
        return None
    try:
        return decode_counts(entry.counts)
    except ValueError:
        return None


def expert_order(spec: ModelSpec, entry: ExpertImportance | None, *, moe_layers: Sequence[int], n_expert: int,
                 local_counts: Mapping[int, tuple[int, ...]] | None = None) -> ExpertOrder | Waiting:
    """The order of ``spec``'s experts (see the module docstring); ``entry``: the document's statistics of the
    file; ``local_counts``: this node's cached ones, for the figure of an order the spec carries."""
    ids = list(range(n_expert))
    if spec.expert_ranks:
        ranks = []
        for j in range(len(moe_layers)):
            try:
                order = [int(x) for x in spec.expert_ranks[j].split(",")]
            except (IndexError, ValueError):
                order = []
            ranks.append(tuple(order) if sorted(order) == ids else tuple(ids))
        return ExpertOrder(tuple(ranks), _entry_counts(entry) or local_counts, "spec")
    counts = _entry_counts(entry)
    if counts is not None:
        ranks = []
        for layer in moe_layers:
            row = counts.get(layer, ())
            ranks.append(tuple(sorted(ids, key=lambda e: (-row[e], e))) if len(row) == n_expert else tuple(ids))
        return ExpertOrder(tuple(ranks), counts, "statistics")
    if entry is not None and entry.phase is ImportancePhase.FAILED:
        return ExpertOrder(_ids(n_expert, len(moe_layers)), None, "id")
    who = f" on node {entry.node}" if entry is not None and entry.node else ""
    return Waiting(f"waiting for expert routing statistics (llama-imatrix on calibration text{who}): the shards are "
                   "written once they are known")


def mass_line(counts: Mapping[int, Sequence[int]] | None, kept: Mapping[int, Sequence[int]]) -> str:
    """The routing-mass figure of a shard keeping ``kept[layer]`` experts, as one line."""
    mass = routing_mass(counts, kept) if counts else None
    if mass is None:
        return "routing mass unknown (no routing statistics: expert id order)"
    mean, low = mass
    return f"keeps {100 * mean:.1f}% of routing mass (lowest layer {100 * low:.1f}%)"


def order_note(spec: ModelSpec, entry: ExpertImportance | None) -> tuple[str, bool]:
    """How the model's shards order experts, for its condition, and whether they wait for statistics."""
    if spec.expert_ranks:
        return "expert order from the model's spec", False
    if entry is None:
        return "expert order: routing statistics not computed yet (shards wait for them)", True
    if entry.phase is ImportancePhase.READY:
        return (f"expert order: routing statistics ({entry.tokens} selections per layer, computed by node "
                f"{entry.node})"), False
    if entry.phase is ImportancePhase.FAILED:
        return f"expert order: expert id (routing statistics failed on node {entry.node}: {entry.message})", False
    return f"expert order: routing statistics being computed on node {entry.node} (shards wait for them)", True
