"""Serving the node's starlette apps with uvicorn inside the node's own task group.

uvicorn's own signal handling is off: the node owns SIGINT/SIGTERM and stops its APIs first.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus

from meshllm.errors import MeshError

__all__ = ["HttpApi", "bind_socket"]


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


class HttpApi:
    """One of the node's HTTP APIs: a starlette app served by uvicorn on a socket the node binds first.

    ``bind`` takes the port (a port another program holds fails the node's start before anything
    runs); ``run`` serves until cancelled, then lets uvicorn finish gracefully (requests in flight get
    a few seconds, the app's lifespan closes what it opened) before it returns."""

    def __init__(self, app: object, *, host: str, port: int, what: str,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.app = app
        self.on_stop = on_stop  # told first when the API stops: ends endless responses (event streams)
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
                                access_log=False, timeout_graceful_shutdown=3)
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
