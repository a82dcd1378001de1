"""The proxy's data plane against stand-in llama-servers, on this node and through a peer's tunnel.

What a client sees when the upstream fails before or after the response began, when the client goes
away, and when it sends ``Expect: 100-continue``; and that every request's lease is given back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import anyio
import httpx
import openai
import pytest

from meshllm.api.routing import Router
from tests.unit.dataplane_fakes import Upstream, node_a, read_request, upstream, wait_hang_up

ROUTED = [pytest.param(False, id="local"), pytest.param(True, id="routed")]
EVENTS = [b'data: {"choices": [{"text": "one", "index": 0}]}\n\n', b'data: {"choices": [{"text": "two", "index": 0}]}\n\n']


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def sse_then_die(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    state.heads.append((await read_request(reader))[0])
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for event in EVENTS:
        writer.write(chunk(event))
        await writer.drain()
    writer.transport.abort()  # llama-server killed: no final chunk


async def json_then_die(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"choices": [')
    await writer.drain()
    writer.transport.abort()


async def echo(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with its body, like a model that repeats its prompt; says ``100 Continue``
    first when asked to (as llama-server does)."""
    while True:
        head, body = await read_request(reader)
        state.heads.append(head)
        if b"expect: 100-continue" in head.lower():
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        answer = json.dumps({"prompt": json.loads(body)["prompt"][:40]}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()


async def hold(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A non-streamed generation that takes long: nothing comes back until the proxy hangs up."""
    await read_request(reader)
    await wait_hang_up(state, reader)


async def leases_returned(router: Router) -> None:
    with anyio.fail_after(5):
        while sum(router.in_flight.values()):
            await anyio.sleep(0.01)


@pytest.mark.parametrize("routed", ROUTED)
async def test_a_stream_whose_upstream_dies_ends_with_an_error_event(routed: bool,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async with upstream(sse_then_die) as llama, node_a(llama.port, routed=routed) as (url, router, _):
        body = {"model": "m", "prompt": "x", "stream": True}
        async with httpx.AsyncClient(base_url=url) as client:
            start = time.monotonic()
            response = await client.post("/v1/completions", json=body)
            assert time.monotonic() - start < 5
        events = [e for e in response.content.split(b"\n\n") if e]
        assert [e + b"\n\n" for e in events[:2]] == EVENTS
        assert events[2].startswith(b"data: ")
        error = json.loads(events[2][6:])["error"]
        assert error["code"] == "upstream_broken" and "broke" in error["message"]
        assert len(events) == 3 and b"[DONE]" not in response.content
        broke = [r for r in caplog.records if "broke mid-response" in r.getMessage()]
        assert broke and all(r.levelno == logging.WARNING for r in broke)  # the operator hears of it too

        texts = []
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
            with pytest.raises(openai.APIError, match="broke"):
                async for part in await sdk.completions.create(model="m", prompt="x", stream=True):
                    texts.append(part.choices[0].text)
        assert texts == ["one", "two"]
        await leases_returned(router)


@pytest.mark.parametrize("routed", ROUTED)
async def test_a_whole_body_whose_upstream_dies_is_cut_short_not_passed_off_as_whole(routed: bool) -> None:
    async with upstream(json_then_die) as llama, node_a(llama.port, routed=routed) as (url, router, _):
        async with httpx.AsyncClient(base_url=url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        await leases_returned(router)


@pytest.mark.parametrize("routed", ROUTED)
async def test_an_upstream_that_is_down_is_a_503_and_one_that_hangs_up_a_502(routed: bool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    async with node_a(closed_port, routed=routed) as (url, router, _):
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "upstream_unavailable"
        await leases_returned(router)

    async def hangs_up(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with upstream(hangs_up) as llama, node_a(llama.port, routed=routed) as (url, router, _):
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert response.status_code == 502 and response.headers["retry-after"]
        assert response.json()["error"]["code"] == "upstream_failed"
        await leases_returned(router)


@pytest.mark.parametrize("routed", ROUTED)
async def test_a_client_that_goes_away_cancels_its_non_streamed_request_upstream(routed: bool) -> None:
    async with upstream(hold) as llama, node_a(llama.port, routed=routed) as (url, router, fake):
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5, read=0.5)) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={"model": "m", "prompt": "a long story"})
        with anyio.fail_after(5):
            await llama.hung_up.wait()
        await leases_returned(router)
        if fake is not None:  # the requesting node reset its tunnel stream: not a clean end
            assert fake.opened[0].was_reset


@pytest.mark.parametrize("routed", ROUTED)
async def test_expect_continue_is_answered_by_the_proxy_and_answers_never_change_hands(routed: bool) -> None:
    """curl sends ``Expect: 100-continue`` with bodies of 1 MiB or more. The proxy answers it and never
    forwards it; two clients taking turns on the one pooled upstream connection get their own answers."""
    async with upstream(echo) as llama, node_a(llama.port, routed=routed) as (url, router, _):
        host, port = url.removeprefix("http://").split(":")
        big = json.dumps({"model": "m", "prompt": "the big one"}).encode() + b" " * (1 << 20)
        async with httpx.AsyncClient(base_url=url) as small_client:
            for turn in range(3):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(big))
                await writer.drain()
                with anyio.fail_after(5):
                    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(big)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                assert head.startswith(b"HTTP/1.1 200")
                assert json.loads(await reader.readexactly(length)) == {"prompt": "the big one"}
                writer.close()
                small = await small_client.post("/v1/completions", json={"model": "m", "prompt": f"small {turn}"})
                assert small.json() == {"prompt": f"small {turn}"}
        assert llama.heads and not any(b"expect" in h.lower() for h in llama.heads)
        if not routed:
            assert llama.connections == 1
        await leases_returned(router)


@pytest.mark.parametrize("routed", ROUTED)
async def test_an_anthropic_stream_whose_upstream_dies_ends_with_anthropic_s_error_event(routed: bool) -> None:
    async with upstream(sse_then_die) as llama, node_a(llama.port, routed=routed) as (url, router, _):
        body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/messages", json=body)
        last = response.content.split(b"\n\n")[-2]
        assert last.startswith(b"event: error\ndata: ")
        assert json.loads(last.split(b"data: ", 1)[1])["type"] == "error"
        await leases_returned(router)


# -- failover (api.failover) -------------------------------------------------------------------

def token_event(text: str, tid: int, count: int, *, final: str | None = None) -> bytes:
    payload = {"choices": [{"text": text, "index": 0, "finish_reason": final,
                            "logprobs": {"content": [{"id": tid}]}}],
               "id": f"cmpl-{tid}", "timings": {"prompt_n": 1, "cache_n": 0, "predicted_n": count}}
    if final:
        payload["usage"] = {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 3 + count}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def two_tokens_then_die(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head, body = await read_request(reader)
    state.heads.append(body)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for event in (token_event("one", 1, 1), token_event(" two", 2, 2)):
        writer.write(chunk(event))
        await writer.drain()
    writer.transport.abort()


async def the_rest(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head, body = await read_request(reader)
    state.heads.append(body)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for event in (token_event(" three", 3, 1), token_event("", 4, 1, final="length"), b"data: [DONE]\n\n"):
        writer.write(chunk(event))
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def with_replica(dying_port: int, replica_port: int) -> tuple[Router, Router]:
    from tests.unit.dataplane_fakes import mesh_state

    return (Router(mesh_state(local_port=dying_port, remote_port=replica_port), node_id="a"),
            Router(mesh_state(remote_port=replica_port), node_id="b"))


async def test_a_stream_whose_server_dies_carries_on_at_a_replica_as_one_stream() -> None:
    from meshllm.api.backends import DataPlane
    from meshllm.tunnels.http import HttpTunnelClient
    from tests.unit.dataplane_fakes import FakeMesh, serving

    async with upstream(two_tokens_then_die) as dying, upstream(the_rest) as replica, \
            anyio.create_task_group() as tg:
        router, b_router = await with_replica(dying.port, replica.port)
        b_plane = DataPlane(b_router)
        async with b_plane.running():
            fake = FakeMesh(tg, {"b": b_plane.answer_peer})
            async with serving(DataPlane(router, tunnels=HttpTunnelClient(fake))) as url:
                async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
                    parts = [part async for part in await sdk.completions.create(
                        model="m", prompt="x", max_tokens=3, temperature=0, stream=True)]
                await leases_returned(router)
        tg.cancel_scope.cancel()
    assert "".join(p.choices[0].text for p in parts if p.choices) == "one two three"
    assert {p.id for p in parts} == {"cmpl-1"}
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3
    assert parts[-1].usage.prompt_tokens == 1
    assert json.loads(replica.heads[0])["prompt"] == ["x", 1, 2]
    assert json.loads(replica.heads[0])["max_tokens"] == 1


async def test_a_request_whose_server_is_down_goes_to_a_replica_unnoticed() -> None:
    from meshllm.api.backends import DataPlane
    from meshllm.tunnels.http import HttpTunnelClient
    from tests.unit.dataplane_fakes import FakeMesh, serving

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = closed.getsockname()[1]  # nothing listens there
    async with upstream(echo) as replica, anyio.create_task_group() as tg:
        router, b_router = await with_replica(down, replica.port)
        b_plane = DataPlane(b_router)
        async with b_plane.running():
            fake = FakeMesh(tg, {"b": b_plane.answer_peer})
            async with serving(DataPlane(router, tunnels=HttpTunnelClient(fake))) as url:
                async with httpx.AsyncClient(base_url=url) as client:
                    reply = await client.post("/v1/completions", json={"model": "m", "prompt": "hello"})
                await leases_returned(router)
        tg.cancel_scope.cancel()
    assert reply.status_code == 200 and reply.json() == {"prompt": "hello"}


async def loading(state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    body = b'{"error": {"code": 503, "message": "Loading model"}}'
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()


async def test_a_server_that_answers_503_hands_the_request_to_a_replica() -> None:
    from meshllm.api.backends import DataPlane
    from meshllm.tunnels.http import HttpTunnelClient
    from tests.unit.dataplane_fakes import FakeMesh, serving

    async with upstream(loading) as busy, upstream(echo) as replica, anyio.create_task_group() as tg:
        router, b_router = await with_replica(busy.port, replica.port)
        b_plane = DataPlane(b_router)
        async with b_plane.running():
            fake = FakeMesh(tg, {"b": b_plane.answer_peer})
            async with serving(DataPlane(router, tunnels=HttpTunnelClient(fake))) as url:
                async with httpx.AsyncClient(base_url=url) as client:
                    reply = await client.post("/v1/completions", json={"model": "m", "prompt": "hello"})
                await leases_returned(router)
        tg.cancel_scope.cancel()
    assert reply.status_code == 200 and reply.json() == {"prompt": "hello"}


async def test_a_stream_whose_servers_all_die_ends_with_an_error_event_after_trying_each_once() -> None:
    from meshllm.api.backends import DataPlane
    from meshllm.tunnels.http import HttpTunnelClient
    from tests.unit.dataplane_fakes import FakeMesh, serving

    async with upstream(two_tokens_then_die) as first, upstream(two_tokens_then_die) as second, \
            anyio.create_task_group() as tg:
        router, b_router = await with_replica(first.port, second.port)
        b_plane = DataPlane(b_router)
        async with b_plane.running():
            fake = FakeMesh(tg, {"b": b_plane.answer_peer})
            async with serving(DataPlane(router, tunnels=HttpTunnelClient(fake))) as url:
                async with httpx.AsyncClient(base_url=url) as client:
                    body = {"model": "m", "prompt": "x", "max_tokens": 9, "temperature": 0, "stream": True}
                    response = await client.post("/v1/completions", json=body)
                await leases_returned(router)
        tg.cancel_scope.cancel()
    events = [json.loads(e[6:]) for e in response.content.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["choices"][0]["text"] for e in events[:2]] == ["one", " two"]  # then the (fake) replica's
    assert events[-1]["error"]["code"] == "upstream_broken"
    assert len(first.heads) == len(second.heads) == 1  # each server tried once
    assert json.loads(second.heads[0])["prompt"] == ["x", 1, 2]


async def test_a_request_waiting_on_a_silent_node_moves_to_another() -> None:
    from meshllm.api.backends import DataPlane
    from meshllm.state.schema import NodeStatus, ServerPhase, ServerStatus
    from meshllm.tunnels.http import HttpTunnelClient
    from tests.unit.dataplane_fakes import FakeMesh, mesh_state, serving

    async with upstream(hold) as stuck, upstream(echo) as replica, anyio.create_task_group() as tg:
        state = mesh_state(remote_port=stuck.port)  # b: answers nothing, and is heard from no more
        state.put_node(NodeStatus(id="c", incarnation=1))
        state.put_server(ServerStatus(node="c", model="m", phase=ServerPhase.READY, port=replica.port))
        # each serving node's own view: the model served by itself (mesh_state names it "b")
        planes = {n: DataPlane(Router(mesh_state(remote_port=port), node_id="b"))
                  for n, port in (("b", stuck.port), ("c", replica.port))}
        async with planes["b"].running(), planes["c"].running():
            fake = FakeMesh(tg, {n: p.answer_peer for n, p in planes.items()})
            router = Router(state, node_id="a")
            plane = DataPlane(router, tunnels=HttpTunnelClient(fake))
            async with serving(plane, silence=lambda node: 30.0 if node == "b" else 0.1) as url:
                async with httpx.AsyncClient(base_url=url) as client:
                    start = time.monotonic()
                    reply = await client.post("/v1/completions", json={"model": "m", "prompt": "hello"})
                    took = time.monotonic() - start
                await leases_returned(router)
        tg.cancel_scope.cancel()
    assert reply.status_code == 200 and reply.json() == {"prompt": "hello"}
    assert took < 2
    await asyncio.wait_for(stuck.hung_up.wait(), 5)  # the silent node's request was cancelled


async def test_a_node_gone_before_it_answers_is_an_openai_error_or_a_failover_never_a_plain_500() -> None:
    """The path to a serving node breaks before its answer (the node's agent was killed) while the
    proxy watches for silence: the request moves to another server, or gets a 503 in the OpenAI
    shape; before, the failure escaped the watcher's task group and the client got a plain 500."""
    from meshllm.api.backends import DataPlane
    from meshllm.state.schema import NodeStatus, ServerPhase, ServerStatus
    from meshllm.transport.errors import TransportError
    from meshllm.tunnels.http import HttpTunnelClient
    from tests.unit.dataplane_fakes import FakeMesh, mesh_state, serving

    class Gone(FakeMesh):
        async def __call__(self, node_id: str) -> FakeMesh.Link:
            if node_id == "b":
                raise TransportError("connection to b closed here: peer stopped")
            return await super().__call__(node_id)

    async with upstream(echo) as replica, anyio.create_task_group() as tg:
        for with_replica in (True, False):
            state = mesh_state(remote_port=1)  # b: its agent is gone
            if with_replica:
                state.put_node(NodeStatus(id="c", incarnation=1))
                state.put_server(ServerStatus(node="c", model="m", phase=ServerPhase.READY, port=replica.port))
            c_plane = DataPlane(Router(mesh_state(remote_port=replica.port), node_id="b"))
            async with c_plane.running():
                router = Router(state, node_id="a")
                plane = DataPlane(router, tunnels=HttpTunnelClient(Gone(tg, {"c": c_plane.answer_peer})))
                async with serving(plane, silence=lambda node: 0.1) as url:
                    async with httpx.AsyncClient(base_url=url) as client:
                        reply = await client.post("/v1/completions", json={"model": "m", "prompt": "hello"})
                    await leases_returned(router)
            if with_replica:
                assert reply.status_code == 200 and reply.json() == {"prompt": "hello"}
            else:
                assert reply.status_code == 503, reply.text
                assert "did not answer" in reply.json()["error"]["message"]
        tg.cancel_scope.cancel()
