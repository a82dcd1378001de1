"""Expert shard planning and placement: how many shards, which experts, on which nodes; sticky; failover."""

from __future__ import annotations

import pytest

from meshllm.moe.plan import NoShards, ShardLayout, core_size, experts_per_shard, plan_layout, shard_experts
from meshllm.reconcile.placement import plan_placement
from meshllm.reconcile.shards import (
    Drop, Fail, Retry, Reuse, ShardActual, ShardFile, ShardTarget, ShardUnavailable, ShardWaiting, Wait, Write,
    plan_shard,
)
from meshllm.state.schema import ModelSpec, NodeStatus, PlacementLease

MB = 10**6
NOW = 1_000_000.0


@pytest.mark.parametrize("n_expert, n_used, fraction, core", [
    (8, 2, 0.5, 4), (128, 8, 0.5, 64), (8, 2, 0.0, 2), (8, 2, 1.0, 8), (64, 8, 0.1, 8), (8, 2, 7.0, 8),
])
def test_the_core_is_the_top_share_but_never_fewer_than_the_experts_a_token_uses(
        n_expert: int, n_used: int, fraction: float, core: int) -> None:
    assert core_size(n_expert, n_used, fraction) == core


# trunk 20 MB, 8 experts of 10 MB (a 100 MB model): a shard of k experts is 20 + 10 k MB, needs 1.1x that
@pytest.mark.parametrize("capacities, expected", [
    ({"a": 95, "b": 95, "c": 95}, (3, 6, 1, ("a", "b", "c"))),  # 6 experts need 88 MB; 7 (two copies) 99
    ({"a": 120, "b": 120, "c": 120}, (3, 7, 2, ("a", "b", "c"))),  # room for every expert on two nodes
    ({"a": 120, "b": 120}, (2, 8, 2, ("a", "b"))),  # two copies on two nodes: each keeps every expert
    ({"a": 95, "b": 95, "c": 30}, (2, 6, 1, ("a", "b"))),  # c cannot hold any shard: two shards
    ({"b": 95, "a": 95, "c": 95, "d": 95}, (4, 6, 2, ("a", "b", "c", "d"))),  # ties by node id
])
def test_the_shard_count_takes_every_node_that_can_hold_a_shard(capacities: dict[str, int],
                                                                expected: tuple[int, int, int, tuple[str, ...]]) -> None:
    layout = plan_layout(n_expert=8, n_used=2, trunk_bytes=20 * MB, expert_bytes=10 * MB,
                         capacities={k: v * MB for k, v in capacities.items()})
    assert isinstance(layout, ShardLayout), layout
    assert (layout.shards, layout.experts, layout.copies, layout.nodes) == expected
    assert layout.core == 4 and layout.shard_bytes == (20 + 10 * layout.experts) * MB


@pytest.mark.parametrize("capacities, reason", [({"a": 500}, "TooFewNodes"), ({"a": 80, "b": 80}, "NoCapacity")])
def test_no_layout_says_why(capacities: dict[str, int], reason: str) -> None:
    layout = plan_layout(n_expert=8, n_used=2, trunk_bytes=20 * MB, expert_bytes=10 * MB,
                         capacities={k: v * MB for k, v in capacities.items()})
    assert isinstance(layout, NoShards) and layout.reason == reason, layout


@pytest.mark.parametrize("n_expert, n_used, shards, copies", [(8, 2, 3, 1), (8, 2, 3, 2), (128, 8, 5, 2),
                                                               (128, 8, 7, 1), (16, 4, 2, 1), (8, 8, 3, 1)])
def test_every_expert_lives_on_copies_shards_and_every_shard_keeps_the_core(
        n_expert: int, n_used: int, shards: int, copies: int) -> None:
    ranks = [list(range(n_expert)), list(reversed(range(n_expert)))]  # layers rank experts differently
    core = core_size(n_expert, n_used)
    layouts = [shard_experts(ranks, core=core, shards=shards, copies=copies, index=i) for i in range(shards)]
    for layer, order in enumerate(ranks):
        kept = [set(layout[layer]) for layout in layouts]
        assert all(set(order[:core]) <= k for k in kept)  # the core everywhere
        assert all(n_used <= len(k) <= experts_per_shard(n_expert, core, shards, copies) for k in kept)
        for expert in order[core:]:
            assert sum(expert in k for k in kept) == min(copies, shards)
        assert len({len(k) for k in kept}) <= 2  # as even as can be
    for layer in range(2):  # one count per shard across layers: one expert_count for its file
        assert len(layouts[0][layer]) == len(layouts[0][0])


def moe_spec(*, split: bool = False) -> ModelSpec:
    return ModelSpec(name="x", source="/m/x.gguf", size_bytes=100 * MB, experts=8, experts_used=2,
                     expert_bytes=10 * MB, split=split)


def nodes(**capacities: int) -> dict[str, NodeStatus]:
    return {nid: NodeStatus(id=nid, capacity_bytes=mb * MB, incarnation=1.0) for nid, mb in capacities.items()}


def plan(model: ModelSpec, alive: dict[str, NodeStatus], leases: list[PlacementLease] | None = None):  # type: ignore[no-untyped-def]
    return plan_placement({model.name: model}, alive, {le.key: le for le in leases or []}, {}, [], now=NOW)


def test_an_moe_model_no_node_holds_gets_one_slot_per_shard_on_distinct_nodes() -> None:
    p = plan(moe_spec(), nodes(a=95, b=95, c=95))
    slots = sorted(p.slots.values(), key=lambda s: s.slot)
    assert [(s.slot, s.node, s.shards, s.expert_core, s.expert_copies) for s in slots] == [
        (0, "a", 3, 4, 1), (1, "b", 3, 4, 1), (2, "c", 3, 4, 1)]
    assert p.wanted["x"] == 3 and "x" not in p.reasons
    assert not any(s.workers for s in slots)  # never a layer split


