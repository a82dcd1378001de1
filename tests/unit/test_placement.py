"""The placement planner, table-tested: who serves what, and why a model is not served."""

from __future__ import annotations

import pytest

from meshllm.reconcile.placement import (
    ConditionPhase, conditions, plan_placement, wanted_models,
)
from meshllm.state.document import MeshState
from meshllm.state.schema import (
    DemandEntry, ModelOrigin, ModelSpec, NodeRole, NodeStatus, PlacementLease, ServerPhase, ServerStatus,
)

GB = 10**9
NOW = 1_000_000.0


def node(nid: str, gb: float, *, role: NodeRole = NodeRole.SERVER, inc: float = 1.0) -> NodeStatus:
    return NodeStatus(id=nid, capacity_bytes=int(gb * GB), role=role, incarnation=inc)


def model(name: str, gb: float, *, replicas: int = 1, pin: str = "", origin: ModelOrigin = ModelOrigin.MANIFEST,
          owner: str = "") -> ModelSpec:
    return ModelSpec(name=name, source=f"/m/{name}.gguf", size_bytes=int(gb * GB), replicas=replicas, node=pin,
                     origin=origin, owner=owner)


def lease(m: str, slot: int, nid: str, *, inc: float = 1.0, hot: bool = False) -> PlacementLease:
    return PlacementLease(model=m, slot=slot, node=nid, incarnation=inc, hot=hot)


def demand(m: str, nid: str, *, rate: float = 0.0, age: float = 0.0, ttl: float = 86400.0) -> DemandEntry:
    return DemandEntry(model=m, node=nid, count=1, rate=rate, last_active=NOW - age, expires_at=NOW - age + ttl)


def plan(models, nodes, leases=(), servers=(), demands=()):
    return plan_placement({m.name: m for m in models}, {n.id: n for n in nodes},
                          {le.key: le for le in leases}, {s.key: s for s in servers}, demands, now=NOW)


def assigned(p) -> dict[str, list[str]]:
    return {name: p.nodes_for(name) for name in p.wanted}


@pytest.mark.parametrize(("models", "nodes", "expected"), [
    # fits: the only node that can hold it gets it
    ([model("x", 9)], [node("a", 8), node("b", 10)], {"x": ["b"]}),
    # 1.1x rule: 9.1 GB needed 10 GB x 1.1 = 11 GB > 10 GB: no node
    ([model("x", 10)], [node("a", 10)], {"x": []}),
    # ties broken by node id
    ([model("x", 1)], [node("b", 8), node("a", 8)], {"x": ["a"]}),
    # most free capacity first
    ([model("x", 1)], [node("a", 8), node("b", 16)], {"x": ["b"]}),
    # two models spread over distinct standby nodes
    ([model("x", 1), model("y", 1)], [node("a", 8), node("b", 8), node("c", 8)], {"x": ["a"], "y": ["b"]}),
    # replicas on distinct nodes, never two on one node
    ([model("x", 1, replicas=3)], [node("a", 8), node("b", 8)], {"x": ["a", "b"]}),
    # clients hold nothing
    ([model("x", 1)], [node("a", 80, role=NodeRole.CLIENT), node("b", 8)], {"x": ["b"]}),
    # capacity is shared: the second model does not fit beside the first
    ([model("x", 6), model("y", 6)], [node("a", 12)], {"x": ["a"], "y": []}),
    # a pin wins over a bigger node
    ([model("x", 1, pin="a")], [node("a", 8), node("b", 80)], {"x": ["a"]}),
])
def test_where_models_go(models, nodes, expected) -> None:
    assert assigned(plan(models, nodes)) == expected


def test_unplaceable_model_says_why() -> None:
    p = plan([model("big", 30)], [node("a", 8), node("b", 16)])
    reason, message = p.reasons["big"]
    assert reason == "NoCapacity"
    assert "33.00 GB" in message and "16.00 GB on node b" in message


def test_leases_are_sticky_even_when_a_better_node_appears() -> None:
    p = plan([model("x", 1)], [node("a", 8), node("b", 80)], leases=[lease("x", 0, "a")])
    assert assigned(p) == {"x": ["a"]}


def test_lease_of_a_dead_node_is_vacant_and_a_restarted_node_keeps_its_own() -> None:
    # "a" is gone (not among the live nodes): its slot goes to the standby
    assert assigned(plan([model("x", 1)], [node("b", 8)], leases=[lease("x", 0, "a")])) == {"x": ["b"]}
    # "b" restarted (a new incarnation) and nobody took its slot: it keeps it, though "a" has more room
    p = plan([model("x", 1)], [node("a", 80), node("b", 8, inc=2.0)], leases=[lease("x", 0, "b", inc=1.0)])
    assert assigned(p) == {"x": ["b"]}


def test_standby_node_is_preferred_over_a_busy_one_with_more_room() -> None:
    models = [model("x", 1, pin="a"), model("y", 1)]
    assert assigned(plan(models, [node("a", 80), node("b", 8)])) == {"x": ["a"], "y": ["b"]}


def test_models_are_wanted_by_manifest_live_owner_or_demand() -> None:
    models = {"m": model("m", 1), "owned": model("owned", 1, origin=ModelOrigin.NODE, owner="a"),
              "orphan": model("orphan", 1, origin=ModelOrigin.NODE, owner="gone"),
              "asked": model("asked", 1, origin=ModelOrigin.NODE, owner="gone"),
              "stale": model("stale", 1, origin=ModelOrigin.NODE, owner="gone")}
    demands = [demand("asked", "a", age=3600), demand("stale", "a", age=90000)]
    wanted = wanted_models(models, {"a": node("a", 8)}, demands, NOW)
    assert wanted == {"m": "manifest", "owned": "node", "asked": "demand"}


