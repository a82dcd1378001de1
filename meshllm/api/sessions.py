"""Session affinity for expert-sharded models: the same conversation goes to the same shard.

Each expert shard runs its own llama-server with its own KV cache, so a conversation that stays on one node
reuses its cached prompt and sees one shard's answers throughout. A request's *session key* is, in order:
the ``x-session-id`` header, the body's ``session_id``, the body's ``user`` (Anthropic: ``metadata.user_id``),
else a hash of the system prompt and the first user message (what every turn of one conversation repeats).
The key picks a node by rendezvous (highest random weight) hashing over the nodes serving a ready shard:
every node of the mesh picks the same one, and when a node goes away only its sessions move, each to the
node that ranks next for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from meshllm.state.schema import NodeId

__all__ = ["rendezvous", "session_key"]


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict)
                         and isinstance(part.get("text", ""), str))
    return ""


def _conversation(payload: dict[str, Any]) -> str:
    """The system prompt and the first user message (or the prompt of a completion)."""
    system = _text(payload.get("system"))  # Anthropic's top-level system prompt
    first = ""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            if message.get("role") in ("system", "developer") and not system:
                system = _text(message.get("content"))
            elif message.get("role") == "user":
                first = _text(message.get("content"))
                break
    prompt = payload.get("prompt")
    if not first and isinstance(prompt, (str, list)):
        first = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return f"{system}\0{first}"


def session_key(body: bytes, headers: Sequence[tuple[str, str]]) -> str:
    """The request's session key (see the module docstring)."""
    for name, value in headers:
        if name.lower() == "x-session-id" and value:
            return "id:" + value
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        return "body:" + hashlib.sha256(body).hexdigest()
    metadata = payload.get("metadata")
    candidates: list[Any] = [payload.get("session_id"), payload.get("user"),
                             metadata.get("user_id") if isinstance(metadata, dict) else None]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            return "id:" + candidate
    return "chat:" + hashlib.sha256(_conversation(payload).encode()).hexdigest()


def rendezvous(key: str, nodes: Iterable[NodeId]) -> NodeId | None:
    """The node with the highest weight for ``key``; None when there is none."""
    best, chosen = b"", None
    for node in nodes:
        weight = hashlib.sha256(f"{key}\0{node}".encode()).digest()
        if chosen is None or weight > best:
            best, chosen = weight, node
    return chosen
