"""Mesh key rotation: sealing a new mesh secret under the old one, and following a chain of them.

``meshllm rotate-key`` gives the mesh a new secret without a new mesh: the rotating node writes a
``KeyRotation`` into the replicated document, keyed by the retired key id, holding the new secret
sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the old secret. Every member holds
the old secret, opens the entry and switches to the new one; nobody else can, and the document is
only readable by members anyway. The associated data binds the entry to its mesh and to both key
ids, so an entry cannot be replayed under another key id, and the opened secret must hash to the
``new`` key id.

Rotations chain (old → new → newer). A node follows the chain from the secret it started with
(``follow``), not from the one it holds now: if two nodes rotated the same key at once, the
document keeps one of the two entries (last writer wins, the same on every replica), and the node
whose rotation lost comes back to the winner's chain instead of staying on a secret nobody else has.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshllm.state.schema import KeyRotation, NodeId
from meshllm.store.mesh import MeshCredentials

__all__ = ["follow", "seal", "unseal"]

LABEL = b"meshllm key rotation 1\0"
NONCE_BYTES = 12
MAX_CHAIN = 1000  # rotations followed in one walk (a loop can only come from forged entries)


def _sealing_key(old: MeshCredentials) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=LABEL + old.mesh_id.encode()).derive(old.secret)


def _aad(mesh_id: str, old_kid: str, new_kid: str) -> bytes:
    return LABEL + "\0".join((mesh_id, old_kid, new_kid)).encode()


def seal(old: MeshCredentials, new: MeshCredentials, *, by: NodeId = NodeId(""), at: float = 0.0) -> KeyRotation:
    """The document entry that hands ``new`` to every holder of ``old``."""
    if new.mesh_id != old.mesh_id:
        raise ValueError("a rotation keeps the mesh id")
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_sealing_key(old)).encrypt(nonce, new.secret, _aad(old.mesh_id, old.key_id, new.key_id))
    return KeyRotation(old=old.key_id, new=new.key_id, nonce=base64.b64encode(nonce).decode(),
                       sealed=base64.b64encode(sealed).decode(), by=by, at=at)


def unseal(old: MeshCredentials, entry: KeyRotation) -> MeshCredentials:
    """The secret ``entry`` hands to holders of ``old``; ``ValueError`` if it is not for them or damaged."""
    if entry.old != old.key_id:
        raise ValueError(f"the rotation retires key {entry.old}, not {old.key_id}")
    try:
        nonce = base64.b64decode(entry.nonce, validate=True)
        sealed = base64.b64decode(entry.sealed, validate=True)
        secret = AESGCM(_sealing_key(old)).decrypt(nonce, sealed, _aad(old.mesh_id, entry.old, entry.new))
    except (binascii.Error, ValueError, InvalidTag):
        raise ValueError(f"the rotation of key {entry.old} does not open with that key") from None
    new = MeshCredentials(mesh_id=old.mesh_id, secret=secret)
    if new.key_id != entry.new:
        raise ValueError(f"the rotation of key {entry.old} holds a secret that is not key {entry.new}")
    return new


def follow(origin: MeshCredentials, rotations: Mapping[str, KeyRotation]) -> MeshCredentials:
    """The end of the chain of rotations that starts at ``origin``: the mesh's current secret as far as
    ``rotations`` tell. Stops at an entry that does not open (and at a loop)."""
    current, seen = origin, {origin.key_id}
    for _ in range(MAX_CHAIN):
        entry = rotations.get(current.key_id)
        if entry is None or entry.new in seen:
            break
        try:
            current = unseal(current, entry)
        except ValueError:
            break
        seen.add(current.key_id)
    return current
