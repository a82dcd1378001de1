"""Work a controller starts and does not wait for (downloads, share fetches), run in a task group of
its own that lives as long as the node's component does (``run``), so that a node that stops ends it."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

__all__ = ["BackgroundWork"]


class BackgroundWork:
    """A task group for work started from synchronous code; ``start`` is False once it has stopped."""

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    @property
    def running(self) -> bool:
        return self._tg is not None

    def start(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        assert self._tg is not None, "check running first"
        self._tg.start_soon(func, *args)
