"""Placement: which node serves which model, decided the same way on every node.

Every server node runs ``plan_placement`` on its replica of the document. The plan is a pure
function of the document and the time, so nodes that see the same document agree; a node only ever
writes leases for itself (it *takes* the slots the plan gives it and *releases* the ones it no longer
gets), and a lease names one node as a whole value, so two nodes that briefly disagree cannot both
keep a slot: the document keeps one lease and the other node stops.

The rules, in order:

1. A model is *wanted* while a manifest names it, while the node whose ``--model`` named it lives,
   or while it has live demand (requests within the TTL). Unwanted models get no slots.
2. Each wanted model gets ``replicas`` slots. A model pinned to a live node has that node in slot 0;
   a manifest's pin is strict (that node or none), a ``--model`` pin lets the model move on when
   its node dies or cannot hold it.
3. A valid lease (its node alive, still able to hold the model) keeps its slot: placement is
   sticky, so a change elsewhere never moves a running server, and a node agent that restarts
   finds its slots (and adopts its running llama-servers) again.
4. A vacant slot goes to the best candidate: a live server node that holds no slot of the model,
   has free capacity >= 1.1 x the model's size, and has not failed to run it recently; standby
   nodes (holding no slot at all) first, then the most free capacity, then the smallest node id.
5. A hot model, whose requests per server are >= 3x the coldest wanted model's and >= 10 a
   minute, gets one extra slot on a standby or underused node; the extra slot is kept until the
   model cools below half of both thresholds (hysteresis).
6. A model no live node can hold alone (or one whose spec asks for ``split``) gets one slot split
   by layers (``split.plan_split``): a host with the most free capacity, and workers nearest to it
   (at most 80 ms away) until they hold 1.1 x its size. A running split is kept
   (``split.keep_or_replan``) unless a participant died or one clearly better appears. Nodes
   whose split worker failed for the model lately are left out. A model whose spec asks for a split
   while no worker can be had (its node started alone, or its workers died) is served solo meanwhile,
   on the node that already serves it if it still can, and moves to a split as soon as one can be
   planned (``Placement.notes`` says so on its Ready condition).
7. A mixture-of-experts model (``ModelSpec.experts``) that needs splitting is split by experts instead
   (``moe.plan``): one slot per shard, each on its own node, every shard a whole model with fewer experts.
   Running shards stay where they are (unless more nodes can now take a shard: then more, smaller
   shards); the slot of a shard whose node died goes to a node that can hold it (its sessions go to the
   other shards meanwhile). An MoE file that cannot be split by experts
   (``moe_problem``) stays Pending with that reason.

``conditions`` explains the outcome per model: Pending, Loading, Ready or Degraded, with a reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from meshllm.moe.order import order_note
from meshllm.moe.plan import NoShards, ShardLayout, experts_per_shard, plan_layout
from meshllm.moe.spec import problem_of
from meshllm.reconcile.split import NoSplit, SplitPlan, keep_or_replan, plan_cost
from meshllm.reconcile.split_cost import SplitCost
from meshllm.state.document import MeshState
from meshllm.state.schema import (
    DemandEntry, ModelName, ModelOrigin, ModelSpec, NodeId, NodeRole, NodeStatus, PlacementLease, ServerPhase,
    ServerStatus, WorkerStatus,
)

__all__ = [
    "FIT_FACTOR", "Condition", "ConditionPhase", "Placement", "Slot", "conditions", "demand_rates",
    "plan_placement", "wanted_models",
]

FIT_FACTOR = 1.1  # a node holds a model when its free capacity is at least this times the model's size
HOT_RATIO = 3.0  # a model is hot at this many times the coldest model's requests per server ...
HOT_MIN_RATE = 10.0  # ... and at least this many requests per server per minute
FAILURE_MEMORY = 300.0  # seconds a node that failed to run a model is not given it again


@dataclass(frozen=True)
class Slot:
    """``node`` serves replica ``slot`` of ``model``; a split slot also names its ``workers`` and the
    layer shares (``tensor_split``: workers first, host last)."""

    model: ModelName
    slot: int
    node: NodeId
    hot: bool = False
    workers: tuple[NodeId, ...] = ()
    tensor_split: tuple[float, ...] = ()
    shards: int = 0  # expert sharding: this slot serves shard ``slot`` of ``shards``
    expert_core: int = 0
    expert_copies: int = 0

    @property
    def split(self) -> bool:
        return bool(self.workers)

    @property
    def participants(self) -> tuple[NodeId, ...]:
        return (self.node, *self.workers)


@dataclass
class Placement:
    """The plan: slots by (model, slot index), and why a wanted model has fewer than it wants."""

    slots: dict[tuple[ModelName, int], Slot] = field(default_factory=dict)
    wanted: dict[ModelName, int] = field(default_factory=dict)  # slots wanted per wanted model
    reasons: dict[ModelName, tuple[str, str]] = field(default_factory=dict)  # model -> (reason, message)
    notes: dict[ModelName, str] = field(default_factory=dict)  # model -> what its Ready condition adds (solo for now)
    costs: dict[ModelName, SplitCost] = field(default_factory=dict)  # split model -> what its split costs a token

    def nodes_for(self, model: ModelName) -> list[NodeId]:
        return sorted(s.node for s in self.slots.values() if s.model == model)

    def slots_of(self, node: NodeId) -> list[Slot]:
        return [s for s in self.slots.values() if s.node == node]


def live_demand(demand: Iterable[DemandEntry], now: float) -> dict[ModelName, list[DemandEntry]]:
    result: dict[ModelName, list[DemandEntry]] = {}
    for entry in demand:
        if entry.expires_at > now:
            result.setdefault(entry.model, []).append(entry)
    return result


def demand_rates(demand: Iterable[DemandEntry], now: float) -> dict[ModelName, float]:
    """Requests per minute per model, summed over the nodes that saw them (live entries only)."""
    return {model: sum(e.rate for e in entries) for model, entries in live_demand(demand, now).items()}


def wanted_models(models: Mapping[ModelName, ModelSpec], alive: Mapping[NodeId, NodeStatus],
                  demand: Iterable[DemandEntry], now: float) -> dict[ModelName, str]:
    """Wanted models, each with why: ``manifest``, ``node`` (its owner lives) or ``demand``."""
    live = live_demand(demand, now)
    wanted = {}
    for name, spec in models.items():
        if spec.origin is ModelOrigin.MANIFEST:
            wanted[name] = "manifest"
        elif spec.owner in alive:
            wanted[name] = "node"
        elif name in live:
            wanted[name] = "demand"
    return wanted


def _fmt(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


@dataclass
class _Ledger:
    """Capacity and slots as the plan fills them in."""

    nodes: dict[NodeId, NodeStatus]
    sizes: dict[ModelName, int]
    used: dict[NodeId, int] = field(default_factory=dict)
    held: dict[NodeId, set[ModelName]] = field(default_factory=dict)  # node -> models it has a slot of

    def free(self, node: NodeId) -> int:
        return self.nodes[node].capacity_bytes - self.used.get(node, 0)

    def fits(self, node: NodeId, model: ModelName) -> bool:
        return self.free(node) >= FIT_FACTOR * self.sizes[model]

    def take(self, node: NodeId, model: ModelName, share: float = 1.0) -> None:
        self.used[node] = self.used.get(node, 0) + int(share * self.sizes[model])
        self.held.setdefault(node, set()).add(model)

    def standby(self, node: NodeId) -> bool:
        return not self.held.get(node)


def plan_placement(state_models: Mapping[ModelName, ModelSpec], alive: Mapping[NodeId, NodeStatus],
                   leases: Mapping[str, PlacementLease], servers: Mapping[str, ServerStatus],
                   demand: Iterable[DemandEntry], *, now: float,
                   workers: Mapping[str, WorkerStatus] | None = None) -> Placement:
    """Where every wanted model should run (pure: the same inputs give the same plan on any node)."""
    demand = list(demand)
    wanted = wanted_models(state_models, alive, demand, now)
    hosts = {nid: n for nid, n in sorted(alive.items()) if n.role is NodeRole.SERVER}
    ledger = _Ledger(hosts, {name: state_models[name].size_bytes for name in wanted})
    failed = _recent_failures(servers, now) | _recent_worker_failures(workers or {}, now)
    plan = Placement()
    valid = {(lease.model, lease.slot): lease for lease in leases.values() if lease.node in hosts}
    rates = demand_rates(demand, now)
    base = {name: state_models[name].replicas for name in sorted(wanted)}
    # pins first, then the leases that stay, then the vacant slots: pins and stickiness take capacity
    # before newcomers are placed
    # a manifest's placement.node is strict (there or nowhere); a --model pin is where the model starts,
    # and it may move on when that node dies or cannot hold it
    strict = {name: state_models[name].node for name in base
              if state_models[name].node and state_models[name].origin is ModelOrigin.MANIFEST}
    for name in base:
        pin = state_models[name].node
        if name in strict and pin not in hosts:
            plan.reasons[name] = ("PinnedNodeDown", f"placement.node pins it to node {pin}, which is not alive")
        if state_models[name].split:
            continue  # a forced split takes its host by the split rules
        if pin and pin in hosts:
            if ledger.fits(pin, name):
                _assign(plan, ledger, Slot(name, 0, pin))
            else:
                plan.reasons[name] = ("NodeTooSmall", f"pinned node {pin} offers {_fmt(ledger.free(pin))}, "
                                      f"{name} needs {_fmt(FIT_FACTOR * ledger.sizes[name])}")
    hot = _hot_models(base, rates, valid, now=now)
    for name, count in base.items():
        plan.wanted[name] = count + (1 if name in hot else 0)
    for (name, index), lease in sorted(valid.items()):
        if name not in plan.wanted or index >= plan.wanted[name] or (name, index) in plan.slots or lease.workers \
                or lease.shards:
            continue
        if state_models[name].split and name not in strict:
            continue  # a forced split served solo: the split rules decide whether it can move to a split now
        if name in ledger.held.get(lease.node, set()) or not ledger.fits(lease.node, name) \
                or strict.get(name, lease.node) != lease.node:
            continue
        _assign(plan, ledger, Slot(name, index, lease.node, hot=index >= base[name]))
    for name, count in plan.wanted.items():
        spec = state_models[name]
        if (name, 0) not in plan.slots and name not in strict and (spec.split and ledger.nodes or len(ledger.nodes) > 1
                                                                    and not any(ledger.fits(nid, name) and (name, nid)
                                                                                not in failed for nid in ledger.nodes)):
            if spec.moe_problem:
                plan.reasons[name] = problem_of(spec.moe_problem)
            elif spec.experts:
                _fill_shards(plan, ledger, spec, leases=valid, failed=failed)
            else:
                _fill_split(plan, ledger, spec, leases=valid, failed=failed)
            continue
        for index in range(count):
            if (name, index) not in plan.slots:
                if not _fill(plan, ledger, name, index, hot=index >= base[name], failed=failed,
                             only=strict.get(name)):
                    break
    return plan


def _fill_split(plan: Placement, ledger: _Ledger, spec: ModelSpec, *,
                leases: Mapping[tuple[ModelName, int], PlacementLease], failed: set[tuple[ModelName, NodeId]]) -> None:
    """Slot 0 of ``spec`` split across nodes (its only slot): the running split if it still holds,
    else a new one from the nodes' free capacity; a split never has replicas."""
    name = spec.name
    nodes = [node.model_copy(update={"capacity_bytes": max(0, ledger.free(nid))})
             for nid, node in ledger.nodes.items() if (name, nid) not in failed]
    lease = leases.get((name, 0))
    current = None
    if lease is not None and lease.workers:
        shares = tuple(lease.tensor_split)  # the lease lists the workers' shares first, SplitPlan the host's
        current = SplitPlan(lease.node, tuple(lease.workers), shares[-1:] + shares[:-1], 0.0, 0)
    chosen = keep_or_replan(current, spec.size_bytes, nodes, force=spec.split, n_embd=spec.embedding_length)
    if isinstance(chosen, NoSplit):
        if chosen.solo:  # one node holds it after all (a failed worker left a solo-capable host)
            _fill(plan, ledger, name, 0, hot=False, failed=failed)
        elif spec.split and _fill_solo(plan, ledger, name, lease, failed):
            plan.notes[name] = f"solo until a split can be planned (--split): {chosen.reason}"
        else:
            reason, message = _why_unplaced(ledger, name, failed)
            plan.reasons[name] = (reason, f"{message}; no split either: {chosen.reason}")
        return
    plan.reasons.pop(name, None)
    plan.wanted[name] = 1
    share_of = dict(zip(chosen.participants, chosen.tensor_split, strict=True))
    slot = Slot(name, 0, chosen.host, workers=chosen.workers,
                tensor_split=(*(share_of[w] for w in chosen.workers), share_of[chosen.host]))
    plan.slots[(name, 0)] = slot
    plan.costs[name] = plan_cost(chosen, ledger.nodes.values(), size_bytes=spec.size_bytes,
                                 n_embd=spec.embedding_length)
    for node, share in share_of.items():
        ledger.take(node, name, share)


