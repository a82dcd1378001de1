"""The data plane with real parts: node A serves a tiny model through a real llama-server, node B is a
``--client`` that reaches it through the mesh; requests go to A ("local") or to B ("routed"). The
model has a 32k context, so a request without a limit runs for a long while unless stopped.

What a user notices: a llama-server killed mid-stream ends the stream with an error the client sees
(the openai SDK raises) within seconds; a client that goes away stops the generation, non-streamed
too; curl's ``Expect: 100-continue`` never mixes up two users' answers; /health tells whether the
node can serve.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.nodes import Mesh, NodeProcess, listed, wait_for

pytestmark = pytest.mark.engine

MODEL = "long-dense"
TARGETS = ["local", "routed"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, engine_dir: Path) -> Iterator[dict[str, NodeProcess]]:
    from meshllm.engine.tinygguf import write_dense

    model = write_dense(tmp_path_factory.mktemp("models") / f"{MODEL}.gguf", n_ctx=32768)
    mesh = Mesh(tmp_path_factory.mktemp("dataplane"), engine_dir)
    try:
        a = mesh.start("a", "127.0.0.2", models=(str(model),))
        a.wait_ready(MODEL)
        b = mesh.start("b", "127.0.0.3", "--client", "--join", a.token())
        wait_for(lambda: listed(b) == {MODEL}, timeout=60, what="B to list the model")
        yield {"local": a, "routed": b}
    finally:
        mesh.close()


def llama_port(pair: dict[str, NodeProcess], *, not_pid: int = 0) -> int:
    """The port of A's llama-server once it answers (a new one, when ``not_pid`` was killed)."""
    a = pair["local"]

    def ready() -> bool:
        server = a.server(MODEL)
        return (server["phase"] == "ready" and server["pid"] != not_pid
                and httpx.get(f"http://127.0.0.1:{server['port']}/health", timeout=2).status_code == 200)

    wait_for(ready, timeout=60, what="A's llama-server to be ready")
    return int(a.server(MODEL)["port"])


def busy_slots(port: int) -> int:
    slots = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
    return sum(1 for slot in slots if slot.get("is_processing"))


def wait_idle(port: int, *, timeout: float = 8.0) -> None:
    """Wait until llama-server generates nothing. Polled slowly on purpose: it checks whether the client
    of a non-streamed request went away only after a whole second without any result, and answering
    /slots is a result; polling faster would keep it from ever looking (tools/server/server-queue.cpp)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.5)
        if busy_slots(port) == 0:
            return
    raise AssertionError(f"llama-server still generating {timeout:.0f}s after its client went away")


def long_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100000, "temperature": 0,
            "ignore_eos": True, **extra}


@pytest.mark.parametrize("target", TARGETS)
def test_a_llama_server_killed_mid_stream_ends_it_with_an_error_event(pair: dict[str, NodeProcess],
                                                                       target: str) -> None:
    node = pair[target]
    llama_port(pair)
    pid = int(pair["local"].server(MODEL)["pid"])
    events: list[str] = []
    with httpx.stream("POST", f"{node.api}/v1/completions", json=long_body(stream=True), timeout=30) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                break
        events += [line for line in lines if line.startswith("data: ")]
    ended = time.monotonic() - killed
    assert ended < 5, f"the stream went on {ended:.1f}s after llama-server died"
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_broken" and error["message"]
    assert "data: [DONE]" not in events

    llama_port(pair, not_pid=pid)  # restarted by the node; now the openai SDK
    pid = int(pair["local"].server(MODEL)["pid"])
    received = 0
    with openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0) as client, \
            pytest.raises(openai.APIError, match="broke"):
        for _ in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=100000, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
            received += 1
            if received == 3:
                os.kill(pid, signal.SIGKILL)
    assert received >= 3


@pytest.mark.parametrize("target", TARGETS)
def test_a_client_that_goes_away_stops_the_generation_non_streamed_too(pair: dict[str, NodeProcess],
                                                                       target: str) -> None:
    port = llama_port(pair)
    gave_up: list[Exception] = []

    def impatient() -> None:  # waits 3 s for a whole answer, then hangs up
        try:
            httpx.post(f"{pair[target].api}/v1/completions", json=long_body(), timeout=httpx.Timeout(10, read=3))
        except httpx.ReadTimeout as exc:
            gave_up.append(exc)

    thread = threading.Thread(target=impatient)
    thread.start()
    wait_for(lambda: busy_slots(port) == 1, timeout=3, what="the generation to start")
    thread.join()
    assert gave_up
    wait_idle(port)

    # a streaming client reads on (llama-server drops a stream whose client stops reading), then hangs up
    enough = threading.Event()

    def reader() -> None:
        with httpx.stream("POST", f"{pair[target].api}/v1/completions", json=long_body(stream=True),
                          timeout=10) as response:
            for _ in response.iter_lines():
                if enough.is_set():
                    return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        wait_for(lambda: busy_slots(port) == 1, timeout=15, what="the stream to start")
    finally:
        enough.set()
        thread.join()
    wait_idle(port)


def _raw_request(api: str, body: bytes, *, expect: bool) -> dict[str, object]:
    """One request as curl sends it (``Expect: 100-continue`` for big bodies), on its own connection."""
    host, port = api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n" + ("Expect: 100-continue\r\n" if expect else "") + "\r\n")
        sock.sendall(head.encode())
        reader = sock.makefile("rb")
        if expect:
            assert reader.readline() == b"HTTP/1.1 100 Continue\r\n" and reader.readline() == b"\r\n"
        sock.sendall(body)
        assert reader.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        answer: dict[str, object] = json.loads(reader.read(length))
        return answer


@pytest.mark.parametrize("target", TARGETS)
def test_after_a_100_continue_request_two_clients_get_their_own_answers(pair: dict[str, NodeProcess],
                                                                        target: str) -> None:
    direct = f"http://127.0.0.1:{llama_port(pair)}"

    def body(prompt: str, tokens: int, *, pad: int = 0) -> bytes:
        request = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        return json.dumps(request).encode() + b" " * pad

    big = body("A long story about the sea", 40, pad=1 << 20)  # curl says Expect: 100-continue from 1 MiB
    small = body("Hi", 3)
    want_big = httpx.post(f"{direct}/v1/completions", content=big, timeout=30).json()["choices"][0]["text"]
    want_small = httpx.post(f"{direct}/v1/completions", content=small, timeout=30).json()["choices"][0]["text"]
    assert want_big != want_small
    with httpx.Client(base_url=pair[target].api, timeout=30) as other_user:
        for _ in range(3):
            got = _raw_request(pair[target].api, big, expect=True)
            assert got["choices"][0]["text"] == want_big  # type: ignore[index]
            answer = other_user.post("/v1/completions", content=small, headers={"content-type": "application/json"})
            assert answer.json()["choices"][0]["text"] == want_small


def test_health_says_whether_the_node_can_serve(pair: dict[str, NodeProcess], tmp_path: Path,
                                                engine_dir: Path) -> None:
    llama_port(pair)
    for node in pair.values():
        health = httpx.get(f"{node.api}/health", timeout=5)
        assert health.status_code == 200 and health.json()["models"] == [MODEL]
    lonely = NodeProcess(models=[], state_dir=tmp_path / "lonely", engine_dir=engine_dir, extra=["--client"]).start()
    try:
        wait_for(lambda: httpx.get(f"{lonely.api}/health", timeout=2).status_code == 503, timeout=30,
                 what="a client node alone to answer /health")
        assert "no model is served" in httpx.get(f"{lonely.api}/health", timeout=2).json()["error"]["message"]
    finally:
        lonely.kill_everything()
