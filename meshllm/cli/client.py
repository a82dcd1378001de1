"""The CLI's side of the console API: one HTTP call to the local node, its errors as one line.

Every command that asks a running node (get, describe, apply, diff, delete, drop) goes through
``console_call``: a node that does not answer is ``NodeUnreachable`` (with how to start one), an
OpenAI-shaped error from the node is a ``MeshError`` carrying the node's message. Every call presents
the node's admin token, read from the node's state folder (``--state-dir``, ``$MESHLLM_STATE_DIR`` or
``~/.meshllm``) or ``$MESHLLM_ADMIN_TOKEN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from meshllm.errors import MeshError, NodeUnreachable
from meshllm.store.admin import read_admin_token
from meshllm.store.identity import default_state_dir

__all__ = ["StateDir", "console_call"]

StateDir = Annotated[Path | None, typer.Option("--state-dir", help="State folder of the node to ask, where its admin token is (default: $MESHLLM_STATE_DIR or ~/.meshllm)")]


def console_call(console: int, method: str, path: str, *, body: object = None,
                 params: dict[str, str] | None = None, timeout: float = 10.0,
                 state_dir: Path | None = None) -> dict[str, Any]:
    """``method path`` on the node whose console listens on 127.0.0.1:``console``, with the admin token
    of the node whose state folder is ``state_dir`` (default: ``$MESHLLM_STATE_DIR`` or ``~/.meshllm``)."""
    url = f"http://127.0.0.1:{console}{path}"
    token = read_admin_token((state_dir or default_state_dir()).expanduser())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url, json=body, params=params, timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        raise NodeUnreachable(f"no meshllm node answers at {url} ({exc.__class__.__name__}); "
                              "start one with `meshllm --model NAME` or pass --console PORT") from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.is_success and isinstance(answer, dict):
        return answer
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict) and error.get("message"):
        raise MeshError(str(error["message"]))
    if response.status_code in (404, 405):
        raise MeshError(f"the node at 127.0.0.1:{console} has no {path} (an older meshllm?); upgrade it")
    raise MeshError(f"the node at 127.0.0.1:{console} answered {response.status_code} to {method} {path}")
