"""The node's admin token: what the management API (:3131) asks of anyone who changes state or reads a secret.

The node creates it on first start in its state folder (``admin.token``, mode 0600, the same folder as
the mesh secret), and the CLI, run by the same user, reads it from there. Holding the file is holding the
node: nothing else is needed, and no one without read access to the state folder can act on the node.
``MESHLLM_ADMIN_TOKEN`` overrides the file for the CLI (a script that manages a node from elsewhere).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["ADMIN_TOKEN_ENV", "ADMIN_TOKEN_FILE", "load_or_create_admin_token", "read_admin_token"]

ADMIN_TOKEN_FILE = "admin.token"
ADMIN_TOKEN_ENV = "MESHLLM_ADMIN_TOKEN"
_PREFIX = "mladm-"


def load_or_create_admin_token(state_dir: Path) -> str:
    """The node's admin token, created (0600) the first time."""
    existing = _read(state_dir / ADMIN_TOKEN_FILE)
    if existing:
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    token = _PREFIX + secrets.token_urlsafe(32)
    tmp = state_dir / (ADMIN_TOKEN_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    tmp.rename(state_dir / ADMIN_TOKEN_FILE)
    return token


def read_admin_token(state_dir: Path) -> str | None:
    """The token the CLI presents: ``$MESHLLM_ADMIN_TOKEN``, else the node's file; None when neither."""
    return os.environ.get(ADMIN_TOKEN_ENV, "").strip() or _read(state_dir / ADMIN_TOKEN_FILE)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:  # missing, or another user's: the node's 401 says what to do
        return None
