"""The three places meshllm reads aioquic state that aioquic 1.x does not expose publicly.

Kept in one module so an aioquic upgrade has one file to check (the integration tests exercise
all three): the server's TLS certificate as the client saw it (auth channel binding), the
smoothed RTT (published for the split planner), and how many bytes a stream still holds unsent or
unacknowledged (send backpressure).
"""

from __future__ import annotations

from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives import serialization

__all__ = ["peer_certificate_der", "send_backlog", "smoothed_rtt"]


def peer_certificate_der(quic: QuicConnection) -> bytes | None:
    """DER of the certificate the peer presented in the TLS handshake (clients only)."""
    certificate = getattr(quic.tls, "_peer_certificate", None)
    if certificate is None:
        return None
    return bytes(certificate.public_bytes(serialization.Encoding.DER))


def smoothed_rtt(quic: QuicConnection) -> float:
    """aioquic's smoothed round-trip time in seconds, 0.0 before the first sample."""
    recovery = getattr(quic, "_loss", None)
    if recovery is None or not getattr(recovery, "_rtt_initialized", False):
        return 0.0
    return float(getattr(recovery, "_rtt_smoothed", 0.0))


def send_backlog(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to ``stream_id`` that the peer has not acknowledged yet (0 if unknown)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    return len(stream.sender._buffer)
