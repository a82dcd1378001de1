"""The split-worker controller: run a ggml-rpc-server for each split model this node holds layers of.

Desired: every split lease (``PlacementLease.workers``) naming this node, its host alive. For each, the
node finds its own copy of the model file, checks it is the mesh's file (``ModelSpec.fingerprint``),
and runs ``ggml-rpc-server --gguf <file>``: the patched server answers the host's weight offers from
that file, so no weights cross the network while the split loads, and it serves only clients that
prove the mesh's RPC key (``engine.rpc_auth``). It binds 127.0.0.1 and is reached through the QUIC
tunnel (``node.rpc_tunnel``, which asks ``endpoint_for`` where it is); with ``--rpc-direct`` it binds the
node's address instead, published as ``WorkerStatus.direct``, and hosts with ``--rpc-direct`` connect
to it straight.
Each worker is reported as a ``WorkerStatus``: loading until its port accepts connections, then
ready; failed when this node has no identical copy or the server keeps dying (placement then leaves
this node out of the split for a while). ``plan_worker`` decides, purely; the controller reads and applies.

A ggml-rpc-server serves one host connection at a time and keeps no state a restart would lose, so
worker processes are not adopted after a restart of the node agent: the tunnel they were reached
through ended with the agent anyway. Ones a killed agent left running are stopped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio

from meshllm.engine.models import resolve_model
from meshllm.engine.process import safe_name
from meshllm.engine.rpc_auth import RPC_SECRET_ENV
from meshllm.engine.tensors import check_hashes, file_table, hash_tensors
from meshllm.errors import ModelError
from meshllm.reconcile.shares import Share, ShareFetcher, share_of, share_tensors, workers_gpu
from meshllm.reconcile.supervisor import PROCESSES, LaunchSpec, ListenReady, ProcessPhase, ProcessView, Supervisor
from meshllm.reconcile.timing import Backoff
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import (
    ModelName, ModelSpec, NodeId, PlacementLease, ServerPhase, WorkerStatus, lease_model, parse_server_key, server_key,
)
from meshllm.store.db import NodeStore

__all__ = [
    "RPC_RECORD_PREFIX", "ActualWorker", "DesiredWorker", "RpcWorkerConfig", "WorkerController", "WorkerMemory",
    "plan_worker", "process_model",
]

log = logging.getLogger(__name__)

RPC_RECORD_PREFIX = "rpc:"  # supervisor keys of workers, beside the llama-servers' (the model name)
START_TIMEOUT = 120.0  # seconds a ggml-rpc-server may take to index its file and listen
MAX_RESTARTS = 3  # crashes in a row before the worker is reported failed
FAILED_RETRY = 60.0  # seconds a failed worker waits before it is tried again
NO_COPY_RETRY = 30.0  # seconds before looking again for an identical copy of the model
FETCH_POLL = 1.0  # seconds between looks at the fetch of its share, while it runs


def process_model(key: str) -> ModelName:
    """The model a supervisor key is for: a llama-server's key is the model's name, a worker's
    ``rpc:<model>`` (the supervisor keeps plain strings: they become model names here)."""
    return ModelName(key.removeprefix(RPC_RECORD_PREFIX))


@dataclass(frozen=True)
class RpcWorkerConfig:
    """A ggml-rpc-server command line: weights answered from ``gguf``, loopback unless ``host`` says
    otherwise (``--rpc-direct``; the key it demands comes in its environment, not here)."""

    binary: Path
    gguf: Path
    port: int
    threads: int = 0
    device: str = ""
    host: str = "127.0.0.1"

    def argv(self) -> list[str]:
        args = [str(self.binary), "--host", self.host, "--port", str(self.port), "--gguf", str(self.gguf)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.device:
            args += ["--device", self.device]
        return args


# -- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DesiredWorker:
    model: ModelName
    host: NodeId  # the split's host node
    gguf: Path | None = None  # this node's copy of the model (whole, or a sparse copy of its share)
    problem: str = ""  # why this node cannot hold the layers (no identical copy)
    fetching: str = ""  # its share of the file is being fetched: how far that got
    layout: str = ""  # a sparse copy: the share it holds (its rpc-server knows only those tensors)


@dataclass(frozen=True)
class WorkerMemory:
    host: NodeId = NodeId("")  # the host the current (or last) worker served
    restarts: int = 0  # crashes in a row
    failed: bool = False  # reported FAILED: not tried again for ``host`` before ``retry_at``
    retry_at: float = 0.0
    since: float = 0.0
    message: str = ""  # why it failed, or restarts
    fetching: bool = False  # ``message`` is the progress of fetching its share of the file
    layout: str = ""  # the share the running rpc-server's sparse copy held when it started


@dataclass(frozen=True)
class ActualWorker:
    model: ModelName
    node: NodeId
    process: ProcessView | None = None
    memory: WorkerMemory = WorkerMemory()
    published: WorkerStatus | None = None
    direct_host: str = ""  # --rpc-direct: the address hosts reach this node's rpc-servers at


@dataclass(frozen=True)
class StartWorker:
    desired: DesiredWorker


@dataclass(frozen=True)
class StopWorker:
    model: ModelName
    reason: str


@dataclass(frozen=True)
class ForgetWorker:
    model: ModelName


@dataclass(frozen=True)
class RememberWorker:
    """Keep ``memory``; with ``backoff`` set, apply adds that attempt's backoff to ``memory.retry_at``."""

    model: ModelName
    memory: WorkerMemory
    backoff: int | None = None


