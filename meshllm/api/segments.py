"""What the trackers of a resumable stream share (``api.resume`` for the OpenAI APIs,
``api.resume_messages`` for Anthropic's): the protocol the failover drives them by, and the small
rules they both follow."""

from __future__ import annotations

import json
from typing import Any, Protocol

__all__ = ["Tracker", "dump", "greedy", "skip_prefix", "whole_events"]


def dump(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class Tracker(Protocol):
    """What the failover needs of a stream's tracker."""

    done: bool  # the answer's final event went to the client
    done_tail: bytes  # what ends the stream once ``done`` (the OpenAI APIs' [DONE])

    def first_body(self) -> bytes: ...
    def resume_body(self) -> bytes | None: ...
    def begin_segment(self) -> None: ...
    def feed(self, chunk: bytes) -> bytes: ...


def whole_events(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The whole server-sent events in ``pending + chunk`` (without their blank-line ends), and the bytes of
    an event not yet whole, kept for the next chunk."""
    data = pending + chunk
    end = data.rfind(b"\n\n")
    if end < 0:
        return [], data
    return data[:end].split(b"\n\n"), data[end + 2:]


def skip_prefix(skip: str, text: str) -> tuple[str, str]:
    """``text`` less what is left of ``skip`` (what the client already has), and what is left of it then.
    A replica that takes another way than ``skip`` gets nothing dropped."""
    if not skip:
        return text, ""
    if skip.startswith(text):
        return "", skip[len(text):]
    if text.startswith(skip):
        return text[len(skip):], ""
    return text, ""


def greedy(body: dict[str, Any]) -> bool:
    temperature = body.get("temperature", 0.8)
    return (isinstance(temperature, (int, float)) and temperature <= 0) or body.get("top_k") == 1