def _fill_shards(plan: Placement, ledger: _Ledger, spec: ModelSpec, *,
                 leases: Mapping[tuple[ModelName, int], PlacementLease], failed: set[tuple[ModelName, NodeId]]) -> None:
    """One slot per expert shard (rule 7): the running layout kept, its vacant shards re-placed; else a
    new layout from the nodes' free capacity."""
    name = spec.name
    trunk = spec.size_bytes - spec.experts * spec.expert_bytes
    current = {index: lease for (model, index), lease in leases.items() if model == name and lease.shards}
    if current:
        first = current[min(current)]
        shards, core, copies = first.shards, first.expert_core, first.expert_copies
        current = {i: lease for i, lease in current.items() if (lease.shards, lease.expert_core, lease.expert_copies)
                   == (shards, core, copies) and i < shards and (name, lease.node) not in failed}
    capacities = {nid: ledger.free(nid) for nid in ledger.nodes if (name, nid) not in failed}
    layout = plan_layout(n_expert=spec.experts, n_used=spec.experts_used, trunk_bytes=trunk,
                         expert_bytes=spec.expert_bytes, capacities=capacities, core_fraction=spec.expert_core)
    if current and isinstance(layout, ShardLayout) and layout.shards > shards:
        current = {}  # more nodes can take a shard now: more, smaller shards (each node re-writes its own)
    if not current:
        if isinstance(layout, NoShards):
            lease = leases.get((name, 0))
            if spec.split and _fill_solo(plan, ledger, name, lease if lease is not None and not lease.shards else None,
                                         failed):
                plan.notes[name] = f"solo until expert shards can be planned (--split): {layout.message}"
                return
            reason, message = _why_unplaced(ledger, name, failed)
            plan.reasons[name] = (layout.reason, f"{message}; no expert sharding either: {layout.message}")
            return
        shards, core, copies = layout.shards, layout.core, layout.copies
        placed = dict(enumerate(layout.nodes))
    else:
        placed = {i: lease.node for i, lease in current.items()}
    size = trunk + experts_per_shard(spec.experts, core, shards, copies) * spec.expert_bytes
    plan.reasons.pop(name, None)
    plan.wanted[name] = shards
    for index in range(shards):
        node = placed.get(index)
        if node is None:  # a vacant shard: a node with room that holds no shard of the model
            holders = set(placed.values())
            spare = [nid for nid in ledger.nodes if nid not in holders and (name, nid) not in failed
                     and ledger.free(nid) >= FIT_FACTOR * size]
            if not spare:
                plan.reasons[name] = ("ShardVacant", f"expert shard {index + 1}/{shards} has no node that can hold "
                                      f"it ({_fmt(FIT_FACTOR * size)}); its sessions go to the other shards")
                continue
            node = placed[index] = min(spare, key=lambda nid: (not ledger.standby(nid), -ledger.free(nid), nid))
        plan.slots[(name, index)] = Slot(name, index, node, shards=shards, expert_core=core, expert_copies=copies)
        ledger.take(node, name, size / max(1, spec.size_bytes))


