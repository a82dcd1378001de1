"""Expert order and routing statistics in the mesh: computed once by one node, read by all; what shards do
before they are known, when they failed, and the routing-mass figure each shard shows."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from meshllm.api.routing import Lease, Route, Router
from meshllm.api.sessions import rendezvous
from meshllm.engine.models import file_fingerprint
from meshllm.engine.tinygguf import write_moe
from meshllm.errors import ModelError
from meshllm.moe.importance import RoutingStats, decode_counts, encode_counts, routing_mass
from meshllm.moe.order import ExpertOrder, Waiting, expert_order, mass_line, order_note
from meshllm.reconcile.demand import GarbageCollector
from meshllm.reconcile.importance import (
    Compute, ExpertImportanceController, ImportanceActual, ImportanceWanted, Publish, computing_node,
    plan_importance,
)
from meshllm.reconcile.placement import conditions
from meshllm.state.document import MeshState
from meshllm.state.schema import (
    ExpertImportance, ImportancePhase, ModelSpec, NodeDeath, NodeStatus, PlacementLease, ServerPhase, ServerStatus,
)

MB = 10**6
NOW = 1_000_000.0
COUNTS = {0: (1, 50, 0, 9, 30, 2, 4, 4), 1: (10, 10, 10, 10, 10, 10, 20, 20)}


def spec(**update: object) -> ModelSpec:
    return ModelSpec(name="x", source="/m/x.gguf", size_bytes=100 * MB, experts=8, experts_used=2,
                     expert_bytes=10 * MB, fingerprint="100:abc").model_copy(update=update)


def entry(phase: ImportancePhase, *, counts: dict[int, tuple[int, ...]] | None = None, node: str = "b",
          message: str = "") -> ExpertImportance:
    return ExpertImportance(fingerprint="100:abc", model="x", node=node, phase=phase,
                            counts=encode_counts(counts or {}), tokens=100, message=message)


def test_counts_travel_as_one_short_line_per_layer_and_damage_is_refused() -> None:
    assert encode_counts(COUNTS)[0] == "0:1,50,0,9,30,2,4,4"
    assert decode_counts(encode_counts(COUNTS)) == COUNTS
    for bad in (["0"], ["x:1,2"], ["0:1,-2"], ["0:1,a"]):
        with pytest.raises(ValueError):
            decode_counts(bad)


def test_the_order_comes_from_the_spec_then_the_statistics_and_waits_while_they_are_computed() -> None:
    layers = (0, 1)
    ready = expert_order(spec(), entry(ImportancePhase.READY, counts=COUNTS), moe_layers=layers, n_expert=8)
    assert isinstance(ready, ExpertOrder) and ready.source == "statistics"
    assert ready.ranks[0] == (1, 4, 3, 6, 7, 5, 0, 2)  # most selections first, ties by id
    assert ready.ranks[1][:2] == (6, 7)
    ranked = spec(expert_ranks=["7,6,5,4,3,2,1,0", "0,1,2,3,4,5,6,7"])
    from_spec = expert_order(ranked, entry(ImportancePhase.READY, counts=COUNTS), moe_layers=layers, n_expert=8)
    assert isinstance(from_spec, ExpertOrder) and from_spec.source == "spec"
    assert from_spec.ranks[0] == (7, 6, 5, 4, 3, 2, 1, 0) and from_spec.counts == COUNTS
    failed = expert_order(spec(), entry(ImportancePhase.FAILED, message="no llama-imatrix"), moe_layers=layers,
                          n_expert=8)
    assert isinstance(failed, ExpertOrder) and failed.source == "id" and failed.ranks[1] == tuple(range(8))
    for waiting in (None, entry(ImportancePhase.COMPUTING)):
        assert isinstance(expert_order(spec(), waiting, moe_layers=layers, n_expert=8), Waiting)


def test_routing_mass_is_the_share_of_selections_a_shard_keeps() -> None:
    every = {0: range(8), 1: range(8)}
    assert routing_mass(COUNTS, every) == (1.0, 1.0)
    mean, low = routing_mass(COUNTS, {0: (1, 4), 1: (6, 7)}) or (0, 0)
    assert low == pytest.approx(0.4) and mean == pytest.approx((80 / 100 + 0.4) / 2)
    assert mass_line(COUNTS, {0: (1, 4), 1: (6, 7)}) == "keeps 60.0% of routing mass (lowest layer 40.0%)"
    assert "unknown" in mass_line(None, every)
    assert routing_mass({0: (0, 0)}, {0: (0,)}) is None


WANTED = ImportanceWanted("x", "100:abc", Path("/m/x.gguf"), "100:abc:r")
STATS = RoutingStats(fingerprint="100:abc:r", selections=100, counts=COUNTS)


@pytest.mark.parametrize("actual, expected", [
    (ImportanceActual(None, False, False, None), [Compute(WANTED)]),
    (ImportanceActual(None, False, False, STATS), [Publish(WANTED, STATS)]),  # computed here before: no rerun
    (ImportanceActual(None, False, True, None), []),  # under way here
    (ImportanceActual(entry(ImportancePhase.READY), True, False, None), []),
    (ImportanceActual(entry(ImportancePhase.FAILED), True, False, None), []),  # not retried by itself
    (ImportanceActual(entry(ImportancePhase.COMPUTING, node="c"), True, False, None), []),  # c is at it
    (ImportanceActual(entry(ImportancePhase.COMPUTING, node="c"), False, False, None), [Compute(WANTED)]),  # c died
    (ImportanceActual(entry(ImportancePhase.COMPUTING, node="b"), True, False, None), [Compute(WANTED)]),  # restart
])
def test_the_importance_plan(actual: ImportanceActual, expected: list[object]) -> None:
    assert plan_importance(WANTED, actual, me="b") == expected
    assert plan_importance(None, actual, me="b") == []


def mesh(model: Path | None) -> MeshState:
    state = MeshState()
    for nid in ("a", "b", "c"):
        state.put_node(NodeStatus(id=nid, capacity_bytes=95 * MB, incarnation=1.0))
    state.put_model(spec() if model is None else spec(source=str(model), fingerprint=file_fingerprint(model)))
    for slot, nid in enumerate(("b", "a", "c")):
        state.put_lease(PlacementLease(model="x", slot=slot, node=nid, incarnation=1.0, shards=3, expert_core=4,
                                       expert_copies=1))
    return state


class Counter:
    def __init__(self, error: Exception | None = None) -> None:
        self.runs: list[Path] = []
        self.error = error

    def __call__(self, path: Path, *, key: str, cancelled: threading.Event) -> RoutingStats:
        self.runs.append(path)
        if self.error is not None:
            raise self.error
        return RoutingStats(fingerprint=key, selections=100, counts=COUNTS)


async def reconcile(controller: ExpertImportanceController) -> None:
    wanted = await controller.desired("x")
    for action in controller.plan(wanted, await controller.actual("x", wanted, NOW), NOW):
        await controller.apply("x", action, NOW)


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MESHLLM_CACHE_DIR", str(tmp_path / "cache"))
    return write_moe(tmp_path / "x.gguf", n_layer=2, n_expert=8, n_expert_used=2, seed=1)


async def test_the_lowest_shard_slots_node_computes_once_and_every_node_reads_the_document(tiny: Path) -> None:
    state = mesh(tiny)
    counters = {nid: Counter() for nid in "abc"}
    controllers = {nid: ExpertImportanceController(state, node_id=nid, counter=counters[nid]) for nid in "abc"}
    for controller in controllers.values():
        await reconcile(controller)
    assert [len(c.runs) for c in counters.values()] == [0, 1, 0]  # b holds slot 0
    (stored,) = state.importance().values()
    assert stored.phase is ImportancePhase.READY and stored.node == "b" and decode_counts(stored.counts) == COUNTS
    for controller in controllers.values():  # done: nobody runs it again
        await reconcile(controller)
    assert [len(c.runs) for c in counters.values()] == [0, 1, 0]
    # b dies while computing: a (slot 1, now the lowest live one) takes over
    state.put_importance(stored.model_copy(update={"phase": ImportancePhase.COMPUTING}))
    state.put_death(NodeDeath(node="b", incarnation=1.0))
    await reconcile(controllers["a"])
    assert len(counters["a"].runs) == 1
    assert state.importance()[stored.fingerprint].phase is ImportancePhase.READY
    assert state.importance()[stored.fingerprint].node == "a"


async def test_a_failed_computation_says_why_and_shards_fall_back_to_id_order(tiny: Path) -> None:
    state = mesh(tiny)
    counter = Counter(ModelError("llama-imatrix on x.gguf failed (exit 1): out of memory"))
    await reconcile(ExpertImportanceController(state, node_id="b", counter=counter))
    (stored,) = state.importance().values()
    assert stored.phase is ImportancePhase.FAILED and "out of memory" in stored.message
    note, waits = order_note(state.models()["x"], stored)
    assert not waits and "expert id" in note and "out of memory" in note
    await reconcile(ExpertImportanceController(state, node_id="b", counter=counter))
    assert len(counter.runs) == 1  # no retry loop


def test_the_condition_says_shards_wait_for_statistics_then_which_order_they_use() -> None:
    state = mesh(None)
    fingerprint = state.models()["x"].fingerprint
    state.put_importance(ExpertImportance(fingerprint=fingerprint, model="x", node="b"))
    cond = conditions(state, now=NOW)["x"]
    assert (cond.phase.value, cond.reason) == ("Loading", "WaitingForImportance")
    assert "being computed on node b" in cond.message
    state.put_importance(ExpertImportance(fingerprint=fingerprint, model="x", node="b", phase=ImportancePhase.READY,
                                          counts=encode_counts(COUNTS), tokens=100))
    for nid, shard in (("b", "1/3"), ("a", "2/3"), ("c", "3/3")):
        state.put_server(ServerStatus(node=nid, model="x", phase=ServerPhase.READY, port=1, shard=shard, experts=5,
                                      file_bytes=60 * MB, quality="keeps 71.0% of routing mass (lowest layer 60.0%)"))
    cond = conditions(state, now=NOW)["x"]
    assert cond.reason == "Serving" and "expert order: routing statistics (100 selections" in cond.message
    assert len(cond.shards) == 3 and all("keeps 71.0% of routing mass" in line for line in cond.shards)


def test_a_session_moves_off_a_failed_shard_to_the_node_it_keeps_once_that_shard_is_declared_dead() -> None:
    """What the failover relies on: avoiding the failed shard's route picks the node the session key ranks
    next, the same node the router picks for it once the dead node leaves the table."""
    state = mesh(None)
    for nid in "abc":
        state.put_server(ServerStatus(node=nid, model="x", phase=ServerPhase.READY, port=1))
    router = Router(state, node_id="z")
    keys = [f"id:user-{i}" for i in range(30)]
    for key in keys:
        first = router.lease("x", session=key)
        assert isinstance(first, Lease) and first.route.node == rendezvous(key, "abc")
        moved = router.lease("x", session=key, avoid={first.route})
        assert isinstance(moved, Lease) and moved.route.node != first.route.node
        assert moved.route.node == rendezvous(key, [n for n in "abc" if n != first.route.node])
        first.release()
        moved.release()
    victim = rendezvous(keys[0], "abc")
    moved_to = {key: router.resolve("x", session=key, avoid={Route("x", victim, 0)}) for key in keys}
    state.put_death(NodeDeath(node=victim or "", incarnation=1.0))
    for key, route in moved_to.items():
        after = router.resolve("x", session=key)
        assert isinstance(after, Route) and isinstance(route, Route)
        assert after.node == (route.node if rendezvous(key, "abc") == victim else rendezvous(key, "abc"))


async def test_the_statistics_of_a_model_that_is_gone_are_removed_by_the_janitor() -> None:
    state = mesh(None)
    state.put_importance(entry(ImportancePhase.READY, counts=COUNTS))
    janitor = GarbageCollector(state, node_id="a")
    for present in (True, False):
        if not present:
            state.remove_model("x")
        for action in janitor.plan(await janitor.desired("x"), await janitor.actual("x", True, NOW), NOW):
            await janitor.apply("x", action, NOW)
        assert bool(state.importance()) is present


def test_nobody_computes_before_slot_0_is_taken_then_its_node_does() -> None:
    state = MeshState()
    for nid in "abc":
        state.put_node(NodeStatus(id=nid, capacity_bytes=95 * MB, incarnation=1.0))
    state.put_model(spec())
    lease = PlacementLease(model="x", slot=1, node="a", incarnation=1.0, shards=3, expert_core=4, expert_copies=1)
    state.put_lease(lease)
    state.put_lease(lease.model_copy(update={"slot": 2, "node": "c"}))
    assert computing_node(state, "x") is None  # a and c took their slots first: they must not both start
    state.put_lease(lease.model_copy(update={"slot": 0, "node": "b"}))
    assert computing_node(state, "x") == "b"
    state.put_death(NodeDeath(node="b", incarnation=1.0))
    assert computing_node(state, "x") == "a"
