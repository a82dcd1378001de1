"""The HTTP tunnel's wire protocol over an in-memory stream pair: clean ends, broken ends, retries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from meshllm.transport import ConnectionLost, StreamKind
from meshllm.transport.errors import ErrorCode
from meshllm.tunnels.http import (HttpTunnelClient, TunnelBroken, TunnelRequest, TunnelUnavailable,
                                  serve_tunnel)
from tests.unit.dataplane_fakes import FakeMesh, MemoryStream, memory_stream_pair

REQUEST = TunnelRequest("POST", "/v1/completions", "", [("content-type", "application/json")], b'{"model": "m"}')


class Answer:
    """What the serving node's llama-server answers: ``chunks``, then ``error`` raised if given."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.status_code = 200
        self.headers = [("content-type", "text/event-stream")]
        self.chunks = chunks
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


async def test_a_whole_response_crosses_and_ends_cleanly() -> None:
    answer = Answer([b"data: 1\n\n", b"data: 2\n\n"])
    async with anyio.create_task_group() as tg:
        async def forward(request: TunnelRequest) -> Answer:
            assert request == REQUEST
            return answer

        mesh = FakeMesh(tg, {"b": forward})
        response = await HttpTunnelClient(mesh).request("b", REQUEST)
        assert (response.status_code, response.headers) == (200, [("content-type", "text/event-stream")])
        assert await response.aread() == b"data: 1\n\ndata: 2\n\n"
        await response.aclose()
    assert answer.closed and not mesh.opened[0].was_reset


async def test_an_upstream_that_breaks_mid_body_is_an_error_at_the_requesting_node() -> None:
    answer = Answer([b"data: 1\n\n"], OSError("llama-server closed the connection"))
    async with anyio.create_task_group() as tg:
        async def forward(request: TunnelRequest) -> Answer:
            return answer

        response = await HttpTunnelClient(FakeMesh(tg, {"b": forward})).request("b", REQUEST)
        chunks = aiter(response)
        assert await anext(chunks) == b"data: 1\n\n"
        with pytest.raises(TunnelBroken, match="node b: llama-server closed the connection"):
            await anext(chunks)
        await response.aclose()
    assert answer.closed


async def test_a_stream_that_breaks_mid_body_is_an_error_not_an_end() -> None:
    async with anyio.create_task_group() as tg:
        stopped = anyio.Event()

        async def forward(request: TunnelRequest) -> Answer:
            mesh.served[0].reset(ErrorCode.HANDLER_FAILED)  # the serving node's stream breaks
            stopped.set()
            return Answer([])

        mesh = FakeMesh(tg, {"b": forward})
        with pytest.raises(TunnelUnavailable):
            await HttpTunnelClient(mesh).request("b", REQUEST)
        await stopped.wait()


async def test_malformed_requests_are_refused_without_reaching_upstream() -> None:
    called = []

    async def forward(request: TunnelRequest) -> Answer:
        called.append(request)
        return Answer([])

    for head in (b"not json", b"[1]", b'{"method": "POST"}'):
        mine, theirs = memory_stream_pair()
        await mine.send(len(head).to_bytes(4, "big") + head + (0).to_bytes(4, "big"))
        await serve_tunnel(theirs, forward)
        assert theirs.was_reset
        await mine.aclose()
    assert not called


class _Lost:
    async def open_stream(self, kind: StreamKind) -> MemoryStream:
        mine, theirs = memory_stream_pair()
        await theirs.aclose()

        async def send(data: bytes) -> None:
            raise ConnectionLost("replaced by another connection", code=ErrorCode.DUPLICATE)

        mine.send = send  # type: ignore[method-assign]
        return mine


@pytest.mark.parametrize(("code", "retried"), [(ErrorCode.DUPLICATE, True), (None, False)])
async def test_a_request_on_a_connection_lost_to_a_duplicate_is_sent_again(code: int | None, retried: bool) -> None:
    async with anyio.create_task_group() as tg:
        async def forward(request: TunnelRequest) -> Answer:
            return Answer([b"ok"])

        good = FakeMesh(tg, {"b": forward})
        links = [_Lost(), await good("b")]

        async def connect(node: str) -> object:
            link = links.pop(0)
            if isinstance(link, _Lost) and code is None:
                raise ConnectionLost("node b is gone")
            return link

        client = HttpTunnelClient(connect)  # type: ignore[arg-type]
        if retried:
            response = await client.request("b", REQUEST)
            assert await response.aread() == b"ok" and not links
            await response.aclose()
        else:
            with pytest.raises(TunnelUnavailable, match="unreachable"):
                await client.request("b", REQUEST)
