"""This node's persistent identity: an Ed25519 key pair in the state folder.

The node id is derived from the public key, so a node restarted with the same state folder keeps
its id, and a peer can later check that a node owns the id it claims.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.state.schema import NodeId

__all__ = ["NodeIdentity", "default_state_dir", "load_identity"]

KEY_FILE = "node.key"


def default_state_dir() -> Path:
    return Path(os.environ.get("MESHLLM_STATE_DIR") or Path.home() / ".meshllm").expanduser()


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def node_id(self) -> NodeId:
        return NodeId(hashlib.sha256(self.public_bytes).hexdigest()[:16])


def load_identity(state_dir: Path) -> NodeIdentity:
    """Read the node key from ``state_dir``, creating it (mode 0600) on first use."""
    path = state_dir / KEY_FILE
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key; move it away to create a new identity")
        return NodeIdentity(key)
    state_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    tmp.rename(path)
    return NodeIdentity(key)