def _fill_solo(plan: Placement, ledger: _Ledger, name: ModelName, lease: PlacementLease | None,
               failed: set[tuple[ModelName, NodeId]]) -> bool:
    """A forced split that has no worker yet, served solo: where it runs already if that node still
    holds it, else on the best node that does; False if none does."""
    here = lease.node if lease is not None and not lease.workers else None
    if here is not None and here in ledger.nodes and ledger.fits(here, name) and (name, here) not in failed:
        _assign(plan, ledger, Slot(name, 0, here))
        return True
    return _fill(plan, ledger, name, 0, hot=False, failed=failed)


def _assign(plan: Placement, ledger: _Ledger, slot: Slot) -> None:
    plan.slots[(slot.model, slot.slot)] = slot
    ledger.take(slot.node, slot.model)


def _fill(plan: Placement, ledger: _Ledger, name: ModelName, index: int, *, hot: bool,
          failed: set[tuple[ModelName, NodeId]], only: NodeId | None = None) -> bool:
    candidates = [nid for nid in ledger.nodes
                  if name not in ledger.held.get(nid, set()) and (name, nid) not in failed
                  and ledger.fits(nid, name) and only in (None, nid)]
    if not candidates:
        if name not in plan.reasons and not hot:
            plan.reasons[name] = ("TooFewNodes", f"placement.node pins it to node {only}: one server at most") \
                if only else _why_unplaced(ledger, name, failed)
        return False
    best = min(candidates, key=lambda nid: (not ledger.standby(nid), -ledger.free(nid), nid))
    _assign(plan, ledger, Slot(name, index, best, hot=hot))
    return True


