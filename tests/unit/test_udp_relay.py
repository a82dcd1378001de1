"""The delay relay used to emulate WAN latency between nodes on one machine."""

from __future__ import annotations

import asyncio
import time

from meshllm.testing.udp_relay import UdpRelay


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.replies.put_nowait(data)


async def test_relay_adds_the_delay_both_ways_and_can_block() -> None:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    relay = await UdpRelay(("127.0.0.1", 0), echo.get_extra_info("sockname")[:2], delay=0.05).start()
    client_proto = _Client()
    client, _ = await loop.create_datagram_endpoint(lambda: client_proto, remote_addr=relay.address)
    try:
        client.sendto(b"warm-up")
        await asyncio.wait_for(client_proto.replies.get(), 2)
        start = time.monotonic()
        client.sendto(b"ping")
        assert await asyncio.wait_for(client_proto.replies.get(), 2) == b"ping"
        assert time.monotonic() - start >= 0.1
        relay.blocked = True
        forwarded = relay.forwarded
        client.sendto(b"lost")
        async with asyncio.timeout(2):
            while relay.dropped == 0:
                await asyncio.sleep(0.005)
        assert relay.forwarded == forwarded and relay.dropped == 1
        relay.blocked = False
        client.sendto(b"after")
        assert await asyncio.wait_for(client_proto.replies.get(), 2) == b"after"  # "lost" never comes
    finally:
        client.close()
        relay.close()
        echo.close()
