"""A budget for QUIC handshakes in flight, so a burst of dials cannot starve the event loop.

aioquic is pure Python: one handshake (TLS 1.3 key exchange and certificate, then meshllm's own
Ed25519 auth) costs milliseconds of CPU on each side. When many peers are lost at once (a partition
heals, a loaded loop timed out its neighbours, a node restarts into a large mesh), every one is
redialled at once; the handshakes keep the loop busy, the busy loop misses pings, and more peers are
lost. ``HandshakeBudget`` lets at most ``capacity`` dials handshake at a time and queues the rest in
order, urgent ones (confirming a suspected death, whose outcome gates a verdict) ahead of the others.
A queued dial's own timeout starts only once it holds a slot (``QuicEndpoint.connect``), so waiting
in line never reads as an unreachable peer.

One budget serves every endpoint of a process when they share its loop (the benchmark runs dozens
per process); by default each endpoint has its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

__all__ = ["BudgetStats", "HandshakeBudget"]


@dataclass
class BudgetStats:
    """What the budget did, for benchmarks and /api/status."""

    granted: int = 0
    queued: int = 0  # dials that had to wait for a slot
    waited_s: float = 0.0  # their waits, summed
    held_s: float = 0.0  # time slots were held (handshakes' wall time), summed
    longest_queue: int = 0


class HandshakeBudget:
    """At most ``capacity`` holders at once; the others wait in line, urgent ones first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a handshake budget needs room for at least one handshake")
        self.capacity = capacity
        self.in_flight = 0
        self._urgent: deque[anyio.Event] = deque()
        self._normal: deque[anyio.Event] = deque()
        self.stats = BudgetStats()

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._normal)

    @asynccontextmanager
    async def slot(self, *, urgent: bool = False) -> AsyncIterator[None]:
        """Hold one slot for the body (a handshake); wait in line for it when the budget is spent."""
        await self._acquire(urgent)
        held = anyio.current_time()
        try:
            yield
        finally:
            self.stats.held_s += anyio.current_time() - held
            self._release()

    async def _acquire(self, urgent: bool) -> None:
        if self.in_flight < self.capacity and not self.waiting:
            self.in_flight += 1
            self.stats.granted += 1
            return
        line = self._urgent if urgent else self._normal
        turn = anyio.Event()
        line.append(turn)
        self.stats.queued += 1
        self.stats.longest_queue = max(self.stats.longest_queue, self.waiting)
        started = anyio.current_time()
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # the slot was handed over just as this waiter was cancelled
                self._release()
            else:
                line.remove(turn)
            raise
        self.stats.granted += 1
        self.stats.waited_s += anyio.current_time() - started

    def _release(self) -> None:
        """Hand the slot to the next in line (it stays counted in flight), or free it."""
        for line in (self._urgent, self._normal):
            if line:
                line.popleft().set()
                return
        self.in_flight -= 1