def _why_unplaced(ledger: _Ledger, name: ModelName, failed: set[tuple[ModelName, NodeId]]) -> tuple[str, str]:
    if not ledger.nodes:
        return "NoServerNodes", "no live node offers capacity (only clients are connected)"
    need = FIT_FACTOR * ledger.sizes[name]
    fitting = [nid for nid in ledger.nodes if ledger.fits(nid, name)]
    holding = [nid for nid in ledger.nodes if name in ledger.held.get(nid, set())]
    if holding and all(nid in holding or (name, nid) in failed for nid in fitting):
        return "TooFewNodes", (f"{name} runs on {len(holding)} node(s); no other node can hold another "
                               f"replica (it needs {_fmt(need)})")
    if fitting and all((name, nid) in failed for nid in fitting):
        return "FailedEverywhere", f"every node that can hold {name} failed to run it in the last " \
                                   f"{FAILURE_MEMORY:.0f} s; see `meshllm describe model {name}`"
    biggest = max(ledger.nodes, key=ledger.free)
    return "NoCapacity", (f"{name} needs {_fmt(need)} (1.1 x {_fmt(ledger.sizes[name])}); the most free "
                          f"capacity is {_fmt(ledger.free(biggest))} on node {biggest}")


def _recent_failures(servers: Mapping[str, ServerStatus], now: float) -> set[tuple[ModelName, NodeId]]:
    """(model, node) pairs where a server failed lately: the model file is missing there, or it
    crash-loops. The planner gives such a slot to another node."""
    return {(s.model, s.node) for s in servers.values()
            if s.phase is ServerPhase.FAILED and (s.port == 0 or s.restarts >= 2)
            and now - s.since < FAILURE_MEMORY}


