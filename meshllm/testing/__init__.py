"""Tools for testing meshes on one machine (latency and loss between nodes, engine processes left
behind) and fakes for unit tests (a clock and a process supervisor) — not used when serving."""

from meshllm.testing.engines import engine_pids, running, terminate
from meshllm.testing.fakes import FakeClock, FakeSupervisor
from meshllm.testing.hubserver import HubServer
from meshllm.testing.tcp_relay import CountingTcpRelay
from meshllm.testing.udp_relay import UdpRelay

__all__ = [
    "CountingTcpRelay",
    "FakeClock",
    "FakeSupervisor",
    "HubServer",
    "UdpRelay",
    "engine_pids",
    "running",
    "terminate",
]
