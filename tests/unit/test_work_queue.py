"""The reconcile work queue: coalescing, one reconcile per key at a time, requeue and retry."""

from __future__ import annotations

import anyio
import pytest

from meshllm.errors import TerminalError
from meshllm.reconcile.queue import Result, WorkQueue

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_adds_while_running_coalesce_into_one_more_run() -> None:
    runs: list[str] = []
    concurrent = 0
    peak = 0

    async def reconcile(key: str) -> Result:
        nonlocal concurrent, peak
        concurrent += 1
        peak = max(peak, concurrent)
        runs.append(key)
        await anyio.sleep(0.05)
        concurrent -= 1
        return Result()

    queue = WorkQueue(reconcile)
    async with anyio.create_task_group() as tg:
        await tg.start(queue.run)
        queue.add("a")
        await anyio.sleep(0.01)
        for _ in range(5):
            queue.add("a")
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert runs == ["a", "a"]
    assert peak == 1


async def test_requeue_after_and_retry_on_error() -> None:
    calls: dict[str, int] = {"ok": 0, "flaky": 0, "terminal": 0}

    async def reconcile(key: str) -> Result:
        calls[key] += 1
        if key == "flaky" and calls[key] < 3:
            raise RuntimeError("boom")
        if key == "terminal":
            raise TerminalError("cannot ever work")
        return Result(requeue_after=0.05) if calls[key] < 3 else Result()

    queue = WorkQueue(reconcile, base_backoff=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(queue.run)
        for key in calls:
            queue.add(key)
        with anyio.fail_after(3):
            while calls["ok"] < 3 or calls["flaky"] < 3:
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert calls == {"ok": 3, "flaky": 3, "terminal": 1}
