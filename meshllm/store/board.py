"""The blackboard's snapshot in the node's state folder, so a node that restarts alone (or a whole
mesh that restarts) still has the last two days of posts.

The file holds the board document as one Yjs update (``board.ydoc``), written whole to a temporary
file and renamed, so a crash leaves the old snapshot or the new one. Loading it into a fresh
document and then syncing with peers merges as any two replicas do: posts deleted meanwhile stay
deleted, nothing comes back twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["BOARD_FILE", "load_board_snapshot", "save_board_snapshot"]

log = logging.getLogger(__name__)

BOARD_FILE = "board.ydoc"


def load_board_snapshot(state_dir: Path) -> bytes | None:
    try:
        return (state_dir / BOARD_FILE).read_bytes() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("could not read the blackboard snapshot: %s", exc)
        return None


def save_board_snapshot(state_dir: Path, update: bytes) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (BOARD_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(update)
    tmp.rename(state_dir / BOARD_FILE)
