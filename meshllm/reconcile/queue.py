"""A work queue of keys for level-triggered reconcilers (the controller-runtime shape, in anyio).

Events only ``add(key)``; the reconcile function re-reads everything about the key itself. One
reconcile per key runs at a time and adds made meanwhile coalesce into one later run. A reconcile
returns ``Result(requeue_after=...)`` to be looked at again; raising retries the key with exponential
backoff and jitter; ``TerminalError`` is logged and not retried.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from meshllm.errors import TerminalError
from meshllm.state.document import MeshState

__all__ = ["Result", "WorkQueue", "run_observed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for next: ``requeue_after`` seconds, or nothing until an event."""

    requeue_after: float | None = None


ReconcileFn = Callable[[str], Awaitable[Result]]


class WorkQueue:
    """Keys due for reconciling, each reconciled by at most one task at a time."""

    def __init__(self, reconcile: ReconcileFn, *, name: str = "queue",
                 base_backoff: float = 0.5, max_backoff: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reconcile = reconcile
        self._name = name
        self._clock = clock
        self._base_backoff = base_backoff
        self._max_backoff = max_backoff
        self._due: dict[str, float] = {}
        self._running: set[str] = set()
        self._failures: dict[str, int] = {}
        self._wake = anyio.Event()

    def add(self, key: str, *, after: float = 0.0) -> None:
        """Make ``key`` due in ``after`` seconds (sooner if it is already due sooner). Never raises."""
        due = self._clock() + max(0.0, after)
        self._due[key] = min(self._due.get(key, math.inf), due)
        self._wake.set()

    def pending(self) -> set[str]:
        return set(self._due) | self._running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                self._wake = anyio.Event()
                now = self._clock()
                for key in [k for k, due in self._due.items() if due <= now and k not in self._running]:
                    del self._due[key]
                    self._running.add(key)
                    tg.start_soon(self._work, key)
                waiting = [due for k, due in self._due.items() if k not in self._running]
                delay = min(waiting) - now if waiting else math.inf
                with anyio.move_on_after(max(delay, 0.0)):
                    await self._wake.wait()

    async def _work(self, key: str) -> None:
        try:
            result = await self._reconcile(key)
        except TerminalError as exc:
            log.error("%s: %s failed for good: %s", self._name, key, exc)
            self._failures.pop(key, None)
        except Exception:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(self._max_backoff, self._base_backoff * 2 ** (failures - 1))
            log.exception("%s: reconcile of %s failed (attempt %d); retrying in %.1fs",
                          self._name, key, failures, delay)
            self.add(key, after=delay * random.uniform(0.8, 1.2))
        else:
            self._failures.pop(key, None)
            if result.requeue_after is not None:
                self.add(key, after=result.requeue_after)
        finally:
            self._running.discard(key)
            self._wake.set()


async def run_observed(state: MeshState, queue: WorkQueue, enqueue_all: Callable[[], None], *,
                       watch: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]],
                       task_status: TaskStatus[None]) -> None:
    """Run ``queue``, enqueueing every key ``enqueue_all`` names at start and at each change of the
    document, with ``watch`` beside it (the processes' exits), until cancelled; then ``shutdown``."""
    subs = state.observe(enqueue_all)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(queue.run)
            enqueue_all()
            tg.start_soon(watch)
            task_status.started()
    finally:
        state.unobserve(subs)
        with anyio.CancelScope(shield=True):
            await shutdown()
