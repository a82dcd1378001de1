"""What applying (or deleting) manifests changes in the desired models, computed before anything is written.

``plan_apply`` and ``plan_delete`` are pure: from the models in the document and the ones manifests
ask for they list, per model, what apply, diff and delete report the way kubectl does (``created``,
``configured``, ``unchanged``, ``pruned``, ``deleted``), with the fields that change. The control API
writes exactly these changes, in one transaction, or none of them.
"""

from __future__ import annotations

import hashlib
import json

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from meshllm.state.schema import ModelName, ModelOrigin, ModelSpec

__all__ = ["ChangeAction", "FieldChange", "ModelChange", "plan_apply", "plan_delete"]


class ChangeAction(StrEnum):
    CREATED = "created"
    CONFIGURED = "configured"
    UNCHANGED = "unchanged"
    PRUNED = "pruned"
    DELETED = "deleted"
    NOT_FOUND = "not found"


class FieldChange(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    old: Any = Field(alias="from")
    new: Any = Field(alias="to")


class ModelChange(BaseModel):
    """One model's change; ``spec`` is what the document holds afterwards (None once removed)."""

    model_config = ConfigDict(frozen=True)

    name: ModelName
    action: ChangeAction
    fields: dict[str, FieldChange] = Field(default_factory=dict, description="manifest field -> from/to")
    spec: ModelSpec | None = None
    message: str = ""


# ModelSpec fields a manifest sets, by the name the manifest gives them
_COMPARED = {"source": "source", "node": "placement.node", "ctx_size": "ctxSize", "replicas": "replicas",
             "draft": "draft", "origin": "origin", "owner": "owner", "size_bytes": "sizeBytes",
             "split": "placement.split", "fingerprint": "fingerprint", "tensor_hashes": "tensorHashes",
             "embeddings": "embeddings", "pooling": "pooling", "rerank": "rerank", "chat_template": "chatTemplate",
             "expert_core": "placement.expertCore", "experts": "experts", "expert_ranks": "expertRanks",
             "moe_problem": "moeProblem"}


def _shown(value: Any) -> Any:
    """A field as a change shows it: a table of tensor hashes as one short digest of it."""
    if isinstance(value, dict):
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12] if value else ""
    return value


def _field_changes(old: ModelSpec, new: ModelSpec) -> dict[str, FieldChange]:
    changes = {}
    for field, shown in _COMPARED.items():
        before, after = _shown(getattr(old, field)), _shown(getattr(new, field))
        if before != after:
            changes[shown] = FieldChange(old=str(before) if isinstance(before, ModelOrigin) else before,
                                         new=str(after) if isinstance(after, ModelOrigin) else after)
    return changes


def plan_apply(current: Mapping[ModelName, ModelSpec], desired: Sequence[ModelSpec], *,
               prune: bool) -> list[ModelChange]:
    """The change per model of writing ``desired`` (a model's ``created_at`` is kept); with ``prune``
    (a Mesh), manifest models not in ``desired`` are removed. Node-origin models are never pruned."""
    changes = []
    for spec in desired:
        old = current.get(spec.name)
        if old is None:
            changes.append(ModelChange(name=spec.name, action=ChangeAction.CREATED, spec=spec))
            continue
        new = spec.model_copy(update={"created_at": old.created_at or spec.created_at})
        fields = _field_changes(old, new)
        action = ChangeAction.CONFIGURED if fields else ChangeAction.UNCHANGED
        changes.append(ModelChange(name=spec.name, action=action, fields=fields, spec=new if fields else old))
    if prune:
        wanted = {spec.name for spec in desired}
        changes.extend(ModelChange(name=name, action=ChangeAction.PRUNED)
                       for name, old in sorted(current.items())
                       if name not in wanted and old.origin is ModelOrigin.MANIFEST)
    return changes


def plan_delete(current: Mapping[ModelName, ModelSpec], names: Sequence[ModelName]) -> list[ModelChange]:
    """The change per model of deleting ``names``: only models a manifest applied can be deleted;
    a node's ``--model`` is dropped with ``meshllm drop`` instead."""
    changes = []
    for name in names:
        old = current.get(name)
        if old is None:
            changes.append(ModelChange(name=name, action=ChangeAction.NOT_FOUND, message=f"model {name!r} not found"))
        elif old.origin is not ModelOrigin.MANIFEST:
            changes.append(ModelChange(
                name=name, action=ChangeAction.NOT_FOUND, spec=old,
                message=f"model {name!r} was not applied from a manifest (it is node {old.owner}'s --model); "
                        f"remove it with: meshllm drop {name}"))
        else:
            changes.append(ModelChange(name=name, action=ChangeAction.DELETED))
    return changes
