"""``meshllm rotate-key``: give the mesh a new secret, so every invite token made before stops working.

The local node does the rotation (``POST /api/rotate-key``) and spreads it to the members over the
mesh; this prints the new invite token on stdout (alone, for scripts: ``meshllm rotate-key > token``)
and what happened on stderr.
"""

from __future__ import annotations

import sys

import typer

from meshllm.cli.client import StateDir, console_call
from meshllm.cli.get import ConsolePort

__all__ = ["register"]

ROTATE_HELP = """Give the mesh a new secret and print its new invite token.

Members that are connected switch to the new secret and carry on. Every earlier invite token stops
working, and a node holding only the old secret (one that was offline during the rotation, too)
can no longer connect: start it with the new token (--join @FILE)."""


def register(app: typer.Typer) -> None:
    @app.command("rotate-key", help=ROTATE_HELP)
    def rotate_key(console: ConsolePort = 3131, state_dir: StateDir = None) -> None:
        answer = console_call(console, "POST", "/api/rotate-key", body={}, timeout=30.0, state_dir=state_dir)
        print(f"mesh {answer.get('mesh_id')}: key {answer.get('previous_key_id')} retired, now key "
              f"{answer.get('key_id')}; earlier invite tokens no longer work. New invite token:",
              file=sys.stderr)
        print(answer["token"])
