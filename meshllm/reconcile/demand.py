"""Demand: every request through this node's API counts for its model, and the count spreads.

The proxy calls ``DemandRecorder.note(model)`` per request (a few dictionary operations). Every
``flush_every`` seconds the recorder writes this node's ``DemandEntry`` for each model that changed:
the requests seen, the rate over the last minute, when it was last asked for and when that stops
meaning anything (``last_active + ttl``, 24 h by default). Summed over nodes, the entries are the
mesh's demand: placement keeps a model wanted while it lasts and adds replicas to hot ones. Entries
past their ``expires_at`` are ignored by everyone and removed by the janitor (see ``leases``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from meshllm.state.document import MeshState
from meshllm.state.schema import DemandEntry

__all__ = ["DEFAULT_TTL", "DemandRecorder"]

DEFAULT_TTL = 24 * 3600.0
WINDOW = 60.0  # the rate is requests over this many seconds, scaled to a minute


@dataclass
class _Tally:
    count: int = 0
    last_active: float = 0.0
    recent: deque[float] = field(default_factory=deque)
    published: tuple[int, float] | None = None  # (count, rate) last written


class DemandRecorder:
    def __init__(self, state: MeshState, *, node_id: str, ttl: float = DEFAULT_TTL, flush_every: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.node_id = node_id
        self.ttl = ttl
        self.flush_every = flush_every
        self.clock = clock
        self._tallies: dict[str, _Tally] = {}

    def note(self, model: str) -> None:
        """One request for ``model`` arrived here. Never raises; cheap enough for every request."""
        now = self.clock()
        tally = self._tallies.setdefault(model, _Tally())
        tally.count += 1
        tally.last_active = now
        tally.recent.append(now)

    def rate(self, model: str, now: float) -> float:
        tally = self._tallies.get(model)
        if tally is None:
            return 0.0
        while tally.recent and tally.recent[0] <= now - WINDOW:
            tally.recent.popleft()
        return round(len(tally.recent) * 60.0 / WINDOW, 3)

    def flush(self) -> int:
        """Write the entries that changed since the last flush; returns how many were written."""
        now = self.clock()
        written = 0
        for model, tally in self._tallies.items():
            rate = self.rate(model, now)
            if tally.published == (tally.count, rate):
                continue
            tally.published = (tally.count, rate)
            self.state.put_demand(DemandEntry(model=model, node=self.node_id, count=tally.count, rate=rate,
                                              last_active=tally.last_active,
                                              expires_at=tally.last_active + self.ttl))
            written += 1
        return written

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self.flush_every)
            self.flush()