@dataclass(frozen=True)
class PublishWorker:
    status: WorkerStatus


@dataclass(frozen=True)
class WithdrawWorker:
    model: ModelName


@dataclass(frozen=True)
class RecordWorker:
    model: ModelName
    reason: str
    message: str


@dataclass(frozen=True)
class WaitWorker:
    model: ModelName
    until: float


WorkerAction = (StartWorker | StopWorker | ForgetWorker | RememberWorker | PublishWorker | WithdrawWorker
                | RecordWorker | WaitWorker)


def plan_worker(desired: DesiredWorker | None, actual: ActualWorker, now: float, *,
                start_timeout: float = START_TIMEOUT, max_restarts: int = MAX_RESTARTS) -> list[WorkerAction]:
    """What to do for this node's worker of one split model. Pure; stops before starts."""
    model, actions = actual.model, list[WorkerAction]()
    memory, proc, backoff = actual.memory, actual.process, None
    if proc is not None and proc.phase is ProcessPhase.EXITED:
        actions.append(ForgetWorker(model))
        if proc.stop_reason is None and not proc.adopted:
            memory, backoff = _crashed(proc, memory, max_restarts)
        proc = None
    if desired is None:
        if proc is not None and proc.running:
            actions.append(StopWorker(model, "no longer a worker of this split"))
        if actual.published is not None:
            actions.append(WithdrawWorker(model))
        return actions + ([RememberWorker(model, WorkerMemory())] if actual.memory != WorkerMemory() else [])
    if proc is not None and proc.running:
        proc, memory = _check_running(desired, proc, memory, now, actions, start_timeout=start_timeout)
    if proc is None and backoff is None:  # else the backoff being drawn asks for the next look
        memory = _start_or_wait(desired, memory, now, actions)
    if backoff is not None:
        memory = replace(memory, retry_at=memory.since)
    if memory != actual.memory:
        actions.insert(0, RememberWorker(model, memory, backoff))
    status = _status(actual, proc, memory)
    if status is not None and (actual.published is None or not _same(actual.published, status)):
        actions.append(PublishWorker(status))
    return actions


def _crashed(proc: ProcessView, memory: WorkerMemory, max_restarts: int) -> tuple[WorkerMemory, int | None]:
    restarts = memory.restarts + 1
    message = f"ggml-rpc-server {proc.message.removeprefix('ggml-rpc-server ')}"
    if restarts > max_restarts:
        return replace(memory, restarts=0, failed=True, retry_at=proc.exited_at + FAILED_RETRY,
                       since=proc.exited_at, message=message), None
    return replace(memory, restarts=restarts, failed=False, since=proc.exited_at,
                   message=f"restarting after: {message}"), restarts


