"""Demand: every request through this node's API counts for its model, and the count spreads; and
the janitor, which removes what nobody owns any more.

The proxy calls ``DemandRecorder.note(model)`` per request (a few dictionary operations). Every
``flush_every`` seconds the recorder writes this node's ``DemandEntry`` for each model that changed:
the requests seen, the rate over the last minute, when it was last asked for and when that stops
meaning anything (``last_active + ttl``, 24 h by default). Summed over nodes, the entries are the
mesh's demand: placement keeps a model wanted while it lasts and adds replicas to hot ones. Entries
past their ``expires_at`` are ignored by everyone and removed by the janitor.

The janitor (``GarbageCollector``) runs on the live server node with the smallest id: per model, it
removes expired demand entries, the leases of a model that is gone, the failures (server and
worker statuses) of a model that is gone, and the routing statistics of its file (``ExpertImportance``:
the node that computed them keeps them in its cache, and publishes them again if the file comes back). A ``--model`` spec whose node left stays (unwanted once its
demand runs out, and shown so) until that node returns or someone drops it: deleting it would race
with its node rewriting it when a partition heals.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from meshllm.reconcile.supervisor import PROCESSES
from meshllm.reconcile.timing import Clock, SystemClock
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import (
    DemandEntry, ModelName, NodeId, NodeRole, ServerPhase, lease_model, parse_demand_key, parse_server_key,
)

__all__ = ["DEFAULT_TTL", "DemandRecorder", "Garbage", "GarbageCollector", "Recheck", "Remove", "plan_garbage"]

DEFAULT_TTL = 24 * 3600.0
WINDOW = 60.0  # the rate is requests over this many seconds, scaled to a minute


@dataclass
class _Tally:
    count: int = 0
    last_active: float = 0.0
    recent: deque[float] = field(default_factory=deque)
    published: tuple[int, float] | None = None  # (count, rate) last written


class DemandRecorder:
    def __init__(self, state: MeshState, *, node_id: NodeId, ttl: float = DEFAULT_TTL, flush_every: float = 2.0,
                 clock: Clock | None = None) -> None:
        self.state = state
        self.node_id = node_id
        self.ttl = ttl
        self.flush_every = flush_every
        self.clock = clock or SystemClock()
        self._tallies: dict[ModelName, _Tally] = {}

    def note(self, model: ModelName) -> None:
        """One request for ``model`` arrived here. Never raises; cheap enough for every request."""
        now = self.clock.now()
        tally = self._tallies.setdefault(model, _Tally())
        tally.count += 1
        tally.last_active = now
        tally.recent.append(now)

    def rate(self, model: ModelName, now: float) -> float:
        tally = self._tallies.get(model)
        if tally is None:
            return 0.0
        while tally.recent and tally.recent[0] <= now - WINDOW:
            tally.recent.popleft()
        return round(len(tally.recent) * 60.0 / WINDOW, 3)

    def flush(self) -> int:
        """Write the entries that changed since the last flush; returns how many were written."""
        now = self.clock.now()
        written = 0
        for model, tally in self._tallies.items():
            rate = self.rate(model, now)
            if tally.published == (tally.count, rate):
                continue
            tally.published = (tally.count, rate)
            self.state.put_demand(DemandEntry(model=model, node=self.node_id, count=tally.count, rate=rate,
                                              last_active=tally.last_active,
                                              expires_at=tally.last_active + self.ttl))
            written += 1
        return written

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.clock.sleep(self.flush_every)
            self.flush()


# -- the janitor --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Garbage:
    """What the document holds about one model, as the janitor sees it."""

    janitor: bool  # this node is the janitor
    leases: tuple[str, ...] = ()
    demand: tuple[tuple[str, float], ...] = ()  # (key, expires_at)
    failed_servers: tuple[str, ...] = ()
    failed_workers: tuple[str, ...] = ()
    importance: tuple[str, ...] = ()  # routing statistics computed for the model's file


@dataclass(frozen=True)
class Remove:
    table: str
    key: str


@dataclass(frozen=True)
class Recheck:
    until: float


def plan_garbage(desired: bool, actual: Garbage, now: float) -> list[Remove | Recheck]:
    """What the janitor removes about one model; ``desired``: whether the model should exist (its spec is
    in the document). Pure."""
    if not actual.janitor:
        return []
    actions: list[Remove | Recheck] = [Remove("demand", key) for key, expires in actual.demand if expires <= now]
    if not desired:
        actions += [Remove("leases", key) for key in actual.leases]
        actions += [Remove("servers", key) for key in actual.failed_servers]  # a failure of a model nobody wants
        actions += [Remove("workers", key) for key in actual.failed_workers]
        actions += [Remove("importance", key) for key in actual.importance]  # the computing node keeps a copy
    later = [expires for _, expires in actual.demand if expires > now]
    if later:
        actions.append(Recheck(min(later)))
    return actions


class GarbageCollector:
    """The janitor, model by model (see the module docstring)."""

    name = "janitor"

    def __init__(self, state: MeshState, *, node_id: NodeId) -> None:
        self.state = state
        self.node_id = node_id

    def keys(self) -> set[ModelName]:
        state = self.state
        return (set(state.models()) | {x.model for x in state.leases().values()}
                | {x.model for x in state.demand().values()} | {x.model for x in state.servers().values()}
                | {x.model for x in state.workers().values()} | {x.model for x in state.importance().values()})

    def keys_for(self, change: Changed) -> set[ModelName]:
        table, key = change
        if table == PROCESSES:
            return set()
        if key is None or table in ("nodes", "deaths"):  # who the janitor is may have changed
            return self.keys()
        if table == "leases":
            return {lease_model(key)}
        if table == "demand":
            return {parse_demand_key(key)[0]}
        if table in ("servers", "workers"):
            return {parse_server_key(key)[1]}
        if table == "importance":
            entry = self.state.importance().get(key)
            return {entry.model} if entry is not None else set()
        return {ModelName(key)} if table == "models" else set()

    def _is_janitor(self) -> bool:
        """Whether this node is the live server node with the smallest id (clients run no controllers)."""
        servers = [nid for nid, node in self.state.alive_nodes().items() if node.role is NodeRole.SERVER]
        return min(servers, default=None) == self.node_id

    async def desired(self, model: ModelName) -> bool:
        return model in self.state.models()

    async def actual(self, model: ModelName, desired: bool, now: float) -> Garbage:
        state = self.state
        return Garbage(
            janitor=self._is_janitor(),
            leases=tuple(k for k, x in state.leases().items() if x.model == model),
            demand=tuple((k, x.expires_at) for k, x in state.demand().items() if x.model == model),
            failed_servers=tuple(k for k, x in state.servers().items()
                                 if x.model == model and x.phase is ServerPhase.FAILED),
            failed_workers=tuple(k for k, x in state.workers().items()
                                 if x.model == model and x.phase is ServerPhase.FAILED),
            importance=tuple(k for k, x in state.importance().items() if x.model == model))

    def plan(self, desired: bool, actual: Garbage, now: float) -> list[Remove | Recheck]:
        return plan_garbage(desired, actual, now)

    async def apply(self, model: ModelName, action: Remove | Recheck, now: float) -> float | None:
        match action:
            case Remove("demand", key):
                self.state.remove_demand(key)
            case Remove("leases", key):
                self.state.remove_lease(key)
            case Remove("servers", key):
                self.state.remove_server(key)
            case Remove("workers", key):
                self.state.remove_worker(key)
            case Remove("importance", key):
                self.state.remove_importance(key)
            case Recheck(until):
                return until - now
        return None

    async def shutdown(self) -> None:
        """Nothing to stop: the janitor only removes entries."""