def _recent_worker_failures(workers: Mapping[str, WorkerStatus], now: float) -> set[tuple[ModelName, NodeId]]:
    """(model, node) pairs where a split worker could not run: no identical copy of the model there,
    or its ggml-rpc-server failed."""
    return {(w.model, w.node) for w in workers.values()
            if w.phase is ServerPhase.FAILED and now - w.since < FAILURE_MEMORY}


def _hot_models(base: Mapping[ModelName, int], rates: Mapping[ModelName, float],
                valid: Mapping[tuple[ModelName, int], PlacementLease], *, now: float) -> set[ModelName]:
    """Models that deserve one extra replica (rule 5), with hysteresis for the ones that have it."""
    if len(base) < 2:
        return set()
    per_server = {name: rates.get(name, 0.0) / count for name, count in base.items()}
    hot = set()
    for name, rate in per_server.items():
        coldest = min(r for other, r in per_server.items() if other != name)
        has_extra = (name, base[name]) in valid
        ratio, floor = (HOT_RATIO / 2, HOT_MIN_RATE / 2) if has_extra else (HOT_RATIO, HOT_MIN_RATE)
        if rate >= floor and rate >= ratio * coldest:
            hot.add(name)
    return hot


# -- conditions ---------------------------------------------------------------------------------
class ConditionPhase(StrEnum):
    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    LOADING = "Loading"
    READY = "Ready"
    DEGRADED = "Degraded"