def _check_running(desired: DesiredWorker, proc: ProcessView, memory: WorkerMemory, now: float,
                   actions: list[WorkerAction], *, start_timeout: float) -> tuple[ProcessView | None, WorkerMemory]:
    reason = ""
    if proc.adopted:
        reason = "left running by the previous run of this node"
    elif memory.host != desired.host:
        reason = f"the split's host is now {desired.host}"
    elif memory.layout != desired.layout:
        reason = "its share of the layers changed"
    elif proc.phase is ProcessPhase.STARTING and now - proc.seen_at > start_timeout:
        reason = f"not listening after {start_timeout:.0f}s"
        memory = replace(memory, failed=True, retry_at=now + FAILED_RETRY, since=now,
                         message=f"ggml-rpc-server did not listen within {start_timeout:.0f}s; see {proc.log_path}")
    if reason:
        actions.append(StopWorker(desired.model, reason))
        return replace(proc, phase=ProcessPhase.STOPPING, stop_reason=reason), memory
    if proc.phase is ProcessPhase.STARTING:
        actions.append(WaitWorker(desired.model, proc.seen_at + start_timeout))
    else:
        memory = replace(memory, failed=False, message="")
    return proc, memory


def _start_or_wait(desired: DesiredWorker, memory: WorkerMemory, now: float,
                   actions: list[WorkerAction]) -> WorkerMemory:
    same_host = memory.host == desired.host
    if same_host and now < memory.retry_at:
        actions.append(WaitWorker(desired.model, memory.retry_at))
        return memory
    if desired.fetching:
        actions.append(WaitWorker(desired.model, now + FETCH_POLL))
        return replace(memory, host=desired.host, failed=False, retry_at=0.0, since=memory.since or now,
                       message=desired.fetching, fetching=True, restarts=0)
    if desired.problem:
        actions.append(WaitWorker(desired.model, now + NO_COPY_RETRY))
        return replace(memory, host=desired.host, failed=True, retry_at=now + NO_COPY_RETRY, since=now,
                       message=desired.problem, restarts=0, fetching=False)
    actions.append(StartWorker(desired))
    return replace(memory, host=desired.host, layout=desired.layout, restarts=memory.restarts if same_host else 0,
                   failed=False,
                   retry_at=0.0, message=memory.message if same_host and not memory.fetching else "", fetching=False)


def _status(actual: ActualWorker, proc: ProcessView | None, memory: WorkerMemory) -> WorkerStatus | None:
    worker = partial(WorkerStatus, node=actual.node, model=actual.model, host=memory.host)
    if proc is not None and proc.phase is ProcessPhase.READY:
        direct = f"{actual.direct_host}:{proc.port}" if actual.direct_host else ""
        return worker(phase=ServerPhase.READY, port=proc.port, direct=direct, pid=proc.pid,
                            since=proc.ready_at)
    if proc is not None and proc.phase is ProcessPhase.STARTING:
        return worker(phase=ServerPhase.LOADING, port=proc.port, pid=proc.pid, since=proc.started_at,
                            message=memory.message)
    if memory.failed:
        return worker(phase=ServerPhase.FAILED, message=memory.message, since=memory.since)
    if proc is None and memory.fetching:
        return worker(phase=ServerPhase.DOWNLOADING, message=memory.message, since=memory.since)
    if proc is None and memory.message:
        return worker(phase=ServerPhase.LOADING, message=memory.message, since=memory.since)
    return None


def _same(a: WorkerStatus, b: WorkerStatus) -> bool:
    return a.model_copy(update={"since": 0.0}) == b.model_copy(update={"since": 0.0})


