"""The key every split's ggml-rpc-server demands, and the direct paths it makes safe.

Engine patch 0004 makes ggml-rpc-server with ``GGML_RPC_SECRET`` set serve no command to a client
that cannot prove the key, and makes llama-server with the variable set refuse a server that
cannot: HMAC-SHA256 challenges over fresh nonces, both ways, on each new connection. Patch 0005
gives that handshake a deadline as a whole (5 s, run beside the connection being served, so a client
that stalls it holds nothing) and, unless the client sets ``GGML_RPC_CLEAR=1``, derives from the
nonces one AES-256-GCM key per direction and seals every message after it (libcrypto, loaded at run
time). meshllm gives every worker and every split host the same key, derived from the mesh secret
(``rpc_key``), so only mesh members can use a worker or read what crosses:

- by default the worker's rpc-server listens on its node's address and the host's llama-server
  connects straight, sealed: no Python in between, so a split decodes at the speed of stock RPC;
- ``--rpc-direct``: the same, unsealed (the key still keeps strangers out; for trusted networks);
- through the QUIC tunnel (``--rpc-tunnel``, or a worker the host cannot reach over TCP): the
  agents carry the bytes, sealed by the engine inside QUIC's own encryption.

With two or more workers reached straight that have met in the mesh (``served.workers_meet``), the
host's llama-server also sets ``GGML_RPC_PUSH=1`` (patch 0006): the activations at the boundary of two
workers' layers go from the first worker to the second directly, over a connection of their own that
proves the same key and is sealed the same way, instead of coming back to the host and going out
again; the host waits for nothing in between. And every split host sets ``GGML_RPC_DELTA=1`` (patch
0008): a small input the host sets again each token (the attention mask: 2-4 bytes per cell of context)
crosses as the bytes that changed since the last time.

``authenticate`` is the client's side of the unsealed handshake, for probing a worker before a split
starts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import anyio
import anyio.abc

__all__ = ["RPC_CLEAR_ENV", "RPC_DELTA_ENV", "RPC_PUSH_ENV", "RPC_SECRET_ENV", "RpcAuthError", "authenticate", "rpc_key"]

RPC_SECRET_ENV = "GGML_RPC_SECRET"
RPC_CLEAR_ENV = "GGML_RPC_CLEAR"  # "1" on a client: the key handshake, then plain RPC (no sealing)
RPC_PUSH_ENV = "GGML_RPC_PUSH"  # "1" on a split host: activations go from worker to worker (patch 0006)
RPC_DELTA_ENV = "GGML_RPC_DELTA"  # "1" on a split host: small inputs go as the bytes that changed (patch 0008)
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