def test_standby_promotes_itself_for_an_unserved_model_with_demand() -> None:
    # the node that named x died; x was asked for an hour ago: the standby serves it
    x = model("x", 1, origin=ModelOrigin.NODE, owner="dead", pin="dead")
    p = plan([x], [node("s", 8)], leases=[lease("x", 0, "dead")], demands=[demand("x", "c", age=3600)])
    assert assigned(p) == {"x": ["s"]}
    # without demand nobody takes it
    p = plan([x], [node("s", 8)], leases=[lease("x", 0, "dead")])
    assert assigned(p) == {}


@pytest.mark.parametrize(("rate_x", "rate_y", "hot"), [
    (30.0, 5.0, True),    # 30 >= 3 x 5 and >= 10
    (12.0, 5.0, False),   # not 3x the coldest
    (9.0, 0.0, False),    # 3x the coldest, but under 10 a minute
    (10.0, 0.0, True),
])
def test_hot_model_gets_a_replica_on_a_standby(rate_x: float, rate_y: float, hot: bool) -> None:
    models = [model("x", 1), model("y", 1)]
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    demands = [demand("x", "a", rate=rate_x), demand("y", "a", rate=rate_y)]
    p = plan(models, nodes, leases=[lease("x", 0, "a"), lease("y", 0, "b")], demands=demands)
    assert assigned(p) == ({"x": ["a", "c"], "y": ["b"]} if hot else {"x": ["a"], "y": ["b"]})
    if hot:
        assert p.slots[("x", 1)].hot


def test_hot_replica_is_kept_until_the_model_cools_down() -> None:
    models = [model("x", 1), model("y", 1)]
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    leases = [lease("x", 0, "a"), lease("y", 0, "b"), lease("x", 1, "c", hot=True)]
    warm = plan(models, nodes, leases=leases, demands=[demand("x", "a", rate=6), demand("y", "a", rate=2)])
    assert assigned(warm)["x"] == ["a", "c"]  # under the thresholds to add, above half of them
    cold = plan(models, nodes, leases=leases, demands=[demand("x", "a", rate=4), demand("y", "a", rate=2)])
    assert assigned(cold)["x"] == ["a"]


def test_a_node_that_failed_to_run_a_model_is_passed_over() -> None:
    failed = ServerStatus(node="a", model="x", phase=ServerPhase.FAILED, port=0, message="no such file",
                          since=NOW - 10)
    p = plan([model("x", 1)], [node("a", 80), node("b", 8)], servers=[failed])
    assert assigned(p) == {"x": ["b"]}
    old = failed.model_copy(update={"since": NOW - 3600})
    assert assigned(plan([model("x", 1)], [node("a", 80), node("b", 8)], servers=[old])) == {"x": ["a"]}
    p = plan([model("x", 1)], [node("a", 80)], servers=[failed])
    assert p.reasons["x"][0] == "FailedEverywhere"


def test_plans_agree_whatever_order_the_document_lists_things_in() -> None:
    models = [model(f"m{i}", 1 + i % 3, replicas=1 + i % 2) for i in range(6)]
    nodes = [node(f"n{i}", 4 + 2 * (i % 3)) for i in range(5)]
    forward = plan(models, nodes)
    backward = plan(list(reversed(models)), list(reversed(nodes)))
    assert forward.slots == backward.slots


def _state(models, nodes, servers=(), leases=()) -> MeshState:
    state = MeshState()
    for m in models:
        state.put_model(m)
    for n in nodes:
        state.put_node(n)
    for s in servers:
        state.put_server(s)
    for le in leases:
        state.put_lease(le)
    return state


def test_conditions_tell_pending_loading_ready_degraded() -> None:
    ready = ServerStatus(node="a", model="x", phase=ServerPhase.READY, port=1)
    loading = ServerStatus(node="b", model="y", phase=ServerPhase.LOADING, port=2)
    state = _state([model("x", 1, replicas=2), model("y", 1), model("big", 100)],
                   [node("a", 8), node("b", 8)], servers=[ready, loading],
                   leases=[lease("x", 0, "a"), lease("y", 0, "b")])
    found = conditions(state, now=NOW)
    assert found["big"].phase is ConditionPhase.PENDING and found["big"].reason == "NoCapacity"
    assert found["y"].phase is ConditionPhase.LOADING
    assert found["x"].phase is ConditionPhase.DEGRADED and (found["x"].ready, found["x"].wanted) == (1, 2)
    state.put_model(model("x", 1))
    assert conditions(state, now=NOW)["x"].phase is ConditionPhase.READY


def test_a_manifest_pin_is_strict_and_a_node_pin_is_not() -> None:
    pinned = model("x", 1, pin="gone")
    p = plan([pinned], [node("a", 8)])
    assert assigned(p) == {"x": []} and p.reasons["x"][0] == "PinnedNodeDown"
    p = plan([model("x", 1, pin="a", replicas=2)], [node("a", 8), node("b", 8)])
    assert assigned(p) == {"x": ["a"]} and p.reasons["x"][0] == "TooFewNodes"
    too_small = model("x", 9, pin="a")
    assert assigned(plan([too_small], [node("a", 8), node("b", 80)])) == {"x": []}
    # a --model pin: its node is too small, so the model goes where it fits
    from_cli = model("x", 9, pin="a", origin=ModelOrigin.NODE, owner="a")
    assert assigned(plan([from_cli], [node("a", 8), node("b", 80)])) == {"x": ["b"]}
