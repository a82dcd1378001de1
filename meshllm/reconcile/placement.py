"""Placement: which node serves which model. (Being written; the interface below is stable.)

``conditions(state, now=...)`` tells, for every wanted model, whether it is Pending, Loading, Ready
or Degraded and why; the API and the CLI show it.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from meshllm.state.document import MeshState
from meshllm.state.schema import ServerPhase

__all__ = ["Condition", "ConditionPhase", "conditions"]


class ConditionPhase(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    DEGRADED = "Degraded"


class Condition(BaseModel):
    """Where a model stands, and why."""

    model_config = ConfigDict(frozen=True)

    phase: ConditionPhase
    reason: str = Field(description="a CamelCase word: NoCapacity, ServerFailed, Serving, ...")
    message: str = ""
    ready: int = Field(default=0, description="servers ready")
    wanted: int = Field(default=1, description="servers wanted")
    nodes: list[str] = Field(default_factory=list, description="nodes placed to serve it")


def conditions(state: MeshState, *, now: float) -> dict[str, Condition]:
    """The condition of every model in the document (a first version from observed servers only)."""
    result = {}
    servers = state.servers()
    for name, spec in state.models().items():
        mine = [s for s in servers.values() if s.model == name]
        ready = [s for s in mine if s.phase is ServerPhase.READY]
        nodes = sorted(s.node for s in mine)
        if len(ready) >= spec.replicas:
            cond = Condition(phase=ConditionPhase.READY, reason="Serving", ready=len(ready),
                             wanted=spec.replicas, nodes=nodes)
        elif ready:
            cond = Condition(phase=ConditionPhase.DEGRADED, reason="TooFewServers", ready=len(ready),
                             wanted=spec.replicas, nodes=nodes)
        elif any(s.phase is ServerPhase.LOADING for s in mine):
            cond = Condition(phase=ConditionPhase.LOADING, reason="Loading", wanted=spec.replicas, nodes=nodes)
        else:
            failed = [s for s in mine if s.phase is ServerPhase.FAILED]
            cond = Condition(phase=ConditionPhase.PENDING, reason="ServerFailed" if failed else "NotPlaced",
                             message=failed[0].message if failed else "", wanted=spec.replicas, nodes=nodes)
        result[name] = cond
    return result
