"""``meshllm apply|diff|delete -f FILE`` and ``meshllm drop MODEL``: change what the mesh serves;
``meshllm token``: the invite token others join with.

A manifest is validated here first, so a mistake is one line naming file, document and field, and
the node is not even asked; relative ``.gguf`` paths are made relative to the manifest's folder.
The node validates again, checks each source, and answers with one change per model, printed the
way kubectl prints them (``model/gemma-3-270m created``).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from meshllm.cli.client import StateDir, console_call
from meshllm.cli.get import ConsolePort
from meshllm.errors import MeshError
from meshllm.state.manifest import load_manifests, with_paths_under

__all__ = ["read_manifests", "register"]

APPLY_TIMEOUT = 300.0  # the node may assemble an embedded model (gemma-3-270m) while checking sources

ManifestFile = Annotated[str, typer.Option("-f", "--filename", help="Manifest file (YAML or JSON); - reads stdin")]


class ChangeOutput(StrEnum):
    TEXT = "text"
    JSON = "json"


Output = Annotated[ChangeOutput, typer.Option("-o", "--output", help="Output format")]


def read_manifests(file: str) -> tuple[list[object], str]:
    """The request body for the node (documents in file order, ``null`` for empty ones, so the
    node's errors number documents as the file does) and the name errors give the file."""
    if file == "-":
        text, name, base = sys.stdin.read(), "stdin", Path.cwd()
    else:
        path = Path(file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise MeshError(f"cannot read {file}: {exc.strerror or exc}") from None
        name, base = file, path.resolve().parent
    loaded = load_manifests(text, source_name=name)
    body: list[object] = [None] * max(item.index for item in loaded)
    for item in loaded:
        body[item.index - 1] = with_paths_under(item.manifest, base).model_dump(mode="json", exclude_none=True)
    return body, name


def _send(path: str, file: str, console: int, state_dir: Path | None) -> dict[str, Any]:
    body, name = read_manifests(file)
    return console_call(console, "POST", path, body=body, params={"source": name}, timeout=APPLY_TIMEOUT,
                        state_dir=state_dir)


def _print_changes(answer: dict[str, Any], output: ChangeOutput, *, diff: bool = False) -> int:
    """Print the node's answer; the number of models that could not be changed (delete: not found)."""
    if output is ChangeOutput.JSON:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    for warning in answer.get("warnings", []):
        print(f"Warning: {warning}", file=sys.stderr)
    failed = 0
    for change in answer["changes"]:
        if change["action"] == "not found":
            failed += 1
            print(f"error: {change['message']}", file=sys.stderr)
            continue
        if output is ChangeOutput.JSON or (diff and change["action"] == "unchanged"):
            continue
        print(f"model/{change['name']} {change['action']}")
        if diff:
            for field, values in change.get("fields", {}).items():
                print(f"    {field}: {json.dumps(values['from'])} -> {json.dumps(values['to'])}")
    return failed


def apply(file: ManifestFile, output: Output = ChangeOutput.TEXT, console: ConsolePort = 3131,
          state_dir: StateDir = None) -> None:
    """Make the mesh serve the models in FILE (a Mesh also removes manifest models it does not list)."""
    _print_changes(_send("/api/apply", file, console, state_dir), output)


def diff(file: ManifestFile, output: Output = ChangeOutput.TEXT, console: ConsolePort = 3131,
         state_dir: StateDir = None) -> None:
    """Show what `apply -f FILE` would change, changing nothing (no output: no change)."""
    _print_changes(_send("/api/diff", file, console, state_dir), output, diff=True)


def delete(file: ManifestFile, output: Output = ChangeOutput.TEXT, console: ConsolePort = 3131,
           state_dir: StateDir = None) -> None:
    """Stop serving the models FILE defines (models applied from manifests only)."""
    if _print_changes(_send("/api/delete", file, console, state_dir), output):
        raise typer.Exit(1)


def drop(model: Annotated[str, typer.Argument(help="Model name")], console: ConsolePort = 3131,
         state_dir: StateDir = None) -> None:
    """Forget a model whatever asked for it (manifest or a node's --model), with its demand and leases."""
    answer = console_call(console, "POST", "/api/drop", body={"model": model}, state_dir=state_dir)
    removed = answer["removed"]
    print(f"model/{model} dropped ({removed['demand']} demand entries, {removed['leases']} leases)")


def token(console: ConsolePort = 3131, state_dir: StateDir = None) -> None:
    """Print the mesh's invite token (others join with `meshllm --join TOKEN`); it holds the mesh secret."""
    print(console_call(console, "GET", "/api/token", state_dir=state_dir)["token"])


def register(app: typer.Typer) -> None:
    for command in (apply, diff, delete, drop, token):
        app.command(command.__name__)(command)
