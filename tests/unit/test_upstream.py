"""The upstream HTTP client against small real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from meshllm.api.errors import BackendUnavailable
from meshllm.api.upstream import UpstreamBroken, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on a free loopback port; yields (port, connections accepted so far)."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, accepted


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def sized(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection_and_sends_the_request_unchanged() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append((head, body))
            writer.write(sized(body.upper()))

    async with serving(echo) as (port, accepted), UpstreamPool() as pool:
        for i in range(5):
            response = await pool.request("127.0.0.1", port, "POST", "/v1/completions?x=1",
                                          [("X-Test", str(i))], b'{"n": %d}' % i)
            assert response.status_code == 200
            assert await response.aread() == b'{"N": %d}' % i
            await response.aclose()
    assert len(accepted) == 1
    assert seen[3][0].startswith(b"POST /v1/completions?x=1 HTTP/1.1\r\n")
    assert b"X-Test: 3\r\n" in seen[3][0]


async def test_a_connection_the_server_closed_after_answering_is_not_reused() -> None:
    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sized(b"ok"))  # no "Connection: close", like llama-server after a stream
        await writer.drain()

    async with serving(one_shot) as (port, accepted), UpstreamPool() as pool:
        for _ in range(3):
            response = await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
            assert await response.aread() == b"ok"
            await response.aclose()
    assert len(accepted) == 3


async def test_a_request_on_a_connection_closing_under_it_is_sent_again_on_a_fresh_one() -> None:
    served: list[bytes] = []

    async def drops_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        served.append(body)
        writer.write(sized(b"first"))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request arrives: hang up without answering

    async with serving(drops_the_second) as (port, accepted), UpstreamPool() as pool:
        first = await pool.request("127.0.0.1", port, "POST", "/", [], b"1")
        assert await first.aread() == b"first"
        await first.aclose()
        second = await pool.request("127.0.0.1", port, "POST", "/", [], b"2")
        assert await second.aread() == b"first"
        await second.aclose()
    assert served == [b"1", b"2"]
    assert len(accepted) == 2


async def test_chunked_body_arrives_piece_by_piece_as_the_server_sends_it() -> None:
    gate = asyncio.Event()

    async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(b"8\r\ndata: 1\n\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        await writer.drain()

    async with serving(streams) as (port, _), UpstreamPool() as pool:
        response = await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
        assert ("Content-Type", "text/event-stream") in response.headers
        chunks = aiter(response)
        assert await asyncio.wait_for(anext(chunks), 5) == b"data: 1\n"
        gate.set()
        assert await asyncio.wait_for(anext(chunks), 5) == b"data: 2\n"
        with pytest.raises(StopAsyncIteration):
            await anext(chunks)
        await response.aclose()


async def test_closing_a_response_early_hangs_up_on_the_server() -> None:
    hung_up = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"2\r\nx\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            hung_up.set()

    async with serving(endless) as (port, _), UpstreamPool() as pool:
        response = await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
        assert await anext(aiter(response))
        await response.aclose()
        await asyncio.wait_for(hung_up.wait(), 5)


async def test_a_server_that_dies_mid_body_raises_instead_of_ending_quietly() -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async with serving(dies) as (port, _), UpstreamPool() as pool:
        response = await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
        with pytest.raises(UpstreamBroken, match="before the response ended"):
            await response.aread()
        await response.aclose()


async def test_nothing_listening_is_an_upstream_error() -> None:
    async with serving(read_request) as (port, _):
        pass  # closed again: the port is free now
    async with UpstreamPool() as pool:
        with pytest.raises(BackendUnavailable, match="cannot connect") as caught:
            await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
    assert caught.value.status == 503


async def test_a_server_that_hangs_up_before_answering_is_a_502() -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(hangs_up) as (port, _), UpstreamPool() as pool:
        with pytest.raises(BackendUnavailable, match="gave no response") as caught:
            await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
    assert caught.value.status == 502


async def test_interim_responses_are_skipped_and_each_request_gets_its_own_answer() -> None:
    """A server that answers ``100 Continue`` before each final response (as llama-server does when
    asked to): the interim response is no answer, and the connection stays in step."""
    async def continues(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + sized(b"answer to " + body))
            await writer.drain()

    async with serving(continues) as (port, accepted), UpstreamPool() as pool:
        for i in range(3):
            response = await pool.request("127.0.0.1", port, "POST", "/", [], b"%d" % i)
            assert response.status_code == 200
            assert ("Link", "</x>") not in response.headers
            assert await response.aread() == b"answer to %d" % i
            await response.aclose()
    assert len(accepted) == 1


async def test_a_pooled_connection_that_receives_bytes_nobody_asked_for_is_dropped() -> None:
    async def answers_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(sized(b"answer to " + body) + sized(b"stray"))
            await writer.drain()

    async with serving(answers_twice) as (port, accepted), UpstreamPool() as pool:
        for i in range(3):
            response = await pool.request("127.0.0.1", port, "POST", "/", [], b"%d" % i)
            assert await response.aread() == b"answer to %d" % i
            await response.aclose()
    assert len(accepted) == 3
