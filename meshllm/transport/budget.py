"""A budget for QUIC handshakes in flight, so a burst of dials cannot starve the event loop.

aioquic is pure Python: one handshake (TLS 1.3 key exchange and certificate, then meshllm's own
Ed25519 auth) costs milliseconds of CPU on each side. When many peers are lost at once (a partition
heals, a loaded loop timed out its neighbours, a node restarts into a large mesh), every one is
redialled at once; the handshakes keep the loop busy, the busy loop misses pings, and more peers are
lost. ``HandshakeBudget`` lets at most ``capacity`` dials handshake at a time and queues the rest in
order, by ``DialPriority``: confirming a suspected death first, redialling nodes held dead last.
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
from enum import IntEnum

import anyio

__all__ = ["BudgetStats", "DialPriority", "HandshakeBudget"]


class DialPriority(IntEnum):
    """Which dials go first when the budget is spent (lower first)."""

    URGENT = 0  # confirming a suspected death: its outcome gates a verdict
    NORMAL = 1  # joining, keeping this node's links
    BACKGROUND = 2  # redialling nodes held dead (how a partition heals): may wait


@dataclass
class BudgetStats:
    """What the budget did, for benchmarks and /api/status."""

    granted: int = 0
    queued: int = 0  # dials that had to wait for a slot
    waited_s: float = 0.0  # their waits, summed
    held_s: float = 0.0  # time slots were held (handshakes' wall time), summed
    longest_queue: int = 0


class HandshakeBudget:
    """At most ``capacity`` holders at once; the others wait in line, by priority, then in order.

    ``reserve`` more slots are open to urgent holders only, so a confirmation never waits behind a
    budget full of slow ordinary dials; background holders (dials to nodes held dead, which
    mostly run into their timeout) take at most half the capacity, so they never crowd out the
    dials that keep this node's links."""

    def __init__(self, capacity: int, *, reserve: int = 1) -> None:
        if capacity < 1:
            raise ValueError("a handshake budget needs room for at least one handshake")
        self.capacity = capacity
        self.reserve = reserve
        self.in_flight = 0
        self._background = 0  # of in_flight
        self._lines: dict[DialPriority, deque[anyio.Event]] = {p: deque() for p in DialPriority}
        self.stats = BudgetStats()

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    @asynccontextmanager
    async def slot(self, *, priority: DialPriority = DialPriority.NORMAL) -> AsyncIterator[None]:
        """Hold one slot for the body (a handshake); wait in line for it when the budget is spent."""
        await self._acquire(priority)
        held = anyio.current_time()
        try:
            yield
        finally:
            self.stats.held_s += anyio.current_time() - held
            self._release(priority)

    def _has_room(self, priority: DialPriority) -> bool:
        if priority is DialPriority.URGENT:
            return self.in_flight < self.capacity + self.reserve
        if priority is DialPriority.BACKGROUND and self._background >= max(1, self.capacity // 2):
            return False
        return self.in_flight < self.capacity

    def _start(self, priority: DialPriority) -> None:
        self.in_flight += 1
        self._background += priority is DialPriority.BACKGROUND
        self.stats.granted += 1

    async def _acquire(self, priority: DialPriority) -> None:
        ahead = any(self._lines[p] for p in DialPriority if p <= priority)
        if not ahead and self._has_room(priority):
            self._start(priority)
            return
        line = self._lines[priority]
        turn = anyio.Event()
        line.append(turn)
        self.stats.queued += 1
        self.stats.longest_queue = max(self.stats.longest_queue, self.waiting)
        started = anyio.current_time()
        try:
            await turn.wait()  # _admit counted this holder in before setting it
        except BaseException:
            if turn.is_set():  # the slot was handed over just as this waiter was cancelled
                self._release(priority)
            else:
                line.remove(turn)
            raise
        self.stats.waited_s += anyio.current_time() - started

    def _release(self, priority: DialPriority) -> None:
        self.in_flight -= 1
        self._background -= priority is DialPriority.BACKGROUND
        self._admit()

    def _admit(self) -> None:
        """Start waiters, most urgent first, while there is room for them."""
        for priority in DialPriority:
            line = self._lines[priority]
            while line and self._has_room(priority):
                self._start(priority)
                line.popleft().set()
