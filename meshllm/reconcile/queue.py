"""A work queue of keys for level-triggered reconcilers (the controller-runtime shape, in anyio).

Events only ``add(key)``; the reconcile function re-reads everything about the key itself. One
reconcile per key runs at a time and adds made meanwhile coalesce into one later run. A reconcile
returns ``Result(requeue_after=...)`` to be looked at again; raising retries the key after the
``Backoff`` of its consecutive failures; ``TerminalError`` is logged and not retried (a later add, such
as the next change to the key, runs it again). Due times are on the injected ``Clock``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

from meshllm.errors import TerminalError
from meshllm.reconcile.timing import Backoff, Clock, SystemClock

__all__ = ["Result", "WorkQueue"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for next: ``requeue_after`` seconds, or nothing until an event."""

    requeue_after: float | None = None


class WorkQueue(Generic[K]):
    """Keys due for reconciling, each reconciled by at most one task at a time."""

    def __init__(self, reconcile: Callable[[K], Awaitable[Result]], *, name: str = "queue",
                 backoff: Backoff | None = None, clock: Clock | None = None) -> None:
        self._reconcile = reconcile
        self._name = name
        self._clock = clock or SystemClock()
        self.backoff = backoff or Backoff()
        self._due: dict[K, float] = {}
        self._running: set[K] = set()
        self._failures: dict[K, int] = {}
        self._wake = anyio.Event()
        self._progress = anyio.Event()

    def add(self, key: K, *, after: float = 0.0) -> None:
        """Make ``key`` due in ``after`` seconds (sooner if it is already due sooner). Never raises."""
        due = self._clock.monotonic() + max(0.0, after)
        self._due[key] = min(self._due.get(key, math.inf), due)
        self._wake.set()

    def pending(self) -> set[K]:
        """Keys due (now or later) or being reconciled."""
        return set(self._due) | self._running

    def failures(self, key: K) -> int:
        """Failed reconciles of ``key`` in a row."""
        return self._failures.get(key, 0)

    async def idle(self) -> None:
        """Return once no reconcile runs and none is due on the clock's present time (tests use it to
        let a fake clock's step play out)."""
        while self._running or any(due <= self._clock.monotonic() for due in self._due.values()):
            progress = self._progress
            await progress.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                self._wake = anyio.Event()
                now = self._clock.monotonic()
                for key in [k for k, due in self._due.items() if due <= now and k not in self._running]:
                    del self._due[key]
                    self._running.add(key)
                    tg.start_soon(self._work, key)
                waiting = [due for k, due in self._due.items() if k not in self._running]
                await self._sleep(min(waiting) - now if waiting else math.inf)

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass on the clock or a key is added, whichever comes first."""
        async with anyio.create_task_group() as tg:
            async def timer() -> None:
                await self._clock.sleep(max(seconds, 0.0))
                tg.cancel_scope.cancel()

            if seconds != math.inf:
                tg.start_soon(timer)
            await self._wake.wait()
            tg.cancel_scope.cancel()

    async def _work(self, key: K) -> None:
        try:
            result = await self._reconcile(key)
        except TerminalError as exc:
            log.error("%s: %s failed for good: %s", self._name, key, exc)
            self._failures.pop(key, None)
        except Exception:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = self.backoff.delay(failures - 1)
            log.exception("%s: reconcile of %s failed (attempt %d); retrying in %.1fs",
                          self._name, key, failures, delay)
            self.add(key, after=delay)
        else:
            self._failures.pop(key, None)
            if result.requeue_after is not None:
                self.add(key, after=result.requeue_after)
        finally:
            self._running.discard(key)
            self._wake.set()
            self._progress.set()
            self._progress = anyio.Event()
