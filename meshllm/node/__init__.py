"""One meshllm node: the state document, the mesh, the reconcilers and the two HTTP APIs, run together.

``run_node`` joins (or founds) a mesh, writes what the command line asked for into the replicated
document as desired state, starts the controllers that make llama-server match it, and
serves the OpenAI API (``--port``) and the management API (``--console``). SIGINT or SIGTERM stops
the APIs, then every engine process the node started, then tells the mesh it is leaving. A node
agent that dies without that (SIGKILL, a crash) leaves its llama-servers running; the next start
with the same state folder adopts them from the node's database (``store.db``).
"""

from __future__ import annotations

import atexit
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from meshllm import __version__
from meshllm.api.admin import ConsoleAccess
from meshllm.api.control import AppliedHook, EventSource
from meshllm.api.keys import ApiKeyGate, KeyRing, exposure_warning, key_routes
from meshllm.api.openai import create_openai_app, upstream_pool
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app
from meshllm.engine.build import require_engine
from meshllm.engine.capacity import detect_capacity
from meshllm.engine.models import file_fingerprint, looks_like_path, resolve_model
from meshllm.engine.rpc_auth import rpc_key
from meshllm.engine.sources import SourcePolicy
from meshllm.errors import MeshError
from meshllm.node.config import NodeConfig
from meshllm.node.http import bind_socket, exit_on_signal, serve_app
from meshllm.node.mesh import MeshRuntime, interface_addresses
from meshllm.node.rpc_tunnel import RpcTunnelClient, RpcTunnelServer
from meshllm.reconcile.demand import DemandRecorder, GarbageCollector
from meshllm.reconcile.leases import PlacementController
from meshllm.reconcile.runtime import Runner
from meshllm.reconcile.served import ServedModelController
from meshllm.reconcile.supervisor import ProcessSupervisor
from meshllm.reconcile.timing import Backoff
from meshllm.reconcile.workers import WorkerController
from meshllm.state.document import MeshState
from meshllm.state.manifest import Manifest
from meshllm.state.schema import ModelOrigin, ModelSpec, NodeRole, NodeStatus, server_key
from meshllm.store.admin import load_or_create_admin_token
from meshllm.store.db import AppliedManifest, NodeStore
from meshllm.store.identity import NodeIdentity, load_identity

__all__ = ["NodeConfig", "bind_socket", "run_node"]

log = logging.getLogger(__name__)


def desired_models(config: NodeConfig, node_id: str, now: float) -> list[ModelSpec]:
    """The ``--model`` arguments as desired state pinned to this node; fails fast on a bad one."""
    if config.client and config.models:
        raise MeshError("--client nodes serve no models; drop --client or --model")
    specs = []
    for source in config.models:
        resolved = resolve_model(source)
        kept = source if not Path(source).expanduser().exists() else str(resolved.path)
        specs.append(ModelSpec(name=resolved.name, source=kept, node=node_id, created_at=now,
                               origin=ModelOrigin.NODE, owner=node_id, size_bytes=resolved.size_bytes,
                               fingerprint=file_fingerprint(resolved.path), split=config.split))
    return specs


def console_access(config: NodeConfig) -> ConsoleAccess:
    """The admin token (created in the state folder the first time) and the Host names of this node."""
    token = load_or_create_admin_token(config.state_dir)
    names = [*interface_addresses(), socket.gethostname(), socket.getfqdn()] if config.listen_all else []
    return ConsoleAccess.for_bind(token, listen_all=config.listen_all, names=names)


def source_policy(config: NodeConfig) -> SourcePolicy:
    """Manifests may name the models folder, ``--allow-models`` and this node's own ``--model`` files."""
    files = [Path(m).expanduser().resolve() for m in config.models if looks_like_path(m)]
    return SourcePolicy.for_node(allowed=config.allow_models, model_files=files)


def store_hooks(store: NodeStore, node_id: str) -> tuple[EventSource, AppliedHook]:
    """The store as the control API wants it: a model's events, and a keeper of applied manifests."""
    async def events(model: str, /) -> list[dict[str, Any]]:
        rows = await store.events(model, limit=20)
        return [{"at": e.at, "type": "Normal" if e.level == "info" else "Warning", "reason": e.reason,
                 "message": e.message, "node": node_id} for e in reversed(rows)]

    async def on_applied(manifests: list[Manifest], /) -> None:
        await store.save_applied([AppliedManifest(kind=m.kind, name=m.metadata.name,
                                                  body=m.model_dump(mode="json", exclude_none=True))
                                  for m in manifests])

    return events, on_applied


async def run_node(config: NodeConfig, *, announce: Callable[[str], None] = print,
                   task_status: TaskStatus[dict[str, str]] = anyio.TASK_STATUS_IGNORED) -> None:
    identity = load_identity(config.state_dir)
    node_id, now = identity.node_id, time.time()
    specs = await anyio.to_thread.run_sync(desired_models, config, node_id, now)
    engine_dir = None if config.client else await anyio.to_thread.run_sync(
        lambda: require_engine(announce=announce))
    store = await NodeStore.open(config.state_dir)
    try:
        await store.record_identity(node_id, identity.public_bytes)
        await _serve(config, identity, store, specs, engine_dir, announce=announce, task_status=task_status)
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


