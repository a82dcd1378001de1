"""When a node republishes the RTTs it measured to its peers (``NodeStatus.rtt_ms``).

The split planner reads these RTTs to tell near peers from far ones; it needs them roughly, not
fresh. But every publication rewrites the node's entry on every replica: a flood that costs each
node a message per link, about N x degree messages mesh-wide (800 at 100 nodes). Republishing each
time a node's links changed made a forming mesh pay that for every join several times over: at 100
nodes, ~80 republications in the 15 s after the last join, four times the changes anyone made on
purpose, saturating the nodes' CPU and delaying real changes by seconds.

So a node publishes its first measurements promptly (a new node), and after that a link it has no
published RTT for waits for the hold-down: ``members / rate`` seconds since its last publication,
which keeps the whole mesh's republications near ``rate`` a second whatever its size (a few seconds
in a small mesh, minutes at hundreds of nodes). Waiting until every link of a new node was measured
once is not enough: in a forming mesh its links keep moving (and a finger may wait for a
handshake slot), so at 100 nodes most nodes were still "new" well after the last join. A link
that went away does not republish (its RTT stays a valid estimate), and a drift alone republishes
at most every ``refresh`` seconds. The planner falls back to the peer's own measurement of this
node while this one's waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from meshllm.state.schema import NodeId

__all__ = ["RttPublisher"]


class RttPublisher:
    """Decides, given the clock, when this node's measured RTTs are worth publishing."""

    def __init__(self, *, check_every: float = 5.0, rate: float = 0.5, refresh: float = 300.0,
                 drift_ms: float = 5.0) -> None:
        self.check_every = check_every
        self.rate = rate
        self.refresh = refresh
        self.drift_ms = drift_ms
        self._checked = float("-inf")
        self._published = float("-inf")

    def hold(self, members: int) -> float:
        """Seconds from one publication to the next (after the first)."""
        return max(self.check_every, members / self.rate)

    def due(self, now: float, measured: Mapping[NodeId, float], published: Mapping[NodeId, float],
            links: Set[NodeId], members: int) -> bool:
        """Whether to publish ``measured`` now, replacing ``published``; ``links`` are the peers this
        node keeps connections to, ``members`` the alive nodes of the mesh."""
        if now - self._checked < self.check_every:
            return False
        self._checked = now
        new = (measured.keys() & links) - published.keys()
        drifted = any(abs(ms - published[nid]) > max(0.5 * published[nid], self.drift_ms)
                      for nid, ms in measured.items() if nid in published)
        since = now - self._published
        if (new and (not published or since >= self.hold(members))) or (drifted and since >= self.refresh):
            self._published = now
            return True
        return False