# -- the controller -----------------------------------------------------------------------------
class WorkerController:
    """Runs this node's split workers and reports them in the document."""

    name = "split-worker"

    def __init__(self, state: MeshState, *, node_id: NodeId, supervisor: Supervisor, engine_dir: Path, log_dir: Path,
                 key: str, threads: int = 0, device: str = "", store: NodeStore | None = None,
                 backoff: Backoff | None = None, bind_host: str = "127.0.0.1", direct_host: str = "",
                 shares: ShareFetcher | None = None, gpu: bool = False) -> None:
        """``key``: the mesh's RPC key every rpc-server demands. ``bind_host``: where rpc-servers
        listen; ``direct_host``: the address published for hosts to reach them straight (``--rpc-direct``).
        ``gpu``: the node computes on a GPU, so its rpc-servers are not CPU batch jobs (``launch``)."""
        self.state = state
        self.key = key
        self.node_id = node_id
        self.supervisor = supervisor
        self.engine_dir = engine_dir
        self.log_dir = log_dir
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.device = device
        self.gpu = gpu
        self.store = store
        self.backoff = backoff or Backoff()
        self.bind_host = bind_host
        self.direct_host = direct_host
        self.memory: dict[ModelName, WorkerMemory] = {}
        self.shares = shares
        self._files: dict[tuple[str, str], Path] = {}  # (source, name) -> this node's whole copy
        self._checked: dict[tuple[object, ...], str] = {}  # a copy and share -> why it is not the mesh's, or ""

    def serve_direct(self, bind_host: str, address: str) -> None:
        """``--rpc-direct``: rpc-servers started from now on listen on ``bind_host`` and are published as
        ``address:<port>`` (``WorkerStatus.direct``) for hosts with ``--rpc-direct`` to connect to."""
        self.bind_host, self.direct_host = bind_host, address

    def endpoint_for(self, model: ModelName) -> tuple[str, int] | None:
        """Where this node's ready worker for ``model`` listens, as this node reaches it (the RPC
        tunnel's lookup)."""
        view = self.supervisor.get(RPC_RECORD_PREFIX + model)
        if view is None or view.phase is not ProcessPhase.READY or view.adopted:
            return None
        host = view.argv[view.argv.index("--host") + 1] if "--host" in view.argv else "127.0.0.1"
        return ("127.0.0.1" if host in ("0.0.0.0", "") else host), view.port

    # -- keys ---------------------------------------------------------------------------------
    def keys(self) -> set[ModelName]:
        procs = {process_model(key) for key in self.supervisor.keys()
                 if key.startswith(RPC_RECORD_PREFIX)}
        mine = {w.model for w in self.state.workers().values() if w.node == self.node_id}
        return set(self._leases()) | procs | set(self.memory) | mine

    def keys_for(self, change: Changed) -> set[ModelName]:
        table, key = change
        if key is None or table in ("nodes", "deaths"):  # a split's host may have died or come back
            return self.keys()
        if table == "models":
            return {ModelName(key)}
        if table == "leases":
            return {lease_model(key)}
        if table == "workers":
            node, model = parse_server_key(key)
            return {model} if node == self.node_id else set()
        if table == PROCESSES and key.startswith(RPC_RECORD_PREFIX):
            return {process_model(key)}
        return set()

    def _leases(self) -> dict[ModelName, PlacementLease]:
        """Split leases naming this node as a worker, by model (their host alive)."""
        alive = self.state.alive_nodes()
        return {lease.model: lease for lease in self.state.leases().values()
                if self.node_id in lease.workers and lease.node in alive}

    # -- desired and actual -------------------------------------------------------------------
    async def desired(self, model: ModelName) -> DesiredWorker | None:
        lease = self._leases().get(model)
        spec = self.state.models().get(model)
        if lease is None or spec is None:
            return None
        host = self.state.nodes().get(lease.node)
        share = share_of(spec, lease, self.node_id, host_gpu=host is not None and bool(host.gpus),
                         workers_gpu=workers_gpu(self.state, lease))
        try:
            path = await self._local_file(spec.source, spec.name)
        except ModelError as exc:
            return self._fetched(share, lease.node, exc)
        problem = await self._check_copy(path, spec, share)
        return DesiredWorker(model, lease.node, gguf=path, problem=problem)

    def _fetched(self, share: Share, host: NodeId, missing: ModelError) -> DesiredWorker:
        """No whole copy here: its share of the file, fetched (``reconcile.shares``)."""
        if self.shares is None:
            return DesiredWorker(share.model, host, problem=f"no copy of {share.model} on this node: {missing}")
        state = self.shares.want(share)
        if state.error:
            return DesiredWorker(share.model, host, problem=f"no copy of {share.model} on this node, and fetching "
                                 f"its layers failed: {state.error}")
        if state.path is None:
            return DesiredWorker(share.model, host, fetching=state.message)
        return DesiredWorker(share.model, host, gguf=state.path, layout=f"{share.worker}:{share.tensor_split}")

    async def _check_copy(self, path: Path, spec: ModelSpec, share: Share) -> str:
        """Why this node's whole copy is not the mesh's file (its header, or a tensor it would serve
        differs), or ""; checked once per version of the file and share."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns, spec.fingerprint, share.key)
        if key not in self._checked:
            def check() -> str:
                table = file_table(path)
                if spec.fingerprint and table.fingerprint != spec.fingerprint:
                    return (f"this node's {path} is not the mesh's {spec.name} (file {table.fingerprint}, mesh "
                            f"{spec.fingerprint}); replace it with the same file")
                if spec.tensor_hashes:
                    try:
                        check_hashes(hash_tensors(path, share_tensors(table, share)), spec.tensor_hashes,
                                     where=f"this node's {path}")
                    except ModelError as exc:
                        return f"{exc}; replace it with the mesh's file"
                return ""
            self._checked[key] = await anyio.to_thread.run_sync(check)
        return self._checked[key]

    async def actual(self, model: ModelName, desired: DesiredWorker | None, now: float) -> ActualWorker:
        return ActualWorker(model=model, node=self.node_id, process=self.supervisor.get(RPC_RECORD_PREFIX + model),
                            memory=self.memory.get(model, WorkerMemory()),
                            published=self.state.workers().get(server_key(self.node_id, model)),
                            direct_host=self.direct_host)

    def plan(self, desired: DesiredWorker | None, actual: ActualWorker, now: float) -> list[WorkerAction]:
        return plan_worker(desired, actual, now)

    async def _local_file(self, source: str, name: str) -> Path:
        key = (source, name)
        if key not in self._files:
            self._files[key] = await anyio.to_thread.run_sync(lambda: resolve_model(source, name=name).path)
        return self._files[key]

    # -- apply --------------------------------------------------------------------------------
    async def apply(self, model: ModelName, action: WorkerAction, now: float) -> float | None:
        key = RPC_RECORD_PREFIX + model
        match action:
            case StartWorker(desired):
                await self._start(desired)
            case StopWorker(_, reason):
                self.supervisor.stop(key, reason=reason)
                await self._event(model, "WorkerStopped", f"stopping ggml-rpc-server ({reason})")
            case ForgetWorker():
                await self.supervisor.forget(key)
            case RememberWorker(_, memory, backoff):
                if backoff is not None:
                    memory = replace(memory, retry_at=memory.retry_at + self.backoff.delay(backoff))
                    log.warning("%s: split worker %s", model, memory.message)
                elif memory.failed and memory != self.memory.get(model):
                    log.warning("%s: split worker failed: %s", model, memory.message)
                self.memory[model] = memory
                if memory == WorkerMemory():
                    del self.memory[model]
                return memory.retry_at - now if backoff is not None else None
            case PublishWorker(status):
                self.state.put_worker(status)
            case WithdrawWorker():
                self.state.remove_worker(server_key(self.node_id, model))
            case RecordWorker(_, reason, message):
                await self._event(model, reason, message)
            case WaitWorker(_, until):
                return until - now
        return None

    async def _start(self, desired: DesiredWorker) -> None:
        assert desired.gguf is not None
        model, key = desired.model, RPC_RECORD_PREFIX + desired.model
        port = self.supervisor.pick_port(RPC_RECORD_PREFIX + server_key(self.node_id, model), host=self.bind_host)
        config = RpcWorkerConfig(binary=self.engine_dir / "ggml-rpc-server", gguf=desired.gguf, port=port,
                                 threads=self.threads, device=self.device, host=self.bind_host)
        view = await self.supervisor.launch(LaunchSpec(
            key=key, model=model, argv=tuple(config.argv()), port=port,
            log_path=self.log_dir / f"rpc-{safe_name(model)}.log", ready=ListenReady(self.bind_host, port),
            env={RPC_SECRET_ENV: self.key}, batch=not (self.device or self.gpu)))
        log.info("%s: started ggml-rpc-server pid %d on %s:%d for host %s", model, view.pid, config.host, port,
                 desired.host)
        await self._event(model, "WorkerStarted", f"ggml-rpc-server pid {view.pid} on {config.host}:{port} holds "
                          f"layers for host {desired.host}")

    async def _event(self, model: ModelName, reason: str, message: str) -> None:
        if self.store is not None:
            await self.store.record_event(model, reason, message)

    async def shutdown(self) -> None:
        async with anyio.create_task_group() as tg:
            for key in self.supervisor.keys():
                view = self.supervisor.get(key)
                if key.startswith(RPC_RECORD_PREFIX) and view is not None and view.phase is not ProcessPhase.EXITED:
                    tg.start_soon(self._halt, key)
        for key, status in list(self.state.workers().items()):
            if status.node == self.node_id:
                self.state.remove_worker(key)
        self.memory.clear()

    async def _halt(self, key: str) -> None:
        if await self.supervisor.halt(key, reason="node shutting down") is not None:
            await self.supervisor.forget(key)
