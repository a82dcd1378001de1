"""A throwaway self-signed certificate for QUIC's mandatory TLS 1.3, and the QUIC configurations.

QUIC cannot run without TLS, and TLS gives every connection encryption and integrity. It does not
give identity here: certificates are generated in memory at start, never checked by clients
(``CERT_NONE``), and the mesh secret plus node keys are proven afterwards by ``auth``. The server's
certificate still matters once: its hash is bound into the auth transcript, so a relay that
terminates TLS with its own certificate cannot splice two honest nodes together.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ALPN", "TlsCredentials", "TransportSettings", "client_configuration",
           "generate_credentials", "server_configuration"]

ALPN = "meshllm/1"


@dataclass(frozen=True)
class TransportSettings:
    """Knobs of one endpoint; the defaults suit a LAN or the internet.

    ``max_datagram_size`` 1452 fits an Ethernet MTU over IPv6 and IPv4 and is measurably faster
    than aioquic's 1200 (ENGINE.md); 16000 is much faster but works on loopback only.
    ``send_buffer`` bounds the bytes one stream may have queued in aioquic, unsent or unacknowledged:
    ``Stream.send`` waits above it, so a fast writer cannot buffer without limit.
    ``max_dials`` bounds this endpoint's outgoing handshakes in flight (``HandshakeBudget``);
    ``max_handshakes`` bounds incoming ones (an Initial beyond it is dropped and retransmitted), and
    ``max_handshakes_per_source`` those from one IP address, so that one source cannot take them all.
    """

    max_datagram_size: int = 1452
    idle_timeout: float = 10.0
    auth_timeout: float = 5.0
    ping_interval: float = 1.0
    peer_timeout: float = 3.0
    send_buffer: int = 1024 * 1024
    max_data: int = 4 * 1024 * 1024
    max_stream_data: int = 1024 * 1024
    max_handshakes: int = 64
    max_handshakes_per_source: int = 32
    max_dials: int = 4


@dataclass(frozen=True)
class TlsCredentials:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the certificate's DER encoding (the auth channel binding)."""
        return certificate_fingerprint(self.certificate.public_bytes(serialization.Encoding.DER))


def certificate_fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def generate_credentials(*, common_name: str = "meshllm") -> TlsCredentials:
    """A fresh P-256 key and a certificate for it, valid from yesterday for a year."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return TlsCredentials(certificate, key)


def _configuration(settings: TransportSettings, *, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=settings.idle_timeout,
        max_datagram_size=settings.max_datagram_size,
        max_data=settings.max_data,
        max_stream_data=settings.max_stream_data,
    )


def server_configuration(credentials: TlsCredentials,
                         settings: TransportSettings) -> QuicConfiguration:
    configuration = _configuration(settings, is_client=False)
    configuration.certificate = credentials.certificate
    configuration.private_key = credentials.private_key
    return configuration


def client_configuration(settings: TransportSettings) -> QuicConfiguration:
    configuration = _configuration(settings, is_client=True)
    configuration.verify_mode = ssl.CERT_NONE  # identity is proven by the auth handshake
    return configuration
