"""The composition of one node: every component built from its ``NodeConfig`` in one place, started in
a declared order, stopped in the reverse order.

``Node.__init__`` builds the parts and wires them to each other; nothing is set on a part after it
is built. ``Node.run`` starts them one after another (``node.lifecycle``), each once the ones before
it serve:

    0. blackboard        its document, gossip on board streams and keeper (``node.blackboard``), so peers
                         find its stream handler from the first connection
    1. mesh              endpoint, gossip, membership (``node.mesh``); the tunnels' stream services
                         (HTTP, and RPC on a node that can be a split worker) are registered before it runs
    2. key rotation      follows the mesh key's rotations (``node.rotation``): the endpoint's secret,
                         mesh.json, the split RPC key
    3. RPC tunnels       the split host's listeners towards its workers (``tunnels.rpc``)
    4. engine processes  the process supervisor (``reconcile.supervisor``): llama-server, rpc-server
    5. controllers       the runner (``reconcile.runtime``): placement, served models, split workers, janitor
    6. demand recorder   what the OpenAI API hears asked for, written to the document
       console events    the feed of /api/events (``api.events``), told of each document change
    7. APIs              OpenAI :9337 (behind the API-key gate), console + /api :3131
    8. publisher         --publish/--mesh-name only: lists the mesh on the relays and the LAN (``node.discovery``)

and stops them last-first on SIGINT or SIGTERM, or when cancelled: the publisher (it withdraws the listing), the APIs (requests in flight get a
few seconds), the demand recorder, the controllers (each stops its own processes as it shuts down),
whatever engine process is left (SIGTERM, then SIGKILL), the RPC tunnels, the mesh, which tells the
peers this node leaves while its gossip still runs, and last the blackboard, which saves its snapshot.
Signals are watched from the start to the end of the stop, so a second Ctrl-C cannot cut the stop
short. A node agent killed outright (SIGKILL, a crash) leaves its llama-servers running; the next start
with the same state folder adopts them from the node's database (``reconcile.supervisor``).
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from meshllm import __version__
from meshllm.api.admin import ConsoleAccess
from meshllm.api.console import console_routes
from meshllm.api.control import AppliedHook, EventSource
from meshllm.api.events import EventHub
from meshllm.api.keys import ApiKeyGate, KeyRing, exposure_warning, key_routes
from meshllm.api.backends import DataPlane
from meshllm.api.cors import CorsGate, CorsPolicy
from meshllm.api.metrics import MeshMetrics, NodeGauges, RequestMetering
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app, status_snapshot
from meshllm.engine.capacity import detect_capacity
from meshllm.engine.models import looks_like_path, models_dir
from meshllm.engine.rpc_auth import rpc_key
from meshllm.engine.sources import SourcePolicy
from meshllm.moe.importance import ImatrixRun
from meshllm.node.blackboard import NodeBlackboard
from meshllm.node.names import NameWatch, taken_by
from meshllm.node.config import NodeConfig
from meshllm.node.discovery import publisher_for
from meshllm.node.http import HttpApi
from meshllm.node.lifecycle import Lifecycle, Run
from meshllm.node.mesh import MeshRuntime, interface_addresses
from meshllm.node.rotation import node_rotation
from meshllm.reconcile.demand import DemandRecorder, GarbageCollector
from meshllm.reconcile.leases import PlacementController
from meshllm.reconcile.runtime import Runner
from meshllm.reconcile.downloads import Downloads
from meshllm.reconcile.importance import ExpertImportanceController, ImatrixCounter
from meshllm.reconcile.served import ServedModelController
from meshllm.reconcile.shares import ShareFetches
from meshllm.reconcile.shards import ExpertShardController
from meshllm.reconcile.supervisor import ProcessSupervisor
from meshllm.reconcile.timing import Backoff
from meshllm.reconcile.workers import WorkerController
from meshllm.state.document import MeshState
from meshllm.state.manifest import Manifest
from meshllm.state.schema import GpuShare, ModelName, ModelSpec, NodeId, NodeRole, NodeStatus, server_key
from meshllm.store.admin import load_or_create_admin_token
from meshllm.store.db import AppliedManifest, NodeStore
from meshllm.store.identity import NodeIdentity
from meshllm.tunnels.http import HttpTunnelClient, HttpTunnelServer
from meshllm.tunnels.models import ModelFileServer, local_copies
from meshllm.tunnels.rpc import RpcTunnelClient, RpcTunnelServer
from meshllm.tunnels.service import StreamService, serve_streams

__all__ = ["Node", "console_access", "source_policy", "store_hooks"]

log = logging.getLogger(__name__)
JOIN_SYNC_WAIT = 5.0  # seconds a joining node waits for the mesh's document before declaring its --model specs


def console_access(config: NodeConfig) -> ConsoleAccess:
    """The admin token (created in the state folder the first time) and the Host names of this node."""
    token = load_or_create_admin_token(config.state_dir)
    names = [*interface_addresses(), socket.gethostname(), socket.getfqdn()] if config.listen_all else []
    return ConsoleAccess.for_bind(token, listen_all=config.listen_all, names=names)


def source_policy(config: NodeConfig) -> SourcePolicy:
    """Manifests may name the models folder, ``--allow-models`` and this node's own ``--model`` files."""
    files = [Path(m).expanduser().resolve() for m in config.models if looks_like_path(m)]
    return SourcePolicy.for_node(allowed=config.allow_models, model_files=files)


