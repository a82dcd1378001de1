"""Exceptions of the transport layer, under ``MeshError`` so callers can catch them by kind.

    MeshError (meshllm.errors)
    └── TransportError         a peer, connection or stream cannot be used
        ├── AuthError          mutual authentication failed, or the peer refused ours
        ├── FrameError         bytes that are not a well-formed frame or message
        ├── ConnectionLost     the QUIC connection closed (peer gone, timed out, replaced, shut down)
        └── StreamReset        the stream was reset or stopped by the peer, or reset locally

Each carries the QUIC application error code where there is one (``ErrorCode``), so logs and
tests can tell a refusal from a timeout without parsing messages. A refusal on authentication also
names its category (``Refusal``: wrong mesh, wrong secret, retired key), which the refusing side
sends in its close frame, so the dialer can tell a mistyped token from a stale one.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from meshllm.errors import MeshError

__all__ = ["AuthError", "ConnectionLost", "ErrorCode", "FrameError", "Refusal", "StreamReset", "TransportError"]


class ErrorCode(IntEnum):
    """QUIC application error codes meshllm sends when it closes a connection or resets a stream."""

    NO_ERROR = 0x0
    # connection close codes
    AUTH_FAILED = 0x101
    AUTH_TIMEOUT = 0x102
    DUPLICATE = 0x103
    PEER_TIMEOUT = 0x104
    SHUTDOWN = 0x105
    PROTOCOL = 0x106
    NOT_NEEDED = 0x107  # a connection neither side needs any more (not a sign of failure)
    # stream reset codes
    STREAM_REJECTED = 0x201
    HANDLER_FAILED = 0x202
    CANCELLED = 0x203


class Refusal(StrEnum):
    """Why a node refused a peer's authentication, as both sides name it. A category only: it never
    says which byte of a proof was wrong, and nothing in it derives from the secret."""

    WRONG_MESH = "wrong mesh"  # the hello names another mesh id
    WRONG_SECRET = "wrong secret"  # the proof's MAC is not made with this mesh's secret
    RETIRED_KEY = "retired key"  # the hello names a key id that a rotation retired

    @property
    def peer_reason(self) -> str:
        return f"{REFUSED_PREFIX}{self.value}"

    @classmethod
    def from_reason(cls, reason: str) -> Refusal | None:
        """The category a peer's close reason names, if any."""
        if reason.startswith(REFUSED_PREFIX):
            try:
                return cls(reason[len(REFUSED_PREFIX):])
            except ValueError:
                return None
        return None


REFUSED_PREFIX = "authentication failed: "


class TransportError(MeshError):
    """A peer, connection or stream cannot be used; ``code`` is the QUIC error code if known."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthError(TransportError):
    """Mutual authentication failed: wrong mesh, wrong secret, forged key or hello, or a timeout.

    ``peer_reason`` is the short text sent to the peer in the close frame: it names the category
    (``refusal``: wrong mesh, wrong secret, retired key) and never which check of the proof failed.
    On the dialer's side ``refusal`` is the category the peer's close frame named.
    """

    def __init__(self, message: str, *, code: int | None = ErrorCode.AUTH_FAILED,
                 peer_reason: str | None = None, refusal: Refusal | None = None) -> None:
        super().__init__(message, code=code)
        self.refusal = refusal
        self.peer_reason = peer_reason or (refusal.peer_reason if refusal else "authentication failed")


class FrameError(TransportError):
    """Bytes that are not a valid frame: oversize length, truncated at EOF, or not a JSON object."""


class ConnectionLost(TransportError):
    """The QUIC connection is closed; every stream on it fails with this error."""


class StreamReset(TransportError):
    """The stream was reset (or its reading side stopped) by the peer, or reset locally."""
