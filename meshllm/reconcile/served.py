"""The served-model controller: make this node's llama-server processes match the desired models.

Desired: every ``ModelSpec`` this node holds a placement lease of (a split's host also runs it, with
``--rpc`` to its workers). Actual: the llama-server the ``Supervisor`` runs for the model, what this
controller remembers of the earlier ones, and the ``ServerStatus`` it published. ``served_plan.plan``
decides; this module reads the two states and carries the actions out: the status of each model is
published in the document (the API routes on it), a crashed server is restarted after the runtime's
backoff, one no longer desired is stopped (the supervisor's one ladder).

The supervisor records every llama-server in the node's database, so a node agent that was killed and
restarted *adopts* the ones it left running instead of starting a second copy: one whose command line
is exactly what this node would run now (``DesiredServer.argv_hash``) is claimed, any other stopped.
What happens to each model is written to the store's event log (Downloading, Started, Ready, Exited,
Restarting, Stopped, Adopted, Failed).

A model (or draft) named by a catalog name or a hub reference whose files are not in the models folder
yet is fetched by the ``Fetcher`` (``reconcile.downloads``) outside the reconcile: while it runs, the
model's desired state is ``Fetching`` and its status ``Downloading`` with the progress.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import anyio

from meshllm.engine.download import ModelReference
from meshllm.engine.ggufcheck import check_gguf
from meshllm.engine.ggufinfo import block_count
from meshllm.engine.models import ResolvedModel, resolve_model
from meshllm.engine.process import DEFAULT_MAX_TOKENS, LlamaServerConfig, ServingOptions, safe_name
from meshllm.engine.rpc_auth import RPC_CLEAR_ENV, RPC_DELTA_ENV, RPC_PUSH_ENV, RPC_SECRET_ENV
from meshllm.engine.templates import chat_arguments
from meshllm.errors import ModelError, ModelNotFetched, TerminalError
from meshllm.reconcile.downloads import Fetcher
from meshllm.reconcile.served_plan import (
    ADOPT_GRACE, Action, ActualServer, Claim, Desired, DesiredServer, Fetching, Forget, GiveUp, Memory, Publish, Record,
    Remember, Start, Stop, Unavailable, Wait, Withdraw, plan,
)
from meshllm.reconcile.shards import ShardFile
from meshllm.reconcile.supervisor import PROCESSES, HttpReady, LaunchSpec, ProcessPhase, ProcessView, Supervisor
from meshllm.reconcile.shares import ShareFetcher, share_of, workers_gpu
from meshllm.reconcile.split import head_args, host_keeps_head, split_layout
from meshllm.reconcile.timing import Backoff, Clock, SystemClock
from meshllm.reconcile.workers import RPC_RECORD_PREFIX, process_model
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import (
    ModelName, ModelSpec, NodeId, NodeStatus, PlacementLease, ServerPhase, lease_model, parse_server_key,
    server_key,
)
from meshllm.store.db import NodeStore

__all__ = ["DesiredServer", "RpcConnector", "ServedModelController", "ShardSource", "settings_hash", "split_args",
           "workers_meet"]

log = logging.getLogger(__name__)

# seconds a split host whose workers would push to each other waits for them to have met (measured their RTT
# to each other) before it starts without push; a node republishes new RTTs only every few seconds in a small
# mesh (gossip.rtt.RttPublisher: 10 s at 5 nodes), so a split planned right after its nodes joined would
# otherwise start, and run, with every hand-over through the host
PUSH_MEET_WAIT = 20.0


class RpcConnector(Protocol):
    """How a split host reaches its workers' ggml-rpc-servers: through the QUIC mesh, or straight with
    ``--rpc-direct`` (``node.rpc_tunnel``)."""

    key: str  # the mesh's RPC key, which the workers demand of the host's llama-server
    clear: bool  # --rpc-direct: no sealing of the RPC bytes after the key handshake

    async def endpoint(self, node_id: NodeId, target: ModelName) -> str:
        """The ``host:port`` llama-server's ``--rpc`` names for ``node_id``'s worker for ``target``."""
        ...

    async def probe(self, node_id: NodeId, target: ModelName) -> str | None:
        """None when ``node_id``'s worker for ``target`` answers now, else why not."""
        ...

    def tunnelled(self, endpoint: str) -> bool:
        """Whether ``endpoint`` (from ``endpoint``) is a tunnel of this node rather than a worker itself."""
        ...


