"""The split planner, table-tested: who hosts, which peers work, the tensor split, and when a running
split is kept rather than replaced."""

from __future__ import annotations

import pytest

from meshllm.reconcile.split import NoSplit, SplitPlan, keep_or_replan, plan_split, rtt
from meshllm.state.schema import NodeRole, NodeStatus

GB = 10**9


def node(nid: str, gb: float, *, role: NodeRole = NodeRole.SERVER, **rtts: float) -> NodeStatus:
    return NodeStatus(id=nid, capacity_bytes=int(gb * GB), role=role, rtt_ms=rtts)


def mesh(*nodes: NodeStatus) -> list[NodeStatus]:
    return list(nodes)


@pytest.mark.parametrize(("size_gb", "nodes", "force", "host", "workers", "split"), [
    pytest.param(10, mesh(node("a", 6, b=5, c=10), node("b", 6), node("c", 6)), False,
                 "a", ("b",), (0.5, 0.5), id="two equal nodes hold it; the closest peer works"),
    pytest.param(10, mesh(node("a", 4, b=5), node("b", 8, a=5, c=30, d=2), node("c", 4), node("d", 2)), False,
                 "b", ("d", "a"), (0.5714, 0.1429, 0.2857), id="host is the biggest; peers in RTT order from it"),
    pytest.param(10, mesh(node("a", 6, b=100, c=20), node("b", 6), node("c", 6)), False,
                 "a", ("c",), (0.5, 0.5), id="a peer over 80 ms is left out"),
    pytest.param(10, mesh(node("a", 6, b=80), node("b", 6)), False,
                 "a", ("b",), (0.5, 0.5), id="80 ms exactly is still in reach"),
    pytest.param(10, mesh(node("a", 6), node("b", 6, a=7)), False,
                 "a", ("b",), (0.5, 0.5), id="the peer's measurement counts when the host has none"),
    pytest.param(10, mesh(node("b", 6, a=3), node("a", 6, b=3)), False,
                 "a", ("b",), (0.5, 0.5), id="equal capacity: the smaller id hosts"),
    pytest.param(10, mesh(node("a", 6, b=5, c=5), node("b", 4), node("c", 9)), False,
                 "c", ("a",), (0.6, 0.4), id="equal RTT: the bigger peer first"),
    pytest.param(1, mesh(node("a", 8, b=5, c=1), node("b", 8), node("c", 2)), True,
                 "a", ("c",), (0.8, 0.2), id="--split takes one worker even though the host holds it"),
    pytest.param(10, mesh(node("a", 6, b=5, c=6), node("b", 6), node("c", 6), node("k", 50, role=NodeRole.CLIENT)),
                 False, "a", ("b",), (0.5, 0.5), id="client nodes neither host nor work"),
])
def test_plan_split(size_gb, nodes, force, host, workers, split):
    plan = plan_split(int(size_gb * GB), nodes, force=force)
    assert isinstance(plan, SplitPlan), plan
    assert (plan.host, plan.workers, plan.tensor_split) == (host, workers, split)
    assert plan.capacity_bytes >= 1.1 * size_gb * GB


def test_plan_split_reports_worst_rtt_and_tensor_split_arg():
    plan = plan_split(20 * GB, mesh(node("a", 8, b=5, c=30), node("b", 8), node("c", 8)))
    assert isinstance(plan, SplitPlan)
    assert plan.participants == ("a", "b", "c")
    assert plan.worst_rtt_ms == 30
    assert plan.tensor_split_arg() == "0.3333,0.3333,0.3333"


