"""The shared secret every split's ggml-rpc-server demands, and the direct path it makes safe.

Engine patch 0004 makes ggml-rpc-server with ``GGML_RPC_SECRET`` set serve no command to a client
that cannot prove the secret, and makes llama-server with the variable set refuse a server that
cannot: HMAC-SHA256 challenges over fresh nonces, both ways, on each new connection. meshllm gives
every worker and every split host the same key, derived from the mesh secret (``rpc_key``), so only
mesh members can use a worker: through the QUIC tunnel (the default: the bytes pass through the
agents unchanged, the handshake with them) and, with ``--rpc-direct``, over plain TCP from the host's
llama-server straight to the worker's rpc-server, which then listens on the node's address instead
of loopback. The direct path has no Python in between, so a split decodes at the speed of stock RPC;
its RPC bytes (the prompt's activations, not the weights) cross in the clear, so use it on networks
you trust not to read or alter traffic.

``authenticate`` is the client's side of the handshake, for probing a worker before a split starts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import anyio
import anyio.abc

__all__ = ["RPC_SECRET_ENV", "RpcAuthError", "authenticate", "rpc_key"]

RPC_SECRET_ENV = "GGML_RPC_SECRET"
MAGIC = b"RPCAUTH1"
NONCE = 32


class RpcAuthError(Exception):
    """The server does not hold the key, or broke the handshake."""


def rpc_key(mesh_secret: bytes) -> str:
    """The key every rpc-server and split host of the mesh uses (never the mesh secret itself)."""
    return hmac.new(mesh_secret, b"meshllm ggml-rpc key", hashlib.sha256).hexdigest()


def _mac(key: str, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key.encode(), label + a + b, hashlib.sha256).digest()


async def _receive_exactly(tcp: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            data += await tcp.receive(n - len(data))
        except anyio.EndOfStream:
            raise RpcAuthError("the server closed the connection during the handshake") from None
    return bytes(data)


async def authenticate(tcp: anyio.abc.ByteStream, key: str) -> None:
    """Prove ``key`` to a ggml-rpc-server on a fresh connection and check it holds the same key.
    Raises RpcAuthError if it does not; afterwards the connection speaks plain RPC."""
    nonce = secrets.token_bytes(NONCE)
    await tcp.send(MAGIC + nonce)
    reply = await _receive_exactly(tcp, 2 * NONCE)
    server_nonce, server_mac = reply[:NONCE], reply[NONCE:]
    if not hmac.compare_digest(server_mac, _mac(key, b"server", nonce, server_nonce)):
        raise RpcAuthError("the rpc-server does not hold the mesh's RPC key")
    await tcp.send(_mac(key, b"client", server_nonce, nonce))
