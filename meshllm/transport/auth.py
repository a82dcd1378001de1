"""Mutual authentication of two mesh members on a fresh QUIC connection, without I/O.

TLS encrypts but proves nothing (certificates are self-signed and unchecked); this handshake is
what keeps strangers out. It runs on the connection's first bidirectional stream (id 0), in frames
of JSON, before any other stream is served:

    client → server   hello   {mesh, kid, node, key, nonce, dialed_at}
    server → client   hello   {mesh, kid, node, key, nonce}
    client → server   proof   {mac, sig}   over transcript T, role "client"
    server → client   proof   {mac, sig}   over T, role "server"

T = SHA-256 over the protocol label, the mesh id, the SHA-256 of the server's TLS certificate
(channel binding: a relay terminating TLS with its own certificate makes the two sides' T differ)
and both hellos exactly as sent. ``mac`` = HMAC-SHA256(secret, role ‖ T) proves the mesh secret;
``sig`` = Ed25519(node key, label ‖ role ‖ T) proves the node key, and the node id must be
sha256(key)[:16 hex]. Both nonces are fresh, so a recorded proof is worthless on another connection.
The client proves first: a node never sends secret-derived bytes to a peer that has not proven the
secret, so a stranger who dials a node gets nothing to attack offline.

``kid`` names the secret a side proves (``store.mesh.key_id``, as in invite tokens). A server refuses a
client whose ``kid`` a key rotation retired before looking at its proof, and says so: the refusal's
category (``Refusal``: wrong mesh, retired key, wrong secret) goes to the dialer in the close frame,
so a node started with a stale or mistyped token can tell its operator which it is.

``Handshake`` is a state machine fed with stream bytes; the connection drives it synchronously from
aioquic's event callback, so it is ordered exactly with the other streams' events.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshllm.state.schema import NodeId
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import key_id
from meshllm.transport.errors import AuthError, FrameError, Refusal
from meshllm.transport.framing import FrameDecoder, decode_message, encode_frame, encode_message

__all__ = ["AUTH_STREAM_ID", "AuthResult", "Handshake", "Hello", "Role", "make_proof",
           "node_id_for", "parse_hello", "transcript_hash", "verify_proof"]

AUTH_STREAM_ID = 0
LABEL = b"meshllm/auth/1"
MAX_AUTH_FRAME = 4096
NONCE_BYTES = 32


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"

    @property
    def other(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


def node_id_for(public_key: bytes) -> NodeId:
    """The node id a public key owns (the same rule as ``NodeIdentity.node_id``)."""
    return NodeId(hashlib.sha256(public_key).hexdigest()[:16])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise AuthError(f"hello field {what} is missing or not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(f"hello field {what} is not base64") from None
    if len(raw) != size:
        raise AuthError(f"hello field {what} has {len(raw)} bytes, expected {size}")
    return raw


@dataclass(frozen=True)
class Hello:
    """The first message of each side: who it claims to be, and a fresh nonce."""

    mesh_id: str
    node_id: NodeId
    public_key: bytes
    nonce: bytes
    dialed_at: int | None = None  # client only: wall-clock ns, orders redials of one peer
    key_id: str = ""  # the id of the mesh secret this side proves ("" from older nodes)

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"t": "hello", "v": 1, "mesh": self.mesh_id, "node": self.node_id,
                                   "key": _b64(self.public_key), "nonce": _b64(self.nonce)}
        if self.key_id:
            message["kid"] = self.key_id
        if self.dialed_at is not None:
            message["dialed_at"] = self.dialed_at
        return message

    def payload(self) -> bytes:
        """The hello's frame payload: these exact bytes go into the transcript on both sides."""
        return json.dumps(self.to_message(), separators=(",", ":")).encode()


def parse_hello(payload: bytes) -> Hello:
    """A hello from its frame payload; malformed fields are an ``AuthError``."""
    message = _decode(payload, "hello")
    mesh_id, node_id, dialed_at = message.get("mesh"), message.get("node"), message.get("dialed_at")
    kid = message.get("kid", "")
    if message.get("v") != 1:
        raise AuthError(f"unsupported auth version {message.get('v')!r}")
    if not isinstance(mesh_id, str) or not isinstance(node_id, str):
        raise AuthError("hello lacks a mesh id or node id")
    if dialed_at is not None and (not isinstance(dialed_at, int) or isinstance(dialed_at, bool)):
        raise AuthError("hello field dialed_at is not an integer")
    if not isinstance(kid, str) or len(kid) > 64:
        raise AuthError("hello field kid is not a key id")
    key = _unb64(message.get("key"), "key", 32)
    nonce = _unb64(message.get("nonce"), "nonce", NONCE_BYTES)
    if node_id_for(key) != node_id:
        raise AuthError(f"node id {node_id[:32]!r} is not the id of the key it presented")
    return Hello(mesh_id, node_id_for(key), key, nonce, dialed_at, kid)


def _decode(payload: bytes, expected: str) -> dict[str, Any]:
    try:
        message = decode_message(payload)
    except FrameError as exc:
        raise AuthError(f"malformed auth message: {exc}") from None
    if message.get("t") != expected:
        raise AuthError(f"expected an auth {expected}, got {str(message.get('t'))[:32]!r}")
    return message


def transcript_hash(mesh_id: str, channel_binding: bytes, client_hello: bytes,
                    server_hello: bytes) -> bytes:
    """T: what both proofs sign. Every part is length-prefixed, so no two inputs collide."""
    digest = hashlib.sha256()
    for part in (LABEL, mesh_id.encode(), channel_binding, client_hello, server_hello):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


