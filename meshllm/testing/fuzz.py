"""Fuzzing meshllm's inputs: hypothesis strategies for what strangers send, the parsers they reach, and
what a well-formed answer is. ``tests/unit/test_fuzz.py`` runs a seeded few hundred cases per target in
CI; ``bench/fuzz.py`` runs ten thousand and more against a real node process.

Inputs are mostly *almost* valid: a valid request, manifest, token or frame with one part replaced by
something else (a wrong type, a huge number, deep nesting, odd unicode, a cut), because a parser's
first check rejects plain noise and the bugs live behind it. Some plain noise too.

The oracle for HTTP answers (``answer_problem``): a 2xx JSON answer is a JSON object; a stream is
server-sent events whose data lines are JSON (or ``[DONE]``); any other status carries the OpenAI error
object (``{"error": {"message", ...}}``, or Anthropic's ``{"type": "error", "error": {...}}``). For the
in-process parsers (``PARSERS``) only their documented errors may escape.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from hypothesis import strategies as st

from meshllm.errors import ManifestError
from meshllm.jsonsafe import loads
from meshllm.store.mesh import InviteToken, MeshCredentials
from meshllm.transport.errors import FrameError
from meshllm.transport.framing import FrameDecoder, decode_message
from meshllm.transport.stream import decode_stream_header
from meshllm.tunnels.rpc import RpcTunnelError, decode_reply, decode_request
from meshllm.state.manifest import load_manifests

__all__ = ["PARSERS", "Tally", "answer_problem", "chat_bodies", "completion_bodies", "invite_texts", "json_values",
           "manifest_texts", "message_bodies", "mutated", "raw_frames"]

# -- values --------------------------------------------------------------------------------------
ODD_TEXT = st.sampled_from(["", " ", "\x00", "\ud7ff", "🦙" * 50, "a" * 5000, "null", "[]", "{}", "-1", "1e999",
                            "../../etc/passwd", "<script>", "%s%n", "\u202e"])
ODD_NUMBERS = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 1e308, -0.0])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), ODD_NUMBERS, st.floats(allow_nan=False),
                    st.text(max_size=30), ODD_TEXT)


def json_values(*, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value, small."""
    return st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=max_leaves)


