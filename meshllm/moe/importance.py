"""Expert importance: how much each expert of each layer of an MoE model is used, to choose the shared core.

The expert shard planner (``moe.plan``) puts the most important experts of every layer in every shard
(the shared core) and spreads the rest. This module is the one place that importance comes from:

    load_importance(path) -> list[list[float]] | None

``path`` is the model's GGUF file. The answer has one list per layer (``blk.<i>``, in layer order), each
with one non-negative figure per expert (expert id order): higher means more used (for example the share
of tokens routed to the expert in calibration text). None when there are no statistics for the file.

Fallback order (the first that exists wins):
1. routing statistics computed for this exact file (matched by its ``engine.models.file_fingerprint``)
   and cached beside it or in the node's cache;
2. statistics another node computed and the mesh replicated;
3. none: ``load_importance`` returns None and the planner ranks every layer's experts by id
   (0, 1, 2, ...), an order every node computes alike. ``expert_ranks`` turns either into ranks.

Owner: the ``moequal`` work fills in 1 and 2; the planner relies only on this signature.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["expert_ranks", "load_importance"]


def load_importance(path: Path) -> list[list[float]] | None:
    """Per layer, per expert: how much the expert is used (see the module docstring); None: no statistics."""
    return None


def expert_ranks(importance: list[list[float]] | None, *, n_layer: int, n_expert: int) -> list[list[int]]:
    """Per layer, expert ids most important first (ties: the smaller id first); the id order without
    statistics, or where a layer's figures do not cover every expert."""
    ranks = []
    for layer in range(n_layer):
        figures = importance[layer] if importance is not None and layer < len(importance) else []
        if len(figures) != n_expert:
            ranks.append(list(range(n_expert)))
            continue
        ranks.append(sorted(range(n_expert), key=lambda e: (-figures[e], e)))
    return ranks
