"""Demand on a fake clock: requests count, spread as entries, and expire by TTL."""

from __future__ import annotations

from meshllm.reconcile.demand import DemandRecorder
from meshllm.reconcile.leases import PlacementReconciler
from meshllm.reconcile.placement import conditions, wanted_models
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelOrigin, ModelSpec, NodeStatus


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_become_a_demand_entry_with_a_rate_and_an_expiry() -> None:
    clock, state = FakeClock(), MeshState()
    recorder = DemandRecorder(state, node_id="n1", ttl=3600, clock=clock)
    for _ in range(5):
        recorder.note("x")
        clock.now += 1
    assert recorder.flush() == 1
    entry = state.demand()["x/n1"]
    assert (entry.count, entry.rate) == (5, 5.0)
    assert entry.last_active == 1004.0 and entry.expires_at == 1004.0 + 3600
    assert recorder.flush() == 0  # nothing new: nothing written
    clock.now += 61
    assert recorder.flush() == 1  # the minute passed: the rate fell to 0, written once
    assert state.demand()["x/n1"].rate == 0.0 and state.demand()["x/n1"].count == 5


def test_demand_keeps_an_orphaned_model_wanted_until_the_ttl() -> None:
    clock, state = FakeClock(), MeshState()
    state.put_node(NodeStatus(id="n1", incarnation=1.0))
    state.put_model(ModelSpec(name="x", source="/x.gguf", origin=ModelOrigin.NODE, owner="gone"))
    recorder = DemandRecorder(state, node_id="n1", ttl=600, clock=clock)

    def wanted() -> bool:
        return "x" in wanted_models(state.models(), state.alive_nodes(), state.demand().values(), clock.now)

    assert not wanted()
    recorder.note("x")
    recorder.flush()
    assert wanted()
    clock.now += 599
    assert wanted()
    clock.now += 2
    assert not wanted()


async def test_the_janitor_removes_expired_demand_and_the_model_becomes_unwanted() -> None:
    clock, state = FakeClock(), MeshState()
    state.put_node(NodeStatus(id="n1", incarnation=1.0))
    state.put_model(ModelSpec(name="x", source="/x.gguf", origin=ModelOrigin.NODE, owner="gone"))
    state.put_model(ModelSpec(name="kept", source="/k.gguf"))
    recorder = DemandRecorder(state, node_id="n1", ttl=600, clock=clock)
    recorder.note("x")
    recorder.flush()
    janitor = PlacementReconciler(state, node_id="n1", incarnation=lambda: 1.0, clock=clock)
    await janitor.reconcile("placement")
    assert set(state.models()) == {"x", "kept"} and "x/n1" in state.demand()
    clock.now += 601
    await janitor.reconcile("placement")
    assert not state.demand()
    assert set(state.models()) == {"x", "kept"}  # shown as unwanted until its node returns or it is dropped
    assert conditions(state, now=clock.now)["x"].reason == "NotWanted"
