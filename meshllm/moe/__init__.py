"""Mixture-of-experts models split by experts: each node serves its own GGUF with the whole trunk and a
subset of the experts, so nodes exchange nothing while they decode.

- ``detect``: is a GGUF an MoE model llama.cpp can run with fewer experts, and its shape (header only);
- ``importance``: how much each expert is used (routing statistics), for choosing the shared core;
- ``plan``: how many shards the nodes' capacities allow and which experts each shard keeps (pure);
- ``shard``: write one shard's GGUF from the whole model, streamed, and check a written one.
"""
