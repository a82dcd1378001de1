"""Serving the node's starlette apps with uvicorn inside the node's own task group."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus

from meshllm.errors import MeshError

__all__ = ["bind_socket", "exit_on_signal", "serve_app"]


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


async def serve_app(app: object, sock: socket.socket, *,
                    task_status: TaskStatus[uvicorn.Server] = anyio.TASK_STATUS_IGNORED) -> None:
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=3)
    server = _QuietServer(config)
    task_status.started(server)
    await server.serve(sockets=[sock])


async def exit_on_signal(servers: tuple[uvicorn.Server, ...], announce: Callable[[str], None]) -> None:
    """On SIGINT or SIGTERM, ask the servers to finish (the caller then stops everything else)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            announce(f"received {signal.Signals(signum).name}: stopping the APIs and llama-server processes")
            for server in servers:
                server.should_exit = True
            return
