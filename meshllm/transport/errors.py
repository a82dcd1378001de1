"""Exceptions of the transport layer, under ``MeshError`` so callers can catch them by kind.

    MeshError (meshllm.errors)
    └── TransportError         a peer, connection or stream cannot be used
        ├── AuthError          mutual authentication failed, or the peer refused ours
        ├── FrameError         bytes that are not a well-formed frame or message
        ├── ConnectionLost     the QUIC connection closed (peer gone, timed out, replaced, shut down)
        └── StreamReset        the stream was reset or stopped by the peer, or reset locally

Each carries the QUIC application error code where there is one (``ErrorCode``), so logs and
tests can tell a refusal from a timeout without parsing messages.
"""

from __future__ import annotations

from enum import IntEnum

from meshllm.errors import MeshError

__all__ = ["AuthError", "ConnectionLost", "ErrorCode", "FrameError", "StreamReset", "TransportError"]


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


class TransportError(MeshError):
    """A peer, connection or stream cannot be used; ``code`` is the QUIC error code if known."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthError(TransportError):
    """Mutual authentication failed: wrong mesh, wrong secret, forged key or hello, or a timeout.

    ``peer_reason`` is the short text sent to the peer in the close frame: it names the category
    (wrong mesh, timeout) and never which check of the proof failed.
    """

    def __init__(self, message: str, *, code: int | None = ErrorCode.AUTH_FAILED,
                 peer_reason: str = "authentication failed") -> None:
        super().__init__(message, code=code)
        self.peer_reason = peer_reason


class FrameError(TransportError):
    """Bytes that are not a valid frame: oversize length, truncated at EOF, or not a JSON object."""


class ConnectionLost(TransportError):
    """The QUIC connection is closed; every stream on it fails with this error."""


class StreamReset(TransportError):
    """The stream was reset (or its reading side stopped) by the peer, or reset locally."""
