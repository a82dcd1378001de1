"""What a stream has produced so far, and the request that carries it on on another server.

The proxy relays a streamed answer event by event through a ``StreamTracker``. When the server
behind it dies mid-stream, ``resume_body`` builds the request that continues the answer on another
server of the model, and the tracker rewrites the new server's events so that the client sees one
uninterrupted stream (the first stream's id, no second role delta, usage counted once).

Two ways to carry on, by endpoint:

- ``/v1/completions``: by token ids, so the replica's context is exactly the first server's. The
  upstream request asks for each token's id (``n_probs: 1`` with ``post_sampling_probs``, which costs
  llama-server nothing) and for the running token count (``timings_per_token``); both are taken out
  of the events before the client sees them. The continuation's prompt is the original prompt
  followed by the ids (llama-server takes a prompt mixing a string and token ids, and adds BOS only
  before a leading string). llama-server holds back a token that ends in an incomplete UTF-8
  sequence and sends its text with the next one; where that happened the count jumps and the held
  token's id is unknown, so the exact prefix stops there, and for a greedy request the replica
  regenerates from there while the tracker drops what the client already has (``_skip``). A
  sampled request gets the rest of the text appended as a string instead.
- ``/v1/chat/completions``: the chat endpoint takes no token ids. A greedy request is sent again
  unchanged and the tracker drops what the client already has from the replica's answer (exact, at
  the cost of decoding those tokens again). A sampled one goes on by text, as a prefilled final
  assistant message: llama-server continues a trailing assistant message (``prefill_assistant``, on
  by default: the template is rendered without closing that turn, and the prefill itself is not
  repeated in the events); the text need not tokenize back into the tokens that produced it (a
  random tiny model's pieces can re-merge), which sampling makes moot.

``/v1/messages`` (Anthropic's events) has its own tracker, ``resume_messages.MessagesTracker``; both
follow the ``Tracker`` protocol. Other requests (several choices, tools, non-streamed bodies) are not
continued mid-way: a request the tracker cannot continue ends with an error event as before.
"""

from __future__ import annotations

import json
from typing import Any

from meshllm.api.resume_messages import messages_tracker
from meshllm.api.segments import Tracker, dump as _dump, greedy, skip_prefix, whole_events

__all__ = ["StreamTracker", "Tracker", "tracker_for"]

_DONE = b"data: [DONE]"


def _limit_key(body: dict[str, Any]) -> str | None:
    for key in ("max_tokens", "max_completion_tokens", "n_predict"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] >= 0:
            return key
    return None


