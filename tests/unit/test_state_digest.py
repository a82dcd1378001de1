"""The anti-entropy digest: equal replicas agree on it, a missed deletion shows, and a repair follows.

What a user would notice: a change lost on the way (a deletion included) still reaches every replica
within a few anti-entropy rounds, and a quiet mesh's anti-entropy costs a few bytes per round.
"""

from __future__ import annotations

import random

import anyio
import pytest
from pycrdt import Doc, Map

from meshllm.gossip import DocGossip, memory_channel_pair
from meshllm.gossip.digest import DIGEST_SIZE, state_digest
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def writes(n: int) -> list[bytes]:
    """``n`` updates from ``n`` writers, the last of which deletes a key the first wrote."""
    updates = []
    base = Doc()
    for i in range(n):
        before = base.get_state()
        table = base.get("t", type=Map)
        if i == n - 1:
            del table["k0"]
        else:
            table[f"k{i}"] = i
        updates.append(base.get_update(before))
        base = _copy(base)  # a fresh client id per writer, as on separate nodes
    return updates


def _copy(doc: Doc) -> Doc:
    other = Doc()
    other.apply_update(doc.get_update())
    return other


def replica(updates: list[bytes]) -> Doc:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def test_replicas_that_received_the_same_changes_in_any_order_share_a_digest() -> None:
    updates = writes(6)
    shuffled = updates[:]
    random.Random(3).shuffle(shuffled)
    a, b = replica(updates), replica(shuffled)
    assert len(state_digest(a)) == DIGEST_SIZE
    assert state_digest(a) == state_digest(b)


def test_a_missed_deletion_changes_the_digest_though_the_state_vectors_agree() -> None:
    updates = writes(4)
    whole, missing_delete = replica(updates), replica(updates[:-1])
    whole.get("t", type=Map)  # the same root on both
    missing_delete.get("t", type=Map)
    assert "k0" not in whole.get("t", type=Map) and "k0" in missing_delete.get("t", type=Map)
    assert state_digest(whole) != state_digest(missing_delete)


def test_a_missing_item_changes_the_digest() -> None:
    updates = writes(4)
    assert state_digest(replica(updates[:2])) != state_digest(replica(updates[:3]))


@pytest.mark.anyio
async def test_anti_entropy_repairs_a_change_the_flood_lost_and_costs_little_when_equal() -> None:
    sa, sb = MeshState(), MeshState()
    ga = DocGossip(sa.doc, node_id="a", anti_entropy=0.1, rng=random.Random(1))
    gb = DocGossip(sb.doc, node_id="b", anti_entropy=0.1, rng=random.Random(2))
    end_a, end_b = memory_channel_pair("a", "b")
    async with anyio.create_task_group() as tg:
        await tg.start(ga.run)
        await tg.start(gb.run)
        tg.start_soon(ga.attach, end_a)
        tg.start_soon(gb.attach, end_b)
        sa.put_model(ModelSpec(name="m", source="m"))
        with anyio.fail_after(3):
            while "m" not in sb.models():
                await anyio.sleep(0.01)
        # a deletion the flood never carries: written as if it came from b, so it is not sent back to b
        ga.delivering = ("b", 0)
        sa.doc.get("models", type=Map).pop("m")
        ga.delivering = None
        assert "m" not in sa.models() and "m" in sb.models()
        with anyio.fail_after(3):
            while "m" in sb.models():
                await anyio.sleep(0.01)
        assert ga.digest() == gb.digest()
        sent = ga.stats.bytes_sent + gb.stats.bytes_sent
        rounds = ga.stats.messages_sent + gb.stats.messages_sent
        with anyio.fail_after(5):  # ten anti-entropy rounds between equal replicas
            while ga.stats.messages_sent + gb.stats.messages_sent - rounds < 10:
                await anyio.sleep(0.01)
        probes = ga.stats.messages_sent + gb.stats.messages_sent - rounds
        assert ga.stats.bytes_sent + gb.stats.bytes_sent - sent == probes * (2 + DIGEST_SIZE)
        tg.cancel_scope.cancel()
