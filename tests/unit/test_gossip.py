"""Gossip of the state document over in-memory channels: flooding, healing, bad input."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import TaskGroup
from pycrdt import YMessageType, YSyncMessageType, handle_sync_message

from meshllm.gossip import DocGossip, memory_channel_pair
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeStatus


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


def make_nodes(n: int) -> list[tuple[MeshState, DocGossip]]:
    nodes = []
    for i in range(n):
        state = MeshState()
        nodes.append((state, DocGossip(state.doc, node_id=f"n{i}", anti_entropy=0.2, rng=random.Random(i))))
    return nodes


async def link(tg: TaskGroup, a: DocGossip, b: DocGossip) -> Callable[[], None]:
    """Connect two replicas; returns a function that cuts the link."""
    end_a, end_b = memory_channel_pair(a.node_id, b.node_id)
    scope = anyio.CancelScope()

    async def run() -> None:
        with scope:
            async with anyio.create_task_group() as inner:
                inner.start_soon(a.attach, end_a)
                inner.start_soon(b.attach, end_b)

    tg.start_soon(run)
    return scope.cancel


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


@asynccontextmanager
async def running(nodes: list[tuple[MeshState, DocGossip]]) -> AsyncIterator[TaskGroup]:
    async with anyio.create_task_group() as tg:
        for _, gossip in nodes:
            await tg.start(gossip.run)
        yield tg
        tg.cancel_scope.cancel()


async def test_a_change_floods_a_chain_of_nodes() -> None:
    nodes = make_nodes(5)
    async with running(nodes) as tg:
        for (_, a), (_, b) in zip(nodes, nodes[1:], strict=False):
            await link(tg, a, b)
        first, last = nodes[0][0], nodes[-1][0]
        first.put_model(ModelSpec(name="m", source="m"))
        await until(lambda: "m" in last.models())
        last.put_node(NodeStatus(id="n4", capacity_bytes=123))
        await until(lambda: first.nodes().get("n4") is not None)
        assert first.nodes()["n4"].capacity_bytes == 123


async def test_a_partition_heals_and_both_sides_keep_their_changes() -> None:
    (sa, ga), (sb, gb) = make_nodes(2)
    async with running([(sa, ga), (sb, gb)]) as tg:
        cut = await link(tg, ga, gb)
        sa.put_model(ModelSpec(name="before", source="x"))
        await until(lambda: "before" in sb.models())
        cut()
        await until(lambda: not ga.sessions and not gb.sessions)
        sa.put_model(ModelSpec(name="left", source="x"))
        sb.put_model(ModelSpec(name="right", source="x"))
        sb.remove_model("before")
        await link(tg, ga, gb)
        await until(lambda: sa.models() == sb.models() and "right" in sa.models())
        assert set(sa.models()) == {"left", "right"}  # the removal crossed too


async def test_malformed_messages_are_dropped_and_the_session_survives() -> None:
    (sa, ga), (sb, gb) = make_nodes(2)
    async with running([(sa, ga), (sb, gb)]) as tg:
        end_a, end_b = memory_channel_pair("n0", "n1")
        tg.start_soon(ga.attach, end_a)
        for junk in (b"", b"\xff\xff", b"\x00\x02\xff\xff\xff", b"\x00\x00\x05abc"):
            await end_b.send(junk)
        await until(lambda: ga.stats.malformed >= 3)
        session = ga.sessions["n1"]
        tg.start_soon(gb.attach, end_b)
        sa.put_model(ModelSpec(name="m", source="m"))
        await until(lambda: "m" in sb.models())
        assert ga.sessions["n1"] is session  # the junk did not end the session that then carried the change
        assert sb.models()["m"].source == "m"


class GatedChannel:
    """A channel to a peer that reads nothing until ``gate`` is set; it records what was sent."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.gate = anyio.Event()
        self.sent: list[bytes] = []

    async def send(self, message: bytes) -> None:
        await self.gate.wait()
        self.sent.append(message)

    async def receive(self) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


def updates_in(messages: list[bytes]) -> list[bytes]:
    return [m for m in messages if m[:2] == bytes([YMessageType.SYNC, YSyncMessageType.SYNC_UPDATE])]


async def test_changes_queued_behind_a_slow_peer_leave_as_one_message_holding_all() -> None:
    [(state, gossip)] = make_nodes(1)
    channel = GatedChannel("slow")
    async with running([(state, gossip)]) as tg:
        await tg.start(gossip.attach, channel)
        await until(lambda: gossip.sessions["slow"].outbox.statistics().current_buffer_used == 0)
        for i in range(10):  # the writer is stuck sending the session's first message (sync step 1)
            state.put_model(ModelSpec(name=f"m{i}", source="x"))
        channel.gate.set()
        await until(lambda: len(updates_in(channel.sent)) == 1 and gossip.stats.merged == 9)
        replica = MeshState()
        for message in channel.sent:
            handle_sync_message(message[1:], replica.doc)
        assert set(replica.models()) == {f"m{i}" for i in range(10)}


async def test_a_batch_stops_at_max_batch_and_keeps_other_messages_in_order() -> None:
    state = MeshState()
    gossip = DocGossip(state.doc, node_id="n0", anti_entropy=60, max_batch=4)
    channel = GatedChannel("slow")
    async with running([(state, gossip)]) as tg:
        await tg.start(gossip.attach, channel)
        await until(lambda: gossip.sessions["slow"].outbox.statistics().current_buffer_used == 0)
        for i in range(6):
            state.put_model(ModelSpec(name=f"m{i}", source="x"))
        gossip.sessions["slow"].outbox.send_nowait(b"marker")  # a whole message, queued after the changes
        state.put_model(ModelSpec(name="late", source="x"))
        channel.gate.set()
        await until(lambda: len(channel.sent) == 5)
        kinds = ["update" if m in updates_in(channel.sent) else m[:6] for m in channel.sent[1:]]
        assert kinds == ["update", "update", b"marker", "update"]  # 4 + 2 merged, the marker, then "late"
        assert gossip.stats.merged == 3 + 1
