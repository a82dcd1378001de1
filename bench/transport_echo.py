"""What meshllm's QUIC transport costs on top of stock aioquic: echo latency and bulk throughput.

Every gossip message, tunnelled HTTP chunk and RPC call crosses ``meshllm.transport``. This bench
runs two endpoints in one process on loopback (127.0.0.1 ↔ 127.0.0.2) and measures, over one
stream: the round trip of a 64 B / 4 KB / 64 KB echo (median of many), and bulk throughput (a
sink that counts bytes: one direction; an echo: both directions at once). The same measurements
run against aioquic's own asyncio API (``serve``/``connect``, a StreamReader echo) in the same
run, alternating rounds, so the ratio means something on a busy machine even when the absolute
numbers do not.

    .venv/bin/python bench/transport_echo.py [--rounds 300] [--bulk-mib 16] [--datagram 1452]

It prints a table and never asserts: benchmarks are not tests (see STYLE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import anyio
from aioquic.asyncio.client import connect
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.store.identity import NodeIdentity
from meshllm.transport import PeerConnection, QuicEndpoint, Stream, StreamKind, TransportSettings
from meshllm.transport.tls import generate_credentials

SIZES = (64, 4096, 65536)


class Pipe(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def receive(self, max_bytes: int = 65536) -> bytes: ...
    async def send_eof(self) -> None: ...


async def rtt(pipe: Pipe, size: int, rounds: int) -> float:
    payload = b"x" * size
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await pipe.send(payload)
        got = 0
        while got < size:
            got += len(await pipe.receive(1 << 20))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def bulk(pipe: Pipe, total: int, *, echo: bool) -> float:
    """MiB/s of payload: with ``echo`` the peer returns everything, else it replies with one byte."""
    chunk = b"y" * 65536
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        async def write() -> None:
            for _ in range(total // len(chunk)):
                await pipe.send(chunk)
            await pipe.send_eof()
        tg.start_soon(write)
        while await pipe.receive(1 << 20):
            pass
    return total / (time.perf_counter() - started) / 2**20


# -- meshllm transport ------------------------------------------------------------------------
async def echo(conn: PeerConnection, stream: Stream) -> None:
    while data := await stream.receive(1 << 20):
        await stream.send(data)


async def sink(conn: PeerConnection, stream: Stream) -> None:
    while await stream.receive(1 << 20):
        pass
    await stream.send(b"!")


@asynccontextmanager
async def meshllm_pipes(datagram: int) -> AsyncIterator[Callable[[bool], Awaitable[Pipe]]]:
    settings = TransportSettings(max_datagram_size=datagram)
    a, b = (QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), "bench", b"k" * 32,
                         host=host, settings=settings) for host in ("127.0.0.1", "127.0.0.2"))
    b.on_stream(StreamKind.RPC, echo)
    b.on_stream(StreamKind.HTTP, sink)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        conn = await a.connect("127.0.0.2", await tg.start(b.run))

        async def open_pipe(echoing: bool) -> Pipe:
            return await conn.open_stream(StreamKind.RPC if echoing else StreamKind.HTTP)
        yield open_pipe
        tg.cancel_scope.cancel()


# -- stock aioquic ----------------------------------------------------------------------------
class AioquicPipe:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.reader.read(max_bytes)

    async def send_eof(self) -> None:
        self.writer.write_eof()


async def serve_aioquic_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    mode = await reader.readexactly(1)
    while data := await reader.read(1 << 20):
        if mode == b"e":
            writer.write(data)
    writer.write(b"" if mode == b"e" else b"!")
    writer.write_eof()


@asynccontextmanager
async def aioquic_pipes(datagram: int) -> AsyncIterator[Callable[[bool], Awaitable[Pipe]]]:
    credentials = generate_credentials()
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["bench"],
                                      max_datagram_size=datagram)
    server_config.certificate, server_config.private_key = (credentials.certificate,
                                                            credentials.private_key)
    client_config = QuicConfiguration(is_client=True, alpn_protocols=["bench"],
                                      max_datagram_size=datagram, verify_mode=ssl.CERT_NONE)
    jobs, incoming = anyio.create_memory_object_stream[AioquicPipe](math.inf)
    server = await serve("127.0.0.2", 0, configuration=server_config,
                         stream_handler=lambda r, w: jobs.send_nowait(AioquicPipe(r, w)))
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    try:
        async with jobs, incoming, anyio.create_task_group() as tg, \
                connect("127.0.0.2", port, configuration=client_config) as client:
            async def dispatch() -> None:
                async for pipe in incoming:
                    tg.start_soon(serve_aioquic_stream, pipe.reader, pipe.writer)
            tg.start_soon(dispatch)

            async def open_pipe(echoing: bool) -> Pipe:
                pipe = AioquicPipe(*await client.create_stream())
                await pipe.send(b"e" if echoing else b"s")
                return pipe
            yield open_pipe
            tg.cancel_scope.cancel()
    finally:
        server.close()


async def measure(opener: Callable[[bool], Awaitable[Pipe]], rounds: int,
                  total: int) -> dict[str, float]:
    result = {}
    pipe = await opener(True)
    for size in SIZES:
        result[f"rtt {size} B (ms)"] = 1000 * await rtt(pipe, size, rounds)
    result["bulk one-way (MiB/s)"] = await bulk(await opener(False), total, echo=False)
    result["bulk echo (MiB/s)"] = await bulk(await opener(True), total, echo=True)
    return result


async def main(rounds: int, total: int, datagram: int, repeats: int) -> None:
    runs: dict[str, list[dict[str, float]]] = {"aioquic": [], "meshllm": []}
    for _ in range(repeats):  # alternate, so both see the same background load
        async with aioquic_pipes(datagram) as opener:
            runs["aioquic"].append(await measure(opener, rounds, total))
        async with meshllm_pipes(datagram) as opener:
            runs["meshllm"].append(await measure(opener, rounds, total))
    print(f"datagram {datagram} B, {rounds} echoes per size, {total >> 20} MiB bulk, "
          f"median of {repeats} alternating runs")
    print(f"{'':24}{'aioquic':>10}{'meshllm':>10}{'ratio':>8}")
    for key in runs["aioquic"][0]:
        stock = statistics.median(r[key] for r in runs["aioquic"])
        ours = statistics.median(r[key] for r in runs["meshllm"])
        print(f"{key:24}{stock:10.3f}{ours:10.3f}{ours / stock:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--bulk-mib", type=int, default=16)
    parser.add_argument("--datagram", type=int, default=1452)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.bulk_mib << 20, args.datagram, args.repeats)
