"""Serving the node's starlette apps with uvicorn inside the node's own task group.

uvicorn's own signal handling is off: the node owns SIGINT/SIGTERM and stops its APIs first.

A connection must send a whole request head within ``HEAD_DEADLINE`` seconds of opening (or of its
previous response): uvicorn waits for a head for ever, so thousands of connections that trickle a
header byte now and then (slowloris) would each hold a socket and a file descriptor. The body has a
deadline of its own in the apps (``api.bodies``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from meshllm.errors import MeshError

__all__ = ["HEAD_DEADLINE", "HttpApi", "bind_socket"]

HEAD_DEADLINE = 10.0  # seconds a connection has to send a request head


def bind_socket(host: str, port: int, *, what: str) -> socket.socket:
    """A listening TCP socket, or a MeshError that says what to do when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MeshError(f"cannot listen on {host}:{port} for the {what} ({exc.strerror}); "
                        f"is another meshllm running? choose another port") from None
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _head_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not begun a request ``seconds`` after it
    opened or after its last response ended (uvicorn's keep-alive timer is cancelled by any byte)."""
    base: Any = AutoHTTPProtocol

    class HeadDeadline(base):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            self.loop.call_later(seconds, self._head_late, self.cycle)

        def _head_late(self, cycle: object) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no new request head since
                self.transport.close()

    return HeadDeadline


class HttpApi:
    """One of the node's HTTP APIs: a starlette app served by uvicorn on a socket the node binds first.

    ``bind`` takes the port (a port another program holds fails the node's start before anything
    runs); ``run`` serves until cancelled, then lets uvicorn finish gracefully (requests in flight get
    a few seconds, the app's lifespan closes what it opened) before it returns."""

    def __init__(self, app: object, *, host: str, port: int, what: str,
                 on_stop: Callable[[], None] | None = None, head_deadline: float = HEAD_DEADLINE) -> None:
        self.app = app
        self.on_stop = on_stop  # told first when the API stops: ends endless responses (event streams)
        self.head_deadline = head_deadline
        self.host = host
        self.port = port
        self.what = what
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        if self._sock is None:
            self._sock = bind_socket(self.host, self.port, what=self.what)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        assert self._sock is not None
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on",  # type: ignore[arg-type]
                                access_log=False, timeout_graceful_shutdown=3,
                                http=_head_deadline(self.head_deadline))
        server = _QuietServer(config)
        ended = anyio.Event()

        async def serve(sock: socket.socket) -> None:
            with anyio.CancelScope(shield=True):  # it stops when asked to, after its graceful shutdown
                try:
                    await server.serve(sockets=[sock])
                finally:
                    ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, self._sock)
            task_status.started()
            try:
                await ended.wait()
            finally:
                if self.on_stop is not None:
                    self.on_stop()
                server.should_exit = True
        raise MeshError(f"the {self.what} on {self.host}:{self.port} stopped by itself; see the log above")
