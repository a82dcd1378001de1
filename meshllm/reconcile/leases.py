"""The placement controller: take and release this node's placement leases, model by model, as the plan says.

Every server node plans the whole mesh (``placement.plan_placement``) but writes only its own
leases: a slot the plan gives this node and that it does not hold yet is taken; a lease it holds
that the plan no longer gives it is released. The served-model controller then runs a llama-server
for each model this node holds a lease of. A dead node's leases stay: they are void while it is dead
(the planner skips them) and valid again if it comes back (a healed partition) with nobody having
taken its slots; deleting them would make the healed node stop its servers. What nobody owns any
more is removed by the janitor (``demand.GarbageCollector``).

The placement is one pure function of the whole document, so any change may move any model: every
change of the tables it reads enqueues every model, and the plan is computed once per document
change (``_plan``), not once per model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshllm.reconcile.placement import Placement, Slot, current_plan
from meshllm.reconcile.supervisor import PROCESSES
from meshllm.reconcile.timing import Clock, SystemClock
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import ModelName, NodeId, PlacementLease, lease_key
from meshllm.store.db import NodeStore

__all__ = ["DesiredLeases", "PlacementController", "Release", "Take", "plan_leases"]

log = logging.getLogger(__name__)

PLAN_TTL = 1.0  # seconds a computed plan serves while the document does not change


@dataclass(frozen=True)
class DesiredLeases:
    """The slots of ``model`` the plan gives this node, and whether the mesh wants the model at all."""

    model: ModelName
    node: NodeId
    incarnation: float
    slots: tuple[Slot, ...] = ()
    wanted: bool = False


@dataclass(frozen=True)
class Take:
    lease: PlacementLease
    event: str = ""  # for the node's log, when the slot is new to this node


@dataclass(frozen=True)
class Release:
    key: str
    event: str


LeaseAction = Take | Release


def plan_leases(desired: DesiredLeases, leases: Mapping[str, PlacementLease], now: float) -> list[LeaseAction]:
    """The leases of one model to write: ``leases`` are the model's leases in the document, anyone's.
    Pure; releases come first."""
    mine = {slot.slot: slot for slot in desired.slots}
    actions: list[LeaseAction] = []
    for key, lease in sorted(leases.items()):
        if lease.node == desired.node and lease.slot not in mine:
            why = "no longer wanted" if not desired.wanted else "placed elsewhere"
            actions.append(Release(key, f"slot {lease.slot} released: {why}"))
    for index, slot in sorted(mine.items()):
        current = leases.get(lease_key(desired.model, index))
        workers, shares = list(slot.workers), list(slot.tensor_split)
        want = PlacementLease(model=desired.model, slot=index, node=desired.node, incarnation=desired.incarnation,
                              at=now, hot=slot.hot, workers=workers, tensor_split=shares, shards=slot.shards,
                              expert_core=slot.expert_core, expert_copies=slot.expert_copies)
        if current is not None and current.model_copy(update={"at": now}) == want:
            continue
        event = ""
        if current is None or current.node != desired.node or current.workers != workers \
                or current.shards != slot.shards:
            split = f" (split by layers with {', '.join(workers)}: shares {shares})" if workers else \
                f" (expert shard {index + 1}/{slot.shards})" if slot.shards else ""
            event = f"slot {index} placed on this node" + (" (a hot replica)" if slot.hot else "") + split
        actions.append(Take(want, event))
    return actions


class PlacementController:
    """Writes this node's leases of each model."""

    name = "placement"

    def __init__(self, state: MeshState, *, node_id: NodeId, incarnation: Callable[[], float],
                 store: NodeStore | None = None, clock: Clock | None = None) -> None:
        self.state = state
        self.store = store
        self.node_id = node_id
        self.incarnation = incarnation
        self.clock = clock or SystemClock()
        self._version = 0  # document changes heard
        self._cached: tuple[int, float, Placement] | None = None

    def keys(self) -> set[ModelName]:
        return set(self.state.models()) | {lease.model for lease in self.state.leases().values()
                                           if lease.node == self.node_id}

    def keys_for(self, change: Changed) -> set[ModelName]:
        if change.table == PROCESSES:
            return set()
        self._version += 1
        return self.keys()

    def _plan(self, now: float) -> Placement:
        """The plan for the document as it stands, computed once per change (and at most ``PLAN_TTL`` old)."""
        if self._cached is not None:
            version, at, plan = self._cached
            if version == self._version and 0.0 <= now - at < PLAN_TTL:
                return plan
        plan = current_plan(self.state, now=now, me=self.node_id)
        self._cached = (self._version, now, plan)
        return plan

    async def desired(self, model: ModelName) -> DesiredLeases:
        now = self.clock.now()
        plan = self._plan(now)
        return DesiredLeases(model=model, node=self.node_id, incarnation=self.incarnation(),
                             slots=tuple(s for s in plan.slots_of(self.node_id) if s.model == model),
                             wanted=model in plan.wanted)

    async def actual(self, model: ModelName, desired: DesiredLeases, now: float) -> dict[str, PlacementLease]:
        return {key: lease for key, lease in self.state.leases().items() if lease.model == model}

    def plan(self, desired: DesiredLeases, actual: dict[str, PlacementLease], now: float) -> list[LeaseAction]:
        return plan_leases(desired, actual, now)

    async def apply(self, model: ModelName, action: LeaseAction, now: float) -> float | None:
        match action:
            case Take(lease, event):
                if event:
                    log.info("placement: %s: %s", model, event)
                self.state.put_lease(lease)
                if event and self.store is not None:
                    await self.store.record_event(model, "Placed", event)
            case Release(key, event):
                log.info("placement: %s: %s", model, event)
                self.state.remove_lease(key)
                if self.store is not None:
                    await self.store.record_event(model, "Released", event)
        return None

    async def shutdown(self) -> None:
        """Leases stay: a node that comes back finds its slots (``mesh.leave`` tells the others it left)."""
