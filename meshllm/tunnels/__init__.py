"""Tunnels: the node-to-node services carried in QUIC streams, above ``transport`` and below the parts that use them.

The HTTP tunnel takes a request for a model served by another node to that node's llama-server; the
RPC tunnel (``tunnels.rpc``) takes a split host's ggml RPC to its workers' rpc-servers. Each serves one
stream kind: a ``StreamService`` (``tunnels.service``) that the node registers on its endpoint.
"""
