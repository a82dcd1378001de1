"""The CLI's side of the console API: one HTTP call to the local node, its errors as one line.

Every command that asks a running node (get, describe, apply, diff, delete, drop) goes through
``console_call``: a node that does not answer is ``NodeUnreachable`` (with how to start one), an
OpenAI-shaped error from the node is a ``MeshError`` carrying the node's message.
"""

from __future__ import annotations

from typing import Any

import httpx

from meshllm.errors import MeshError, NodeUnreachable

__all__ = ["console_call"]


def console_call(console: int, method: str, path: str, *, body: object = None,
                 params: dict[str, str] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """``method path`` on the node whose console listens on 127.0.0.1:``console``; the JSON answer."""
    url = f"http://127.0.0.1:{console}{path}"
    try:
        response = httpx.request(method, url, json=body, params=params, timeout=timeout)
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
