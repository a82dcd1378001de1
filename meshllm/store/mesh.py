"""Mesh membership credentials and invite tokens.

A mesh is an id plus a shared secret. The first node creates both and keeps them in its state
folder (``mesh.json``, mode 0600); a node that joins with a token keeps the token's. An invite token
carries the mesh id, the secret, a key id and the addresses of members to dial first:

    meshllm1.<base64url(JSON {"v": 1, "mesh": id, "kid": key id, "secret": b64, "addrs": [...]})>

The key id names the secret (a digest of it), so a later ``rotate-key`` can give the mesh a new
secret under a new key id and have members refuse hellos proven with a retired one: every token
printed before the rotation stops working, without anyone having to list them.

A token need not appear on a command line (where every local user reads it in ``/proc/<pid>/cmdline``):
``--join @FILE`` reads it from a file and ``MESHLLM_JOIN`` from the environment (``join_arguments``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshllm.jsonsafe import loads
from meshllm.errors import MeshError

__all__ = ["JOIN_ENV", "InviteToken", "MeshCredentials", "join_arguments", "key_id", "load_or_create_mesh",
           "load_peers", "save_mesh", "save_peers"]

TOKEN_PREFIX = "meshllm1."
MESH_FILE = "mesh.json"
JOIN_ENV = "MESHLLM_JOIN"  # an invite token (or @FILE), used when no --join is given


def key_id(secret: bytes) -> str:
    """The public name of a mesh secret (in tokens and hellos): a short digest, never the secret."""
    return hashlib.sha256(b"meshllm key id\0" + secret).hexdigest()[:8]


@dataclass(frozen=True)
class MeshCredentials:
    mesh_id: str
    secret: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.secret)

    @classmethod
    def create(cls) -> MeshCredentials:
        return cls(mesh_id=secrets.token_hex(8), secret=secrets.token_bytes(32))


@dataclass(frozen=True)
class InviteToken:
    credentials: MeshCredentials
    addrs: tuple[str, ...] = field(default=())

    def encode(self) -> str:
        body = {"v": 1, "mesh": self.credentials.mesh_id, "kid": self.credentials.key_id,
                "secret": base64.urlsafe_b64encode(self.credentials.secret).decode().rstrip("="),
                "addrs": list(self.addrs)}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> InviteToken:
        """Parse a token; raises ValueError saying what is wrong with it."""
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise ValueError("not a meshllm invite token (it should start with 'meshllm1.')")
        try:
            raw = _b64decode(text[len(TOKEN_PREFIX):])
            body = loads(raw)
            secret = _b64decode(body["secret"])
            creds = MeshCredentials(mesh_id=str(body["mesh"]), secret=secret)
            addrs = tuple(str(a) for a in body["addrs"])
            kid = str(body["kid"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ValueError("invite token is damaged (copy it again, whole)") from None
        if body.get("v") != 1:
            raise ValueError(f"invite token version {body.get('v')!r} is not supported by this meshllm")
        if kid != creds.key_id or len(secret) < 16:
            raise ValueError("invite token is damaged: its key id does not match its secret")
        if not addrs:
            raise ValueError("invite token names no member address to join through")
        return cls(creds, addrs)


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def join_arguments(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The invite tokens the ``--join`` values name: each a token, or ``@FILE`` for the token held in
    a file; with no ``--join``, the one in ``$MESHLLM_JOIN`` (a token or ``@FILE`` too). Raises
    ``MeshError`` naming the argument when a file cannot be read or holds no token."""
    if args:
        return [_token_argument(arg, "--join") for arg in args]
    value = environ.get(JOIN_ENV, "").strip()
    return [_token_argument(value, JOIN_ENV)] if value else []


def _token_argument(arg: str, where: str) -> str:
    if not arg.startswith("@"):
        return arg
    path = Path(arg[1:]).expanduser()
    try:
        text = path.read_text(errors="replace").strip()
    except OSError as exc:
        raise MeshError(f"{where} @{path}: cannot read the token file: {exc.strerror or exc}") from None
    if not text:
        raise MeshError(f"{where} @{path}: the file is empty (it should hold one invite token)")
    if len(text.split()) > 1:
        raise MeshError(f"{where} @{path}: the file holds more than one word (it should hold one invite token)")
    return text


def load_or_create_mesh(state_dir: Path, *, joining: MeshCredentials | None = None) -> MeshCredentials:
    """The mesh this node belongs to: the one it joins, else the one it was in, else a new one.

    Joined credentials are not saved here: the node saves them once a member accepted them
    (``save_mesh``), so a mistyped token never replaces the credentials of the mesh it was in."""
    if joining is not None:
        return joining
    path = state_dir / MESH_FILE
    if path.is_file():
        body = json.loads(path.read_text())
        return MeshCredentials(mesh_id=body["mesh"], secret=bytes.fromhex(body["secret"]))
    created = MeshCredentials.create()
    save_mesh(state_dir, created)
    return created


def save_mesh(state_dir: Path, creds: MeshCredentials) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / MESH_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"mesh": creds.mesh_id, "secret": creds.secret.hex()}, f)
    tmp.rename(path)


PEERS_FILE = "peers.json"


def load_peers(state_dir: Path) -> tuple[int, list[str]]:
    """The QUIC port this node last used and the member addresses it last knew (to rejoin after a restart)."""
    try:
        body = json.loads((state_dir / PEERS_FILE).read_text())
        return int(body.get("port", 0)), [str(a) for a in body.get("peers", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, []


def save_peers(state_dir: Path, port: int, peers: list[str]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (PEERS_FILE + ".tmp")
    tmp.write_text(json.dumps({"port": port, "peers": sorted(set(peers))}))
    tmp.rename(state_dir / PEERS_FILE)
