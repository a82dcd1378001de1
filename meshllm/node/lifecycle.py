"""Starting a node's components one after another, and stopping them in the reverse order.

Each component is a long-lived ``run(*, task_status)`` (the house shape). ``Lifecycle.start`` runs
it in the node's task group and returns once it reports started; ``Lifecycle.stop`` cancels the
started ones last-first, each finished before the next is asked, so a component never loses what
it depends on while it stops (the APIs stop before the controllers, the controllers before their
engine processes, and all of them before the node leaves the mesh).

A component is shielded from outside cancellation once it has started: cancelling the node's task
group (a crash, a test cancelling the node) does not stop them all at once, it makes the node run
``stop``, which stops them in order. Before it reports started a component is cancelled like any
task, so a node asked to stop while starting does not wait for a start that may never finish.

    async with anyio.create_task_group() as tg:
        parts = Lifecycle(tg)
        try:
            port = await parts.start("mesh", mesh.run)
            await parts.start("OpenAI API", api.run)
            await anyio.sleep_forever()
        finally:
            await parts.stop()
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskStatus

__all__ = ["Lifecycle", "Run"]

log = logging.getLogger(__name__)


Run = Callable[..., Awaitable[None]]  # a component's ``run(*, task_status)``: runs until cancelled


class _ShieldOnStart:
    """The task status handed to a component: reporting started also shields it from outside cancellation."""

    def __init__(self, inner: TaskStatus[Any], scope: anyio.CancelScope) -> None:
        self._inner = inner
        self._scope = scope

    def started(self, value: Any = None) -> None:
        self._scope.shield = True
        self._inner.started(value)


@dataclass
class _Running:
    name: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


class Lifecycle:
    """The components started in ``tg``, in the order they started."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self._running: list[_Running] = []

    @property
    def names(self) -> list[str]:
        """The running components, first started first."""
        return [r.name for r in self._running]

    async def start(self, name: str, run: Run) -> Any:
        """Start ``run`` and return what it reported started with; it raises what ``run`` raised
        before it started."""
        running = _Running(name)

        async def supervise(*, task_status: TaskStatus[Any]) -> None:
            try:
                with running.scope:
                    await run(task_status=_ShieldOnStart(task_status, running.scope))
            finally:
                running.done.set()

        value = await self._tg.start(supervise, name=name)
        self._running.append(running)
        return value

    async def stop(self) -> None:
        """Stop every started component, last started first, each finished before the next one."""
        with anyio.CancelScope(shield=True):
            while self._running:
                running = self._running.pop()
                log.debug("stopping %s", running.name)
                running.scope.cancel()
                await running.done.wait()
