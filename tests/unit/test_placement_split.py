"""Placement of models no node holds alone: split by layers, sticky, re-planned when a worker goes."""

from __future__ import annotations

from meshllm.reconcile.placement import ConditionPhase, conditions, plan_placement
from meshllm.state.document import MeshState
from meshllm.state.schema import (
    ModelSpec, NodeStatus, PlacementLease, ServerPhase, ServerStatus, WorkerStatus,
)

MB = 10**6
NOW = 1_000_000.0


def node(nid: str, mb: float, rtt: dict[str, float] | None = None) -> NodeStatus:
    return NodeStatus(id=nid, capacity_bytes=int(mb * MB), incarnation=1.0, rtt_ms=rtt or {})


def mesh(*nodes: NodeStatus) -> dict[str, NodeStatus]:
    return {n.id: n for n in nodes}


def spec(mb: float, *, split: bool = False, replicas: int = 1) -> ModelSpec:
    return ModelSpec(name="x", source="/m/x.gguf", size_bytes=int(mb * MB), split=split, replicas=replicas)


def plan(model: ModelSpec, nodes: dict[str, NodeStatus], leases=(), workers=()):
    return plan_placement({model.name: model}, nodes, {le.key: le for le in leases}, {}, [], now=NOW,
                          workers={w.key: w for w in workers})


def split_lease(host: str, workers: list[str], shares: list[float]) -> PlacementLease:
    return PlacementLease(model="x", slot=0, node=host, incarnation=1.0, workers=workers, tensor_split=shares)


NEAR = {"b": 1.0, "c": 2.0}


def test_a_model_no_node_holds_is_split_with_the_nearest_peer() -> None:
    p = plan(spec(100), mesh(node("a", 80, NEAR), node("b", 60), node("c", 70)))
    slot = p.slots[("x", 0)]
    assert (slot.node, slot.workers) == ("a", ("b",))  # the biggest hosts; b is nearer than c
    assert slot.tensor_split == (round(60 / 140, 4), round(80 / 140, 4))  # workers first, host last
    assert p.wanted["x"] == 1 and "x" not in p.reasons


def test_a_model_that_fits_one_node_is_not_split_unless_asked() -> None:
    nodes = mesh(node("a", 200, NEAR), node("b", 60), node("c", 70))
    assert not plan(spec(100), nodes).slots[("x", 0)].split
    forced = plan(spec(100, split=True), nodes).slots[("x", 0)]
    assert (forced.node, forced.workers) == ("a", ("b",))


def test_a_far_peer_is_never_a_worker() -> None:
    nodes = mesh(node("a", 80, {"b": 100.0, "c": 20.0}), node("b", 60), node("c", 60))
    assert plan(spec(100), nodes).slots[("x", 0)].workers == ("c",)
    alone = plan(spec(100), mesh(node("a", 80, {"b": 100.0}), node("b", 60)))
    assert ("x", 0) not in alone.slots
    reason, message = alone.reasons["x"]
    assert reason == "NoCapacity" and "further or unmeasured" in message


def test_a_running_split_is_kept_and_replanned_when_its_worker_dies() -> None:
    nodes = mesh(node("a", 80, {"b": 5.0, "c": 1.0}), node("b", 60), node("c", 60))
    running = split_lease("a", ["b"], [0.4286, 0.5714])
    kept = plan(spec(100), nodes, leases=[running]).slots[("x", 0)]
    assert kept.workers == ("b",)  # c is nearer, but not by more than the hysteresis
    del nodes["b"]
    moved = plan(spec(100), nodes, leases=[running]).slots[("x", 0)]
    assert (moved.node, moved.workers) == ("a", ("c",))


def test_a_node_whose_worker_failed_is_left_out() -> None:
    nodes = mesh(node("a", 80, NEAR), node("b", 60), node("c", 70))
    failed = WorkerStatus(node="b", model="x", host="a", phase=ServerPhase.FAILED, message="no copy", since=NOW - 5)
    assert plan(spec(100), nodes, workers=[failed]).slots[("x", 0)].workers == ("c",)


