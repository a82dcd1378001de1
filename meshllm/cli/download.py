"""``meshllm download``: list the model catalog, or fetch a model (and its draft) into the models folder.

``meshllm download`` lists every catalog model with its size, quantization, draft and whether it is in
the models folder already. ``meshllm download NAME|URL|ORG/REPO/FILE.gguf [--draft]`` fetches one (and
its catalog draft) with a progress bar; a node serving a model it lacks runs this same command as a
child process (``--quiet``), so the fetch can be stopped with the node and holds no lock once killed.
"""

from __future__ import annotations

from typing import Annotated

import typer

from meshllm.cli.get import table
from meshllm.engine.catalog import catalog
from meshllm.engine.download import fetch, parse_reference
from meshllm.engine.models import models_dir
from meshllm.errors import ModelError

__all__ = ["register"]


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def list_catalog() -> str:
    folder = models_dir()
    rows = []
    for entry in catalog():
        ref = parse_reference(entry.name)
        local = ref is not None and ref.present(folder)
        rows.append({"name": entry.name, "size": _gb(entry.size_bytes), "quant": entry.quantization,
                     "kind": "moe" if entry.moe else "dense", "tools": "yes" if entry.tools else "no",
                     "draft": entry.draft or "-", "local": "yes" if local else "no"})
    columns = [("NAME", "name"), ("SIZE", "size"), ("QUANT", "quant"), ("KIND", "kind"), ("TOOLS", "tools"),
               ("DRAFT", "draft"), ("LOCAL", "local")]
    return table(rows, columns) + f"models folder: {folder} (MESHLLM_MODELS_DIR changes it)\n"


def download(
    name: Annotated[str | None, typer.Argument(help="Catalog name (partial is fine), hub URL or ORG/REPO/FILE.gguf; none: list the catalog")] = None,
    draft: Annotated[bool, typer.Option("--draft", help="Also fetch the model's draft for speculative decoding")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar (a node fetching for itself)")] = False,
) -> None:
    """List the model catalog, or download a model into the models folder."""
    if name is None:
        typer.echo(list_catalog(), nl=False)
        return
    ref = parse_reference(name)
    if ref is None:
        raise ModelError(f"{name!r} is not a catalog model, a hub URL or ORG/REPO/FILE.gguf; "
                         "`meshllm download` lists the catalog")
    refs = [ref]
    if draft:
        paired = parse_reference(ref.entry.draft) if ref.entry is not None and ref.entry.draft else None
        if paired is None:
            raise ModelError(f"{ref.name} has no draft model in the catalog")
        refs.append(paired)
    folder = models_dir()
    for one in refs:
        path = fetch(one, folder, progress=not quiet)
        if not quiet:
            typer.echo(f"{one.name}: {path}")


def register(app: typer.Typer) -> None:
    app.command("download")(download)
