"""Hostile HTTP clients against a node's real HTTP server (uvicorn on loopback, as ``node.http`` runs
it): slow heads and slow bodies (slowloris) must not hold the node, and llama-server's 500s that
blame the request reach the client as 400s."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from meshllm.api.backends import DataPlane
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.node.http import HttpApi
from meshllm.state.document import MeshState
from tests.unit.dataplane_fakes import Upstream, node_a, read_request, upstream

pytestmark = pytest.mark.anyio

ROUTED = [pytest.param(False, id="local"), pytest.param(True, id="routed")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def open_slow(port: int, count: int, first: bytes) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        conns.append((reader, writer))
    return conns


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, trickle: bytes) -> bytes:
    """Trickle ``trickle`` a byte now and then until the server ends the connection; what it said."""
    answer = b""
    for byte in trickle:
        writer.write(bytes([byte]))
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=0.3)
        except TimeoutError:
            continue
        except ConnectionError:
            return answer
        if not data:
            return answer
        answer += data
    try:
        return answer + await asyncio.wait_for(reader.read(), timeout=1.0)
    except TimeoutError:
        return b"still held"


@pytest.mark.parametrize("stage", ["head", "body"])
async def test_slow_clients_are_cut_off_and_the_node_keeps_answering(stage: str) -> None:
    router = Router(MeshState(), node_id="n1")
    app = create_openai_app(DataPlane(router), body_deadline=1.0)
    port = free_port()
    api = HttpApi(app, host="127.0.0.1", port=port, what="OpenAI API", head_deadline=1.0)
    first = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if stage == "head" else
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{")
    async with anyio.create_task_group() as serving:
        await serving.start(api.run)
        slow = await open_slow(port, 300, first)  # 2,000 of these were held for 40 s
        started = time.monotonic()
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 503 and time.monotonic() - started < 2.0  # answered, promptly
        answers = await asyncio.gather(*(closed_by_server(r, w, trickle=b"x" * 40) for r, w in slow))
        took = time.monotonic() - started
        for _, writer in slow:
            writer.close()
        serving.cancel_scope.cancel()
    assert took < 6.0 and b"still held" not in answers, took  # each cut within its deadline (1 s here)
    if stage == "body":
        assert all(a.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in a for a in answers), answers[0]
    router.close()


# What llama-server answered (a 500) to requests that were the client's mistake, as seen
LLAMA_500 = {
    "no role": ("/v1/chat/completions", {"model": "m", "messages": [{"content": "hi"}]},
                "Failed to parse messages: Missing 'role' in message: {\"content\":\"hi\"}"),
    "tools": ("/v1/chat/completions", {"model": "m", "messages": [], "tools": "x"},
              "Failed to parse tools: Expected 'tools' to be an array, got \"x\"; tools = \"x\""),
    "no messages": ("/v1/messages", {"model": "m", "max_tokens": 4}, "'messages' is required"),
}


def answering_500(message: str) -> Callable[[Upstream, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    body = json.dumps({"error": {"code": 500, "message": message, "type": "server_error"}}).encode()

    async def answer(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json; charset=utf-8\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    return answer


@pytest.mark.parametrize("case", sorted(LLAMA_500))
@pytest.mark.parametrize("routed", ROUTED)
async def test_a_llama_server_500_for_a_malformed_request_reaches_the_client_as_a_400(routed: bool, case: str) -> None:
    path, request, message = LLAMA_500[case]
    async with upstream(answering_500(message)) as server, node_a(server.port, routed=routed) as (url, _, _):
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{url}{path}", json=request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] == message


async def test_a_llama_server_500_of_its_own_stays_a_500() -> None:
    async with upstream(answering_500("model crashed")) as server, node_a(server.port, routed=False) as (url, _, _):
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x"})
    assert response.status_code == 500 and response.json()["error"]["message"] == "model crashed"
