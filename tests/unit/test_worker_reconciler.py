"""The split-worker controller on the fake supervisor and a fake clock: what runs, and the WorkerStatus the
document shows, as a split's lease names this node, its worker crashes, fails, or its host changes."""

from __future__ import annotations

from pathlib import Path

from meshllm.reconcile.workers import FAILED_RETRY, MAX_RESTARTS, RPC_RECORD_PREFIX
from meshllm.state.schema import NodeDeath, NodeStatus, ServerPhase
from tests.unit.controllers import ME, World

KEY = RPC_RECORD_PREFIX + "m"


def split_world(tmp_path: Path, *, slow_stops: bool = False) -> World:
    """A mesh where host n2 serves "m" split with this node as its worker."""
    world = World(tmp_path, slow_stops=slow_stops)
    for node in ("n2", "n3"):
        world.state.put_node(NodeStatus(id=node, capacity_bytes=10**9, incarnation=1.0))
    world.model("m")
    world.state.put_model(world.state.models()["m"].model_copy(update={"fingerprint": world.fingerprint("m")}))
    world.lease("m", node="n2", workers=[ME], shares=[1.0, 1.0])
    return world


async def test_a_worker_runs_for_its_host_and_is_reported_ready_with_its_address(tmp_path: Path) -> None:
    world = split_world(tmp_path)
    workers = world.workers(direct_host="10.0.0.1")
    async with world.running(workers):
        assert list(world.pids()) == [KEY]
        status = world.worker()
        assert status is not None and status.phase is ServerPhase.LOADING and status.host == "n2"
        assert workers.endpoint_for("m") is None  # not listening yet: the tunnel has nowhere to go
        world.supervisor.ready(KEY)
        await world.settle()
        status = world.worker()
        port = world.process(KEY).port
        assert status is not None and status.phase is ServerPhase.READY and status.port == port
        assert status.direct == f"10.0.0.1:{port}"
        assert workers.endpoint_for("m") == ("127.0.0.1", port)


async def test_a_worker_that_keeps_crashing_is_reported_failed_then_tried_again_later(tmp_path: Path) -> None:
    world = split_world(tmp_path)
    async with world.running(world.workers()):
        for crash in range(1, MAX_RESTARTS + 1):
            world.supervisor.crash(KEY)
            await world.settle()
            status = world.worker()
            assert status is not None and status.phase is ServerPhase.LOADING
            assert status.message.startswith("restarting after: ggml-rpc-server exited with code 1")
            low, high = world.backoff.bounds(crash)
            await world.advance(low - 0.01)
            assert not world.pids()
            await world.advance(high - low + 0.02)
            assert list(world.pids()) == [KEY]
        world.supervisor.crash(KEY)  # one crash too many
        await world.settle()
        status = world.worker()
        assert status is not None and status.phase is ServerPhase.FAILED and "exited with code 1" in status.message
        await world.advance(FAILED_RETRY - 1)
        assert not world.pids()  # placement leaves this node out meanwhile
        await world.advance(1.01)
        assert list(world.pids()) == [KEY]


async def test_a_node_without_the_same_model_file_reports_failed_and_runs_nothing(tmp_path: Path) -> None:
    world = split_world(tmp_path)
    world.state.put_model(world.state.models()["m"].model_copy(update={"fingerprint": "1:other"}))
    async with world.running(world.workers()):
        status = world.worker()
        assert status is not None and status.phase is ServerPhase.FAILED
        assert "is not the mesh's m" in status.message and not world.pids()


async def test_a_new_host_gets_a_new_worker_after_the_old_one_stopped(tmp_path: Path) -> None:
    world = split_world(tmp_path, slow_stops=True)
    async with world.running(world.workers()):
        world.supervisor.ready(KEY)
        await world.settle()
        old = world.pids()[KEY]
        world.lease("m", node="n3", workers=[ME], shares=[1.0, 1.0])
        await world.settle()
        assert world.pids() == {KEY: old}  # stopping; nothing new before it has ended
        world.supervisor.finish_stop(KEY)
        await world.settle()
        assert list(world.pids()) == [KEY] and world.pids()[KEY] != old
        status = world.worker()
        assert status is not None and status.host == "n3" and status.phase is ServerPhase.LOADING


async def test_a_worker_goes_with_its_lease_or_its_host(tmp_path: Path) -> None:
    world = split_world(tmp_path)
    async with world.running(world.workers()):
        world.supervisor.ready(KEY)
        await world.settle()
        world.state.put_death(NodeDeath(node="n2", incarnation=1.0, by="n3"))  # the host died
        await world.settle()
        assert not world.pids() and world.worker() is None
        world.state.put_node(NodeStatus(id="n2", capacity_bytes=10**9, incarnation=2.0))  # and came back
        await world.settle()
        assert list(world.pids()) == [KEY]
        world.lease("m", node="n2")  # re-planned solo: no workers
        await world.settle()
        assert not world.pids() and world.worker() is None


async def test_a_worker_left_by_the_previous_run_is_stopped_and_a_fresh_one_started(tmp_path: Path) -> None:
    world = split_world(tmp_path)
    left = world.supervisor.left_running(KEY, ["/engine/ggml-rpc-server", "--port", "41000"], port=41000,
                                         argv_hash="")
    async with world.running(world.workers()):
        assert list(world.pids()) == [KEY] and world.pids()[KEY] != left.pid
