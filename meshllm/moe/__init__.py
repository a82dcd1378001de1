"""Mixture-of-experts models split by experts: each node serves its own GGUF with the whole trunk and a
subset of the experts, so nodes exchange nothing while they decode.

- ``detect``: is a GGUF an MoE model llama.cpp can run with fewer experts, and its shape (header only);
- ``importance``: how much each expert is used (routing statistics), for choosing the shared core;
- ``order``: the order every node deals a model's experts in, and each shard's routing-mass figure;
- ``plan``: how many shards the nodes' capacities allow and which experts each shard keeps (pure);
- ``shard``: write one shard's GGUF from the whole model, streamed, and check a written one.
"""

from meshllm.moe.detect import MoeInfo, detect_moe
from meshllm.moe.order import ExpertOrder, Waiting, expert_order, mass_line, order_note
from meshllm.moe.plan import (
    NoShards,
    ShardLayout,
    composition_digest,
    experts_per_shard,
    plan_layout,
    shard_experts,
)
from meshllm.moe.quality import read_quality
from meshllm.moe.shard import ShardCancelled, shard_ready, write_shard
from meshllm.moe.spec import moe_spec_fields, problem_of

__all__ = [
    "ExpertOrder",
    "MoeInfo",
    "NoShards",
    "ShardCancelled",
    "ShardLayout",
    "Waiting",
    "composition_digest",
    "detect_moe",
    "expert_order",
    "experts_per_shard",
    "mass_line",
    "moe_spec_fields",
    "order_note",
    "plan_layout",
    "problem_of",
    "read_quality",
    "shard_experts",
    "shard_ready",
    "write_shard",
]