async def _serve(config: NodeConfig, identity: NodeIdentity, store: NodeStore, specs: list[ModelSpec],
                 engine_dir: Path | None, *, announce: Callable[[str], None],
                 task_status: TaskStatus[dict[str, str]]) -> None:
    node_id, now = identity.node_id, time.time()
    state = MeshState()
    mesh = MeshRuntime.for_node(state, identity, state_dir=config.state_dir, joins=config.joins,
                                host=config.quic_host, port=config.bind_port, advertise=config.advertise)
    access, sources = console_access(config), source_policy(config)
    api_sock = bind_socket(config.host, config.port, what="OpenAI API")
    console_sock = bind_socket(config.host, config.console_port, what="console API")
    capacity = 0 if config.client else detect_capacity(max_vram=config.max_vram).bytes
    api_url = f"http://{config.host}:{config.port}/v1"
    me = NodeStatus(id=node_id, name=config.name or socket.gethostname(), capacity_bytes=capacity,
                    role=NodeRole.CLIENT if config.client else NodeRole.SERVER, api_url=api_url,
                    version=__version__, started_at=now, incarnation=now)
    router = Router(state, node_id=node_id)
    keys = KeyRing(state, local=config.api_keys)
    def direct_address(worker: str, model: str) -> str | None:
        status = state.workers().get(server_key(worker, model))
        return status.direct or None if status is not None else None

    key = rpc_key(mesh.creds.secret)
    tunnels = RpcTunnelClient(mesh.connect, key=key, direct=direct_address if config.rpc_direct else None)
    supervisor = runner = workers = None
    if engine_dir is not None:
        backoff, supervisor = Backoff(), ProcessSupervisor(store=store)
        served = ServedModelController(
            state, node_id=node_id, supervisor=supervisor, engine_dir=engine_dir, log_dir=config.state_dir / "logs",
            gpu_layers=999 if detect_capacity().gpu else 0, device=config.device, threads=config.threads,
            store=store, rpc=tunnels, backoff=backoff)
        workers = WorkerController(state, node_id=node_id, supervisor=supervisor, engine_dir=engine_dir,
                                   log_dir=config.state_dir / "logs", key=key, threads=config.threads,
                                   device=config.device, store=store, backoff=backoff)
        placement = PlacementController(state, node_id=node_id, incarnation=mesh.incarnation, store=store)
        runner = Runner(state, [placement, served, workers, GarbageCollector(state, node_id=node_id)],
                        supervisor=supervisor, backoff=backoff)
        atexit.register(supervisor.kill_all_now)
    try:
        async with anyio.create_task_group() as tg, upstream_pool() as upstream:
            me = await mesh.start(tg, me)
            mesh.serve_tunnels(router, upstream)
            await tg.start(tunnels.run)
            if workers is not None:
                RpcTunnelServer(mesh.endpoint, workers.endpoint_for).install()
                if config.rpc_direct:  # rpc-servers on the node's address, for hosts to reach straight
                    workers.serve_direct(config.quic_host,
                                         me.addrs[0].rpartition(":")[0] if me.addrs else config.quic_host)
            for spec in specs:
                state.put_model(spec)
            token = mesh.token(me)
            demand = DemandRecorder(state, node_id=node_id)
            async with anyio.create_task_group() as work:
                await work.start(demand.run)
                if supervisor is not None and runner is not None:
                    await work.start(supervisor.run)
                    await work.start(runner.run)
                async with anyio.create_task_group() as apis:
                    openai_app = create_openai_app(router, tunnels=mesh.open_tunnel,
                                                   max_body_bytes=config.max_body_bytes, demand=demand.note)
                    api = await apis.start(serve_app, ApiKeyGate(openai_app, keys), api_sock)
                    events, on_applied = store_hooks(store, node_id)
                    status_app = create_status_app(
                        state, node_id=node_id, access=access, sources=sources, events=events,
                        on_applied=on_applied, invite=lambda: mesh.token(me),
                        extra={"mesh_id": mesh.creds.mesh_id, "rpc_tunnels": tunnels.tunnels},
                        routes=key_routes(state, node_id=node_id, ring=keys))
                    console = await apis.start(serve_app, status_app, console_sock)
                    announce(f"meshllm node {node_id}: OpenAI API {api_url}, console "
                             f"http://{config.host}:{config.console_port}/api/status, logs in "
                             f"{config.state_dir / 'logs'}\ninvite token (others join with --join): {token}")
                    if warning := exposure_warning(keys, host=config.host, url=api_url):
                        announce(warning)
                    task_status.started({"node_id": node_id, "api_url": api_url, "token": token})
                    apis.start_soon(exit_on_signal, (api, console), announce)
                if runner is not None:
                    await runner.stop()  # the APIs stopped: the controllers stop their processes
                work.cancel_scope.cancel()
            await mesh.leave()
            tg.cancel_scope.cancel()
    finally:
        router.close()
        keys.close()
        if supervisor is not None:
            atexit.unregister(supervisor.kill_all_now)
            supervisor.kill_all_now()
