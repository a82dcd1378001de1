"""The placement reconciler: take and release this node's placement leases as the plan says.

Every server node plans the whole mesh (``placement.plan_placement``) but writes only its own
leases: a slot the plan gives this node and that it does not hold yet is taken; a lease it holds
that the plan no longer gives it is released. The served-model reconciler then runs a llama-server
for each model this node holds a lease of. One node, the janitor (the live server node with the
smallest id), also removes what nobody owns any more: expired demand, and the leases and failures of models
that are gone. A dead node's leases stay: they are void while it is dead (the planner skips them)
and valid again if it comes back (a healed partition) with nobody having taken its slots; deleting
them would make the healed node stop its servers. A ``--model`` spec whose node left stays (unwanted once
its demand runs out, and shown so) until that node returns or someone drops it: deleting it would
race with its node rewriting it when a partition heals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from meshllm.reconcile.placement import Placement, current_plan
from meshllm.reconcile.queue import Result, WorkQueue
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeRole, PlacementLease, ServerPhase, lease_key
from meshllm.store.db import NodeStore

__all__ = ["PlacementReconciler"]

log = logging.getLogger(__name__)

RECHECK = 5.0  # seconds between plans with no change: demand expires and failures are forgotten in time
KEY = "placement"


class PlacementReconciler:
    def __init__(self, state: MeshState, *, node_id: str, incarnation: Callable[[], float],
                 store: NodeStore | None = None, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.store = store
        self.node_id = node_id
        self.incarnation = incarnation
        self.clock = clock
        self.queue = WorkQueue(self.reconcile, name="placement")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        handle = self.state.observe(lambda: self.queue.add(KEY))
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.queue.run)
                self.queue.add(KEY)
                task_status.started()
        finally:
            self.state.unobserve(handle)

    async def reconcile(self, key: str) -> Result:
        now = self.clock()
        plan = current_plan(self.state, now=now, me=self.node_id)
        with self.state.transaction():
            events = self._sync_leases(plan, now)
            if self._is_janitor():
                self._collect_garbage(now)
        if self.store is not None:
            for model, reason, message in events:
                await self.store.record_event(model, reason, message)
        return Result(requeue_after=RECHECK)

    def _sync_leases(self, plan: Placement, now: float) -> list[tuple[str, str, str]]:
        """Take and release this node's leases; returns the events (model, reason, message)."""
        events = []
        incarnation = self.incarnation()
        mine = {(s.model, s.slot): s for s in plan.slots_of(self.node_id)}
        for (model, index), slot in mine.items():
            current = self.state.leases().get(lease_key(model, index))
            workers, shares = list(slot.workers), list(slot.tensor_split)
            if current is None or current.node != self.node_id or current.incarnation != incarnation \
                    or current.hot != slot.hot or current.workers != workers or current.tensor_split != shares:
                split = f" (split by layers with {', '.join(workers)}: shares {shares})" if workers else ""
                if current is None or current.node != self.node_id or current.workers != workers:
                    log.info("placement: taking %s slot %d%s%s", model, index,
                             " (hot replica)" if slot.hot else "", split)
                    events.append((model, "Placed", f"slot {index} placed on this node"
                                   + (" (a hot replica)" if slot.hot else "") + split))
                self.state.put_lease(PlacementLease(model=model, slot=index, node=self.node_id,
                                                    incarnation=incarnation, at=now, hot=slot.hot,
                                                    workers=workers, tensor_split=shares))
        for key, lease in list(self.state.leases().items()):
            if lease.node == self.node_id and (lease.model, lease.slot) not in mine:
                log.info("placement: releasing %s slot %d", lease.model, lease.slot)
                events.append((lease.model, "Released", f"slot {lease.slot} released: "
                               + ("no longer wanted" if lease.model not in plan.wanted else "placed elsewhere")))
                self.state.remove_lease(key)
        return events

    def _is_janitor(self) -> bool:
        """Whether this node is the live server node with the smallest id (clients run no reconcilers)."""
        servers = [nid for nid, node in self.state.alive_nodes().items() if node.role is NodeRole.SERVER]
        return min(servers, default=None) == self.node_id

    def _collect_garbage(self, now: float) -> None:
        models = self.state.models()
        for key, lease in list(self.state.leases().items()):
            if lease.model not in models:
                self.state.remove_lease(key)
        for key, entry in list(self.state.demand().items()):
            if entry.expires_at <= now:
                self.state.remove_demand(key)
        for key, server in list(self.state.servers().items()):
            if server.model not in models and server.phase is ServerPhase.FAILED:
                self.state.remove_server(key)  # a failure of a model nobody wants any more
        for key, worker in list(self.state.workers().items()):
            if worker.model not in models and worker.phase is ServerPhase.FAILED:
                self.state.remove_worker(key)
