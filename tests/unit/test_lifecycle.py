"""A node's components start in order and stop in reverse, one finished before the next is asked,
whether the node is stopped from inside (a signal) or cancelled from outside."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from meshllm.node.lifecycle import Lifecycle

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Part:
    """A component that records its start and its stop, and takes a checkpoint while stopping (so a
    stop that is not awaited shows up as overlapping stops)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        self.log.append(f"start {self.name}")
        task_status.started(self.name.upper())
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                self.log.append(f"stopping {self.name}")
                await anyio.sleep(0.01)
                self.log.append(f"stopped {self.name}")


EXPECTED = ["start mesh", "start controllers", "start api",
            "stopping api", "stopped api", "stopping controllers", "stopped controllers",
            "stopping mesh", "stopped mesh"]


async def test_started_in_order_stopped_in_reverse_one_at_a_time() -> None:
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        parts = Lifecycle(tg)
        values = [await parts.start(name, Part(name, log).run) for name in ("mesh", "controllers", "api")]
        assert parts.names == ["mesh", "controllers", "api"]
        await parts.stop()
    assert values == ["MESH", "CONTROLLERS", "API"]
    assert log == EXPECTED


async def test_outside_cancellation_still_stops_in_reverse() -> None:
    log: list[str] = []
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            parts = Lifecycle(tg)
            try:
                for name in ("mesh", "controllers", "api"):
                    await parts.start(name, Part(name, log).run)
                outer.cancel()  # what cancelling the node's task does
                await anyio.sleep_forever()
            finally:
                await parts.stop()
    assert outer.cancelled_caught
    assert log == EXPECTED


async def test_a_crash_stops_the_others_in_reverse_and_is_raised() -> None:
    log: list[str] = []

    async def crashing(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep(0.01)
        raise RuntimeError("boom")

    with pytest.raises(ExceptionGroup) as raised:
        async with anyio.create_task_group() as tg:
            parts = Lifecycle(tg)
            try:
                await parts.start("mesh", Part("mesh", log).run)
                await parts.start("api", Part("api", log).run)
                await parts.start("crashing", crashing)
                await anyio.sleep_forever()
            finally:
                await parts.stop()
    assert raised.group_contains(RuntimeError, match="boom")
    assert log == ["start mesh", "start api", "stopping api", "stopped api", "stopping mesh", "stopped mesh"]


async def test_cancelled_while_a_component_starts_does_not_wait_for_it() -> None:
    log: list[str] = []

    async def never_starts(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            log.append("start abandoned")

    with anyio.move_on_after(5) as deadline:  # the test's own limit: stopping must not hang
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                parts = Lifecycle(tg)
                try:
                    await parts.start("mesh", Part("mesh", log).run)
                    tg.start_soon(lambda: _cancel_soon(outer))
                    await parts.start("stuck", never_starts)
                finally:
                    await parts.stop()
    assert not deadline.cancelled_caught
    assert log == ["start mesh", "start abandoned", "stopping mesh", "stopped mesh"]


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.sleep(0.01)
    scope.cancel()
