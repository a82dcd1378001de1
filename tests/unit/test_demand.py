"""Demand on a fake clock: requests count, spread as entries, and expire by TTL."""

from __future__ import annotations

import anyio

from meshllm.reconcile.demand import DemandRecorder, GarbageCollector
from meshllm.reconcile.placement import conditions, wanted_models
from meshllm.reconcile.runtime import Runner
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelOrigin, ModelSpec, NodeStatus, PlacementLease, ServerPhase, ServerStatus
from meshllm.testing.fakes import FakeClock


def test_requests_become_a_demand_entry_with_a_rate_and_an_expiry() -> None:
    clock, state = FakeClock(), MeshState()
    start = clock.now()
    recorder = DemandRecorder(state, node_id="n1", ttl=3600, clock=clock)
    for _ in range(5):
        recorder.note("x")
        clock.advance(1)
    assert recorder.flush() == 1
    entry = state.demand()["x/n1"]
    assert (entry.count, entry.rate) == (5, 5.0)
    assert entry.last_active == start + 4 and entry.expires_at == start + 4 + 3600
    assert recorder.flush() == 0  # nothing new: nothing written
    clock.advance(61)
    assert recorder.flush() == 1  # the minute passed: the rate fell to 0, written once
    assert state.demand()["x/n1"].rate == 0.0 and state.demand()["x/n1"].count == 5


def test_demand_keeps_an_orphaned_model_wanted_until_the_ttl() -> None:
    clock, state = FakeClock(), MeshState()
    state.put_node(NodeStatus(id="n1", incarnation=1.0))
    state.put_model(ModelSpec(name="x", source="/x.gguf", origin=ModelOrigin.NODE, owner="gone"))
    recorder = DemandRecorder(state, node_id="n1", ttl=600, clock=clock)

    def wanted() -> bool:
        return "x" in wanted_models(state.models(), state.alive_nodes(), state.demand().values(), clock.now())

    assert not wanted()
    recorder.note("x")
    recorder.flush()
    assert wanted()
    clock.advance(599)
    assert wanted()
    clock.advance(2)
    assert not wanted()


async def test_the_janitor_removes_expired_demand_and_the_model_becomes_unwanted() -> None:
    clock, state = FakeClock(), MeshState()
    state.put_node(NodeStatus(id="n1", incarnation=1.0))
    state.put_model(ModelSpec(name="x", source="/x.gguf", origin=ModelOrigin.NODE, owner="gone"))
    state.put_model(ModelSpec(name="kept", source="/k.gguf"))
    recorder = DemandRecorder(state, node_id="n1", ttl=600, clock=clock)
    recorder.note("x")
    recorder.flush()
    runner = Runner(state, [GarbageCollector(state, node_id="n1")], clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await runner.idle()
        assert set(state.models()) == {"x", "kept"} and "x/n1" in state.demand()
        clock.advance(599)
        await runner.idle()
        assert "x/n1" in state.demand()
        clock.advance(2)  # the entry expires: the janitor looks again then, not only at its resync
        await runner.idle()
        assert not state.demand()
        assert set(state.models()) == {"x", "kept"}  # shown as unwanted until its node returns or it is dropped
        assert conditions(state, now=clock.now())["x"].reason == "NotWanted"
        await runner.stop()


async def test_the_janitor_removes_what_a_dropped_model_left_and_only_the_janitor_does() -> None:
    clock, state = FakeClock(), MeshState()
    for node in ("n1", "n2"):
        state.put_node(NodeStatus(id=node, incarnation=1.0))
    state.put_model(ModelSpec(name="x", source="/x.gguf"))
    state.put_lease(PlacementLease(model="x", slot=0, node="n2", incarnation=1.0))
    state.put_server(ServerStatus(node="n2", model="x", phase=ServerPhase.FAILED, port=0, message="broken"))
    state.put_server(ServerStatus(node="n1", model="y", phase=ServerPhase.FAILED, port=0, message="gone too"))
    async with anyio.create_task_group() as tg:
        other = Runner(state, [GarbageCollector(state, node_id="n2")], clock=clock)  # n1 is the janitor
        await tg.start(other.run)
        await other.idle()
        assert set(state.servers()) == {"n2/x", "n1/y"}
        janitor = Runner(state, [GarbageCollector(state, node_id="n1")], clock=clock)
        await tg.start(janitor.run)
        await janitor.idle()
        assert list(state.servers()) == ["n2/x"]  # "y" is in no spec: its failure goes; "x" is still wanted
        state.remove_model("x")
        await janitor.idle()
        assert not state.leases() and not state.servers()
        await other.stop()
        await janitor.stop()