class StreamTracker:
    """One streamed answer across the servers that produced it (see the module docstring)."""

    done_tail = _DONE + b"\n\n"

    def __init__(self, body: dict[str, Any], *, chat: bool) -> None:
        self.body = body
        self.chat = chat
        self.greedy = greedy(body)
        self.client_logprobs = bool(body.get("logprobs")) or "n_probs" in body
        self.client_timings = bool(body.get("timings_per_token"))
        self.resumable = True
        self.done = False  # the final event or [DONE] went to the client
        self.first_id: str | None = None
        self.prompt_tokens: int | None = None
        self.ids: list[int] = []  # completions: the exact token prefix produced so far
        self.exact = not chat
        self.beyond = ""  # text the client has that ``ids`` do not cover (all of it, for chat)
        self.produced = 0  # tokens generated before the current segment
        self.segment_tokens = 0  # tokens the current segment generated so far
        self.segment = 0
        self.base = 0  # tokens the current segment's prompt carries beyond the original prompt
        self._skip = ""
        self._pending = b""
        self._ids_carry_on = not chat  # False once text, not ids, carries a sampled stream on

    # -- the request ------------------------------------------------------------------------

    def first_body(self) -> bytes:
        """The first request: the original, asking for what resuming needs."""
        return _dump(self._instrumented(dict(self.body)))

    def _instrumented(self, body: dict[str, Any]) -> dict[str, Any]:
        body["timings_per_token"] = True
        if not self.chat and not self.client_logprobs:
            body["n_probs"], body["post_sampling_probs"] = 1, True
        return body

    def resume_body(self) -> bytes | None:
        """The request that continues the answer, or None when it cannot be continued."""
        if not self.resumable or self.done:
            return None
        produced = self.produced + self.segment_tokens
        body = dict(self.body)
        key = _limit_key(body)
        if self.chat and self.greedy:  # the same request again: the replica regenerates what the client has
            kept, self._skip = 0, self.beyond
        elif self.chat:
            body["messages"] = self._prefilled(body.get("messages"))
            kept, self._skip = produced, ""
        else:
            prompt = body.get("prompt")
            head: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt or [])
            extra: list[Any] = list(self.ids)
            self._skip = ""
            if self.beyond and self.greedy:
                self._skip = self.beyond  # regenerate what the client has, and drop it
            elif self.beyond:
                extra.append(self.beyond)
                self._ids_carry_on = False  # the text's tokens are not ids: the ids end here for good
            if extra:
                body["prompt"] = head + extra
            kept = len(self.ids) if self._skip else produced
        if key is not None:
            body[key] = body[key] - kept
            if body[key] <= 0:
                return None
        self.base = len(self.ids) if not self.chat else 0
        self.produced, self.segment_tokens = kept, 0
        return _dump(self._instrumented(body))

    def _prefilled(self, messages: Any) -> list[Any]:
        out = list(messages)
        last = out[-1] if out else None
        if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            out[-1] = {**last, "content": last["content"] + self.beyond}
        else:
            out.append({"role": "assistant", "content": self.beyond})
        return out

    def begin_segment(self) -> None:
        """A new upstream response begins (the first, or a continuation)."""
        self.segment += 1
        self.segment_tokens = 0
        self._pending = b""
        self.exact = self._ids_carry_on

    # -- the events -------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Upstream bytes in, the bytes for the client out (whole events only)."""
        events, self._pending = whole_events(self._pending, chunk)
        out = [self._event(raw) for raw in events]
        return b"".join(event + b"\n\n" for event in out if event)

    def _event(self, raw: bytes) -> bytes:
        if not raw.startswith(b"data: ") or raw.startswith(_DONE):
            if raw.startswith(_DONE):
                self.done = True
            return raw
        try:
            payload = json.loads(raw[6:])
            choice = payload["choices"][0] if payload.get("choices") else None
        except (ValueError, KeyError, TypeError, AttributeError):
            self.resumable = False
            return raw
        if not isinstance(payload, dict) or "error" in payload or (choice is not None and len(payload["choices"]) > 1):
            self.resumable = False
            return raw
        kept = self._rewrite(payload, choice)
        return b"data: " + _dump(payload) if kept else b""

    def _rewrite(self, payload: dict[str, Any], choice: dict[str, Any] | None) -> bool:
        """Note what ``payload`` carries and shape it for the client; False drops it."""
        timings = payload.get("timings")
        final = choice is not None and choice.get("finish_reason") is not None
        if self.first_id is None:
            self.first_id = payload.get("id")
        elif "id" in payload:
            payload["id"] = self.first_id
        count = timings.get("predicted_n") if isinstance(timings, dict) else None
        if self.prompt_tokens is None and isinstance(timings, dict):
            self.prompt_tokens = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0)) - self.base
        if choice is None:  # a usage-only chunk (stream_options.include_usage)
            self._fix_usage(payload)
            return True
        if self.chat:
            keep = self._chat_choice(choice, count)
        else:
            keep = self._completion_choice(choice, count)
        if not self.client_timings and not final and timings is not None:
            del payload["timings"]
        if final:
            self._fix_usage(payload)
            self.done = True
        return keep or final

    def _chat_choice(self, choice: dict[str, Any], count: Any) -> bool:
        delta = choice.get("delta") or {}
        if self.segment > 1 and "role" in delta and not delta.get("content"):
            return False  # the continuation's opening delta: the client had one
        if isinstance(count, int):
            self.segment_tokens = count
        text = delta.get("content")
        if isinstance(text, str):
            text = self._skipped(text)
            delta["content"] = text
            self.beyond += text
            if not text and self.segment > 1:
                return False
        if delta.get("tool_calls") or delta.get("reasoning_content"):
            self.resumable = False
        return True

    def _completion_choice(self, choice: dict[str, Any], count: Any) -> bool:
        logprobs = choice.get("logprobs")
        if not self.client_logprobs:
            choice["logprobs"] = None
        text = choice.get("text")
        if not isinstance(text, str):
            self.resumable = False
            return True
        token = _token_id(logprobs)
        if self.exact and isinstance(count, int) and count == self.segment_tokens + 1 and token is not None:
            self.ids.append(token)
            self.beyond = self.beyond[len(text):] if len(text) <= len(self.beyond) else ""
        else:
            self.exact = False
        if isinstance(count, int):
            self.segment_tokens = count
        text = self._skipped(text)
        if not self.exact:
            self.beyond += text
        choice["text"] = text
        return bool(text) or self.segment == 1

    def _skipped(self, text: str) -> str:
        """``text`` less what the client already has (a greedy replica regenerating it)."""
        text, self._skip = skip_prefix(self._skip, text)
        return text

    def _fix_usage(self, payload: dict[str, Any]) -> None:
        usage = payload.get("usage")
        if self.segment == 1 or not isinstance(usage, dict):
            return
        completion = self.produced + int(usage.get("completion_tokens") or 0)
        prompt = self.prompt_tokens if self.prompt_tokens is not None else int(usage.get("prompt_tokens") or 0)
        usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        usage.pop("prompt_tokens_details", None)


def _token_id(logprobs: Any) -> int | None:
    try:
        token = logprobs["content"][0]["id"]
    except (KeyError, IndexError, TypeError):
        return None
    return token if isinstance(token, int) else None


def tracker_for(path: str, body: bytes) -> Tracker | None:
    """A tracker for a streamed request the proxy knows how to continue, else None."""
    if path not in ("/v1/completions", "/v1/chat/completions", "/v1/messages"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("stream") is not True or payload.get("n", 1) != 1:
        return None
    if path == "/v1/messages":
        return messages_tracker(payload)
    if path == "/v1/completions":
        prompt = payload.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
            return None
        return StreamTracker(payload, chat=False)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or payload.get("tools"):
        return None
    return StreamTracker(payload, chat=True)
