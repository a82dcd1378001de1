"""The places meshllm reaches into aioquic state that aioquic 1.x does not expose publicly.

Kept in one module so an aioquic upgrade has one file to check (the integration tests exercise
all of them): the server's TLS certificate as the client saw it (auth channel binding), the
smoothed RTT (published for the split planner), whether a client's first Initial decrypts, how many bytes a stream still holds unsent or
unacknowledged (send backpressure), and the acknowledgement policy (``AckPolicy``).
"""

from __future__ import annotations

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported without __all__
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import pull_quic_header
from cryptography.hazmat.primitives import serialization

__all__ = ["AckPolicy", "initial_decrypts", "peer_certificate_der", "send_backlog", "smoothed_rtt"]


def peer_certificate_der(quic: QuicConnection) -> bytes | None:
    """DER of the certificate the peer presented in the TLS handshake (clients only)."""
    certificate = getattr(quic.tls, "_peer_certificate", None)
    if certificate is None:
        return None
    return bytes(certificate.public_bytes(serialization.Encoding.DER))


def initial_decrypts(data: bytes, *, host_cid_length: int) -> bool:
    """Whether the first packet of ``data`` is an Initial that decrypts with the keys its destination
    connection id derives (RFC 9001 section 5.2): what any real client sends first. Junk shaped like an
    Initial fails here, before a connection (and a handshake slot) is spent on it."""
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=host_cid_length)
        if header.version is None or header.packet_length > len(data):
            return False
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        crypto.decrypt_packet(data[:header.packet_length], buf.tell(), 0)
    except ValueError:  # a malformed header, or aioquic's CryptoError (a ValueError)
        return False
    return True


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


SPARSE_GAP = 0.001  # datagrams further apart than this are a trickle (tokens), not a burst


class AckPolicy:
    """Acknowledge stream data every ``every`` datagrams or within ``delay``; anything else at once.

    aioquic acknowledges each ack-eliciting packet after a fixed 1 ms, so a stream of small
    messages (one tunnelled token every few milliseconds) costs an ACK datagram per message at the
    receiver and an ACK to process at the sender, each with a wakeup and a full
    ``datagrams_to_send`` pass. RFC 9000 section 13.2.1 lets a receiver wait up to its advertised
    max_ack_delay (aioquic advertises 25 ms). A trickle (datagrams more than ``SPARSE_GAP``
    apart: a token stream) is acknowledged on its second unacknowledged datagram, inline, so the
    receiver never wakes just to acknowledge. A burst gets an ACK per ``every`` datagrams: per two
    (the RFC's suggestion) cost a third of the throughput in ``bench/transport_echo.py``, because
    an ACK costs aioquic about as much CPU as a data packet; per eight matches aioquic's own 1 ms
    batching.

    A datagram without stream data (in practice the membership PINGs) is acknowledged at once:
    those ACKs are the RTT samples the mesh publishes, and a delayed one would count the delay as
    path latency whenever it cannot be told apart from it (RFC 9002 section 5.3).
    """

    def __init__(self, quic: QuicConnection, *, delay: float = 0.02, every: int = 8) -> None:
        self._quic = quic
        self._every = every
        quic._ack_delay = delay
        self._unacked = 0
        self._last = 0.0

    def received(self, now: float, *, stream_data: bool) -> bool:
        """Call after each ``receive_datagram``: brings the ACK forward when it is due now.

        Returns whether the caller may skip sending until the ACK timer or the next datagram:
        nothing of ours waits to be sent (which an ACK in this datagram could have released or
        declared lost), and either no ACK is owed (the datagram was only an ACK) or the ACK owed
        for stream data is not due yet. Whatever else aioquic might want to send (a flow-control
        update) then leaves with that ACK, within ``delay``."""
        space = self._quic._spaces.get(tls.Epoch.ONE_RTT)
        if space is None:
            return False
        if space.ack_at is None:
            self._unacked = 0
            return _nothing_to_send(self._quic)
        self._unacked += 1
        sparse = self._unacked >= 2 and now - self._last > SPARSE_GAP
        self._last = now
        if (self._unacked >= self._every or sparse or not stream_data) and space.ack_at > now:
            space.ack_at = now
        return space.ack_at > now and _nothing_to_send(self._quic)

    def sent(self) -> None:
        """Call after ``datagrams_to_send``: an ACK that went out resets the count."""
        space = self._quic._spaces.get(tls.Epoch.ONE_RTT)
        if space is None or space.ack_at is None:
            self._unacked = 0


def _nothing_to_send(quic: QuicConnection) -> bool:
    """No stream data queued (new or to retransmit), no probe and no PING waiting."""
    if quic._probe_pending or quic._ping_pending:
        return False
    return all(stream.sender.buffer_is_empty for stream in quic._streams.values())
