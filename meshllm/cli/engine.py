"""``meshllm engine build|path``: build the pinned llama.cpp engine, or say where it is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshllm.engine.build import build_engine, default_flavour, find_engine

__all__ = ["build_with_progress", "engine_app", "ensure_engine"]

engine_app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                         help="Build or locate the llama.cpp engine (llama-server, ggml-rpc-server).")
err = Console(stderr=True)


def build_with_progress(flavour: str, *, jobs: int | None = None) -> Path:
    """Build the engine, showing progress: a live bar on a terminal, a line per 10% otherwise."""
    err.print(f"building the llama.cpp engine ({flavour}); this takes a while the first time")
    if not err.is_terminal:
        shown = [-1]

        def report(done: int, total: int, step: str) -> None:
            tenth = done * 10 // max(total, 1)
            if tenth != shown[0]:
                shown[0] = tenth
                err.print(f"engine build: {done}/{total} steps ({tenth * 10}%)")

        folder = build_engine(flavour=flavour, jobs=jobs, progress=report)
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[step]}"))
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("compiling", total=None, step="configuring")

            def advance(done: int, total: int, step: str) -> None:
                progress.update(task, completed=done, total=total, step=step)

            folder = build_engine(flavour=flavour, jobs=jobs, progress=advance)
    err.print(f"engine ready: {folder}")
    return folder


def ensure_engine(*, flavour: str | None = None) -> Path:
    """The engine folder; builds it first (with progress) when it is missing."""
    found = find_engine(flavour=flavour)
    if found is not None:
        return found
    err.print("the llama.cpp engine is not built yet: building it now (once)")
    return build_with_progress(flavour or default_flavour())


@engine_app.command("build")
def build(
    flavour: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when nvcc and a GPU are found)")] = None,
    jobs: Annotated[int | None, typer.Option("-j", "--jobs", help="Parallel compile jobs")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a build exists")] = False,
) -> None:
    """Fetch the pinned llama.cpp source, patch it and build the engine binaries."""
    flavour = flavour or default_flavour()
    found = None if force else find_engine(flavour=flavour)
    if found is not None:
        err.print(f"engine already built ({flavour}): {found}")
    print(found or build_with_progress(flavour, jobs=jobs))


@engine_app.command("path")
def path(flavour: Annotated[str | None, typer.Option(help="cpu or cuda")] = None) -> None:
    """Print the folder holding the engine binaries (exit 1 if it is not built)."""
    found = find_engine(flavour=flavour)
    if found is None:
        err.print("the engine is not built yet; run `meshllm engine build`")
        raise typer.Exit(1)
    print(found)