def make_proof(identity: NodeIdentity, secret: bytes, transcript: bytes,
               role: Role) -> dict[str, Any]:
    mac = hmac.new(secret, role.value.encode() + transcript, hashlib.sha256).digest()
    sig = identity.private_key.sign(LABEL + role.value.encode() + transcript)
    return {"t": "proof", "mac": _b64(mac), "sig": _b64(sig)}


def verify_proof(message: Mapping[str, Any], *, secret: bytes, transcript: bytes, role: Role,
                 public_key: bytes) -> None:
    """Raise ``AuthError`` unless ``message`` proves the secret and the key for ``role``."""
    mac = _unb64(message.get("mac"), "mac", 32)
    sig = _unb64(message.get("sig"), "sig", 64)
    expected = hmac.new(secret, role.value.encode() + transcript, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise AuthError("the peer does not know the mesh secret", refusal=Refusal.WRONG_SECRET)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            sig, LABEL + role.value.encode() + transcript)
    except InvalidSignature:
        raise AuthError("the peer's signature does not match its node key") from None


@dataclass(frozen=True)
class AuthResult:
    """Who the peer proved to be, and when the client dialed (to pick one of two connections)."""

    node_id: NodeId
    public_key: bytes
    dialed_at: int


@dataclass
class _Progress:
    client_hello: bytes = b""
    server_hello: bytes = b""
    peer: Hello | None = None
    transcript: bytes = b""
    expect: str = "hello"
    result: AuthResult | None = None
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(max_size=MAX_AUTH_FRAME))


class Handshake:
    """One side of the handshake; feed it the auth stream's bytes, send what it returns."""

    def __init__(self, *, identity: NodeIdentity, mesh_id: str, secret: bytes, role: Role,
                 channel_binding: bytes, nonce: bytes | None = None,
                 dialed_at: int | None = None,
                 retired: Callable[[str], bool] | None = None) -> None:
        """``retired(kid)``: whether a key rotation retired that key id (a server refuses it)."""
        self._identity = identity
        self._mesh_id = mesh_id
        self._secret = secret
        self._retired = retired
        self.role = role
        self._binding = channel_binding
        dialed = (dialed_at if dialed_at is not None else time.time_ns()) \
            if role is Role.CLIENT else None
        self.hello = Hello(mesh_id, identity.node_id, identity.public_bytes,
                           nonce if nonce is not None else os.urandom(NONCE_BYTES), dialed,
                           key_id(secret))
        self._state = _Progress()

    @property
    def done(self) -> bool:
        return self._state.result is not None

    @property
    def result(self) -> AuthResult:
        if self._state.result is None:
            raise AuthError("the handshake has not completed")
        return self._state.result

    @property
    def peer_hello(self) -> Hello | None:
        """The peer's hello once received (its node id is claimed, not yet proven)."""
        return self._state.peer

    def start(self) -> bytes:
        """What to send first: the client's hello; nothing for the server."""
        if self.role is Role.SERVER:
            return b""
        self._state.client_hello = self.hello.payload()
        return encode_frame(self._state.client_hello, max_size=MAX_AUTH_FRAME)

    def receive(self, data: bytes) -> bytes:
        """Process bytes from the auth stream; return bytes to send. Raises ``AuthError``."""
        state = self._state
        try:
            frames = state.decoder.decode(data)
        except FrameError as exc:
            raise AuthError(f"malformed auth stream: {exc}") from None
        out = bytearray()
        for frame in frames:
            if state.expect == "hello":
                out += self._on_hello(frame)
            elif state.expect == "proof":
                out += self._on_proof(frame)
            else:
                raise AuthError("unexpected data on the auth stream after authentication")
        return bytes(out)

    def _on_hello(self, frame: bytes) -> bytes:
        state = self._state
        peer = parse_hello(frame)
        if peer.mesh_id != self._mesh_id:
            raise AuthError(f"peer belongs to mesh {peer.mesh_id[:64]!r}, not {self._mesh_id!r}",
                            refusal=Refusal.WRONG_MESH)
        if (self.role is Role.SERVER and peer.key_id and peer.key_id != self.hello.key_id
                and self._retired is not None and self._retired(peer.key_id)):
            raise AuthError(f"peer proves key {peer.key_id!r}, which a rotation of the mesh key retired",
                            refusal=Refusal.RETIRED_KEY)
        if peer.node_id == self._identity.node_id:
            raise AuthError("connected to itself", peer_reason="authentication failed: same node")
        if (peer.dialed_at is not None) != (self.role is Role.SERVER):
            raise AuthError("dialed_at belongs in the client's hello only")
        state.peer = peer
        out = b""
        if self.role is Role.SERVER:
            state.client_hello, state.server_hello = frame, self.hello.payload()
            out = encode_frame(state.server_hello, max_size=MAX_AUTH_FRAME)
        else:
            state.server_hello = frame
        state.transcript = transcript_hash(self._mesh_id, self._binding, state.client_hello,
                                           state.server_hello)
        state.expect = "proof"
        if self.role is Role.CLIENT:
            out = self._proof()
        return out

    def _on_proof(self, frame: bytes) -> bytes:
        state = self._state
        assert state.peer is not None
        verify_proof(_decode(frame, "proof"), secret=self._secret, transcript=state.transcript,
                     role=self.role.other, public_key=state.peer.public_key)
        dialed_at = self.hello.dialed_at if self.role is Role.CLIENT else state.peer.dialed_at
        assert dialed_at is not None
        state.result = AuthResult(state.peer.node_id, state.peer.public_key, dialed_at)
        state.expect = "nothing"
        return self._proof() if self.role is Role.SERVER else b""

    def _proof(self) -> bytes:
        proof = make_proof(self._identity, self._secret, self._state.transcript, self.role)
        return encode_message(proof, max_size=MAX_AUTH_FRAME)
