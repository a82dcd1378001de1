"""One meshllm node: the state document, its reconcilers and its two HTTP APIs, run together.

``run_node`` writes what the command line asked for into the document as desired state, starts the
served-model reconciler that makes llama-server match it, and serves the OpenAI API (``--port``)
and the management API (``--console``). SIGINT or SIGTERM stops the APIs, then every engine process
the node started, before it returns.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import uvicorn
from anyio.abc import TaskStatus

from meshllm import __version__
from meshllm.api.openai import DEFAULT_MAX_BODY, create_openai_app
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app
from meshllm.engine.build import require_engine
from meshllm.engine.capacity import detect_capacity
from meshllm.engine.models import resolve_model
from meshllm.errors import MeshError
from meshllm.reconcile.served import ServedModelReconciler
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeRole, NodeStatus
from meshllm.store.identity import default_state_dir, load_identity

__all__ = ["NodeConfig", "bind_socket", "run_node"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    models: tuple[str, ...] = ()
    port: int = 9337
    console_port: int = 3131
    listen_all: bool = False
    state_dir: Path = field(default_factory=default_state_dir)
    max_vram: int | None = None
    device: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY
    threads: int = 0
    name: str = ""

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen_all else "127.0.0.1"


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


async def _serve(app: object, sock: socket.socket, *,
                 task_status: TaskStatus[uvicorn.Server] = anyio.TASK_STATUS_IGNORED) -> None:
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=3)
    server = _QuietServer(config)
    task_status.started(server)
    await server.serve(sockets=[sock])


def desired_models(config: NodeConfig, node_id: str, now: float) -> list[ModelSpec]:
    """The ``--model`` arguments as desired state pinned to this node; fails fast on a bad one."""
    specs = []
    for source in config.models:
        resolved = resolve_model(source)
        kept = source if not Path(source).expanduser().exists() else str(resolved.path)
        specs.append(ModelSpec(name=resolved.name, source=kept, node=node_id, created_at=now))
    return specs


async def run_node(config: NodeConfig, *, announce: Callable[[str], None] = print,
                   task_status: TaskStatus[dict[str, str]] = anyio.TASK_STATUS_IGNORED) -> None:
    identity = load_identity(config.state_dir)
    node_id = identity.node_id
    now = time.time()
    specs = await anyio.to_thread.run_sync(desired_models, config, node_id, now)
    engine_dir = await anyio.to_thread.run_sync(lambda: require_engine(announce=announce))
    api_sock = bind_socket(config.host, config.port, what="OpenAI API")
    console_sock = bind_socket(config.host, config.console_port, what="console API")
    capacity = detect_capacity(max_vram=config.max_vram)

    state = MeshState()
    api_url = f"http://{config.host}:{config.port}/v1"
    state.put_node(NodeStatus(id=node_id, name=config.name or socket.gethostname(), role=NodeRole.SERVER,
                              capacity_bytes=capacity.bytes, api_url=api_url, version=__version__,
                              started_at=now, heartbeat_at=now))
    for spec in specs:
        state.put_model(spec)

    reconciler = ServedModelReconciler(
        state, node_id=node_id, engine_dir=engine_dir, log_dir=config.state_dir / "logs",
        gpu_layers=999 if capacity.gpu else 0, device=config.device, threads=config.threads)
    atexit.register(reconciler.kill_all_now)
    router = Router(state, node_id=node_id)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(reconciler.run)
            async with anyio.create_task_group() as apis:
                openai_app = create_openai_app(router, max_body_bytes=config.max_body_bytes)
                api = await apis.start(_serve, openai_app, api_sock)
                console = await apis.start(_serve, create_status_app(state, node_id=node_id), console_sock)
                announce(f"meshllm node {node_id}: OpenAI API {api_url}, "
                         f"console http://{config.host}:{config.console_port}/api/status, "
                         f"logs in {config.state_dir / 'logs'}")
                task_status.started({"node_id": node_id, "api_url": api_url})
                apis.start_soon(_exit_on_signal, (api, console), announce)
            tg.cancel_scope.cancel()  # the APIs have stopped: stop the reconciler and its processes
    finally:
        router.close()
        atexit.unregister(reconciler.kill_all_now)
        reconciler.kill_all_now()


async def _exit_on_signal(servers: tuple[uvicorn.Server, ...], announce: Callable[[str], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            announce(f"received {signal.Signals(signum).name}: stopping the APIs and llama-server processes")
            for server in servers:
                server.should_exit = True
            return