class ShardSource(Protocol):
    """Where an expert shard's file stands on this node (``reconcile.shards.ExpertShardController``)."""

    def shard_for(self, model: ModelName) -> ShardFile | None: ...


class ServedModelController:
    """Runs one llama-server per model this node holds a lease of, and reports them in the document."""

    name = "served-model"

    def __init__(self, state: MeshState, *, node_id: NodeId, supervisor: Supervisor, engine_dir: Path, log_dir: Path,
                 gpu_layers: int = 0, device: str = "", threads: int = 0, store: NodeStore | None = None,
                 rpc: RpcConnector | None = None, clock: Clock | None = None, backoff: Backoff | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, downloads: Fetcher | None = None,
                 shares: ShareFetcher | None = None, shards: ShardSource | None = None) -> None:
        self.state = state
        self.node_id = node_id
        self.supervisor = supervisor
        self.engine_dir = engine_dir
        self.log_dir = log_dir
        self.gpu_layers = gpu_layers
        self.device = device
        self.threads = threads
        self.store = store
        self.rpc = rpc
        self.downloads = downloads
        self.shares = shares
        self.shards = shards
        self.clock = clock or SystemClock()
        self.backoff = backoff or Backoff()
        self.max_tokens = max_tokens
        self._adopt_until = self.clock.now() + ADOPT_GRACE
        self.memory: dict[ModelName, Memory] = {}
        self._resolved: dict[tuple[str, str], ResolvedModel] = {}
        self._draftless: set[ModelName] = set()  # models served without their draft (it could not be fetched)
        self._layers: dict[Path, int] = {}  # a model file's layer count (a CPU split host needs it)
        self._chat: dict[Path, tuple[str, ...]] = {}  # a model file's chat format (engine.templates)
        self._checked: dict[tuple[Path, int, int], str] = {}  # a file (size, mtime) -> what is wrong, "" if whole
        self._meet_since: dict[tuple[ModelName, tuple[NodeId, ...]], float] = {}  # split -> waiting for push since

    # -- keys ---------------------------------------------------------------------------------
    def keys(self) -> set[ModelName]:
        mine = {s.model for s in self.state.servers().values() if s.node == self.node_id}
        procs = {process_model(key) for key in self.supervisor.keys() if not key.startswith(RPC_RECORD_PREFIX)}
        return set(self._my_specs()) | procs | set(self.memory) | mine

    def keys_for(self, change: Changed) -> set[ModelName]:
        table, key = change
        if key is None:
            return self.keys()
        if table == "models":
            return {ModelName(key)}
        if table == "leases":
            return {lease_model(key)}
        if table in ("servers", "workers"):  # node/model: a split host waits for its workers' statuses
            node, model = parse_server_key(key)
            return {model} if table == "workers" or node == self.node_id else set()
        if table == PROCESSES and not key.startswith(RPC_RECORD_PREFIX):
            return {process_model(key)}
        return set()

    def _my_specs(self) -> dict[ModelName, ModelSpec]:
        """The models this node holds a placement lease of (see ``leases``)."""
        mine = {lease.model for lease in self.state.leases().values() if lease.node == self.node_id}
        return {name: spec for name, spec in self.state.models().items() if name in mine}

    # -- desired and actual -------------------------------------------------------------------
    async def desired(self, model: ModelName) -> Desired:
        spec = self._my_specs().get(model)
        if spec is None:
            return None
        lease = next((lease for lease in self.state.leases().values()
                      if lease.node == self.node_id and lease.model == model), None)
        try:
            path = await self._resolve(spec.source, spec.name)
        except ModelError as exc:
            if lease is not None and lease.workers and self.shares is not None:  # a split host: its share only
                share = self._host_share(spec, lease)
                if not isinstance(share, Path):
                    return share
                path = share
            elif isinstance(exc, ModelNotFetched):
                return self._fetching(model, spec.source, exc, draft=False)
            else:
                return Unavailable(model, str(exc))
        if problem := await self._broken(path):  # llama-server would fail to load it, again and again
            return Unavailable(model, problem)
        try:
            draft = await self._resolve(spec.draft, spec.name + "-draft") if spec.draft else None
        except ModelNotFetched as exc:
            fetching = self._fetching(model, spec.draft, exc, draft=True)
            if isinstance(fetching, Fetching):
                return fetching
            if model not in self._draftless:  # a draft only speeds up: serve without it, say so once
                self._draftless.add(model)
                log.warning("%s: serving without its draft: %s", model, fetching.message)
            draft = None
        except ModelError as exc:
            return Unavailable(model, str(exc))
        if path not in self._chat:  # read once, not at every reconcile
            self._chat[path] = await anyio.to_thread.run_sync(chat_arguments, path)
        serving = ServingOptions(embeddings=spec.embeddings, pooling=spec.pooling, rerank=spec.rerank,
                                 chat_template=spec.chat_template)
        if lease is not None and lease.shards:
            return await self._shard_desired(model, spec, lease, serving)
        if lease is None or not lease.workers:
            desired = DesiredServer(model=model, path=path, ctx_size=spec.ctx_size, draft=draft, serving=serving)
        else:
            if not self.gpu_layers and path not in self._layers:  # read once, not at every reconcile
                self._layers[path] = await anyio.to_thread.run_sync(block_count, path)
            desired = DesiredServer(model=model, path=path, ctx_size=spec.ctx_size, workers=tuple(lease.workers),
                                    tensor_split=tuple(lease.tensor_split),
                                    n_layer=0 if self.gpu_layers else self._layers[path], serving=serving,
                                    workers_gpu=workers_gpu(self.state, lease))
        return replace(desired, argv_hash=settings_hash(self._config(desired, port=0)))

    async def _shard_desired(self, model: ModelName, spec: ModelSpec, lease: PlacementLease,
                             serving: ServingOptions) -> Desired:
        """An expert shard's server: its file once the shard controller has it ready."""
        label = f"{lease.slot + 1}/{lease.shards}"
        shard = self.shards.shard_for(model) if self.shards is not None else None
        target = shard.target if shard is not None else None
        if shard is not None and shard.phase == "failed" and (target is None or target.label == label):
            return Unavailable(model, shard.message)
        if shard is None or target is None or target.label != label or shard.phase != "ready":
            mine = shard is not None and (shard.phase == "waiting" or target is not None and target.label == label)
            return Fetching(model, shard.message if shard is not None and mine
                            else f"waiting for expert shard {label} to be written")
        if target.out not in self._chat:
            self._chat[target.out] = await anyio.to_thread.run_sync(chat_arguments, target.out)
        desired = DesiredServer(model=model, path=target.out, ctx_size=spec.ctx_size, shard=label,
                                experts=len(target.experts[0]) if target.experts else 0, file_bytes=shard.size,
                                quality=shard.quality, serving=serving)
        return replace(desired, argv_hash=settings_hash(self._config(desired, port=0)))

    async def actual(self, model: ModelName, desired: Desired, now: float) -> ActualServer:
        proc = self.supervisor.get(model)
        waiting = None
        serves = self.memory.get(model, Memory()).serves
        solo_now = proc is not None and proc.running and serves is not None and not serves.workers
        if isinstance(desired, DesiredServer) and desired.workers and (proc is None or not proc.running or solo_now):
            waiting = await self._split_waiting(desired)  # a solo server keeps serving until the split can start
        return ActualServer(model=model, node=self.node_id, process=proc, memory=self.memory.get(model, Memory()),
                            published=self.state.servers().get(server_key(self.node_id, model)), waiting=waiting,
                            adopt_until=self._adopt_until)

    def plan(self, desired: Desired, actual: ActualServer, now: float) -> list[Action]:
        return plan(desired, actual, now)

    async def _split_waiting(self, desired: DesiredServer) -> str | None:
        """Why the split cannot start yet (a worker still loading, failed or unreachable), or None."""
        if self.rpc is None:
            return "this node cannot reach split workers (no RPC tunnel)"
        workers = self.state.workers()
        for node in desired.workers:
            status = workers.get(server_key(node, desired.model))
            if status is None or status.host != self.node_id:
                return f"waiting for worker {node} to start its ggml-rpc-server"
            if status.phase is not ServerPhase.READY:
                return f"worker {node}: {status.message or status.phase.value}"
            problem = await self.rpc.probe(node, desired.model)
            if problem is not None:
                return f"worker {node} does not answer through the mesh: {problem}"
        return await self._meet_waiting(desired)

    async def _meet_waiting(self, desired: DesiredServer) -> str | None:
        """Workers that would push to each other but have not met yet: why the split waits for that
        (``PUSH_MEET_WAIT`` at most, then it starts with the hand-over through the host), or None. A split
        that served and lost it (``recovering``) does not wait: serving again comes first."""
        assert self.rpc is not None
        key = (desired.model, desired.workers)
        memory = self.memory.get(desired.model, Memory())
        endpoints = [await self.rpc.endpoint(node, desired.model) for node in desired.workers]
        if (memory.failed or memory.recovering or not self._straight(endpoints)
                or workers_meet(self.state.nodes(), desired.workers)):  # a restart after a failure never pushes
            self._meet_since.pop(key, None)
            return None
        now = self.clock.now()
        since = self._meet_since.setdefault(key, now)
        if now - since >= PUSH_MEET_WAIT:
            return None
        return (f"waiting for workers {', '.join(desired.workers)} to measure their RTT to each other, so the "
                f"activations go from one to the next ({PUSH_MEET_WAIT - (now - since):.0f} s more at most)")

    def _straight(self, endpoints: list[str]) -> bool:
        """Two or more workers, each reached straight (not through a tunnel of this node): they could push."""
        assert self.rpc is not None
        return len(endpoints) > 1 and not any(self.rpc.tunnelled(e) for e in endpoints)

    def _fetching(self, model: ModelName, source: str, exc: ModelNotFetched, *, draft: bool) -> Fetching | Unavailable:
        """Its files (or its draft's) are missing: have them fetched, and say how far that got."""
        reference = exc.reference
        if self.downloads is None or not isinstance(reference, ModelReference):
            return Unavailable(model, str(exc))
        state = self.downloads.want(source, reference, retry=not draft)  # a failed draft: serve without it
        what = f"draft {reference.name}: " if draft else ""
        if state.error:
            return Unavailable(model, f"{what}download failed: {state.error}")
        return Fetching(model, what + state.message)

    async def _broken(self, path: Path) -> str:
        """What is wrong with the model file at ``path`` (``engine.ggufcheck``), "" when it is whole;
        checked again only when its size or modification time changes."""
        try:
            info = path.stat()
        except OSError as exc:
            return f"cannot read model file {path}: {exc.strerror}"
        key = (path, info.st_size, info.st_mtime_ns)
        if key not in self._checked:
            try:
                await anyio.to_thread.run_sync(check_gguf, path)
                self._checked[key] = ""
            except ModelError as exc:
                self._checked[key] = str(exc)
        return self._checked[key]

    def _host_share(self, spec: ModelSpec, lease: PlacementLease) -> Path | Fetching | Unavailable:
        """The split host's share of a file it has no whole copy of: fetched (``reconcile.shares``)."""
        assert self.shares is not None
        state = self.shares.want(share_of(spec, lease, self.node_id, host_gpu=self.gpu_layers > 0,
                                          workers_gpu=workers_gpu(self.state, lease)))
        if state.error:
            return Unavailable(spec.name, f"fetching its layers failed: {state.error}")
        return state.path if state.path is not None else Fetching(spec.name, state.message)

    async def _resolve(self, source: str, name: str) -> Path:
        key = (source, name)
        if key not in self._resolved:
            self._resolved[key] = await anyio.to_thread.run_sync(lambda: resolve_model(source, name=name))
        return self._resolved[key].path

    # -- apply --------------------------------------------------------------------------------
    async def apply(self, model: ModelName, action: Action, now: float) -> float | None:
        match action:
            case Start():
                await self._start(action)
            case Stop(_, reason):
                self.supervisor.stop(model, reason=reason)
            case Claim():
                view = self.supervisor.get(model)
                if view is not None:
                    self.supervisor.claim(model, HttpReady(view.port))
                    log.info("%s: adopted llama-server pid %d on 127.0.0.1:%d", model, view.pid, view.port)
            case Forget():
                await self.supervisor.forget(model)
            case Remember(_, memory, backoff):
                if backoff is not None:
                    memory = replace(memory, retry_at=memory.retry_at + self.backoff.delay(backoff))
                self.memory[model] = memory
                if memory == Memory():
                    del self.memory[model]
                return memory.retry_at - now if backoff is not None else None
            case Publish(status):
                self.state.put_server(status.model_copy(update={"since": status.since or now}))
            case Withdraw():
                self.state.remove_server(server_key(self.node_id, model))
            case Record(_, reason, message, level):
                await self._event(model, reason, message, level=level)
            case Wait(_, until):
                return until - now
            case GiveUp(_, message):
                raise TerminalError(message)
        return None

    def _config(self, desired: DesiredServer, *, port: int,
                rpc_endpoints: list[str] | None = None) -> LlamaServerConfig:
        gpu_layers, extra, device = self.gpu_layers, tuple[str, ...](), self.device
        if desired.workers:  # the host's device goes after --rpc, with the workers' (split_args)
            gpu_layers, extra = split_args(desired, rpc_endpoints or [], gpu=self.gpu_layers > 0, device=device)
            device = ""
        return LlamaServerConfig(
            binary=self.engine_dir / "llama-server", model_path=desired.path, alias=desired.model, port=port,
            ctx_size=desired.ctx_size, gpu_layers=gpu_layers, threads=self.threads, device=device,
            draft_path=desired.draft, max_tokens=self.max_tokens, chat=self._chat.get(desired.path, ()),
            serving=desired.serving, extra=extra,
        )

    async def _start(self, action: Start) -> ProcessView:
        desired = action.desired
        model = desired.model
        rpc_endpoints, env = None, {}
        if desired.workers:
            assert self.rpc is not None
            rpc_endpoints = [await self.rpc.endpoint(node, model) for node in desired.workers]
            # every weight is offered to the workers by name (patch 0003), and each worker loads it from
            # its own copy of the file, which the worker checked is the mesh's (ModelSpec.fingerprint);
            # the workers serve only a client that proves the mesh's RPC key (patch 0004), and the bytes
            # that follow are sealed (patch 0005) unless --rpc-direct asks for the clear channel
            # a token's small inputs (the attention mask grows with the context) cross as what changed
            env = {"GGML_RPC_HASH_THRESHOLD": "1", "GGML_RPC_LOAD_BY_NAME": "1", RPC_SECRET_ENV: self.rpc.key,
                   RPC_DELTA_ENV: "1"}
            if self.rpc.clear:
                env[RPC_CLEAR_ENV] = "1"
            # workers reached straight, and which talk to each other in the mesh, reach each other the same
            # way: the activations between two of them go from one to the next directly (patch 0006), not
            # back through this host. A server started again after a failure hands them over itself: if
            # two workers cannot reach each other after all (a port closed between them), the split
            # still serves.
            if (self._straight(rpc_endpoints) and workers_meet(self.state.nodes(), desired.workers)
                    and action.restarts == 0):
                env[RPC_PUSH_ENV] = "1"
            self._meet_since.pop((model, desired.workers), None)
        port = self.supervisor.pick_port(server_key(self.node_id, model))
        config = self._config(desired, port=port, rpc_endpoints=rpc_endpoints)
        # decoding on the CPU, llama-server takes every core: as a batch job it leaves the node responsive
        view = await self.supervisor.launch(LaunchSpec(
            key=model, model=model, argv=tuple(config.argv()), port=port, ready=HttpReady(port), env=env,
            log_path=self.log_dir / f"{safe_name(model)}.log", batch=self.gpu_layers == 0,
            argv_hash=desired.argv_hash))
        where = f"llama-server pid {view.pid} on 127.0.0.1:{port}"
        log.info("%s: started %s", model, where)
        await self._event(model, "Restarting" if action.restarts else "Started",
                          f"{action.message}; {where}" if action.message else where)
        return view

    async def _event(self, model: ModelName, reason: str, message: str, *, level: str = "info") -> None:
        if self.store is not None:
            await self.store.record_event(model, reason, message, level=level)

    async def shutdown(self) -> None:
        """Stop every llama-server of this node (adopted ones too) and withdraw their statuses."""
        async def halt(key: str) -> None:
            view = await self.supervisor.halt(key, reason="node shutting down")
            if view is not None:
                await self._event(process_model(key), "Stopped",
                                  f"{view.name} pid {view.pid} stopped (node shutting down)")
                await self.supervisor.forget(key)

        async with anyio.create_task_group() as tg:
            for key in self.supervisor.keys():
                view = self.supervisor.get(key)
                if not key.startswith(RPC_RECORD_PREFIX) and view is not None and view.phase is not ProcessPhase.EXITED:
                    tg.start_soon(halt, key)
        for key, status in list(self.state.servers().items()):
            if status.node == self.node_id:
                self.state.remove_server(key)
        self.memory.clear()


