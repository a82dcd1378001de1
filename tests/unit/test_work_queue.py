"""The reconcile work queue on a fake clock: coalescing, one reconcile per key at a time, requeue, retry
with backoff, and terminal errors. Each test waits on conditions (the queue idle), never on real time."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from meshllm.errors import TerminalError
from meshllm.reconcile.queue import Result, WorkQueue
from meshllm.reconcile.timing import Backoff
from meshllm.testing.fakes import FakeClock


@asynccontextmanager
async def running(reconcile: Callable[[str], Awaitable[Result]], clock: FakeClock,
                  backoff: Backoff | None = None) -> AsyncIterator[WorkQueue[str]]:
    queue: WorkQueue[str] = WorkQueue(reconcile, clock=clock, backoff=backoff)
    async with anyio.create_task_group() as tg:
        await tg.start(queue.run)
        yield queue
        tg.cancel_scope.cancel()


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not check():
            await anyio.sleep(0)


async def test_changes_during_a_reconcile_are_seen_by_one_more_reconcile_not_one_each() -> None:
    clock, world = FakeClock(), {"a": 0}
    seen: list[int] = []
    overlapping = False
    busy = False
    release = anyio.Event()

    async def reconcile(key: str) -> Result:
        nonlocal busy, overlapping
        overlapping |= busy
        busy = True
        seen.append(world[key])
        if len(seen) == 1:
            await release.wait()
        busy = False
        return Result()

    async with running(reconcile, clock) as queue:
        queue.add("a")
        await until(lambda: bool(seen))
        for value in range(1, 6):  # five changes while the first reconcile runs
            world["a"] = value
            queue.add("a")
        release.set()
        await queue.idle()
    assert seen[-1] == 5  # the last change was reconciled
    assert len(seen) == 2  # the five adds coalesced into one more reconcile
    assert not overlapping  # never two reconciles of one key at a time


async def test_requeue_after_looks_again_when_the_time_comes() -> None:
    clock, world, copied = FakeClock(), {"a": 1}, {}

    async def reconcile(key: str) -> Result:
        copied[key] = world[key]
        return Result(requeue_after=10.0)

    async with running(reconcile, clock) as queue:
        queue.add("a")
        await queue.idle()
        world["a"] = 2
        clock.advance(9.9)
        await queue.idle()
        assert copied["a"] == 1
        clock.advance(0.2)
        await queue.idle()
        assert copied["a"] == 2


async def test_a_failing_key_is_retried_after_a_growing_backoff() -> None:
    clock = FakeClock()
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(3))
    failures_left, done = 4, False

    async def reconcile(key: str) -> Result:
        nonlocal failures_left, done
        if failures_left:
            failures_left -= 1
            raise RuntimeError("not yet")
        done = True
        return Result()

    async with running(reconcile, clock, backoff) as queue:
        queue.add("a")
        await queue.idle()
        for attempt in range(4):
            low, high = backoff.bounds(attempt)
            assert (low, high) == (0.8 * min(8.0, 2.0 ** attempt), 1.2 * min(8.0, 2.0 ** attempt))
            left = failures_left
            clock.advance(low - 0.01)
            await queue.idle()
            assert failures_left == left  # not retried before the backoff's shortest wait
            clock.advance(high - low + 0.02)
            await queue.idle()
            assert failures_left == left - 1 or done  # retried within its longest
    assert done


async def test_a_terminal_error_is_not_retried_but_a_later_add_runs_the_key_again() -> None:
    clock, fixed, done = FakeClock(), False, False

    async def reconcile(key: str) -> Result:
        nonlocal done
        if not fixed:
            raise TerminalError("cannot ever work as it stands")
        done = True
        return Result()

    async with running(reconcile, clock) as queue:
        queue.add("a")
        await queue.idle()
        fixed = True
        clock.advance(3600)
        await queue.idle()
        assert not done and queue.pending() == set()
        queue.add("a")  # what a change to the key does
        await queue.idle()
        assert done


def test_backoff_is_capped_and_jittered_within_its_bounds() -> None:
    backoff = Backoff(base=0.5, cap=30.0, spread=0.2, rng=random.Random(1))
    for attempt in range(12):
        low, high = backoff.bounds(attempt)
        nominal = min(30.0, 0.5 * 2 ** attempt)
        assert (low, high) == pytest.approx((0.8 * nominal, 1.2 * nominal))
        draws = [backoff.delay(attempt) for _ in range(200)]
        assert all(low <= d <= high for d in draws)
        assert max(draws) - min(draws) > 0.2 * (high - low)  # jittered, not one value
