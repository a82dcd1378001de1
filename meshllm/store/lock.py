"""One node agent per state folder: an exclusive lock on ``node.lock`` held while the node runs.

Two agents started with the same ``--state-dir`` would share a node id, a database and the records of
the engine processes, and each would stop the other's llama-servers as strangers. The second one
must not start: ``hold_state_dir`` takes an ``fcntl`` lock (released by the kernel however the process
ends, so a crashed node leaves no stale lock) and raises one ``MeshError`` naming the pid that holds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshllm.errors import MeshError

__all__ = ["LOCK_FILE", "hold_state_dir"]

LOCK_FILE = "node.lock"


@contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold the state folder's lock for the ``with`` block; ``MeshError`` when another process holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise MeshError(f"another meshllm node (pid {holder}) is running with --state-dir {state_dir}; "
                            "stop it, or give this node its own --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
