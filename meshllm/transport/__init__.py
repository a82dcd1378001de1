"""Transport layer: one QUIC endpoint per node, mutual auth with the mesh secret, stream kinds.

Above ``state``/``store`` and below ``gossip``/``reconcile``: it imports only ``meshllm.errors``
and ``meshllm.store.identity``. Runs on anyio's asyncio backend (aioquic drives asyncio directly).

    endpoint = QuicEndpoint(identity, mesh_id, secret, host="127.0.0.1", port=0)
    endpoint.on_stream(StreamKind.GOSSIP, handler)      # handler(conn, stream) per incoming stream
    endpoint.on_peer(listener)                          # PeerEvent(up/down) per peer
    port = await tg.start(endpoint.run)
    conn = await endpoint.connect(host, port)           # authenticated PeerConnection
    async with await conn.open_stream(StreamKind.RPC) as stream:
        await stream.send(b"..."); await stream.send_eof(); data = await stream.receive()

Dials take turns (``HandshakeBudget``, by ``DialPriority``), and the peer timeout widens while this
process's own event loop runs late (``LoopHealth``); both are shared by the endpoints of a process.
"""

from meshllm.transport.budget import DialPriority, HandshakeBudget
from meshllm.transport.channel import ByteChannel, MemoryByteChannel, memory_byte_channel_pair
from meshllm.transport.connection import Address, PeerConnection
from meshllm.transport.endpoint import PeerEvent, PeerListener, QuicEndpoint, StreamHandler
from meshllm.transport.errors import (AuthError, ConnectionLost, ErrorCode, FrameError, Refusal,
                                      StreamReset, TransportError)
from meshllm.transport.framing import (MAX_FRAME, FrameChannel, FrameDecoder, decode_message,
                                       encode_frame, encode_message)
from meshllm.transport.health import HealthSettings, LoopHealth
from meshllm.transport.stream import MessageStream, Stream, StreamKind
from meshllm.transport.tls import ALPN, TransportSettings

__all__ = [
    "ALPN",
    "MAX_FRAME",
    "Address",
    "AuthError",
    "ByteChannel",
    "ConnectionLost",
    "DialPriority",
    "ErrorCode",
    "FrameChannel",
    "FrameDecoder",
    "FrameError",
    "HandshakeBudget",
    "HealthSettings",
    "LoopHealth",
    "MemoryByteChannel",
    "MessageStream",
    "PeerConnection",
    "PeerEvent",
    "PeerListener",
    "QuicEndpoint",
    "Refusal",
    "Stream",
    "StreamHandler",
    "StreamKind",
    "StreamReset",
    "TransportError",
    "TransportSettings",
    "decode_message",
    "encode_frame",
    "encode_message",
    "memory_byte_channel_pair",
]
