"""The overlay's choice of links: symmetric ring, few hops, bounded degree, fingers that stay put."""

from __future__ import annotations

import random
import statistics
from collections import deque

import pytest

from meshllm.gossip.overlay import fingers, links, ring_neighbours


def ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(n)]


def graph(members: list[str], ring: int = 2) -> dict[str, set[str]]:
    """The connections of a mesh where every node dials its links (a connection serves both ends)."""
    adj: dict[str, set[str]] = {m: set() for m in members}
    for m in members:
        for peer in links(m, members, ring=ring):
            adj[m].add(peer)
            adj[peer].add(m)
    return adj


def eccentricity(adj: dict[str, set[str]], start: str) -> int:
    hops = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for peer in adj[node]:
            if peer not in hops:
                hops[peer] = hops[node] + 1
                queue.append(peer)
    assert len(hops) == len(adj), "the overlay is not connected"
    return max(hops.values())


def test_ring_is_symmetric_and_small_meshes_are_fully_connected() -> None:
    members = ids(40)
    for a in members:
        for b in ring_neighbours(a, members, 2):
            assert a in ring_neighbours(b, members, 2)
    few = ids(5)
    assert set(links(few[0], few, ring=2)) == set(few[1:])


@pytest.mark.parametrize(("size", "max_hops"), [(10, 2), (50, 4), (100, 5), (200, 6)])
def test_fingers_cut_the_diameter_at_a_bounded_degree(size: int, max_hops: int) -> None:
    adj = graph(ids(size, seed=size))
    degrees = [len(peers) for peers in adj.values()]
    assert max(eccentricity(adj, m) for m in adj) <= max_hops  # the ring alone: size / 4 hops
    assert statistics.mean(degrees) <= 8.5
    assert max(degrees) <= 18


def test_a_join_moves_few_fingers() -> None:
    """Growing a mesh to 100 nodes, one at a time, moves each node's fingers a handful of times;
    fingers at a fixed share of the sorted members would move on nearly every join."""
    members: list[str] = []
    before: dict[str, list[str]] = {}
    moves = joins = 0
    for new in ids(100, seed=7):
        members.append(new)
        now = {m: fingers(m, members) for m in members}
        if len(members) > 10:
            joins += 1
            moves += sum(len(set(now[m]) - set(before[m])) for m in before)
        before = now
    assert moves / joins < 4  # moved fingers in the whole mesh per join (each node has two)


def test_fingers_are_deterministic_and_never_self() -> None:
    members = ids(60)
    shuffled = random.Random(1).sample(members, len(members))
    for m in members:
        mine = fingers(m, members)
        assert mine == fingers(m, shuffled)
        assert m not in mine
        assert 1 <= len(mine) <= 2
    assert fingers(members[0], [members[0]]) == []


def test_a_departure_moves_only_the_fingers_that_pointed_at_it() -> None:
    members = ids(80, seed=3)
    gone = members[5]
    rest = [m for m in members if m != gone]
    for m in rest:
        old, new = fingers(m, members), fingers(m, rest)
        if gone not in old:
            assert new == old
