"""Mid-stream failover for Anthropic's ``/v1/messages``: the tracker that carries a streamed message on.

llama-server streams a message as named events: ``message_start``, ``content_block_start`` (index 0, a
text block), one ``content_block_delta`` per token, ``content_block_stop``, ``message_delta`` (the stop
reason and ``usage.output_tokens``) and ``message_stop``. When the server dies mid-way, the request goes
to another server of the model and the new server's events continue the client's message:

- a greedy request is sent again unchanged; the replica regenerates the text the client has, which is
  dropped, so the message is exactly an uninterrupted run's and its usage is the replica's own;
- a sampled one goes on by text: the text so far becomes a final assistant message (Anthropic's
  prefill), ``max_tokens`` is lowered by the deltas already sent, and the echo of the prefill at the
  head of the replica's first delta is dropped; ``output_tokens`` adds the deltas of earlier servers.

The continuation's ``message_start`` and its opening ``content_block_start`` are dropped (the client had
them). A message with a block other than one text block (thinking, tool use) is not continued: it ends
with an error event, as before.
"""

from __future__ import annotations

import json
from typing import Any

from meshllm.api.segments import dump, greedy, skip_prefix, whole_events

__all__ = ["MessagesTracker", "messages_tracker"]


class MessagesTracker:
    """One streamed Anthropic message across the servers that produced it."""

    done_tail = b""  # ``message_stop`` is the end: nothing follows it

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.greedy = greedy(body)
        self.resumable = True
        self.done = False
        self.text = ""  # what the client has
        self.produced = 0  # deltas sent by earlier servers and kept (sampled continuations)
        self.deltas = 0  # deltas of the current server
        self.segment = 0
        self._skip = ""
        self._pending = b""

    def first_body(self) -> bytes:
        return dump(self.body)

    def resume_body(self) -> bytes | None:
        """The request that continues the message, or None when it cannot be continued."""
        if not self.resumable or self.done:
            return None
        body = dict(self.body)
        if self.greedy:  # the same request: the replica regenerates what the client has
            kept = 0
        else:
            messages = body.get("messages")
            if not isinstance(messages, list) or (messages and _role(messages[-1]) == "assistant"):
                return None  # a prefill of the client's own: ours cannot be appended to it safely
            body["messages"] = [*messages, {"role": "assistant", "content": self.text}]
            kept = self.produced + self.deltas
            limit = body.get("max_tokens")
            if isinstance(limit, int) and not isinstance(limit, bool):
                body["max_tokens"] = limit - kept
                if body["max_tokens"] <= 0:
                    return None
        self._skip = self.text
        self.produced, self.deltas = kept, 0
        return dump(body)

    def begin_segment(self) -> None:
        self.segment += 1
        self.deltas = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Upstream bytes in, the bytes for the client out (whole events only)."""
        events, self._pending = whole_events(self._pending, chunk)
        out = [self._event(raw) for raw in events]
        return b"".join(event + b"\n\n" for event in out if event)

    def _event(self, raw: bytes) -> bytes:
        lines = raw.split(b"\n")
        data = next((line for line in lines if line.startswith(b"data: ")), None)
        try:
            payload = json.loads(data[6:]) if data is not None else None
            kind = payload.get("type") if isinstance(payload, dict) else None
        except ValueError:
            payload, kind = None, None
        if not isinstance(payload, dict) or not isinstance(kind, str):
            self.resumable = False
            return raw
        keep = self._rewrite(kind, payload)
        if not keep:
            return b""
        head = [line for line in lines if not line.startswith(b"data: ")]
        return b"\n".join([*head, b"data: " + dump(payload)])

    def _rewrite(self, kind: str, payload: dict[str, Any]) -> bool:
        """Note what the event carries and shape it for the client; False drops it."""
        later = self.segment > 1
        if kind == "message_start":
            return not later
        if kind == "content_block_start":
            block = payload.get("content_block")
            if payload.get("index") != 0 or not isinstance(block, dict) or block.get("type") != "text":
                self.resumable = False
                return True
            return not later
        if kind == "content_block_delta":
            return self._delta(payload)
        if kind == "message_delta":
            usage = payload.get("usage")
            if self.produced and isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                usage["output_tokens"] += self.produced
            return True
        if kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.resumable = False
        return True

    def _delta(self, payload: dict[str, Any]) -> bool:
        delta = payload.get("delta")
        if payload.get("index") != 0 or not isinstance(delta, dict) or delta.get("type") != "text_delta" \
                or not isinstance(delta.get("text"), str):
            self.resumable = False
            return True
        self.deltas += 1
        text, self._skip = skip_prefix(self._skip, delta["text"])
        delta["text"] = text
        self.text += text
        return bool(text) or not self.segment > 1


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def messages_tracker(payload: dict[str, Any]) -> MessagesTracker | None:
    """A tracker for a streamed ``/v1/messages`` request, else None (tools: not continued)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or payload.get("tools"):
        return None
    return MessagesTracker(payload)
