"""The controller runtime on a fake clock, with a toy controller that copies model specs into a dict: a
document change reaches the keys it touched, a process change reaches its key, the resync catches what no
event said, failures back off, a terminal error waits for a change, and shutdown runs in order."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from meshllm.errors import TerminalError
from meshllm.reconcile.runtime import RESYNC, Runner
from meshllm.reconcile.supervisor import PROCESSES
from meshllm.reconcile.timing import Backoff
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import ModelSpec
from meshllm.testing.fakes import FakeClock, FakeSupervisor


@dataclass
class Copier:
    """Desired: a model's source in the document (or, for keys in ``outside``, a value no event announces).
    Actual: ``copies``. The plan copies what differs."""

    state: MeshState
    name: str = "copier"
    copies: dict[str, str | None] = field(default_factory=dict)
    outside: dict[str, str] = field(default_factory=dict)
    failing: dict[str, type[Exception]] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)

    def keys(self) -> Iterable[str]:
        return set(self.state.models()) | set(self.outside) | set(self.copies)

    def keys_for(self, change: Changed) -> Iterable[str]:
        if change.table == "models" and change.key is not None:
            return [change.key]
        if change.table == PROCESSES and change.key is not None:
            return [change.key.removeprefix("proc:")]
        return []

    async def desired(self, key: str) -> str | None:
        spec = self.state.models().get(key)
        return self.outside.get(key, spec.source if spec is not None else None)

    async def actual(self, key: str, desired: str | None, now: float) -> str | None:
        return self.copies.get(key)

    def plan(self, desired: str | None, actual: str | None, now: float) -> list[str | None]:
        return [desired] if desired != actual else []

    async def apply(self, key: str, action: str | None, now: float) -> float | None:
        if key in self.failing:
            raise self.failing[key](f"{key} cannot be copied")
        self.copies[key] = action
        return None

    async def shutdown(self) -> None:
        self.stopped.append(self.name)


@asynccontextmanager
async def running(runner: Runner) -> AsyncIterator[Runner]:
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await runner.idle()
        yield runner
        await runner.stop()


async def settle(runner: Runner, clock: FakeClock, seconds: float = 0.0) -> None:
    clock.advance(seconds)
    await clock.woken()
    await runner.idle()


async def test_a_document_change_reconciles_the_keys_it_touched() -> None:
    state, clock = MeshState(), FakeClock()
    copier = Copier(state)
    async with running(Runner(state, [copier], clock=clock)) as runner:
        state.put_model(ModelSpec(name="a", source="a1"))
        await settle(runner, clock)
        assert copier.copies == {"a": "a1"}
        copier.outside["b"] = "b1"  # no event says so: seen at the resync only
        state.put_model(ModelSpec(name="a", source="a2"))
        await settle(runner, clock)
        assert copier.copies == {"a": "a2"}
        await settle(runner, clock, RESYNC)
        assert copier.copies == {"a": "a2", "b": "b1"}
        state.remove_model("a")
        await settle(runner, clock)
        assert copier.copies == {"a": None, "b": "b1"}


async def test_a_process_change_reconciles_its_key() -> None:
    state, clock = MeshState(), FakeClock()
    supervisor = FakeSupervisor(clock=clock)
    copier = Copier(state)
    async with running(Runner(state, [copier], supervisor=supervisor, clock=clock)) as runner:
        copier.outside["p"] = "started"
        supervisor.left_running("proc:p", ["/bin/x"], port=1, argv_hash="")
        supervisor.crash("proc:p")  # the process ends: an event for its key
        await settle(runner, clock)
        assert copier.copies == {"p": "started"}


async def test_a_failing_key_backs_off_and_a_terminal_one_waits_for_a_change() -> None:
    state, clock = MeshState(), FakeClock()
    backoff = Backoff(base=1.0, cap=4.0, rng=random.Random(5))
    copier = Copier(state, failing={"flaky": RuntimeError, "broken": TerminalError})
    state.put_model(ModelSpec(name="flaky", source="f"))
    state.put_model(ModelSpec(name="broken", source="b"))
    async with running(Runner(state, [copier], clock=clock, backoff=backoff)) as runner:
        assert copier.copies == {}
        copier.failing.clear()  # both would work now
        await settle(runner, clock, backoff.bounds(0)[1] + 0.01)
        assert copier.copies == {"flaky": "f"}  # retried after its backoff; the terminal one was not
        state.put_model(ModelSpec(name="broken", source="b2"))  # a change: looked at again
        await settle(runner, clock)
        assert copier.copies == {"flaky": "f", "broken": "b2"}


async def test_stop_shuts_the_controllers_down_in_order() -> None:
    state, clock, stopped = MeshState(), FakeClock(), list[str]()
    first, second = Copier(state, name="served", stopped=stopped), Copier(state, name="workers", stopped=stopped)
    runner = Runner(state, [first, second], clock=clock)
    async with running(runner):
        assert stopped == []
    assert stopped == ["served", "workers"]  # a split's llama-server goes before the rpc-servers it uses
    assert runner.queue.pending() == set()
