"""Local health: how late this process's event loop runs, so the failure detector can discount it.

A peer's silence is evidence against the peer only while this node was listening. When this
process's event loop runs behind (starved of CPU by a burst of QUIC handshakes, by other work on a
small machine, by dozens of nodes in one benchmark process), datagrams wait in the socket, timers
fire late, and every peer looks silent at once. A detector that trusts its own clock then declares
live peers dead; they are redialled, the pure-Python handshakes load the loop further, and the mesh
stays overloaded after whatever started it has passed (seen at 100 nodes on 2 cores, see
bench/README.md). Lifeguard (Dadgar, Phillips and Currey, 2018) calls the remedy local health
awareness: a node that is itself slow widens its timeouts before it suspects others.

``LoopHealth`` samples the loop's lateness with a periodic timer (``run``) and offers the detector:

- ``multiplier``: a factor >= 1 for timeouts, grown by the lateness seen lately (it decays with a
  half-life of ``HealthSettings.memory``), bounded by ``max_multiplier``;
- ``stalled_since(t)``: how long this loop ran late since ``t``, so silence gathered while this
  node was not listening is not counted against a peer;
- ``allowance(base, since)``: both together, the silence a peer may show since ``since`` before it
  is suspected: ``base * multiplier + stalled_since(since)``, never more than
  ``base * max_multiplier``. An unloaded loop gets ``base`` exactly, and a real death is declared
  at most ``base * (max_multiplier - 1)`` later on a loaded one.

One instance serves every endpoint of a process (the loop is the process's); whoever creates it
runs it. Time is injected (``clock``) so the arithmetic is tested without an event loop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

__all__ = ["HealthSettings", "LoopHealth"]


@dataclass(frozen=True)
class HealthSettings:
    """How the loop is sampled and how its lateness turns into wider timeouts.

    ``floor``: lateness below it is ordinary scheduling noise and widens nothing. ``lag_scale``:
    the recent lateness (beyond the floor) that doubles the timeouts. ``memory``: half-life of a
    late sample's effect, long enough to cover a timeout that started while the loop was late.
    ``history``: how far back ``stalled_since`` can look (longer than any timeout it serves).
    """

    period: float = 0.1
    floor: float = 0.05
    lag_scale: float = 0.5
    max_multiplier: float = 2.0
    memory: float = 5.0
    history: float = 30.0


class LoopHealth:
    """The lateness of this process's event loop, recorded by ``run`` (or fed to ``record``)."""

    def __init__(self, settings: HealthSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or HealthSettings()
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque()  # (woke at, late by), late ones only
        self._score = 0.0  # the recent lateness, decayed to _score_at
        self._score_at = 0.0
        self.worst = 0.0  # the latest wake-up seen (for benchmarks and /api/status)

    # -- recording --------------------------------------------------------------------------
    def record(self, woke_at: float, late: float) -> None:
        """A timer due at ``woke_at - late`` ran at ``woke_at``."""
        if late <= 0.0:
            return
        self.worst = max(self.worst, late)
        self._score = max(self._decayed(woke_at), late)
        self._score_at = woke_at
        if late > self.settings.floor:
            self._samples.append((woke_at, late))
        horizon = woke_at - self.settings.history
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample the loop every ``period`` until cancelled."""
        period = self.settings.period
        task_status.started()
        while True:
            before = self.clock()
            await anyio.sleep(period)
            now = self.clock()
            self.record(now, now - before - period)

    # -- reading ----------------------------------------------------------------------------
    def _decayed(self, now: float) -> float:
        elapsed = max(0.0, now - self._score_at)
        return self._score * math.pow(0.5, elapsed / self.settings.memory)

    @property
    def recent_lag(self) -> float:
        """Lateness seen lately (seconds), decayed by age."""
        return self._decayed(self.clock())

    @property
    def multiplier(self) -> float:
        """How much wider than normal timeouts should be now: 1 on a punctual loop."""
        s = self.settings
        excess = max(0.0, self.recent_lag - s.floor)
        return min(s.max_multiplier, 1.0 + excess / s.lag_scale)

    def stalled_since(self, since: float) -> float:
        """Seconds after ``since`` this loop spent running late (beyond the noise floor)."""
        stalled = 0.0
        for woke_at, late in reversed(self._samples):
            if woke_at <= since:
                break
            stalled += min(late, woke_at - since)
        return stalled

    def allowance(self, base: float, since: float) -> float:
        """The silence since ``since`` a peer may show before it is suspected (see the module doc)."""
        return min(base * self.multiplier + self.stalled_since(since), base * self.settings.max_multiplier)
