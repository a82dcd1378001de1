"""What a model's desired state (``ModelSpec``) records of an MoE file, read where the spec is made.

The placement planner is a pure function of the document, so whatever it needs to plan expert shards is
written into the spec when a node resolves the model (``--model``, ``meshllm apply``): the expert count and
size from the header, and the importance order (``moe.importance``), so every node deals the same
experts to the same shards. A file with experts that cannot be split gets ``moe_problem`` instead, which the
model's condition shows when the model would need splitting.
"""

from __future__ import annotations

from pathlib import Path

from meshllm.moe.detect import MoeProblem, detect_moe
from meshllm.moe.importance import expert_ranks, load_importance

__all__ = ["moe_spec_fields", "problem_of"]


def moe_spec_fields(path: Path) -> dict[str, object]:
    """The ``ModelSpec`` fields of ``path``'s MoE shape; none for a dense model."""
    try:
        info = detect_moe(path)
    except MoeProblem as exc:
        return {"moe_problem": f"{exc.reason}: {exc}"}
    if info is None:
        return {}
    importance = load_importance(path)
    ranks = [] if importance is None else expert_ranks(importance, n_layer=info.n_layer, n_expert=info.n_expert)
    return {"experts": info.n_expert, "experts_used": info.n_used, "expert_bytes": info.expert_bytes,
            "expert_ranks": [",".join(map(str, ranks[layer])) for layer in info.moe_layers] if ranks else []}


def problem_of(moe_problem: str) -> tuple[str, str]:
    """A spec's ``moe_problem`` as (reason, message) for a condition."""
    reason, _, message = moe_problem.partition(": ")
    return (reason, message) if message else ("MoeProblem", moe_problem)