class Condition(BaseModel):
    """Where a model stands, and why."""

    model_config = ConfigDict(frozen=True)

    phase: ConditionPhase
    reason: str = Field(description="a CamelCase word: Serving, Loading, NoCapacity, ServerFailed, ...")
    message: str = ""
    ready: int = Field(default=0, description="servers ready")
    wanted: int = Field(default=1, description="servers wanted")
    nodes: list[NodeId] = Field(default_factory=list, description="nodes placed to serve it")
    workers: list[NodeId] = Field(default_factory=list, description="split: the nodes holding the rest of its layers")
    split_cost: str = Field(default="", description="split: what it adds to a decoded token, loads on the workers, "
                            "and the biggest file one node would serve alone instead (split_cost)")
    shards: list[str] = Field(default_factory=list, description="expert sharding: each shard's node, experts, "
                              "memory and measured quality")


def _shard_lines(spec: ModelSpec, servers: list[ServerStatus]) -> list[str]:
    """One line per expert shard: where, which experts, how big against the whole model, how good."""
    lines = []
    for server in sorted((s for s in servers if s.shard), key=lambda s: s.shard):
        quality = server.quality or "not known yet"
        lines.append(f"shard {server.shard} on {server.node}: {server.experts}/{spec.experts} experts per layer, "
                     f"{_fmt(server.file_bytes)} (whole model {_fmt(spec.size_bytes)}), {server.phase.value}, "
                     f"quality: {quality}")
    return lines


def current_plan(state: MeshState, *, now: float, me: NodeId = NodeId("")) -> Placement:
    """The plan for the document as it stands. ``me``: the node planning, alive in its own eyes even
    while a death verdict it has yet to refute (a healed partition) says otherwise."""
    alive = state.alive_nodes()
    if me and me not in alive and me in state.nodes():
        alive[me] = state.nodes()[me]
    return plan_placement(state.models(), alive, state.leases(), state.servers(), state.demand().values(), now=now,
                          workers=state.workers())


def conditions(state: MeshState, *, now: float, plan: Placement | None = None) -> dict[ModelName, Condition]:
    """The condition of every model in the document."""
    plan = plan or current_plan(state, now=now)
    alive = state.alive_nodes()
    servers = [s for s in state.servers().values() if s.node in alive]
    wanted = wanted_models(state.models(), alive, state.demand().values(), now)
    failed_workers = [w for w in state.workers().values() if w.phase is ServerPhase.FAILED and w.node in alive
                      and now - w.since < FAILURE_MEMORY]
    importance = state.importance()
    result = {}
    for name, spec in state.models().items():
        first = plan.slots.get((name, 0))
        order = order_note(spec, importance.get(spec.fingerprint)) if first is not None and first.shards else None
        result[name] = _worker_failure(name, _condition(name, spec, wanted.get(name), plan, servers, order=order),
                                       failed_workers)
    return result


def _worker_failure(name: ModelName, condition: Condition, failed: list[WorkerStatus]) -> Condition:
    """A model not served because a split worker could not hold its layers says so (say, its copy of
    the file differs from the mesh's in one tensor), rather than only that no split fits."""
    mine = [w for w in failed if w.model == name]
    if condition.phase in (ConditionPhase.READY, ConditionPhase.LOADING, ConditionPhase.DOWNLOADING) or not mine:
        return condition
    return condition.model_copy(update={"reason": "WorkerFailed",
                                        "message": f"split worker {mine[0].node}: {mine[0].message}"})


