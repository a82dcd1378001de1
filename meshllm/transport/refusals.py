"""A bounded log of refused connection attempts.

Anyone can send UDP datagrams to a node's QUIC port, so a line per refused attempt lets a stranger
write to the node's log as fast as it can send (a junk flood once wrote 1.4 MB). ``RefusalLog`` logs
the first refusal, then at most one line per ``interval`` seconds that counts what was refused since,
with the sources seen most.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["RefusalLog"]

log = logging.getLogger("meshllm.transport.endpoint")


class RefusalLog:
    """Counts refused attempts and logs them at most once per ``interval`` seconds."""

    def __init__(self, *, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.total = 0
        self._pending: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._last = -interval

    def note(self, addr: tuple[str, int], reason: str) -> None:
        self.total += 1
        self._pending[addr[0]] += 1
        self._reasons[reason] += 1
        now = self.clock()
        if now - self._last < self.interval:
            return
        count = sum(self._pending.values())
        sources = ", ".join(f"{host} ({n})" for host, n in self._pending.most_common(3))
        reasons = "; ".join(f"{why} ({n})" for why, n in self._reasons.most_common(2))
        log.warning("refused %d QUIC connection attempt%s from %s: %s (counted, and logged at most every %gs)",
                    count, "s" if count > 1 else "", sources, reasons, self.interval)
        self._pending.clear()
        self._reasons.clear()
        self._last = now
