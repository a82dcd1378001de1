"""One meshllm node: the state document, the mesh, the reconcilers and the two HTTP APIs, run together.

``run_node`` joins (or founds) a mesh, writes what the command line asked for into the replicated
document as desired state, starts the served-model reconciler that makes llama-server match it, and
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
from meshllm.api.control import AppliedHook, EventSource
from meshllm.api.openai import create_openai_app, upstream_pool
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app
from meshllm.engine.build import require_engine
from meshllm.engine.capacity import detect_capacity
from meshllm.engine.models import file_fingerprint, resolve_model
from meshllm.engine.rpc_auth import rpc_key
from meshllm.errors import MeshError
from meshllm.node.config import NodeConfig
from meshllm.node.http import bind_socket, exit_on_signal, serve_app
from meshllm.node.mesh import MeshRuntime
from meshllm.node.rotation import node_rotation
from meshllm.node.rpc_tunnel import RpcTunnelClient, RpcTunnelServer
from meshllm.reconcile.demand import DemandRecorder
from meshllm.reconcile.leases import PlacementReconciler
from meshllm.reconcile.served import ServedModelReconciler
from meshllm.reconcile.workers import WorkerReconciler
from meshllm.state.document import MeshState
from meshllm.state.manifest import Manifest
from meshllm.state.schema import ModelOrigin, ModelSpec, NodeRole, NodeStatus, server_key
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
    api_sock = bind_socket(config.host, config.port, what="OpenAI API")
    console_sock = bind_socket(config.host, config.console_port, what="console API")
    capacity = 0 if config.client else detect_capacity(max_vram=config.max_vram).bytes
    api_url = f"http://{config.host}:{config.port}/v1"
    me = NodeStatus(id=node_id, name=config.name or socket.gethostname(), capacity_bytes=capacity,
                    role=NodeRole.CLIENT if config.client else NodeRole.SERVER, api_url=api_url,
                    version=__version__, started_at=now, incarnation=now)
    router = Router(state, node_id=node_id)
    def direct_address(worker: str, model: str) -> str | None:
        status = state.workers().get(server_key(worker, model))
        return status.direct or None if status is not None else None

    key = rpc_key(mesh.creds.secret)
    tunnels = RpcTunnelClient(mesh.connect, key=key, direct=direct_address if config.rpc_direct else None)
    reconciler = workers = None
    if engine_dir is not None:
        reconciler = ServedModelReconciler(
            state, node_id=node_id, engine_dir=engine_dir, log_dir=config.state_dir / "logs",
            gpu_layers=999 if detect_capacity().gpu else 0, device=config.device, threads=config.threads,
            store=store, rpc=tunnels)
        workers = WorkerReconciler(state, node_id=node_id, engine_dir=engine_dir, log_dir=config.state_dir / "logs",
                                   key=key, threads=config.threads, device=config.device, store=store)
        atexit.register(reconciler.kill_all_now)
        atexit.register(workers.kill_all_now)
    rotation, rotation_api = node_rotation(mesh, tunnels=tunnels, workers=workers, served=reconciler)
    try:
        async with anyio.create_task_group() as tg, upstream_pool() as upstream:
            me = await mesh.start(tg, me)
            await tg.start(rotation.run)
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
                if reconciler is not None:
                    placement = PlacementReconciler(state, node_id=node_id, incarnation=mesh.incarnation,
                                                    store=store)
                    await work.start(placement.run)
                    await work.start(reconciler.run)
                    assert workers is not None
                    await work.start(workers.run)
                async with anyio.create_task_group() as apis:
                    openai_app = create_openai_app(router, tunnels=mesh.open_tunnel,
                                                   max_body_bytes=config.max_body_bytes, demand=demand.note)
                    api = await apis.start(serve_app, openai_app, api_sock)
                    events, on_applied = store_hooks(store, node_id)
                    status_app = create_status_app(state, node_id=node_id, events=events, on_applied=on_applied,
                                                   extra={"token": mesh.token, "mesh_id": mesh.creds.mesh_id,
                                                          "key_id": lambda: mesh.creds.key_id,
                                                          "rpc_tunnels": tunnels.tunnels},
                                                   routes=rotation_api)
                    console = await apis.start(serve_app, status_app, console_sock)
                    announce(f"meshllm node {node_id}: OpenAI API {api_url}, console "
                             f"http://{config.host}:{config.console_port}/api/status, logs in "
                             f"{config.state_dir / 'logs'}\ninvite token (others join with --join): {token}")
                    task_status.started({"node_id": node_id, "api_url": api_url, "token": token})
                    apis.start_soon(exit_on_signal, (api, console), announce)
                work.cancel_scope.cancel()  # the APIs stopped: stop the reconciler and its processes
            await mesh.leave()
            tg.cancel_scope.cancel()
    finally:
        router.close()
        if reconciler is not None and workers is not None:
            atexit.unregister(reconciler.kill_all_now)
            atexit.unregister(workers.kill_all_now)
            reconciler.kill_all_now()
            workers.kill_all_now()
