"""Tunnels: node-to-node services carried in QUIC streams, one stream kind each.

Above ``transport`` (and ``engine``, for the RPC key) and below ``reconcile`` and ``api``, which use
them through small protocols. A tunnel's serving end is a ``StreamService`` (``tunnels.service``) that
the node registers on its endpoint: the RPC tunnel (``tunnels.rpc``) takes a split host's ggml RPC to
its workers' rpc-servers, and the HTTP tunnel (``tunnels.http``) takes a request for a model another
node serves to that node's llama-server.
"""