def store_hooks(store: NodeStore, node_id: NodeId) -> tuple[EventSource, AppliedHook]:
    """The store as the control API wants it: a model's events, and a keeper of applied manifests."""
    async def events(model: ModelName, /) -> list[dict[str, Any]]:
        rows = await store.events(model, limit=20)
        return [{"at": e.at, "type": "Normal" if e.level == "info" else "Warning", "reason": e.reason,
                 "message": e.message, "node": node_id} for e in reversed(rows)]

    async def on_applied(manifests: list[Manifest], /) -> None:
        await store.save_applied([AppliedManifest(kind=m.kind, name=m.metadata.name,
                                                  body=m.model_dump(mode="json", exclude_none=True))
                                  for m in manifests])

    return events, on_applied


class Node:
    """One running node. ``engine_dir`` is None on a ``--client`` node (no engine, no controllers)."""

    def __init__(self, config: NodeConfig, identity: NodeIdentity, store: NodeStore, *,
                 specs: Sequence[ModelSpec] = (), engine_dir: Path | None = None,
                 announce: Callable[[str], None] = print) -> None:
        self.config = config
        self.node_id = node_id = identity.node_id
        self.specs = tuple(specs)
        self.announce = announce
        self.api_url = f"http://{config.host}:{config.port}/v1"
        self.state = state = MeshState()
        self.mesh = MeshRuntime.for_node(state, identity, me=self._me(engine_dir is None), state_dir=config.state_dir,
                                         joins=config.joins, host=config.quic_host, port=config.bind_port,
                                         advertise=config.advertise)
        self.router = Router(state, node_id=node_id)
        self.mesh.endpoint.on_peer(  # a node whose connection closed is routed around before its death verdict
            lambda event: (self.router.peer_up if event.up else self.router.peer_down)(event.node_id))
        self.blackboard = NodeBlackboard.for_node(config, self.mesh.endpoint, node_id=node_id,
                                                  node_name=config.name or socket.gethostname())
        self.keys = KeyRing(state, local=config.api_keys)
        # the data plane: the OpenAI app and the HTTP tunnel service forward through it (its pool lives
        # as long as the OpenAI app)
        self.plane = DataPlane(self.router, tunnels=HttpTunnelClient(self.mesh.connect))
        key = rpc_key(self.mesh.creds.secret)
        self.rpc_tunnels = RpcTunnelClient(self.mesh.connect, key=key, clear=config.rpc_direct,
                                           direct=None if config.rpc_tunnel else self._direct_address)
        self.supervisor: ProcessSupervisor | None = None
        self.runner: Runner | None = None
        self.workers: WorkerController | None = None
        self.downloads = Downloads(folder=models_dir())  # hub models this node must fetch to serve
        # split shares: the tensors of a model this node holds in a split, when it has no whole copy
        self.shares = ShareFetches(folder=models_dir(), node_id=node_id, tunnels=HttpTunnelClient(self.mesh.connect))
        if engine_dir is not None:
            self.supervisor = ProcessSupervisor(store=store)
            self.runner, self.workers = self._controllers(self.supervisor, engine_dir, store, key)
        self.demand = DemandRecorder(state, node_id=node_id)
        self.names = NameWatch(state, node_id=node_id, specs=self.specs, announce=announce,
                               record=lambda model, reason, text: store.record_event(model, reason, text, level="warning"))
        self.rotation, rotation_api = node_rotation(self.mesh, tunnels=self.rpc_tunnels, workers=self.workers,
                                                    supervisor=self.supervisor)
        serve_streams(self.mesh.endpoint, self._stream_services())
        events, on_applied = store_hooks(store, node_id)
        self.metrics = MeshMetrics(state, node_id=node_id, gauges=self._gauges())
        openai_app = create_openai_app(self.plane, max_body_bytes=config.max_body_bytes, demand=self.demand.note,
                                       failover_events=self.metrics, silence=self._silence)
        extra = {"mesh_id": self.mesh.creds.mesh_id, "key_id": lambda: self.mesh.creds.key_id,
                 "rpc_tunnels": self.rpc_tunnels.tunnels, "metrics": self.metrics.summary}
        self.events = EventHub(lambda: status_snapshot(state, node_id=node_id, now=time.time(), extra=extra))
        local_api = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{config.port}"
        status_app = create_status_app(
            state, node_id=node_id, access=console_access(config), sources=source_policy(config), events=events,
            on_applied=on_applied, invite=self.mesh.token,
            routes=[*key_routes(state, node_id=node_id, ring=self.keys), *self.blackboard.api.routes(),
                    *rotation_api, *self.events.routes(), *self.metrics.routes(),
                    *console_routes(openai_base=local_api)],
            extra=extra)
        self.publisher = publisher_for(config, state, self.mesh, node_id=node_id)  # None: a private mesh
        metered = RequestMetering(openai_app, self.metrics)
        gated = CorsGate(ApiKeyGate(metered, self.keys), CorsPolicy(origins=config.cors_origins))
        self.apis = (HttpApi(gated, host=config.host, port=config.port, what="OpenAI API"),
                     HttpApi(status_app, host=config.host, port=config.console_port, what="console API",
                             on_stop=self.events.close))

    def _silence(self, node: NodeId) -> float | None:
        """Seconds since this node heard from ``node`` (the proxy moves requests off a silent one)."""
        return self.mesh.endpoint.silent_for(node)

    def _gauges(self) -> NodeGauges:
        gossip, quic = self.mesh.gossip.stats, self.mesh.endpoint.stats
        return NodeGauges(gossip_bytes=lambda: (gossip.bytes_sent, gossip.bytes_received),
                          quic_bytes=lambda: (quic.bytes_sent, quic.bytes_received))

    def _controllers(self, supervisor: ProcessSupervisor, engine_dir: Path, store: NodeStore,
                     key: str) -> tuple[Runner, WorkerController]:
        """The runner and its controllers; the runner shuts them down in this order (a split's
        llama-server before the rpc-servers it uses)."""
        config, state, node_id, logs = self.config, self.state, self.node_id, self.config.state_dir / "logs"
        backoff = Backoff()
        gpu = detect_capacity().gpu
        shards = ExpertShardController(state, node_id=node_id, folder=config.state_dir / "shards", store=store)
        served = ServedModelController(
            state, node_id=node_id, supervisor=supervisor, engine_dir=engine_dir, log_dir=logs,
            gpu_layers=999 if gpu else 0, device=config.device, threads=config.threads,
            store=store, rpc=self.rpc_tunnels, backoff=backoff, max_tokens=config.max_tokens_default,
            downloads=self.downloads, shares=self.shares, shards=shards)
        # rpc-servers on the node's address, published for hosts to reach straight (they demand the mesh's
        # RPC key and seal what follows unless the host asks --rpc-direct's clear channel); --rpc-tunnel:
        # on loopback, reached through the QUIC mesh only
        bind_host = "127.0.0.1" if config.rpc_tunnel else config.quic_host
        direct_host = "" if config.rpc_tunnel else self.mesh.advertised(0)[0].rpartition(":")[0]
        workers = WorkerController(state, node_id=node_id, supervisor=supervisor, engine_dir=engine_dir, log_dir=logs,
                                   key=key, threads=config.threads, device=config.device, store=store,
                                   backoff=backoff, bind_host=bind_host, direct_host=direct_host,
                                   shares=self.shares, gpu=gpu)
        placement = PlacementController(state, node_id=node_id, incarnation=self.mesh.incarnation, store=store)
        importance = ExpertImportanceController(state, node_id=node_id, store=store, counter=ImatrixCounter(
            engine_dir, ImatrixRun(threads=config.threads)))
        runner = Runner(state, [placement, importance, served, shards, workers,
                                GarbageCollector(state, node_id=node_id)], supervisor=supervisor, backoff=backoff)
        return runner, workers

    def _me(self, client: bool) -> NodeStatus:
        now = time.time()
        capacity = None if client else detect_capacity(max_vram=self.config.max_vram)
        gpus = [GpuShare(name=name, bytes=size) for name, size in capacity.devices] if capacity else []
        return NodeStatus(id=self.node_id, name=self.config.name or socket.gethostname(),
                          capacity_bytes=capacity.bytes if capacity else 0, gpus=gpus,
                          role=NodeRole.CLIENT if client else NodeRole.SERVER, api_url=self.api_url,
                          version=__version__, started_at=now, incarnation=now)

    def _direct_address(self, worker: NodeId, model: ModelName) -> str | None:
        status = self.state.workers().get(server_key(worker, model))
        return status.direct or None if status is not None else None

    def _stream_services(self) -> list[StreamService]:
        """What this node answers on its endpoint besides gossip: the HTTP tunnel (requests for the
        models it serves) and, where it can be a split worker, the RPC tunnel to its rpc-servers."""
        # peers' requests, and pieces of the model files this node holds (for split shares)
        answer = ModelFileServer(local_copies(self.state.models), self.plane.answer_peer)
        services: list[StreamService] = [HttpTunnelServer(answer)]
        if self.workers is not None:
            services.append(RpcTunnelServer(self.workers.endpoint_for))
        return services

    def _components(self) -> list[tuple[str, Run]]:
        """The start order after the mesh; the stop order is its reverse, then the mesh."""
        engine = [] if self.supervisor is None or self.runner is None else [
            ("engine processes", self.supervisor.run), ("downloads", self.downloads.run),
            ("split shares", self.shares.run),
            ("controllers", self.runner.run)]
        listing = [] if self.publisher is None else [("publisher", self.publisher.run)]
        return [("model names", self.names.run), ("key rotation", self.rotation.run), ("RPC tunnels", self.rpc_tunnels.run), *engine,
                ("demand recorder", self.demand.run), ("console events", self._run_events),
                *((api.what, api.run) for api in self.apis), *listing]

    async def _run_events(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The console's event feed, told of every change of the state document while it runs."""
        handle = self.state.observe(self.events.notify)
        try:
            await self.events.run(task_status=task_status)
        finally:
            self.state.unobserve(handle)

    async def run(self, *, task_status: TaskStatus[dict[str, str]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGINT, SIGTERM or cancellation; then stop every component, last started first."""
        running = anyio.CancelScope()
        try:
            for api in self.apis:
                api.bind()  # a port another program holds fails here, before anything starts
            async with anyio.create_task_group() as tg:
                await tg.start(self._watch_signals, running)
                parts = Lifecycle(tg)
                try:
                    with running:
                        await self._start(parts, task_status)
                        await anyio.sleep_forever()
                finally:
                    await parts.stop()
                    tg.cancel_scope.cancel()  # the signal watcher
        finally:
            for api in self.apis:
                api.close()
            self.router.close()
            self.keys.close()

    async def _start(self, parts: Lifecycle, task_status: TaskStatus[dict[str, str]]) -> None:
        await parts.start("blackboard", self.blackboard.run)  # its stream handler in place before peers come
        await parts.start("mesh", self.mesh.run)
        if self.config.joins and self.specs:
            # joining: the mesh's models first, so a --model whose name the mesh already has is seen as
            # taken rather than written over it (a few seconds at most: a seed that does not answer
            # does not hold this node's models back)
            with anyio.move_on_after(JOIN_SYNC_WAIT):
                await self.mesh.gossip.synced_once.wait()
        for spec in self.specs:  # this node's --model models, as desired state (a name taken: see names)
            if taken_by(self.state.models().get(spec.name), node_id=self.node_id) is None:
                self.state.put_model(spec)
        for name, run in self._components():
            await parts.start(name, run)
        token = self.mesh.token()
        self.announce(f"meshllm node {self.node_id}: OpenAI API {self.api_url}, console "
                      f"http://{self.config.host}:{self.config.console_port}/ , logs in "
                      f"{self.config.state_dir / 'logs'}\ninvite token (others join with --join): {token}")
        if warning := exposure_warning(self.keys, host=self.config.host, url=self.api_url):
            self.announce(warning)
        task_status.started({"node_id": self.node_id, "api_url": self.api_url, "token": token})

    async def _watch_signals(self, running: anyio.CancelScope, *,
                             task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The first SIGINT or SIGTERM ends ``running`` (the node then stops); later ones only say so."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if running.cancel_called:
                    self.announce(f"received {name}: still stopping the engine processes and leaving the mesh")
                    continue
                self.announce(f"received {name}: stopping the APIs, the controllers and their engine "
                              "processes, then leaving the mesh")
                running.cancel()
