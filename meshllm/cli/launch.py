"""``meshllm claude|goose|opencode|pi``: run a coding agent on the mesh's models (``meshllm.launchers``).

Options before the agent's own arguments; anything the launcher does not know, and everything after
``--``, goes to the agent: ``meshllm claude --model M -- -p "hello"``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from meshllm.cli.keys import local_keys
from meshllm.launchers import TOOLS, LaunchRequest, Tool, launch
from meshllm.store.identity import default_state_dir

__all__ = ["register"]

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _command(tool: Tool) -> Callable[..., None]:
    def command(
        ctx: typer.Context,
        model: Annotated[str, typer.Option("--model", metavar="NAME", help="Model to use (default: the strongest tool-capable model the mesh serves)")] = "",
        port: Annotated[int, typer.Option("--port", metavar="PORT", help="OpenAI API port of the node to use; a client node is started there if none answers")] = 9337,
        join: Annotated[list[str] | None, typer.Option("--join", metavar="TOKEN|@FILE", help="Invite token, or @FILE, of the mesh the started node joins (repeatable; default: $MESHLLM_JOIN, else the mesh of --state-dir)")] = None,
        api_key: Annotated[str | None, typer.Option("--api-key", metavar="KEY", help="Key for a node that requires one (default: $MESHLLM_API_KEY)")] = None,
        state_dir: Annotated[Path, typer.Option("--state-dir", metavar="DIR", help="State folder of your node: its mesh, and the started node's folder (launch/PORT)")] = default_state_dir(),
        wait: Annotated[float, typer.Option("--wait", metavar="SECONDS", help="Seconds to wait for the mesh to route a model")] = 90.0,
    ) -> None:
        keys = local_keys([api_key] if api_key else [], os.environ.get("MESHLLM_API_KEY"))
        request = LaunchRequest(state_dir=state_dir.expanduser(), model=model, port=port, joins=tuple(join or ()),
                                api_key=keys[0] if keys else None, args=tuple(ctx.args), wait=wait)
        code = launch(tool, request, announce=lambda text: print(text, file=sys.stderr))
        raise typer.Exit(code)

    command.__doc__ = (f"Run {tool.title} on the mesh's models: reuse the node on --port or start a client node, "
                       f"configure {tool.binary}, run it with the remaining arguments, stop the node it started.")
    return command


def register(app: typer.Typer) -> None:
    for tool in TOOLS.values():
        app.command(tool.name, context_settings=_EXTRA, options_metavar="[OPTIONS] [--] [AGENT ARGS]...")(_command(tool))
