"""Replicating the state document between nodes: the sync protocol over message channels."""

from meshllm.gossip.channel import MessageChannel, memory_channel_pair
from meshllm.gossip.sync import DocGossip

__all__ = ["DocGossip", "MessageChannel", "memory_channel_pair"]
