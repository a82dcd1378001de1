"""The console's event feed (``api.events``), its metrics (``api.metrics``) and who may read them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from meshllm.api.admin import ConsoleAccess
from meshllm.api.console import console_routes
from meshllm.api.events import EventHub, diff_status
from meshllm.api.metrics import MeshMetrics, RequestMetering
from meshllm.api.status import create_status_app, status_snapshot
from meshllm.engine.sources import SourcePolicy
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeStatus


def node(nid: str, **fields: Any) -> dict[str, Any]:
    return {"id": nid, "state": "alive", **fields}


@pytest.mark.parametrize(("old", "new", "change"), [
    ({"nodes": [node("a")], "models": []}, {"nodes": [node("a")], "models": []}, {}),
    ({"nodes": [node("a")]}, {"nodes": [node("a"), node("b")]}, {"put": {"nodes": [node("b")]}}),
    ({"nodes": [node("a"), node("b")]}, {"nodes": [node("a")]}, {"removed": {"nodes": ["b"]}}),
    ({"nodes": [node("a", rtt_ms={"b": 1.0})]}, {"nodes": [node("a", rtt_ms={"b": 2.0})]},
     {"put": {"nodes": [node("a", rtt_ms={"b": 2.0})]}}),
    ({"models": [{"name": "m", "phase": "loading"}]}, {"models": [{"name": "m", "phase": "ready"}]},
     {"put": {"models": [{"name": "m", "phase": "ready"}]}}),
    ({"mesh_id": "x", "metrics": {}}, {"mesh_id": "x", "metrics": {"m": {"requests": 1}}},
     {"set": {"metrics": {"m": {"requests": 1}}}}),
])
def test_a_change_says_only_what_differs(old: dict[str, Any], new: dict[str, Any], change: dict[str, Any]) -> None:
    assert diff_status(old, new) == change


class Feed:
    """A hub over a real state document and its status, the way the node builds it."""

    def __init__(self, **options: Any) -> None:
        self.state = MeshState()
        self.state.put_node(NodeStatus(id="n1", name="one", capacity_bytes=8 << 30))
        self.hub = EventHub(lambda: status_snapshot(self.state, node_id="n1", now=1000.0), **options)
        self.hub.refresh()

    def join(self, nid: str) -> None:
        self.state.put_node(NodeStatus(id=nid, name=nid, capacity_bytes=4 << 30))
        self.hub.refresh()


async def read_event(stream: AsyncIterator[bytes]) -> tuple[str, str, dict[str, Any]]:
    """The next event of a stream (skipping comments): id, name, data."""
    while True:
        with anyio.fail_after(5):
            block = (await anext(stream)).decode()
        fields = dict(line.split(": ", 1) for line in block.strip().split("\n") if not line.startswith(":")
                      and ": " in line)
        if "event" in fields:
            return fields["id"], fields["event"], json.loads(fields["data"])


async def test_a_client_gets_a_snapshot_then_each_change() -> None:
    feed = Feed()
    stream = feed.hub.events()
    ident, name, data = await read_event(stream)
    assert name == "snapshot" and [n["id"] for n in data["nodes"]] == ["n1"]
    feed.join("n2")
    ident2, name, data = await read_event(stream)
    assert name == "change" and [n["id"] for n in data["put"]["nodes"]] == ["n2"]
    assert ident2 != ident
    await stream.aclose()
    assert feed.hub.clients == 0


async def test_a_client_that_resumes_gets_only_what_it_missed() -> None:
    feed = Feed()
    first = feed.hub.events()
    await read_event(first)
    feed.join("n2")
    seen, _, _ = await read_event(first)
    await first.aclose()  # disconnected; two nodes join meanwhile
    feed.join("n3")
    feed.join("n4")
    resumed = feed.hub.events(seen)
    got = [await read_event(resumed), await read_event(resumed)]
    assert [(name, [n["id"] for n in data["put"]["nodes"]]) for _, name, data in got] == \
        [("change", ["n3"]), ("change", ["n4"])]
    await resumed.aclose()


@pytest.mark.parametrize("last_id", ["othernode-1", "garbage", "EPOCH-99"])
async def test_an_unknown_or_future_event_id_gets_a_fresh_snapshot(last_id: str) -> None:
    feed = Feed()
    feed.join("n2")
    stream = feed.hub.events(last_id.replace("EPOCH", feed.hub.epoch))
    _, name, data = await read_event(stream)
    assert name == "snapshot" and {n["id"] for n in data["nodes"]} == {"n1", "n2"}
    await stream.aclose()


async def test_changes_gone_from_the_history_mean_a_snapshot() -> None:
    feed = Feed(history=2)
    stream = feed.hub.events()
    seen, _, _ = await read_event(stream)
    await stream.aclose()
    for nid in ("n2", "n3", "n4"):
        feed.join(nid)
    resumed = feed.hub.events(seen)
    _, name, data = await read_event(resumed)
    assert name == "snapshot" and len(data["nodes"]) == 4
    await resumed.aclose()


async def test_a_feed_nobody_watches_computes_nothing_and_a_late_resume_gets_a_snapshot() -> None:
    now = [0.0]
    feed = Feed()
    calls = [0]
    status = feed.hub.status
    feed.hub = EventHub(lambda: (calls.__setitem__(0, calls[0] + 1), status())[1], linger=10, clock=lambda: now[0])
    feed.hub.refresh()
    stream = feed.hub.events()
    seen, _, _ = await read_event(stream)
    await stream.aclose()
    feed.join("n2")  # within the linger: computed, kept for a resume
    now[0] = 11.0
    computed = calls[0]
    feed.join("n3")
    feed.join("n4")
    assert calls[0] == computed  # nobody watching: no status computed
    resumed = feed.hub.events(seen)
    _, name, data = await read_event(resumed)
    assert name == "snapshot" and len(data["nodes"]) == 4
    await resumed.aclose()


async def test_a_slow_client_is_dropped_and_resynced_without_holding_the_others_back() -> None:
    feed = Feed(client_buffer=3)
    slow, fast = feed.hub.events(), feed.hub.events()
    await read_event(slow)
    await read_event(fast)
    for i in range(10):
        feed.join(f"p{i}")
        _, name, data = await read_event(fast)  # the fast one reads each change as it comes
        assert name == "change" and data["put"]["nodes"][0]["id"] == f"p{i}"
        assert all(len(c.queue) <= 3 for c in feed.hub._clients)  # bounded, whatever the slow one does
    _, name, data = await read_event(slow)
    assert name == "snapshot" and len(data["nodes"]) == 11  # it lost the changes, not the state
    feed.join("late")
    _, name, data = await read_event(slow)
    assert name == "change" and data["put"]["nodes"][0]["id"] == "late"
    await slow.aclose()
    await fast.aclose()


async def test_a_quiet_stream_sends_keepalives() -> None:
    feed = Feed(keepalive=0.01)
    stream = feed.hub.events()
    await read_event(stream)
    with anyio.fail_after(5):
        assert await anext(stream) == b": keepalive\n\n"
    await stream.aclose()


async def test_closing_the_hub_ends_every_stream_at_once() -> None:
    """A stopping node ends its console streams itself: its HTTP server does not wait out its grace period."""
    feed = Feed()  # keepalive 15 s: only close() can end the wait
    streams = [feed.hub.events() for _ in range(3)]
    for stream in streams:
        await read_event(stream)
    feed.hub.close()
    for stream in streams:
        with anyio.fail_after(1):
            with pytest.raises(StopAsyncIteration):
                await anext(stream)
    assert feed.hub.clients == 0


async def test_the_run_loop_coalesces_a_burst_of_changes() -> None:
    feed = Feed(interval=0.05, tick=60)
    feed.state.observe(feed.hub.notify)
    async with anyio.create_task_group() as tg:
        await tg.start(feed.hub.run)
        stream = feed.hub.events()
        await read_event(stream)
        with feed.state.transaction():
            pass
        for nid in ("a", "b", "c"):
            feed.state.put_node(NodeStatus(id=nid, name=nid))
        _, name, data = await read_event(stream)
        seen = {n["id"] for n in data["put"]["nodes"]}
        while seen != {"a", "b", "c"}:  # at most a couple of events, never one per write
            _, _, data = await read_event(stream)
            seen |= {n["id"] for n in data["put"]["nodes"]}
        assert feed.hub.published <= 2
        await stream.aclose()
        tg.cancel_scope.cancel()


# -- metrics -------------------------------------------------------------------------------------

def fake_llm(chunks: list[bytes], *, status: int = 200, stream: bool = True) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        kind = b"text/event-stream" if stream else b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    return app


def metrics_with(app: Any) -> tuple[MeshMetrics, TestClient]:
    state = MeshState()
    state.put_model(ModelSpec(name="tiny", source="tiny.gguf", size_bytes=1 << 20))
    metrics = MeshMetrics(state, node_id="n1")
    return metrics, TestClient(RequestMetering(app, metrics, clock=iter(range(0, 1000)).__next__))


def test_a_streamed_answer_counts_tokens_ttft_and_rate_from_llama_server_timings() -> None:
    last = {"choices": [{"delta": {}, "finish_reason": "stop"}],
            "timings": {"prompt_n": 7, "predicted_n": 5, "predicted_per_second": 42.5}}
    chunks = [b'data: {"choices":[{"delta":{"content":"he"}}]}\n\n', b'data: {"choices":[{"delta":{"content":"llo"}}]}\n',
              b"\n", b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"]
    metrics, client = metrics_with(fake_llm(chunks))
    for _ in range(3):
        assert client.post("/v1/chat/completions", json={"model": "tiny", "stream": True}).status_code == 200
    figures = metrics.summary()["tiny"]
    assert figures["requests"] == 3 and figures["errors"] == 0 and figures["in_flight"] == 0
    assert (figures["tokens_in"], figures["tokens_out"]) == (21, 15)
    assert figures["decode_avg_tps"] == 42.5 and figures["ttft_avg_s"] > 0


def test_a_plain_answer_counts_its_usage_and_an_error_counts_as_one() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}).encode()
    metrics, client = metrics_with(fake_llm([body[:10], body[10:]], stream=False))
    client.post("/v1/completions", json={"model": "tiny"})
    metrics2, failing = metrics_with(fake_llm([b'{"error": {"message": "no"}}'], status=503, stream=False))
    failing.post("/v1/chat/completions", json={"model": "tiny"})
    assert (metrics.summary()["tiny"]["tokens_in"], metrics.summary()["tiny"]["tokens_out"]) == (4, 9)
    assert metrics2.summary()["tiny"]["errors"] == 1


def test_an_error_inside_a_stream_counts_and_unknown_models_add_no_series() -> None:
    metrics, client = metrics_with(fake_llm([b'data: {"choices":[]}\n\n', b'data: {"error": {"message": "x"}}\n\n']))
    client.post("/v1/chat/completions", json={"model": "tiny", "stream": True})
    client.post("/v1/chat/completions", json={"model": "made-up-name"})
    assert metrics.summary()["tiny"]["errors"] == 1
    assert list(metrics.summary()) == ["tiny"]


async def test_a_request_is_queued_until_the_first_byte_of_its_answer() -> None:
    gate, first_sent, finish = anyio.Event(), anyio.Event(), anyio.Event()

    async def engine(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await gate.wait()  # no slot free yet
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices":[]}\n\n', "more_body": True})
        first_sent.set()
        await finish.wait()
        await send({"type": "http.response.body", "body": b""})

    state = MeshState()
    state.put_model(ModelSpec(name="tiny", source="tiny.gguf", size_bytes=1 << 20))
    metrics = MeshMetrics(state, node_id="n1")
    metered = RequestMetering(engine, metrics)
    body = json.dumps({"model": "tiny", "stream": True}).encode()

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    figures = lambda: (metrics.summary()["tiny"]["in_flight"], metrics.summary()["tiny"]["waiting"])  # noqa: E731
    async with anyio.create_task_group() as tg:
        tg.start_soon(metered, scope, receive, send)
        with anyio.fail_after(5):
            while "tiny" not in metrics.summary():
                await anyio.sleep(0.01)
        assert figures() == (1, 1)
        gate.set()
        await first_sent.wait()
        assert figures() == (1, 0)
        finish.set()
    assert figures() == (0, 0)


# -- who may read what ---------------------------------------------------------------------------

def console(*, listen_all: bool) -> TestClient:
    state = MeshState()
    hub = EventHub(lambda: status_snapshot(state, node_id="n1", now=0.0))
    metrics = MeshMetrics(state, node_id="n1")
    access = ConsoleAccess.for_bind("tok", listen_all=listen_all, names=["10.1.2.3"])
    app = create_status_app(state, node_id="n1", access=access, sources=SourcePolicy(()),
                            routes=[*hub.routes(), *metrics.routes(), *console_routes(openai_base="http://127.0.0.1:9")])
    return TestClient(app, base_url="http://127.0.0.1:3131")


@pytest.mark.parametrize(("path", "loopback", "beyond"), [
    ("/", 200, 401), ("/console.js", 200, 401), ("/metrics", 200, 401),
    ("/api/token", 401, 401), ("/nothing", 401, 401),  # "/" is the page, not a prefix opening every path
])
def test_the_page_and_metrics_are_public_on_loopback_only(path: str, loopback: int, beyond: int) -> None:
    assert console(listen_all=False).get(path).status_code == loopback
    assert console(listen_all=True).get(path).status_code == beyond
    assert console(listen_all=True).get(path, headers={"Authorization": "Bearer tok"}).status_code in (200, 404)


def test_the_chat_relay_needs_the_token_even_on_loopback() -> None:
    client = console(listen_all=False)
    answer = client.post("/api/chat/completions", json={"model": "tiny"})
    assert answer.status_code == 401
    relayed = client.post("/api/chat/completions", json={"model": "tiny"}, headers={"Authorization": "Bearer tok"})
    assert relayed.status_code == 502 and relayed.json()["error"]["code"] == "upstream_unavailable"


def test_metrics_are_prometheus_text_with_node_figures() -> None:
    text = console(listen_all=False).get("/metrics").text
    assert "meshllm_node_capacity_bytes" in text and 'meshllm_gossip_bytes{direction="sent"}' in text
