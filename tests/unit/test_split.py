"""The split planner, table-tested: who hosts, which peers work, the tensor split, and when a running
split is kept rather than replaced."""

from __future__ import annotations

import pytest

from meshllm.reconcile.split import NoSplit, SplitPlan, keep_or_replan, plan_cost, plan_split, rtt
from meshllm.reconcile.split_cost import HOP_MS, split_cost, token_bytes
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
                 "b", ("a",), (0.6667, 0.3333), id="host is the biggest; one peer that suffices beats two nearer"),
    pytest.param(10, mesh(node("a", 4, b=30), node("b", 8, a=30, c=1, d=2), node("c", 2), node("d", 2)), False,
                 "b", ("c", "d"), (0.6667, 0.1667, 0.1667), id="unless it is further than two hops cost"),
    pytest.param(10, mesh(node("a", 7, b=1, c=2, d=3, e=4), node("b", 1), node("c", 1), node("d", 2), node("e", 3)),
                 False, "a", ("b", "e"), (0.6364, 0.0909, 0.2727), id="the fewest workers, the cheapest of those"),
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


@pytest.mark.parametrize(("rtts", "n_embd", "added", "per_token"), [
    pytest.param((), 4096, 0.0, 0, id="no worker: nothing added"),
    pytest.param((5.0,), 4096, 5 + HOP_MS + 1000 * 39_768 / 125e6, 39_768, id="one worker 5 ms away, 8B width"),
    pytest.param((0.1, 0.2), 640, 0.3 + 2 * HOP_MS + 2 * 1000 * 12_120 / 125e6, 24_240,
                 id="two near workers, gemma-3-270m's width"),
    pytest.param((1.0,), 0, 1 + HOP_MS + 1000 * 39_768 / 125e6, 39_768, id="width unknown: an 8B's assumed"),
])
def test_split_cost(rtts, n_embd, added, per_token):
    cost = split_cost(rtts, size_bytes=10 * GB, worker_fraction=0.4, n_embd=n_embd)
    assert cost.added_ms == pytest.approx(added)
    assert cost.bytes_per_token == per_token == len(rtts) * token_bytes(n_embd)
    assert cost.load_bytes == 4 * GB


def test_plan_cost_says_what_a_split_adds_and_what_fits_one_node():
    nodes = mesh(node("a", 8.8, b=5, c=30), node("b", 8), node("c", 8))
    plan = plan_split(20 * GB, nodes, n_embd=4096)
    assert isinstance(plan, SplitPlan) and plan.workers == ("b", "c")
    cost = plan_cost(plan, nodes, size_bytes=20 * GB, n_embd=4096)
    assert cost.rtts_ms == (5, 30)
    assert cost.added_ms == pytest.approx(35 + 2 * HOP_MS + 2 * 1000 * token_bytes(4096) / 125e6)
    assert cost.solo_max_bytes == 8 * GB  # the biggest node, 8.8 GB, holds 8 GB under the 1.1x rule
    line = cost.line()
    assert line.startswith("~37.6 ms/token added (2 workers: 35.0 ms of round trips, 2 x 1 ms engine")
    assert "79.5 KB/token" in line and "workers load 12.90 GB" in line
    assert "a quantization of at most 8.00 GB fits one node and, served solo, decodes faster" in line


def test_many_small_peers_take_the_nearest_when_too_many_sets_to_weigh():
    # 20 peers of 1 GB, 10 needed: more sets than MAX_SETS, so the nearest ten in RTT order
    peers = {f"p{i:02d}": 1.0 + i for i in range(20)}
    nodes = mesh(node("a", 1.5, **peers), *(node(nid, 1) for nid in peers))
    plan = plan_split(10 * GB, nodes)
    assert isinstance(plan, SplitPlan)
    assert plan.workers == tuple(f"p{i:02d}" for i in range(10))