def settings_hash(config: LlamaServerConfig) -> str:
    """A digest of what a llama-server command line runs, its port left out: a server left running by
    the previous run of the node is adopted only when it runs what this node would start now."""
    argv = config.argv()
    if "--port" in argv:
        at = argv.index("--port")
        argv = argv[:at] + argv[at + 2:]
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]


def workers_meet(nodes: Mapping[NodeId, NodeStatus], workers: Sequence[NodeId]) -> bool:
    """Whether every two of ``workers`` have measured their RTT to each other (either one of them): they
    reach each other at the addresses they publish, where their rpc-servers listen too. Each worker
    pushes its activations to the next one's rpc-server only then (``RPC_PUSH_ENV``); a pair that has
    not met yet keeps the hand-over through the host, which works wherever the host reaches both."""
    def met(a: NodeId, b: NodeId) -> bool:
        return any(node is not None and other in node.rtt_ms
                   for node, other in ((nodes.get(a), b), (nodes.get(b), a)))

    return all(met(a, b) for i, a in enumerate(workers) for b in workers[i + 1:])


def split_args(desired: DesiredServer, rpc_endpoints: list[str], *, gpu: bool,
               device: str = "") -> tuple[int, tuple[str, ...]]:
    """``--n-gpu-layers`` and the extra llama-server arguments of a split host (``split_layout``; the
    output head on the host where ``host_keeps_head``).

    ``device``: the host's own ``--device``. llama-server offloads only to the devices that option
    names, so a split host lists the workers' too, as llama.cpp names them once ``--rpc`` has
    registered them (``RPC0``, ``RPC1``, ... in ``--rpc`` order), then its own: without them it would
    load the whole model on its own device and never use the workers. One device per worker is
    assumed, as the tensor split assumes: a worker's rpc-server serves one unless its node has several
    GPUs and no ``--device``."""
    gpu_layers, shares = split_layout(desired.n_layer, desired.tensor_split, gpu=gpu)
    keep = host_keeps_head(desired.n_layer, desired.tensor_split, host_gpu=gpu, workers_gpu=desired.workers_gpu)
    devices = ("--device", ",".join([f"RPC{i}" for i in range(len(rpc_endpoints))] + [device])) if device else ()
    return gpu_layers, ("--rpc", ",".join(rpc_endpoints), "--tensor-split", ",".join(f"{x:.4g}" for x in shares),
                        *devices, *head_args(gpu=gpu, keep=keep))