def _condition(name: ModelName, spec: ModelSpec, why: str | None, plan: Placement, servers: list[ServerStatus], *,
               order: tuple[str, bool] | None = None) -> Condition:
    """``order``: for an expert-sharded model, how its shards order experts and whether they wait for that."""
    if why is None:
        return Condition(phase=ConditionPhase.PENDING, reason="NotWanted", wanted=0,
                         message=f"node {spec.owner} that served it left, and nobody asked for it since")
    nodes = plan.nodes_for(name)
    want = plan.wanted.get(name, spec.replicas)
    mine = [s for s in servers if s.model == name and s.node in nodes]
    split = plan.slots.get((name, 0))
    split = split if split is not None and split.split else None
    replaced: list[ServerStatus] = []  # a split's server still running with the workers it had
    if split is not None:  # a split server counts once it runs with the planned workers
        replaced = [s for s in mine if s.phase is ServerPhase.READY and tuple(s.workers) != split.workers]
        mine = [s for s in mine if s not in replaced]
    ready = sum(s.phase is ServerPhase.READY for s in mine)
    failed = [s for s in servers if s.model == name and s.phase is ServerPhase.FAILED]
    reason, message = plan.reasons.get(name, ("", ""))
    common = {"ready": ready, "wanted": want, "nodes": nodes, "workers": list(split.workers) if split else [],
              "shards": _shard_lines(spec, mine),
              "split_cost": plan.costs[name].line() if split is not None and name in plan.costs else ""}
    if ready >= want:
        where = f", split by layers: host {split.node}, workers {', '.join(split.workers)}" if split else ""
        first = plan.slots.get((name, 0))
        if first is not None and first.shards:
            where = (f", split by experts into {first.shards} shards (core of {first.expert_core} experts per layer "
                     f"in every shard, each other expert on {first.expert_copies} of them)")
            where += f"; {order[0]}" if order is not None else ""
        where += f"; {plan.notes[name]}" if name in plan.notes else ""
        return Condition(phase=ConditionPhase.READY, reason="Serving", **common,
                         message=f"{ready} server{'s' if ready != 1 else ''} ready{where}")
    solo = [s for s in servers if split is not None and s.model == name and s.node in split.participants
            and s.phase is ServerPhase.READY and not s.workers]
    if solo and split is not None and not ready:  # --split that served solo until now (host or worker-to-be)
        return Condition(phase=ConditionPhase.DEGRADED, reason="MovingToSplit", **{**common, "ready": 1},
                         message=f"serving solo on {solo[0].node} while the split's workers "
                                 f"({', '.join(split.workers)}) get ready")
    if replaced and split is not None:  # it served until a participant left: re-planned, not yet back
        return Condition(phase=ConditionPhase.DEGRADED, reason="Recovering", **common,
                         message=f"split re-planned: workers {', '.join(replaced[0].workers)} -> "
                                 f"{', '.join(split.workers)}")
    recovering = [s for s in mine if s.phase is ServerPhase.LOADING and s.recovering]
    if recovering:
        return Condition(phase=ConditionPhase.DEGRADED, reason="Recovering", **common,
                         message=f"restarting on {recovering[0].node} after: {recovering[0].message}")
    if ready:
        message = message or (failed[0].message if failed else f"{want - ready} more server(s) starting")
        return Condition(phase=ConditionPhase.DEGRADED, reason=reason or "TooFewServers", message=message,
                         **common)
    if order is not None and order[1] and not ready:
        return Condition(phase=ConditionPhase.LOADING, reason="WaitingForImportance", message=order[0], **common)
    fetching = [s for s in mine if s.phase is ServerPhase.DOWNLOADING]
    if fetching and not ready:
        return Condition(phase=ConditionPhase.DOWNLOADING, reason="Downloading", **common,
                         message=f"{fetching[0].node}: {fetching[0].message}")
    if nodes and any(s.phase is ServerPhase.LOADING for s in mine):
        return Condition(phase=ConditionPhase.LOADING, reason="Loading", message="loading on " + ", ".join(nodes),
                         **common)
    if failed and not nodes:
        return Condition(phase=ConditionPhase.PENDING, reason=reason or "ServerFailed",
                         message=message or failed[0].message, **common)
    if failed:
        return Condition(phase=ConditionPhase.DEGRADED, reason="ServerFailed", message=failed[0].message, **common)
    if nodes:
        return Condition(phase=ConditionPhase.LOADING, reason="Starting", message="starting on " + ", ".join(nodes),
                         **common)
    return Condition(phase=ConditionPhase.PENDING, reason=reason or "NotPlaced", message=message, **common)
