"""The command line (typer): ``meshllm`` and its subcommands. ``main`` is the entry point."""

from meshllm.cli.main import main

__all__ = [
    "main",
]
