"""The overlay: which peers a node keeps connections to, as pure functions of the alive members.

Nodes sit on a hash ring (a node's position is a hash of its id, so positions are uniform whatever
the ids look like). Each node links to its ``ring`` nearest neighbours on either side, which keeps
the overlay connected and each node watched by its neighbours, but alone makes a change cross N/2k
hops (17 at 100 nodes with three a side). So each node also keeps a few long links ("fingers"),
one per offset (half, quarter of the ring): among the members within half a ``window`` of its
position + offset, the one with the highest rendezvous score for (node, offset, member). That cuts
the diameter to 4-5 hops at 100 nodes with two neighbours a side and two fingers.

Why rendezvous inside a window, not Chord's plain successor or the member a quarter of the ring
away by index: the index-based finger moves on every join (everyone's quarter-ring member shifts),
which churned connections while a mesh formed; the successor moves only when a joiner lands just
before it, but concentrates links on members after a large gap (at 100 nodes some had 25). A
rendezvous finger moves only when the joiner lands in the window and outscores the incumbent, about
1/N per join, and the winners are spread evenly, so incoming fingers stay near one per offset.

Fingers are not symmetric: the node that wants a finger dials it and is the one that closes it
when it no longer wants it (see ``Membership._prune``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import lru_cache

from meshllm.state.schema import NodeId

__all__ = ["FINGERS", "FINGER_WINDOW", "fingers", "links", "ring_neighbours", "ring_position"]

FINGERS = (0.5, 0.25)  # finger offsets, as fractions of the ring
FINGER_WINDOW = 0.25  # the arc (a fraction of the ring), centred on each offset, a finger is chosen from


@lru_cache(maxsize=8192)
def ring_position(node_id: NodeId) -> float:
    """Where ``node_id`` sits on the ring, in [0, 1)."""
    digest = hashlib.blake2b(node_id.encode(), digest_size=8, person=b"meshllm-ring").digest()
    return int.from_bytes(digest, "big") / 2**64


def _score(me: NodeId, slot: int, member: NodeId) -> bytes:
    return hashlib.blake2b(f"{me}|{slot}|{member}".encode(), digest_size=8, person=b"meshllm-fngr").digest()


def _ring(me: NodeId, members: Iterable[NodeId]) -> list[NodeId]:
    return sorted(set(members) | {me}, key=lambda m: (ring_position(m), m))


def ring_neighbours(me: NodeId, members: Sequence[NodeId], k: int) -> list[NodeId]:
    """The ``k`` nearest members on each side of ``me`` on the ring (symmetric: b is a's
    neighbour exactly when a is b's). Everyone else when there are at most ``2k`` of them."""
    ring = _ring(me, members)
    if len(ring) <= 2 * k + 1:
        return [m for m in ring if m != me]
    at = ring.index(me)
    chosen = {ring[(at + i) % len(ring)] for i in range(1, k + 1)}
    chosen |= {ring[(at - i) % len(ring)] for i in range(1, k + 1)}
    return sorted(chosen)


def _arc(a: float, b: float) -> float:
    """The distance from ``a`` to ``b`` going round the ring either way."""
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def fingers(me: NodeId, members: Sequence[NodeId], *, offsets: Sequence[float] = FINGERS,
            window: float = FINGER_WINDOW) -> list[NodeId]:
    """This node's long links: one member per offset (fewer when two offsets pick the same one).

    For each offset, the members within ``window / 2`` of ``me``'s position + offset compete by
    rendezvous score; when that arc is empty (a small mesh), the first member after the target
    position wins."""
    others = sorted(set(members) - {me})
    if not others:
        return []
    here = ring_position(me)
    chosen: list[NodeId] = []
    for slot, offset in enumerate(offsets):
        target = (here + offset) % 1.0
        near = [m for m in others if _arc(ring_position(m), target) <= window / 2]
        if near:
            pick = max(near, key=lambda m: _score(me, slot, m))
        else:
            pick = min(others, key=lambda m: ((ring_position(m) - target) % 1.0, m))
        if pick not in chosen:
            chosen.append(pick)
    return chosen


def links(me: NodeId, members: Sequence[NodeId], *, ring: int, offsets: Sequence[float] = FINGERS,
          window: float = FINGER_WINDOW) -> set[NodeId]:
    """The peers ``me`` wants connections to: its ring neighbours and its fingers."""
    wanted = set(ring_neighbours(me, members, ring))
    if len(wanted) < len(set(members) - {me}):  # a small mesh is fully connected by the ring alone
        wanted |= set(fingers(me, members, offsets=offsets, window=window))
    return wanted
