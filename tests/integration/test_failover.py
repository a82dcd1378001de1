"""Failover with real parts: two nodes serve replicas of one model, a ``--client`` node proxies.

What a user notices: when the node serving their streams dies (kill -9, machine gone) or only its
llama-server does, the streams go on without a break and end with exactly the text an uninterrupted
greedy run gives; new requests keep succeeding within seconds; the client node's ``/metrics`` counts
the failovers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from meshllm.testing.engines import engine_pids
from tests.integration.nodes import Mesh, NodeProcess, listed, wait_for

pytestmark = pytest.mark.engine

MODEL = "twin"
PROMPTS = ["Once upon a time", "The quick brown fox", "In the beginning", "It was a dark night"]
MAX_TOKENS = 1200


@dataclass
class Stream:
    """One streamed completion read in a thread: its text so far, and how it ended."""

    prompt: str
    text: list[str] = field(default_factory=list)
    usage: Any = None
    error: BaseException | None = None
    finish: str | None = None


@pytest.fixture
def twins(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, NodeProcess]]:
    from meshllm.engine.tinygguf import write_dense

    # llama.cpp's CPU flash attention takes another path for several rows than for one, so a greedy
    # answer can change with what else is in the batch (measured: 2 of 4 streams differ between a solo
    # and a concurrent run). Without it, a run is batch-invariant, and "equals an uninterrupted run"
    # tests the failover, not the batching. The nodes pass the variable on to their llama-servers.
    monkeypatch.setenv("LLAMA_ARG_FLASH_ATTN", "off")
    monkeypatch.setenv("LLAMA_ARG_N_PARALLEL", "8")  # room for a new request beside the 4 moved streams
    monkeypatch.setenv("LLAMA_ARG_THREADS", "1")

    # big enough to stream for seconds on one thread (the test kills a node while the streams run)
    model = write_dense(tmp_path_factory.mktemp("failover-models") / "twin.gguf", n_ctx=16384, n_layer=8,
                        n_embd=384, n_ff=1024)
    a = mesh.start("a", "127.0.0.2", "--standby")
    token = a.token()
    b = mesh.start("b", "127.0.0.3", "--standby", "--join", token)
    c = mesh.start("c", "127.0.0.4", "--client", "--join", token)
    manifest = {"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": MODEL},
                "spec": {"source": str(model), "replicas": 2, "ctxSize": 16384}}
    applied = a.cli("apply", "-f", "-", stdin=json.dumps(manifest))
    assert applied.returncode == 0, applied.stderr
    wait_for(lambda: len(ready(c)) == 2, timeout=90, what="two servers of the model, seen from C")
    wait_for(lambda: listed(c) == {MODEL}, timeout=30, what="C to list the model")
    ids = {a.status()["node"]["id"]: a, b.status()["node"]["id"]: b}
    yield {"a": a, "b": b, "c": c, **ids}


def ready(node: NodeProcess) -> list[dict[str, Any]]:
    for entry in node.status()["models"]:
        if entry["name"] == MODEL:
            return [s for s in entry["servers"] if s["phase"] == "ready"]
    return []


def read_stream(api: str, stream: Stream) -> None:
    try:
        with openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            for chunk in client.completions.create(model=MODEL, prompt=stream.prompt, max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices:
                    stream.text.append(chunk.choices[0].text)
                    stream.finish = chunk.choices[0].finish_reason or stream.finish
                stream.usage = chunk.usage or stream.usage
    except BaseException as exc:  # the test asserts there was none
        stream.error = exc


def read_message(api: str, stream: Stream) -> None:
    """``read_stream`` through Anthropic's API and SDK (``usage`` here: the final output token count)."""
    try:
        with anthropic.Anthropic(base_url=api, api_key="unused", max_retries=0, timeout=120) as client:
            events = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, stream=True,
                                            messages=[{"role": "user", "content": stream.prompt}],
                                            extra_body={"ignore_eos": True, "temperature": 0})  # greedy: no SDK argument
            with events:
                for event in events:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        stream.text.append(event.delta.text)
                    elif event.type == "message_delta":
                        stream.finish, stream.usage = event.delta.stop_reason, event.usage.output_tokens
    except BaseException as exc:  # the test asserts there was none
        stream.error = exc


