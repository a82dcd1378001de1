"""A node's QUIC port under hostile datagrams: junk Initials and abandoned handshakes from one source
must neither keep a real peer out nor fill the log (real sockets on 127.0.0.x)."""

from __future__ import annotations

import logging
import os
import socket
import time

import anyio
import pytest
from aioquic.quic.connection import QuicConnection

from meshllm.transport import QuicEndpoint, TransportSettings
from meshllm.transport.tls import client_configuration
from tests.integration.test_transport import endpoint, running

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def junk_initial() -> bytes:
    """A datagram shaped like a client's first Initial (long header, version 1, fresh connection ids,
    padded to 1200 bytes) whose payload is noise: what needs no crypto to send."""
    dcid, scid = os.urandom(8), os.urandom(8)
    header = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + dcid + bytes([8]) + scid + b"\x00"
    length = 1200 - len(header) - 2
    return header + (0x4000 | length).to_bytes(2, "big") + os.urandom(length)


async def flood(port: int, *, source: str, per_second: int, seconds: float) -> int:
    """Send junk Initials from ``source`` to ``port`` on 127.0.0.1; the count sent."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(per_second // 50):
                sock.sendto(junk_initial(), ("127.0.0.1", port))
                sent += 1
            await anyio.sleep(0.02)
    return sent


def warnings_from_transport(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("meshllm.transport") and r.levelno >= logging.WARNING]


async def test_a_junk_initial_flood_neither_delays_a_join_nor_fills_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server, peer = endpoint("127.0.0.1"), endpoint("127.0.0.2")
    async with running(server, peer) as (port, _):
        async with anyio.create_task_group() as tg:
            sent: list[int] = []

            async def flooding() -> None:
                sent.append(await flood(port, source="127.0.0.3", per_second=1000, seconds=4.0))

            tg.start_soon(flooding)
            await anyio.sleep(1.0)  # the flood is on: at 13 junk Initials a second all 64 slots were full
            started = time.monotonic()
            conn = await peer.connect("127.0.0.1", port, timeout=10.0)
            took = time.monotonic() - started
        assert conn.authenticated and took < 2.0, took  # a join on loopback: well under a second, flood or not
        assert sent[0] >= 2000
        assert sum(1 for c in server._require_running().connections if not c.authenticated) == 0
    lines = warnings_from_transport(caplog)
    assert 1 <= len(lines) <= 2, lines  # one a line per junk Initial wrote 1.4 MB; now one per 10 s, with counts
    assert "does not decrypt" in lines[0] and "127.0.0.3" in lines[0]


def abandoned_initial(port: int, settings: TransportSettings) -> bytes:
    """The first datagram of a real client handshake, which its sender then abandons."""
    quic = QuicConnection(configuration=client_configuration(settings))
    quic.connect(("127.0.0.1", port), now=time.monotonic())
    return quic.datagrams_to_send(now=time.monotonic())[0][0]


async def test_one_source_cannot_take_every_handshake_slot() -> None:
    settings = TransportSettings(auth_timeout=30.0, idle_timeout=30.0)
    server = QuicEndpoint(endpoint().identity, "test-mesh", b"correct horse battery staple 32b",
                          host="127.0.0.1", settings=settings)
    peer = endpoint("127.0.0.2")
    async with running(server, peer) as (port, _):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.3", 0))
            for _ in range(settings.max_handshakes):  # valid Initials, never finished: each held a slot
                sock.sendto(abandoned_initial(port, settings), ("127.0.0.1", port))
            pending = server._require_running().connections
            with anyio.fail_after(5):
                while len(pending) < settings.max_handshakes_per_source:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)
            assert len(pending) == settings.max_handshakes_per_source  # that source's share, no more
            started = time.monotonic()
            conn = await peer.connect("127.0.0.1", port, timeout=10.0)
            assert conn.authenticated and time.monotonic() - started < 2.0
