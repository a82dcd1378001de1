"""Parts the data-plane unit tests share: a stand-in llama-server (real HTTP on loopback), an in-memory
QUIC-like stream pair with resets, and a node's OpenAI API served by uvicorn inside the test."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import uvicorn
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from meshllm.api.backends import DataPlane
from meshllm.api.failover import Silence
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeStatus, ServerPhase, ServerStatus
from meshllm.transport import StreamKind, StreamReset
from meshllm.transport.errors import ErrorCode
from meshllm.tunnels.http import HttpTunnelClient, LocalForward, serve_tunnel

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Upstream:
    """A stand-in llama-server: ``port``, the request heads it received, and hang-ups it noticed."""

    port: int
    heads: list[bytes] = field(default_factory=list)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


@asynccontextmanager
async def upstream(handler: Callable[[Upstream, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                   ) -> AsyncIterator[Upstream]:
    state = Upstream(port=0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await handler(state, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            state.hung_up.set()
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


async def wait_hang_up(state: Upstream, reader: asyncio.StreamReader) -> None:
    """Read until the proxy closes the connection (the request was cancelled)."""
    while await reader.read(65536):
        pass
    state.hung_up.set()


# -- an in-memory stream pair with QUIC's reset -----------------------------------------------

class MemoryStream:
    """One end of an in-memory stream: bytes, EOF, and a reset the other end sees as ``StreamReset``."""

    def __init__(self, out: MemoryObjectSendStream[bytes | Exception],
                 inc: MemoryObjectReceiveStream[bytes | Exception]) -> None:
        self._out, self._inc = out, inc
        self._pending = b""
        self.was_reset = False

    async def send(self, data: bytes) -> None:
        try:
            await self._out.send(bytes(data))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise StreamReset("the peer stopped reading", code=ErrorCode.CANCELLED) from None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            try:
                item = await self._inc.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return b""
            if isinstance(item, Exception):
                raise item
            self._pending = item
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    async def send_eof(self) -> None:
        self._out.close()

    def reset(self, code: int = ErrorCode.CANCELLED) -> None:
        self.was_reset = True
        try:
            self._out.send_nowait(StreamReset("reset by the peer", code=code))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        self._out.close()
        self._inc.close()

    async def aclose(self) -> None:
        self._out.close()
        self._inc.close()


def memory_stream_pair() -> tuple[MemoryStream, MemoryStream]:
    a_out, b_in = anyio.create_memory_object_stream[bytes | Exception](math.inf)
    b_out, a_in = anyio.create_memory_object_stream[bytes | Exception](math.inf)
    return MemoryStream(a_out, a_in), MemoryStream(b_out, b_in)


class FakeMesh:
    """``connect`` for an ``HttpTunnelClient``: each stream opened to a node is served there by that
    node's ``forward`` (``serve_tunnel``, as the endpoint would), in ``tg``."""

    def __init__(self, tg: anyio.abc.TaskGroup, forwards: dict[str, LocalForward]) -> None:
        self.tg = tg
        self.forwards = forwards
        self.opened: list[MemoryStream] = []
        self.served: list[MemoryStream] = []

    async def __call__(self, node_id: str) -> FakeMesh.Link:
        return FakeMesh.Link(self, node_id)

    @dataclass
    class Link:
        mesh: FakeMesh
        node: str

        async def open_stream(self, kind: StreamKind) -> MemoryStream:
            mine, theirs = memory_stream_pair()
            self.mesh.opened.append(mine)
            self.mesh.served.append(theirs)
            self.mesh.tg.start_soon(self._serve, theirs)
            return mine

        async def _serve(self, stream: MemoryStream) -> None:
            try:  # as the endpoint does: EOF when the handler returns
                await serve_tunnel(stream, self.mesh.forwards[self.node])
            finally:
                await stream.aclose()


# -- nodes -------------------------------------------------------------------------------------

def mesh_state(*, local_port: int | None = None, remote_port: int | None = None,
               loading: bool = False) -> MeshState:
    """The state as node ``a`` sees it: model ``m`` served by ``a`` on ``local_port``, or by ``b``."""
    state = MeshState()
    state.put_model(ModelSpec(name="m", source="m.gguf", node="a" if local_port else "b"))
    state.put_node(NodeStatus(id="b", incarnation=1))
    phase = ServerPhase.LOADING if loading else ServerPhase.READY
    if local_port is not None:
        state.put_server(ServerStatus(node="a", model="m", phase=phase, port=local_port))
    if remote_port is not None:
        state.put_server(ServerStatus(node="b", model="m", phase=phase, port=remote_port))
    return state


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@asynccontextmanager
async def serving(plane: DataPlane, *, max_body_bytes: int = 4 << 20,
                  silence: Silence | None = None) -> AsyncIterator[str]:
    """The node's OpenAI API on a loopback port, served by uvicorn in this event loop."""
    sock = free_socket()
    app = create_openai_app(plane, max_body_bytes=max_body_bytes, silence=silence)
    config = uvicorn.Config(app, log_level="warning",
                            lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    with sock:  # uvicorn serves a duplicate of the socket: this one is ours to close
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True


@asynccontextmanager
async def node_a(port: int, *, routed: bool) -> AsyncIterator[tuple[str, Router, FakeMesh | None]]:
    """Node ``a``'s API for model ``m``: served by a llama-server on ``port`` on ``a`` itself, or
    (``routed``) on node ``b``, reached through an HTTP tunnel answered by ``b``'s data plane."""
    async with anyio.create_task_group() as tg:
        if not routed:
            router = Router(mesh_state(local_port=port), node_id="a")
            async with serving(DataPlane(router)) as url:
                yield url, router, None
        else:
            b_router = Router(mesh_state(remote_port=port), node_id="b")
            b_plane = DataPlane(b_router)
            async with b_plane.running():
                fake = FakeMesh(tg, {"b": b_plane.answer_peer})
                router = Router(mesh_state(remote_port=port), node_id="a")
                async with serving(DataPlane(router, tunnels=HttpTunnelClient(fake))) as url:
                    yield url, router, fake
        tg.cancel_scope.cancel()
