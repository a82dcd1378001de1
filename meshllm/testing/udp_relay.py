"""A userspace UDP relay that adds latency (and optional loss) between two QUIC endpoints.

Kernels without netem cannot delay loopback traffic, and users' laptops have no netem either, so
tests and benchmarks put this relay in front of a node: packets from any client to ``listen`` are
forwarded to ``target`` after ``delay`` seconds, and the replies come back after ``delay`` too, so
one relay on a path adds ``2 × delay`` of round-trip time. ``drop`` discards that fraction of
packets; ``blocked`` discards everything (a partition) until cleared.

    python -m meshllm.testing.udp_relay --listen 127.0.0.10:7000 --to 127.0.0.2:7000 --delay-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

__all__ = ["UdpRelay", "main"]

Address = tuple[str, int]


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.on_datagram(data, (str(addr[0]), int(addr[1])))


@dataclass
class UdpRelay:
    listen: Address
    target: Address
    delay: float = 0.0
    drop: float = 0.0
    blocked: bool = False
    forwarded: int = 0
    dropped: int = 0  # datagrams ``drop`` or ``blocked`` discarded, both ways
    rng: random.Random = field(default_factory=random.Random)
    _front: _Socket | None = None
    _backs: dict[Address, _Socket] = field(default_factory=dict)

    @property
    def address(self) -> Address:
        assert self._front is not None and self._front.transport is not None
        host, port = self._front.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        front = self._front = _Socket(self._from_client)
        await loop.create_datagram_endpoint(lambda: front, local_addr=self.listen)
        return self

    def close(self) -> None:
        for sock in [self._front, *self._backs.values()]:
            if sock is not None and sock.transport is not None:
                sock.transport.close()
        self._backs.clear()

    def _passes(self) -> bool:
        passes = not self.blocked and (self.drop <= 0 or self.rng.random() >= self.drop)
        self.dropped += not passes
        return passes

    def _later(self, send: Callable[[], None]) -> None:
        if self.delay > 0:
            asyncio.get_running_loop().call_later(self.delay, send)
        else:
            send()

    def _from_client(self, data: bytes, client: Address) -> None:
        back = self._backs.get(client)
        if back is None:
            back = self._backs[client] = _Socket(lambda reply, _src: self._to_client(reply, client))
            loop = asyncio.get_running_loop()
            task = loop.create_datagram_endpoint(lambda: back, local_addr=(self.listen[0], 0))
            pending = asyncio.ensure_future(task)
            pending.add_done_callback(lambda _f: self._from_client(data, client))
            return
        if back.transport is None or not self._passes():
            return
        self.forwarded += 1
        self._later(lambda: back.transport.sendto(data, self.target) if back.transport else None)

    def _to_client(self, data: bytes, client: Address) -> None:
        front = self._front
        if front is None or front.transport is None or not self._passes():
            return
        self._later(lambda: front.transport.sendto(data, client) if front.transport else None)


def _addr(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, type=_addr, help="host:port to receive on")
    parser.add_argument("--to", required=True, type=_addr, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added each direction")
    parser.add_argument("--drop", type=float, default=0.0, help="fraction of packets to drop (0..1)")
    args = parser.parse_args(argv)

    async def run() -> None:
        relay = await UdpRelay(args.listen, args.to, delay=args.delay_ms / 1000, drop=args.drop).start()
        print(f"relaying {relay.address[0]}:{relay.address[1]} -> {args.to[0]}:{args.to[1]} "
              f"(+{args.delay_ms:g} ms each way)", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