@pytest.mark.parametrize(("size_gb", "nodes", "force", "solo", "words"), [
    pytest.param(5, mesh(node("a", 6, b=5), node("b", 6)), False, True, "a holds it alone",
                 id="fits on one node: solo placement serves it"),
    pytest.param(10, mesh(node("a", 6, b=100), node("b", 6)), False, False, "1 peer(s) further",
                 id="the only peer with room is too far"),
    pytest.param(10, mesh(node("a", 6), node("b", 6)), False, False, "further or unmeasured",
                 id="no RTT measured: not a worker"),
    pytest.param(20, mesh(node("a", 6, b=5, c=5), node("b", 6), node("c", 6)), False, False, "offer 18.00 GB",
                 id="all peers together are too small"),
    pytest.param(1, mesh(node("a", 6)), True, False, "needs", id="--split with no peer"),
    pytest.param(1, mesh(node("k", 6, role=NodeRole.CLIENT)), False, False, "no server node",
                 id="no server node"),
])
def test_no_split(size_gb, nodes, force, solo, words):
    result = plan_split(int(size_gb * GB), nodes, force=force)
    assert isinstance(result, NoSplit)
    assert result.solo is solo
    assert words in result.reason


def test_rtt_prefers_the_first_nodes_measurement():
    nodes = {n.id: n for n in mesh(node("a", 1, b=10), node("b", 1, a=12), node("c", 1))}
    assert rtt(nodes, "a", "b") == 10
    assert rtt(nodes, "b", "a") == 12
    assert rtt(nodes, "a", "c") is None


def running(host: str, *workers: str, worst: float = 5.0) -> SplitPlan:
    return SplitPlan(host, workers, tuple(1 / (1 + len(workers)) for _ in range(1 + len(workers))), worst, 0)


@pytest.mark.parametrize(("current", "nodes", "expect"), [
    pytest.param(None, mesh(node("a", 6, b=5), node("b", 6)), ("a", ("b",)), id="nothing runs: the candidate"),
    pytest.param(running("a", "b"), mesh(node("a", 6, b=30, c=20), node("b", 6), node("c", 6)), ("a", ("b",)),
                 id="a peer 10 ms closer does not move a running split"),
    pytest.param(running("a", "b"), mesh(node("a", 6, b=45, c=20), node("b", 6), node("c", 6)), ("a", ("c",)),
                 id="a peer 25 ms closer does"),
    pytest.param(running("a", "b"), mesh(node("a", 6, c=20), node("c", 6)), ("a", ("c",)),
                 id="a worker died"),
    pytest.param(running("b", "a"), mesh(node("a", 6, c=20), node("c", 6)), ("a", ("c",)),
                 id="the host died"),
    pytest.param(running("a", "b"), mesh(node("a", 6, b=95, c=60), node("b", 6), node("c", 6)), ("a", ("c",)),
                 id="a worker went beyond 80 ms"),
    pytest.param(running("a", "b", "c"), mesh(node("a", 6, b=5, c=5), node("b", 6), node("c", 6)),
                 ("a", ("b",)), id="fewer participants are enough"),
    pytest.param(running("a", "b"), mesh(node("a", 6, b=5, c=5), node("b", 6), node("c", 20)), ("c", ()),
                 id="one node now holds it alone"),
    pytest.param(running("a", "b"), mesh(node("a", 6, b=5), node("b", 6), node("d", 7, a=1)), ("a", ("b",)),
                 id="a bigger host with the same number of nodes does not move it"),
])
def test_keep_or_replan(current, nodes, expect):
    result = keep_or_replan(current, 10 * GB, nodes)
    if isinstance(result, NoSplit):
        assert result.solo
        assert expect[1] == ()
    else:
        assert (result.host, result.workers) == expect


def test_keep_or_replan_keeps_a_running_split_when_no_better_one_can_be_planned():
    current = running("a", "b")
    # the same mesh plans the same split again: the running plan object is kept as it is
    nodes = mesh(node("a", 6, b=5), node("b", 6))
    assert keep_or_replan(current, 10 * GB, nodes) is current
    # a lost peer and nothing else in reach: the candidate (no split) says why
    gone = keep_or_replan(current, 10 * GB, mesh(node("a", 6)))
    assert isinstance(gone, NoSplit) and not gone.solo