def deep(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


def deep_text(depth: int) -> str:
    """JSON text nested ``depth`` deep (beyond what ``json.dumps`` of ``deep`` can write)."""
    return '{"a":[' * (depth // 2) + "1" + "]}" * (depth // 2)


WEIRD = st.one_of(json_values(), st.integers(min_value=10, max_value=400).map(deep))


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with a few fields (top level or one level down) replaced, removed or added."""
    value: dict[str, Any] = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        target: dict[str, Any] = value
        nested = [k for k, v in value.items() if isinstance(v, dict)]
        inner: bool = draw(st.booleans())
        if nested and inner:
            target = value[draw(st.sampled_from(nested))]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        key = draw(st.sampled_from(sorted(target))) if target and action != "add" else draw(st.text(max_size=12))
        if action == "remove":
            target.pop(key, None)
        else:
            target[key] = draw(WEIRD)
    return value


# -- requests -------------------------------------------------------------------------------------
def chat_bodies(model: str) -> st.SearchStrategy[Any]:
    base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    return st.one_of(mutated(base), st.builds(lambda stream, n: {**base, "stream": stream, "max_tokens": n},
                                              st.booleans(), st.integers(min_value=-2, max_value=8)))


def completion_bodies(model: str) -> st.SearchStrategy[Any]:
    base = {"model": model, "prompt": "once upon", "max_tokens": 4, "temperature": 0, "stream": False}
    return mutated(base)


def message_bodies(model: str) -> st.SearchStrategy[Any]:
    base = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    return mutated(base)


def raw_bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), json_values().map(lambda v: json.dumps(v).encode()),
                     st.integers(min_value=500, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
                     st.just(b'{"model": "x"'), st.just(b"\xff\xfe{}"))


# -- manifests, tokens, frames ---------------------------------------------------------------------
MODEL_MANIFEST = {"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": "m"},
                  "spec": {"source": "gemma-3-270m", "replicas": 1, "ctxSize": 0, "placement": {"node": ""}}}
MESH_MANIFEST = {"apiVersion": "meshllm/v1", "kind": "Mesh", "metadata": {"name": "mesh"},
                 "spec": {"models": [{"name": "m", "source": "gemma-3-270m"}]}}


def manifest_values() -> st.SearchStrategy[Any]:
    return st.one_of(mutated(MODEL_MANIFEST), mutated(MESH_MANIFEST), json_values())


def manifest_texts() -> st.SearchStrategy[str]:
    """YAML (or JSON) text of one or more manifests, some cut short or garbled."""
    docs = st.lists(manifest_values(), min_size=1, max_size=3)
    as_yaml = docs.map(lambda ds: yaml.safe_dump_all(ds, allow_unicode=True))
    return st.one_of(as_yaml, as_yaml.flatmap(lambda t: st.integers(0, len(t)).map(lambda n: t[:n])),
                     st.text(max_size=200), st.just("a: &a [*a]"), st.just("- " * 3000 + "x"))


def invite_texts() -> st.SearchStrategy[str]:
    creds = MeshCredentials(mesh_id="mesh-1", secret=b"s" * 32)
    good = InviteToken(creds, ("127.0.0.1:4242",)).encode()

    def forged_text(text: str) -> str:
        return "meshllm1." + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    def forged(body: Any) -> str:
        return forged_text(json.dumps(body))

    real_body = {"v": 1, "mesh": "mesh-1", "secret": "c" * 43, "kid": "x", "addrs": ["127.0.0.1:1"]}
    return st.one_of(st.integers(0, len(good)).map(lambda n: good[:n]), st.text(max_size=100),
                     mutated(real_body).map(forged), json_values().map(forged),
                     st.integers(min_value=100, max_value=5000).map(lambda n: forged_text(deep_text(n))))


def raw_frames() -> st.SearchStrategy[bytes]:
    """Bytes for a framed stream: length-prefixed payloads (JSON, noise, deep nesting), or noise."""
    payload = st.one_of(json_values().map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                        st.integers(min_value=100, max_value=5000).map(lambda n: deep_text(n).encode()))
    framed = payload.map(lambda p: len(p).to_bytes(4, "big") + p)
    return st.one_of(st.lists(framed, min_size=1, max_size=3).map(b"".join), st.binary(max_size=300),
                     st.binary(min_size=4, max_size=4).map(lambda b: b + b"x" * 10))


def _frames(data: bytes) -> None:
    decoder = FrameDecoder(max_size=4096)
    decoder.feed(data)
    while (payload := decoder.pop()) is not None:
        decode_message(payload)


# Each parser, the strategy of its input, and the errors it may raise (anything else is a bug).
PARSERS: dict[str, tuple[Callable[[Any], object], st.SearchStrategy[Any], tuple[type[BaseException], ...]]] = {
    "manifest": (lambda text: load_manifests(text, source_name="fuzz.yaml"), manifest_texts(), (ManifestError,)),
    "invite token": (InviteToken.decode, invite_texts(), (ValueError,)),
    "frames": (_frames, raw_frames(), (FrameError,)),
    "stream header": (decode_stream_header, st.binary(max_size=80), (FrameError,)),
    "rpc request": (decode_request, st.binary(max_size=80), (FrameError,)),
    "rpc reply": (decode_reply, st.binary(max_size=80), (RpcTunnelError,)),
    "json": (loads, raw_bodies(), (ValueError,)),
}


# -- answers ---------------------------------------------------------------------------------------
def answer_problem(status: int, content_type: str, body: bytes) -> str | None:
    """What is malformed about an HTTP answer, or None when it is well-formed."""
    if 200 <= status < 300:
        if content_type.startswith("text/event-stream"):
            return _stream_problem(body)
        try:
            parsed = json.loads(body)
        except ValueError:
            return f"{status} answer is not JSON: {body[:80]!r}"
        return None if isinstance(parsed, (dict, list)) else f"{status} answer is not a JSON object"
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return f"{status} answer is not a JSON error object: {body[:80]!r}"
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return f"{status} answer has no error message: {body[:80]!r}"
    return None


def _stream_problem(body: bytes) -> str | None:
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                continue
            try:
                json.loads(data)
            except ValueError:
                return f"stream event is not JSON: {data[:80]!r}"
    return None


@dataclass
class Tally:
    """Counts of one fuzz run."""

    cases: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # malformed answers, unexpected exceptions
    server_errors: list[str] = field(default_factory=list)  # well-formed 5xx answers, what they said

    def case(self, target: str) -> None:
        self.cases[target] = self.cases.get(target, 0) + 1

    def status(self, code: int) -> None:
        key = f"{code // 100}xx" if code != 500 else "500"
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def server_error(self, text: str) -> None:
        self.server_errors.append(text)

    def problem(self, target: str, text: str) -> None:
        self.problems.append(f"{target}: {text}")

    @property
    def total(self) -> int:
        return sum(self.cases.values())