def run_streams(api: str, *, when_started: Any = None, reader: Any = read_stream) -> list[Stream]:
    """Four greedy streams at once; ``when_started`` runs once each has tokens (then they go on)."""
    streams = [Stream(p) for p in PROMPTS]
    threads = [threading.Thread(target=reader, args=(api, s)) for s in streams]
    for thread in threads:
        thread.start()
    if when_started is not None:
        wait_for(lambda: all(len(s.text) >= 20 or s.error for s in streams), timeout=60,
                 what="tokens on every stream")
        when_started()
    for thread in threads:
        thread.join(timeout=180)
    return streams


def failovers(node: NodeProcess) -> float:
    text = httpx.get(f"http://127.0.0.1:{node.console}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r'^meshllm_failovers_total\{[^}]*stage="mid_stream"[^}]*\} (\S+)$',
                                             text, re.M))


def busy(node: NodeProcess) -> int:
    port = node.server(MODEL)["port"]
    slots = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
    return sum(1 for slot in slots if slot.get("is_processing"))


def serving_node(twins: dict[str, NodeProcess]) -> tuple[NodeProcess, int]:
    """The serving node whose llama-server holds most of the streams now, and how many."""
    node = max((twins["a"], twins["b"]), key=busy)
    return node, busy(node)


def assert_whole(streams: list[Stream], reference: list[Stream]) -> None:
    for got, want in zip(streams, reference, strict=True):
        assert got.error is None, f"{got.prompt!r}: {got.error!r}"
        assert got.finish == "length"
        assert "".join(got.text) == "".join(want.text), f"{got.prompt!r} differs from an uninterrupted run"
        assert got.usage.completion_tokens == MAX_TOKENS
        assert got.usage.prompt_tokens == want.usage.prompt_tokens


def test_streams_survive_the_death_of_their_node(twins: dict[str, NodeProcess]) -> None:
    c = twins["c"]
    reference = run_streams(c.api)
    for stream in reference:
        assert stream.error is None and stream.finish == "length"
    victims: list[NodeProcess] = []
    answered: list[float] = []

    def kill() -> None:
        victim, streams_on_it = serving_node(twins)
        assert streams_on_it >= 1
        victims.append(streams_on_it)
        assert victim.proc is not None
        victim.proc.kill()
        for pid in engine_pids(victim.state_dir):  # the machine is gone: its llama-server too
            os.killpg(pid, signal.SIGKILL)
        killed = time.monotonic()
        with openai.OpenAI(base_url=f"{c.api}/v1", api_key="unused", max_retries=0, timeout=10) as client:
            reply = client.completions.create(model=MODEL, prompt="hi", max_tokens=8, temperature=0)
        assert reply.choices[0].text
        answered.append(time.monotonic() - killed)

    streams = run_streams(c.api, when_started=kill)
    assert_whole(streams, reference)
    print(f"\nnode killed mid-stream: all 4 streams whole; a new request answered {answered[0]:.2f}s after the kill")
    assert answered[0] < 5
    assert failovers(c) == victims[0]  # each stream the dead node held moved once


def kill_busiest_llama_server(twins: dict[str, NodeProcess], killed: list[int]) -> Any:
    """What ``run_streams`` runs once the streams are under way: kill -9 the llama-server holding most of
    them, noting how many it held."""
    def kill() -> None:
        victim, streams_on_it = serving_node(twins)
        assert streams_on_it >= 1
        os.kill(int(victim.server(MODEL)["pid"]), signal.SIGKILL)
        killed.append(streams_on_it)
    return kill


def test_streams_survive_the_death_of_their_llama_server(twins: dict[str, NodeProcess]) -> None:
    c = twins["c"]
    reference = run_streams(c.api)
    killed: list[int] = []
    kill = kill_busiest_llama_server(twins, killed)

    streams = run_streams(c.api, when_started=kill)
    assert_whole(streams, reference)
    assert failovers(c) == killed[0]


def test_anthropic_messages_survive_the_death_of_their_llama_server(twins: dict[str, NodeProcess]) -> None:
    """The same through ``/v1/messages`` with Anthropic's SDK: one message each, as if never broken."""
    c = twins["c"]
    reference = run_streams(c.api, reader=read_message)
    for stream in reference:
        assert stream.error is None and stream.finish == "max_tokens" and stream.usage == MAX_TOKENS
    killed: list[int] = []
    kill = kill_busiest_llama_server(twins, killed)

    streams = run_streams(c.api, when_started=kill, reader=read_message)
    for got, want in zip(streams, reference, strict=True):
        assert got.error is None, f"{got.prompt!r}: {got.error!r}"
        assert "".join(got.text) == "".join(want.text), f"{got.prompt!r} differs from an uninterrupted run"
        assert got.finish == "max_tokens" and got.usage == MAX_TOKENS
    assert failovers(c) == killed[0]
