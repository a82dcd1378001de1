"""Time and retry policy for the controller runtime, injected so that tests run on a fake clock.

``Clock`` is what every controller, the runner and the process supervisor ask for the time and sleep
on: ``SystemClock`` in a node, ``meshllm.testing.fakes.FakeClock`` in unit tests, which only moves when
a test advances it. ``Backoff`` is the one retry policy of the runtime: a failed reconcile is retried
after it, and a crashed engine process is started again after it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Protocol

import anyio

__all__ = ["Backoff", "Clock", "SystemClock"]


class Clock(Protocol):
    """Where the runtime gets the time from."""

    def now(self) -> float:
        """Seconds since the epoch: what statuses in the document carry (comparable across nodes)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: what due times and timeouts are measured on."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` on this clock."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


@dataclass
class Backoff:
    """Exponential backoff with jitter: attempt ``n`` (0 first) waits ``min(cap, base * 2**n)`` times a
    factor drawn uniformly from ``[1 - spread, 1 + spread]`` (jitter keeps many retries from aligning)."""

    base: float = 0.5
    cap: float = 30.0
    spread: float = 0.2
    rng: random.Random = field(default_factory=random.Random)

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The shortest and longest wait of ``attempt``."""
        nominal = min(self.cap, self.base * 2 ** min(attempt, 64))
        return nominal * (1 - self.spread), nominal * (1 + self.spread)

    def delay(self, attempt: int) -> float:
        """A wait for ``attempt``, drawn within ``bounds(attempt)``."""
        low, high = self.bounds(attempt)
        return self.rng.uniform(low, high)