def test_a_split_takes_capacity_from_every_participant() -> None:
    other = ModelSpec(name="y", source="/m/y.gguf", size_bytes=50 * MB)
    nodes = mesh(node("a", 80, NEAR), node("b", 60), node("c", 70))
    p = plan_placement({"x": spec(100), "y": other}, nodes, {}, {}, [], now=NOW)
    assert p.slots[("x", 0)].participants == ("a", "b")
    assert p.nodes_for("y") == ["c"]  # a and b gave their capacity to the split


def test_conditions_of_a_split_model() -> None:
    state = MeshState()
    for n in (node("a", 80, NEAR), node("b", 60)):
        state.put_node(n)
    state.put_model(spec(100))
    state.put_lease(split_lease("a", ["b"], [0.4286, 0.5714]))
    state.put_server(ServerStatus(node="a", model="x", phase=ServerPhase.LOADING, port=0, recovering=True,
                                  message="worker b does not answer"))
    degraded = conditions(state, now=NOW)["x"]
    assert (degraded.phase, degraded.reason, degraded.workers) == (ConditionPhase.DEGRADED, "Recovering", ["b"])
    state.put_server(ServerStatus(node="a", model="x", phase=ServerPhase.READY, port=4000, workers=["c"]))
    stale = conditions(state, now=NOW)["x"]  # ready, but with another worker than planned
    assert (stale.phase, stale.reason) == (ConditionPhase.DEGRADED, "Recovering")
    state.put_server(ServerStatus(node="a", model="x", phase=ServerPhase.READY, port=4000, workers=["b"]))
    ready = conditions(state, now=NOW)["x"]
    assert ready.phase is ConditionPhase.READY and "workers b" in ready.message


def test_a_kept_split_keeps_its_shares() -> None:
    nodes = mesh(node("a", 90, NEAR), node("b", 80))
    first = plan(spec(100), nodes).slots[("x", 0)]
    again = plan(spec(100), nodes, leases=[split_lease("a", list(first.workers), list(first.tensor_split))])
    assert again.slots[("x", 0)] == first  # planning again from its own lease changes nothing


def solo_lease(nid: str) -> PlacementLease:
    return PlacementLease(model="x", slot=0, node=nid, incarnation=1.0)


def test_split_asked_of_a_node_alone_serves_solo_then_moves_to_a_split_when_a_worker_comes() -> None:
    alone = plan(spec(100, split=True), mesh(node("a", 200)))
    assert alone.slots[("x", 0)].node == "a" and not alone.slots[("x", 0)].split
    assert "solo until a split can be planned" in alone.notes["x"]
    # a standby joined, not yet measured: still solo where it runs (not moved to the newcomer), and said so
    unmeasured = plan(spec(100, split=True), mesh(node("a", 200), node("b", 300)), leases=[solo_lease("a")])
    slot = unmeasured.slots[("x", 0)]
    assert (slot.node, slot.workers) == ("a", ())
    assert "solo until a split can be planned" in unmeasured.notes["x"]
    # measured: the split the flag asked for (the bigger node hosts)
    joined = plan(spec(100, split=True), mesh(node("a", 200, {"b": 1.0}), node("b", 300)), leases=[solo_lease("a")])
    split = joined.slots[("x", 0)]
    assert (split.node, split.workers) == ("b", ("a",)) and "x" not in joined.notes


def test_a_forced_split_that_loses_its_only_worker_is_served_solo_by_its_host() -> None:
    nodes = mesh(node("a", 200, {"b": 1.0}), node("b", 60))
    running = split_lease("a", ["b"], [0.23, 0.77])
    assert plan(spec(100, split=True), nodes, leases=[running]).slots[("x", 0)].workers == ("b",)
    del nodes["b"]
    after = plan(spec(100, split=True), nodes, leases=[running]).slots[("x", 0)]
    assert (after.node, after.workers) == ("a", ())


def test_conditions_while_a_solo_server_moves_to_a_split() -> None:
    state = MeshState()
    for n in (node("a", 200, {"b": 1.0}), node("b", 300)):
        state.put_node(n)
    state.put_model(spec(100, split=True))
    state.put_lease(split_lease("b", ["a"], [0.4, 0.6]))
    state.put_server(ServerStatus(node="a", model="x", phase=ServerPhase.READY, port=4000))  # still the solo one
    moving = conditions(state, now=NOW)["x"]
    assert (moving.phase, moving.reason) == (ConditionPhase.DEGRADED, "MovingToSplit")
    assert "serving solo on a" in moving.message
