"""The served-model controller on the fake supervisor and a fake clock: what runs, and the ServerStatus the
document shows, through crash loops, an agent restart, a split waiting for its workers, and new settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.engine.rpc_auth import RPC_PUSH_ENV
from meshllm.reconcile.served import PUSH_MEET_WAIT
from meshllm.reconcile.served_plan import ADOPT_GRACE, STABLE_AFTER
from meshllm.reconcile.runtime import RESYNC
from meshllm.state.schema import ModelSpec, NodeId, NodeStatus, ServerPhase, WorkerStatus
from tests.unit.controllers import ME, World, gguf


def phase(world: World, model: str = "m") -> ServerPhase | None:
    status = world.server(model)
    return status.phase if status is not None else None


async def test_a_model_placed_here_runs_and_is_reported_ready(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.serve("m")
    async with world.running(world.served()):
        assert list(world.pids()) == ["m"]
        status = world.server()
        assert status is not None and status.phase is ServerPhase.LOADING and status.pid == world.pids()["m"]
        world.supervisor.ready("m")
        await world.settle()
        status = world.server()
        assert status is not None and status.phase is ServerPhase.READY and status.port == world.process("m").port


async def test_a_crash_looping_server_restarts_later_each_time_up_to_the_cap(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.serve("m")
    async with world.running(world.served()):
        for crash in range(9):
            world.supervisor.crash("m")
            await world.settle()
            status = world.server()
            assert status is not None and status.phase is ServerPhase.FAILED and status.restarts == crash
            assert "exited with code 1" in status.message and not world.pids()
            low, high = world.backoff.bounds(crash)
            await world.advance(low - 0.01)
            assert not world.pids(), f"restarted before the backoff of crash {crash} ({low:.2f}s)"
            await world.advance(high - low + 0.02)
            assert "m" in world.pids(), f"not restarted within the backoff of crash {crash} ({high:.2f}s)"
            status = world.server()
            assert status is not None and status.phase is ServerPhase.LOADING
            assert status.restarts == crash + 1 and status.recovering
            assert status.message.startswith(f"restart {crash + 1} after: ")
        assert world.backoff.bounds(8) == world.backoff.bounds(30) == (24.0, 36.0)  # capped at 30 s, +-20%

        world.supervisor.ready("m")  # it stays up: after a while the count starts over
        await world.advance(STABLE_AFTER + 0.01)
        status = world.server()
        assert status is not None and status.phase is ServerPhase.READY and status.restarts == 0
        world.supervisor.crash("m")
        await world.advance(world.backoff.bounds(0)[1] + 0.01)
        assert "m" in world.pids()


async def test_a_restarted_agent_adopts_the_server_it_left_when_nothing_changed(tmp_path: Path) -> None:
    before = World(tmp_path)
    before.serve("m")
    async with before.running(before.served(threads=2)):
        pid = before.pids()["m"]
        launched = before.supervisor.launched[-1]
    # the agent is killed, its llama-server is not; the new agent finds the record at start
    after = World(tmp_path, clock=before.clock)
    after.supervisor.left_running("m", launched.argv, port=launched.port, argv_hash=launched.argv_hash, pid=pid)
    after.serve("m")
    async with after.running(after.served(threads=2)):
        assert after.pids() == {"m": pid} and not after.supervisor.launched
        after.supervisor.ready("m")
        await after.settle()
        status = after.server()
        assert status is not None and status.phase is ServerPhase.READY and status.pid == pid
        assert status.restarts == 0 and status.port == launched.port


async def test_a_restarted_agent_replaces_the_server_it_left_when_settings_changed(tmp_path: Path) -> None:
    before = World(tmp_path)
    before.serve("m")
    async with before.running(before.served(threads=2)):
        launched = before.supervisor.launched[-1]
    after = World(tmp_path, clock=before.clock, slow_stops=True)
    found = after.supervisor.left_running("m", launched.argv, port=launched.port, argv_hash=launched.argv_hash)
    after.serve("m")
    async with after.running(after.served(threads=4)):
        assert after.pids() == {"m": found.pid}  # stopping: nothing new starts before it has ended
        assert not after.supervisor.launched
        after.supervisor.finish_stop("m")
        await after.settle()
        fresh = after.supervisor.get("m")
        assert fresh is not None and fresh.pid != found.pid and after.pids() == {"m": fresh.pid}
        assert fresh.argv[fresh.argv.index("--threads") + 1] == "4"


async def test_an_adopted_server_waits_for_the_node_to_learn_its_leases_then_goes_if_unwanted(tmp_path: Path) -> None:
    before = World(tmp_path)
    before.serve("m")
    before.serve("gone")
    async with before.running(before.served()):
        launched = {spec.key: spec for spec in before.supervisor.launched}
    after = World(tmp_path, clock=before.clock)
    found = {key: after.supervisor.left_running(key, spec.argv, port=spec.port, argv_hash=spec.argv_hash)
             for key, spec in launched.items()}
    async with after.running(after.served()):
        await after.advance(ADOPT_GRACE / 2)
        assert after.pids() == {key: view.pid for key, view in found.items()}  # leases not known yet: kept
        after.serve("m")  # the mesh tells it "m" is still its own
        await after.settle()
        await after.advance(ADOPT_GRACE)
        assert after.pids() == {"m": found["m"].pid}  # "gone" is nobody's wish any more: stopped


async def test_a_split_host_pinned_to_a_device_names_its_workers_devices_too(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.model("m")
    world.lease("m", workers=["n2"], shares=[1.0, 1.0])
    async with world.running(world.served(gpu_layers=999, device="CUDA1")):
        world.state.put_worker(WorkerStatus(node="n2", model="m", host=ME, phase=ServerPhase.READY, port=50001))
        await world.settle()
        await world.advance(1.0)
        argv = world.process("m").argv
        assert argv.count("--device") == 1 and argv.index("--device") > argv.index("--rpc")
        assert argv[argv.index("--device") + 1] == "RPC0,CUDA1"


async def test_workers_that_met_push_to_each_other_until_the_host_fails_once(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.model("m")
    world.lease("m", workers=["n2", "n3"], shares=[1.0, 1.0, 1.0])
    world.state.put_node(NodeStatus(id=NodeId("n2"), rtt_ms={NodeId("n3"): 0.5}))
    world.state.put_node(NodeStatus(id=NodeId("n3")))
    async with world.running(world.served(gpu_layers=999)):
        for worker, port in (("n2", 50001), ("n3", 50002)):
            world.state.put_worker(WorkerStatus(node=worker, model="m", host=ME, phase=ServerPhase.READY, port=port))
        await world.settle()
        await world.advance(1.0)
        assert world.supervisor.launched[-1].env.get(RPC_PUSH_ENV) == "1"  # the two workers have met
        world.supervisor.crash("m")
        await world.settle()
        await world.advance(60.0)
        assert len(world.supervisor.launched) == 2
        # the same split again after a failure: the host hands the activations over itself, in case the
        # workers could not reach each other after all
        assert RPC_PUSH_ENV not in world.supervisor.launched[-1].env


@pytest.mark.parametrize("they_meet", [True, False], ids=["they meet: push", "they never meet: no push"])
async def test_a_split_host_waits_a_while_for_its_workers_to_meet(tmp_path: Path, they_meet: bool) -> None:
    world = World(tmp_path)
    world.model("m")
    world.lease("m", workers=["n2", "n3"], shares=[1.0, 1.0, 1.0])
    world.state.put_node(NodeStatus(id=NodeId("n2")))
    world.state.put_node(NodeStatus(id=NodeId("n3")))
    async with world.running(world.served(gpu_layers=999)):
        for worker, port in (("n2", 50001), ("n3", 50002)):
            world.state.put_worker(WorkerStatus(node=worker, model="m", host=ME, phase=ServerPhase.READY, port=port))
        await world.settle()
        await world.advance(PUSH_MEET_WAIT / 2)
        status = world.server()
        assert not world.supervisor.launched, "started before its workers met"
        assert status is not None and status.phase is ServerPhase.LOADING
        assert "waiting for workers n2, n3 to measure their RTT to each other" in status.message
        if they_meet:
            world.state.put_node(NodeStatus(id=NodeId("n3"), rtt_ms={NodeId("n2"): 0.4}))
            await world.advance(1.0)
            assert world.supervisor.launched[-1].env.get(RPC_PUSH_ENV) == "1"
        else:
            await world.advance(PUSH_MEET_WAIT / 2 - 1.0)
            assert not world.supervisor.launched
            await world.advance(2.0)  # waited long enough: the hand-over stays with the host
            assert len(world.supervisor.launched) == 1
            assert RPC_PUSH_ENV not in world.supervisor.launched[-1].env


async def test_a_split_that_lost_a_worker_comes_back_without_waiting_for_the_new_one_to_meet(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.model("m")
    world.lease("m", workers=["n2", "n3"], shares=[1.0, 1.0, 1.0])
    world.state.put_node(NodeStatus(id=NodeId("n2"), rtt_ms={NodeId("n3"): 0.5}))
    async with world.running(world.served(gpu_layers=999)):
        for worker, port in (("n2", 50001), ("n3", 50002), ("n4", 50003)):
            world.state.put_worker(WorkerStatus(node=worker, model="m", host=ME, phase=ServerPhase.READY, port=port))
        await world.settle()
        world.supervisor.ready("m")
        await world.advance(1.0)
        assert world.supervisor.launched[-1].env.get(RPC_PUSH_ENV) == "1"
        world.lease("m", workers=["n2", "n4"], shares=[1.0, 1.0, 1.0])  # n3 is gone; n4 has met nobody yet
        await world.settle()
        await world.advance(1.0)
        assert len(world.supervisor.launched) == 2, "the re-planned split waited for its workers to meet"
        assert RPC_PUSH_ENV not in world.supervisor.launched[-1].env


async def test_a_split_host_waits_for_its_workers_then_starts_with_them(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.model("m")
    world.lease("m", workers=["n2"], shares=[1.0, 1.0])
    async with world.running(world.served(gpu_layers=999)):
        def waiting() -> str:
            status = world.server()
            assert status is not None and status.phase is ServerPhase.LOADING and status.port == 0, status
            assert not world.pids()
            return status.message

        assert waiting() == "waiting for worker n2 to start its ggml-rpc-server"
        worker = WorkerStatus(node="n2", model="m", host=ME, phase=ServerPhase.LOADING)
        world.state.put_worker(worker)
        await world.settle()
        assert waiting() == "worker n2: loading"
        world.state.put_worker(worker.model_copy(update={"phase": ServerPhase.FAILED, "message": "no copy of m"}))
        await world.settle()
        assert waiting() == "worker n2: no copy of m"  # a worker reported FAILED: the host says why it waits
        world.rpc.problems["n2"] = "connection refused"
        world.state.put_worker(worker.model_copy(update={"phase": ServerPhase.READY, "port": 50001}))
        await world.settle()
        assert waiting() == "worker n2 does not answer through the mesh: connection refused"
        del world.rpc.problems["n2"]
        await world.advance(1.0)
        assert list(world.pids()) == ["m"]
        argv = world.process("m").argv
        assert argv[argv.index("--rpc") + 1] == await world.rpc.endpoint("n2", "m")
        status = world.server()
        assert status is not None and status.phase is ServerPhase.LOADING and status.workers == ["n2"]


async def test_new_settings_replace_the_server_stop_first(tmp_path: Path) -> None:
    world = World(tmp_path, slow_stops=True)
    spec = world.serve("m")
    async with world.running(world.served()):
        world.supervisor.ready("m")
        await world.settle()
        old = world.pids()["m"]
        world.state.put_model(spec.model_copy(update={"ctx_size": 4096}))
        await world.settle()
        assert world.pids() == {"m": old}  # only the old one, stopping
        status = world.server()
        assert status is not None and status.phase is ServerPhase.LOADING and status.port == 0  # not routed to
        world.supervisor.finish_stop("m")
        await world.settle()
        new = world.supervisor.get("m")
        assert new is not None and new.pid != old and new.argv[new.argv.index("--ctx-size") + 1] == "4096"

        draft = gguf(tmp_path / "draft.gguf")
        world.state.put_model(spec.model_copy(update={"ctx_size": 4096, "draft": str(draft)}))
        await world.settle()
        world.supervisor.finish_stop("m")
        await world.settle()
        newer = world.supervisor.get("m")
        assert newer is not None and newer.pid != new.pid and str(draft) in newer.argv


async def test_an_unavailable_model_is_reported_and_served_once_its_file_appears(tmp_path: Path) -> None:
    world = World(tmp_path)
    missing = tmp_path / "later.gguf"
    world.state.put_model(ModelSpec(name="m", source=str(missing), node=ME))
    world.lease("m")
    async with world.running(world.served()):
        status = world.server()
        assert status is not None and status.phase is ServerPhase.FAILED and "does not exist" in status.message
        assert not world.pids()
        gguf(missing)
        await world.advance(RESYNC)
        assert list(world.pids()) == ["m"]


async def test_a_model_placed_elsewhere_is_stopped_and_its_status_withdrawn(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.serve("m")
    async with world.running(world.served()):
        world.supervisor.ready("m")
        await world.settle()
        world.lease("m", node="n2")
        await world.settle()
        assert not world.pids() and world.server() is None


async def test_stopping_the_node_stops_every_server_and_withdraws_their_statuses(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.serve("a")
    world.serve("b")
    async with world.running(world.served()) as runner:
        assert set(world.pids()) == {"a", "b"}
        await runner.stop()
        assert not world.pids()
        assert world.server("a") is None and world.server("b") is None


class FakeFetcher:
    """Downloads as the controller sees them: a state per source, set by the test."""

    def __init__(self) -> None:
        self.states: dict[str, object] = {}
        self.asked: list[tuple[str, bool]] = []

    def want(self, source: str, reference: object, *, retry: bool = True) -> object:
        from meshllm.reconcile.downloads import FetchState

        self.asked.append((source, retry))
        return self.states.get(source, FetchState())


def served_with(world: World, fetcher: FakeFetcher) -> object:
    from meshllm.reconcile.served import ServedModelController

    return ServedModelController(world.state, node_id=ME, supervisor=world.supervisor, engine_dir=Path("/engine"),
                                 log_dir=world.tmp / "logs", clock=world.clock, backoff=world.backoff,
                                 downloads=fetcher)  # type: ignore[arg-type]


async def test_a_hub_model_shows_downloading_then_starts_once_its_file_is_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshllm.reconcile.downloads import FetchState
    from meshllm.reconcile.served_plan import FETCH_POLL

    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
    world, fetcher = World(tmp_path), FakeFetcher()
    fetcher.states["org/r/m.gguf"] = FetchState(done=1_000_000, total=4_000_000, rate=500_000)
    world.state.put_model(ModelSpec(name="m", source="org/r/m.gguf", node=ME))
    world.lease("m")
    async with world.running(served_with(world, fetcher)):  # type: ignore[arg-type]
        status = world.server()
        assert status is not None and status.phase is ServerPhase.DOWNLOADING and "(25%)" in status.message
        assert not world.pids() and fetcher.asked[0] == ("org/r/m.gguf", True)
        (tmp_path / "models").mkdir()
        gguf(tmp_path / "models" / "m.gguf")  # the download finished
        await world.advance(FETCH_POLL)
        assert list(world.pids()) == ["m"]


async def test_a_draft_that_cannot_be_fetched_leaves_the_model_served_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshllm.reconcile.downloads import FetchState

    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
    world, fetcher = World(tmp_path), FakeFetcher()
    fetcher.states["org/r/d.gguf"] = FetchState(finished=True, error="org/r/d.gguf: not found on the hub")
    world.serve("m", draft="org/r/d.gguf")
    async with world.running(served_with(world, fetcher)):  # type: ignore[arg-type]
        assert list(world.pids()) == ["m"]
        assert "--model-draft" not in world.process("m").argv
        assert ("org/r/d.gguf", False) in fetcher.asked  # a failed draft is not fetched again and again
