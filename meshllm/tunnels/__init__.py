"""Tunnels: node-to-node services carried in QUIC streams, one stream kind each.

Above ``transport`` (and ``engine``, for the RPC key) and below ``reconcile`` and ``api``, which use
them through small protocols. A tunnel's serving end is a ``StreamService`` (``tunnels.service``) that
the node registers on its endpoint: the RPC tunnel (``tunnels.rpc``) takes a split host's ggml RPC to
its workers' rpc-servers, and the HTTP tunnel (``tunnels.http``) takes a request for a model another
node serves to that node's llama-server.
"""

from meshllm.tunnels.http import (
    Answer,
    HttpTunnelClient,
    HttpTunnelServer,
    TunnelBroken,
    TunnelRequest,
    TunnelUnavailable,
)
from meshllm.tunnels.models import ModelFileServer, PeerRanges, local_copies
from meshllm.tunnels.rpc import RpcTunnelClient, RpcTunnelError, RpcTunnelServer, decode_reply, decode_request
from meshllm.tunnels.service import StreamService, serve_streams

__all__ = [
    "Answer",
    "HttpTunnelClient",
    "HttpTunnelServer",
    "ModelFileServer",
    "PeerRanges",
    "RpcTunnelClient",
    "RpcTunnelError",
    "RpcTunnelServer",
    "StreamService",
    "TunnelBroken",
    "TunnelRequest",
    "TunnelUnavailable",
    "decode_reply",
    "decode_request",
    "local_copies",
    "serve_streams",
]
