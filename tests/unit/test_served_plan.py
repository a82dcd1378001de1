"""The served-model planner, table-tested: what one model needs given what is wanted and what runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meshllm.reconcile.served_plan import (
    ActualServer, Claim, Desired, DesiredServer, Fetching, Forget, GiveUp, Memory, Publish, Record, Remember, Start, Stop,
    Unavailable, Wait, Withdraw, plan,
)
from meshllm.reconcile.supervisor import ProcessPhase, ProcessView
from meshllm.state.schema import ServerPhase, ServerStatus

WANT = DesiredServer(model="m", path=Path("/models/m.gguf"), argv_hash="h1")
OTHER = DesiredServer(model="m", path=Path("/models/m.gguf"), ctx_size=4096, argv_hash="h2")
SPLIT = DesiredServer(model="m", path=Path("/models/m.gguf"), workers=("w",), tensor_split=(1.0, 1.0))
NOW = 1000.0


def proc(phase: ProcessPhase, *, started: float = 990.0, stop_reason: str | None = None, adopted: bool = False,
         argv_hash: str = "h1") -> ProcessView:
    return ProcessView(key="m", pid=7, port=41000, argv=("/e/llama-server",), argv_hash=argv_hash,
                       log_path=Path("/logs/m.log"), started_at=started, seen_at=started, phase=phase,
                       adopted=adopted, claimed=not adopted, ready_at=995.0 if phase is ProcessPhase.READY else 0.0,
                       exited_at=999.0 if phase is ProcessPhase.EXITED else 0.0, stop_reason=stop_reason,
                       message="llama-server exited with code 1: boom" if phase is ProcessPhase.EXITED else "")


def status(phase: ServerPhase, **fields: object) -> ServerStatus:
    base: dict[str, object] = {"node": "n1", "model": "m", "phase": phase, "port": 41000, "pid": 7}
    return ServerStatus.model_validate(base | fields)


def actual(process: ProcessView | None = None, *, memory: Memory = Memory(), published: ServerStatus | None = None,
           waiting: str | None = None) -> ActualServer:
    return ActualServer(model="m", node="n1", process=process, memory=memory, published=published, waiting=waiting,
                        adopt_until=1010.0)


RUNS = Memory(serves=WANT)
READY = status(ServerPhase.READY, since=995.0)
CRASHED = Memory(serves=WANT, restarts=2, failed=True, failed_at=999.0, retry_at=1005.0,
                 message="llama-server exited with code 1: boom", recovering=True, port=41000, pid=7)
FAILED = status(ServerPhase.FAILED, restarts=2, message=CRASHED.message, recovering=True)
REPLACING = status(ServerPhase.LOADING, port=0, pid=0, message="replacing llama-server: spec changed")


@pytest.mark.parametrize(("desired", "now_actual", "expected"), [
    pytest.param(None, actual(), [], id="nothing wanted, nothing running"),
    pytest.param(WANT, actual(), [Remember("m", RUNS), Start(WANT)], id="wanted, nothing running: start"),
    pytest.param(None, actual(proc(ProcessPhase.READY), memory=RUNS, published=READY),
                 [Stop("m", "no longer desired"), Withdraw("m")], id="running, no longer wanted: stop, withdraw"),
    pytest.param(None, actual(proc(ProcessPhase.EXITED, stop_reason="no longer desired"), memory=RUNS),
                 [Remember("m", Memory()), Forget("m"),
                  Record("m", "Stopped", "llama-server pid 7 stopped (no longer desired)")],
                 id="stopped and unwanted: forget it all"),
    pytest.param(WANT, actual(proc(ProcessPhase.READY), memory=RUNS, published=READY), [],
                 id="ready and unchanged: nothing"),
    pytest.param(WANT, actual(proc(ProcessPhase.STARTING), memory=RUNS, published=status(ServerPhase.LOADING)),
                 [Wait("m", 1890.0)], id="loading: look again at its load timeout"),
    pytest.param(WANT, actual(proc(ProcessPhase.STARTING, started=0.0), memory=RUNS),
                 [Remember("m", replace(RUNS, failed=True, failed_at=NOW, retry_at=NOW, recovering=True, port=41000,
                                        pid=7, message="llama-server not ready after 900s"), backoff=0),
                  Stop("m", "not ready after 900s"),
                  Publish(status(ServerPhase.LOADING, port=0, pid=0, message="llama-server not ready after 900s",
                                 since=NOW, recovering=True))],
                 id="loading too long: stop, and count it as a failure"),
    pytest.param(OTHER, actual(proc(ProcessPhase.READY), memory=RUNS, published=READY),
                 [Stop("m", "spec changed"), Publish(REPLACING.model_copy(update={"since": NOW}))],
                 id="spec changed: stop first, the start comes once it has ended"),
    pytest.param(OTHER, actual(proc(ProcessPhase.STOPPING, stop_reason="spec changed"), memory=RUNS,
                               published=REPLACING), [], id="stopping: wait for the end, start nothing"),
    pytest.param(OTHER, actual(proc(ProcessPhase.EXITED, stop_reason="spec changed"), memory=RUNS,
                               published=REPLACING),
                 [Remember("m", Memory(serves=OTHER)), Forget("m"),
                  Record("m", "Stopped", "llama-server pid 7 stopped (spec changed)"), Start(OTHER)],
                 id="stopped for a new spec: start the new one"),
    pytest.param(WANT, actual(proc(ProcessPhase.EXITED), memory=replace(RUNS, restarts=2), published=READY),
                 [Remember("m", replace(CRASHED, retry_at=999.0), backoff=2), Forget("m"),
                  Record("m", "Exited", CRASHED.message, "warning"),
                  Publish(FAILED.model_copy(update={"since": 999.0}))],
                 id="crashed: count it, draw its backoff, report it failed"),
    pytest.param(WANT, actual(memory=CRASHED, published=FAILED), [Wait("m", 1005.0)],
                 id="crashed, backoff pending: wait"),
    pytest.param(WANT, actual(memory=replace(CRASHED, retry_at=NOW), published=FAILED),
                 [Remember("m", replace(RUNS, restarts=3, message=f"restart 3 after: {CRASHED.message}",
                                        recovering=True, port=41000, pid=7, failed_at=999.0)),
                  Start(WANT, restarts=3, message=f"restart 3 after: {CRASHED.message}")],
                 id="crashed, backoff over: restart and count it"),
    pytest.param(OTHER, actual(memory=CRASHED, published=FAILED),
                 [Remember("m", replace(CRASHED, serves=OTHER, restarts=0, failed=False, retry_at=0.0)),
                  Start(OTHER, message=CRASHED.message)],
                 id="crashed but spec changed since: start fresh now"),
    pytest.param(WANT, actual(proc(ProcessPhase.STARTING, adopted=True)),
                 [Remember("m", RUNS), Claim("m"),
                  Record("m", "Adopted", "adopted llama-server pid 7 on 127.0.0.1:41000"), Wait("m", 1890.0),
                  Publish(status(ServerPhase.LOADING, since=990.0))],
                 id="adopted, runs what this node would: claim it"),
    pytest.param(OTHER, actual(proc(ProcessPhase.STARTING, adopted=True)),
                 [Stop("m", "spec changed while the node was down"),
                  Publish(status(ServerPhase.LOADING, port=0, pid=0, since=NOW,
                                 message="replacing llama-server: spec changed while the node was down"))],
                 id="adopted, runs other settings: replace it"),
    pytest.param(None, actual(proc(ProcessPhase.STARTING, adopted=True)), [Wait("m", 1010.0)],
                 id="adopted, this node's leases not known yet: wait"),
    pytest.param(SPLIT, actual(waiting="waiting for worker w to start its ggml-rpc-server"),
                 [Wait("m", NOW + 0.5), Publish(status(ServerPhase.LOADING, port=0, pid=0, since=NOW,
                                                      message="waiting for worker w to start its ggml-rpc-server"))],
                 id="split, workers not ready: wait, and say why"),
    pytest.param(Unavailable("m", "model file /x.gguf does not exist"), actual(proc(ProcessPhase.READY), memory=RUNS),
                 [Stop("m", "model unavailable"), Remember("m", Memory()),
                  Publish(status(ServerPhase.FAILED, port=0, pid=0, message="model file /x.gguf does not exist")),
                  Record("m", "Failed", "model file /x.gguf does not exist", "error"),
                  GiveUp("m", "model file /x.gguf does not exist")],
                 id="model unavailable: stop, report, give up until it changes"),
])
def test_plan(desired: Desired, now_actual: ActualServer, expected: list[object]) -> None:
    assert plan(desired, now_actual, NOW) == expected


def test_a_failure_stays_reported_after_the_model_left_this_node() -> None:
    """Placement moves a crash-looping model away; its failure stays on record here."""
    assert plan(None, actual(published=FAILED), NOW) == []
    assert plan(None, actual(published=READY), NOW) == [Withdraw("m")]


FETCHING = status(ServerPhase.DOWNLOADING, port=0, pid=0, message="downloading 1.0 MB of 4.0 MB (25%)", since=NOW)


@pytest.mark.parametrize(("message", "now_actual", "expected"), [
    pytest.param("downloading 1.0 MB of 4.0 MB (25%)", actual(),
                 [Publish(FETCHING), Record("m", "Downloading", FETCHING.message), Wait("m", NOW + 1.0)],
                 id="files missing: Downloading published and recorded, looked at again"),
    pytest.param("downloading 1.0 MB of 4.0 MB (25%)", actual(published=FETCHING), [Wait("m", NOW + 1.0)],
                 id="no progress: nothing rewritten"),
    pytest.param("downloading 2.0 MB of 4.0 MB (50%)", actual(published=FETCHING),
                 [Publish(FETCHING.model_copy(update={"message": "downloading 2.0 MB of 4.0 MB (50%)"})), Wait("m", NOW + 1.0)],
                 id="progress: republished, no new event"),
    pytest.param("downloading 0 B", actual(proc(ProcessPhase.READY), memory=RUNS, published=READY),
                 [Stop("m", "model files are downloading"), Remember("m", Memory()),
                  Publish(FETCHING.model_copy(update={"message": "downloading 0 B"})), Record("m", "Downloading", "downloading 0 B"),
                  Wait("m", NOW + 1.0)],
                 id="a new source to fetch: the old server stops first"),
])
def test_plan_while_downloading(message: str, now_actual: ActualServer, expected: list[object]) -> None:
    assert plan(Fetching("m", message), now_actual, NOW) == expected


def test_a_solo_server_serves_until_the_split_it_becomes_can_start() -> None:
    waiting = actual(proc(ProcessPhase.READY), memory=RUNS, published=READY, waiting="waiting for worker w")
    assert plan(SPLIT, waiting, NOW) == [Wait("m", NOW + 0.5)]  # --split, worker joined late: keep serving
    ready = actual(proc(ProcessPhase.READY), memory=RUNS, published=READY)
    assert plan(SPLIT, ready, NOW)[0] == Stop("m", "spec changed")  # the workers are ready: now the split