def test_split_forces_expert_shards_and_a_dense_model_still_splits_by_layers() -> None:
    p = plan(moe_spec(split=True), nodes(a=500, b=500))
    assert sorted((s.node, s.shards) for s in p.slots.values()) == [("a", 2), ("b", 2)]
    assert sum(s.shards for s in plan(moe_spec(), nodes(a=500, b=500)).slots.values()) == 0  # fits: solo


def shard_lease(node: str, slot: int, shards: int = 3) -> PlacementLease:
    return PlacementLease(model="x", slot=slot, node=node, incarnation=1.0, shards=shards, expert_core=4,
                          expert_copies=1)


def test_running_shards_stay_and_a_dead_nodes_shard_goes_to_a_spare_node() -> None:
    running = [shard_lease("c", 0), shard_lease("a", 1), shard_lease("b", 2)]
    p = plan(moe_spec(), nodes(a=95, b=95, c=95, d=95), running)
    assert p.wanted["x"] == 4  # a fourth node can take a shard: four smaller shards
    kept = plan(moe_spec(), nodes(a=95, b=95, c=95), running)
    assert sorted((s.slot, s.node) for s in kept.slots.values()) == [(0, "c"), (1, "a"), (2, "b")]
    # b dies; d (a standby) takes its shard, the others stay
    after = plan(moe_spec(), nodes(a=95, c=95, d=95), running)
    assert sorted((s.slot, s.node) for s in after.slots.values()) == [(0, "c"), (1, "a"), (2, "d")]
    # b dies and no node has room: the shard is vacant, the reason says its sessions go to the others
    vacant = plan(moe_spec(), nodes(a=95, c=95, d=50), running)
    assert sorted((s.slot, s.node) for s in vacant.slots.values()) == [(0, "c"), (1, "a")]
    assert vacant.reasons["x"][0] == "ShardVacant" and "other shards" in vacant.reasons["x"][1]


def test_an_moe_file_that_cannot_be_split_stays_pending_with_its_reason() -> None:
    bad = moe_spec().model_copy(update={"experts": 0, "moe_problem": "UnknownMoeArchitecture: arch 'foo' ..."})
    p = plan(bad, nodes(a=95, b=95))
    assert not p.slots and p.reasons["x"] == ("UnknownMoeArchitecture", "arch 'foo' ...")


TARGET = ShardTarget("x", 0, 3, source=__import__("pathlib").Path("/m/x.gguf"), source_fingerprint="f",
                     layers=(0,), experts=((0, 1, 2, 3, 4, 5),), out=__import__("pathlib").Path("/s/x-1of3.gguf"))


@pytest.mark.parametrize("desired, known, on_disk, now, expected", [
    (TARGET, ShardFile(), False, NOW, [Write(TARGET)]),
    (TARGET, ShardFile(), True, NOW, [Reuse(TARGET)]),  # written before (this run or an earlier one): reused
    (TARGET, ShardFile(TARGET, "writing"), False, NOW, []),
    (TARGET, ShardFile(TARGET, "ready"), True, NOW, []),
    (TARGET, ShardFile(TARGET, "failed", at=NOW - 10), False, NOW, [Retry("x", NOW + 50)]),  # no crash loop
    (TARGET, ShardFile(TARGET, "failed", at=NOW - 70), False, NOW, [Write(TARGET)]),
    (ShardUnavailable("x", "bad"), ShardFile(), False, NOW, [Fail("x", "bad")]),
    (ShardUnavailable("x", "bad"), ShardFile(phase="failed", message="bad"), False, NOW, []),
    (ShardWaiting("x", "stats"), ShardFile(), False, NOW, [Wait("x", "stats")]),  # no order yet: nothing written
    (ShardWaiting("x", "stats"), ShardFile(phase="waiting", message="stats"), False, NOW, []),
    (TARGET, ShardFile(phase="waiting", message="stats"), False, NOW, [Write(TARGET)]),  # the order came
    (None, ShardFile(TARGET, "ready"), False, NOW, [Drop("x")]),
    (None, ShardFile(), False, NOW, []),
])
def test_the_shard_controller_plan(desired: object, known: ShardFile, on_disk: bool, now: float,
                                   expected: list[object]) -> None:
    assert plan_shard(desired, ShardActual("x", known, on_disk=on_disk), now) == expected  # type: ignore[arg-type]


def test_the_core_share_is_tunable_from_a_manifest() -> None:
    from meshllm.state.manifest import manifest_models, validate_documents

    loaded = validate_documents([{"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": "x"},
                                  "spec": {"source": "/m/x.gguf", "placement": {"split": True, "expertCore": 0}}}],
                                source_name="test")
    (model,) = manifest_models(loaded)
    assert model.spec.expert_core == 0.0 and model.spec.split
    spec = model.spec.model_copy(update={"size_bytes": 100 * MB, "experts": 8, "experts_used": 2,
                                         "expert_bytes": 10 * MB})
    slots = plan(spec, nodes(a=500, b=500)).slots.values()
    assert {s.expert_core for s in slots} == {2}  # the experts a token uses, no more


def test_a_forced_split_served_alone_while_its_node_was_alone_is_split_once_a_peer_comes() -> None:
    alone = plan(moe_spec(split=True), nodes(a=500))
    (slot,) = alone.slots.values()
    assert slot.node == "a" and not slot.shards
    solo = PlacementLease(model="x", slot=0, node="a", incarnation=1.0)
    later = plan(moe_spec(split=True), nodes(a=500, b=500), [solo])
    assert sorted((s.node, s.shards) for s in later.slots.values()) == [("a", 2), ("b", 2)]
