"""The served-model reconciler: make this node's llama-server processes match the desired models.

Desired: every ``ModelSpec`` this node holds a placement lease of. Actual: the llama-server
processes this node runs, one per model. ``plan()`` is pure and decides what to do for one model;
``ServedModelReconciler`` observes processes, applies the plan, and publishes a ``ServerStatus`` for
each model into the document (the API routes on those). A server that dies is restarted with
exponential backoff; one that stops being desired is stopped (SIGTERM, grace, SIGKILL).

With a ``NodeStore`` every llama-server started is recorded (pid, port, argv and its digest) and
forgotten when stopped on purpose, so a node agent that was killed and restarted *adopts* the
llama-servers it left running instead of starting a second copy: a record whose pid still runs
exactly the recorded argv is taken back (loading, probed, ready, same port) when the model is still
desired with the same argv, and stopped otherwise. What happens to each model is written to the
store's event log (Started, Ready, Exited, Restarting, Stopped, Adopted, Failed).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import anyio
import httpx
from anyio.abc import TaskStatus

from meshllm.engine.models import ResolvedModel, resolve_model
from meshllm.engine.process import (
    DEFAULT_MAX_TOKENS, UNKNOWN_EXIT, EngineProcess, LlamaServerConfig, adopt, candidate_ports, describe_exit, launch, log_tail,
    port_is_free, safe_name, stop_process, stop_process_now,
)
from meshllm.engine.ggufinfo import block_count
from meshllm.engine.rpc_auth import RPC_SECRET_ENV
from meshllm.engine.templates import chat_arguments
from meshllm.errors import ModelError
from meshllm.reconcile.queue import Result, WorkQueue, run_observed
from meshllm.reconcile.workers import RPC_RECORD_PREFIX
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, ServerPhase, ServerStatus, server_key
from meshllm.store.db import NodeStore, ProcessRecord

__all__ = ["ActualServer", "DesiredServer", "ServedModelReconciler", "Start", "Stop", "plan"]

log = logging.getLogger(__name__)

LOAD_TIMEOUT = 900.0       # seconds a llama-server may take to answer /health with 200
STABLE_AFTER = 60.0        # a server ready this long has its restart count reset
BASE_BACKOFF = 0.5
MAX_BACKOFF = 30.0
ADOPT_GRACE = 15.0         # seconds after start an adoptable llama-server waits for this node's leases
SPLIT_WAIT = 0.5           # seconds between checks while a split's workers are not all reachable


class RpcConnector(Protocol):
    """How a split host reaches its workers' ggml-rpc-servers: through the QUIC mesh, or straight with
    ``--rpc-direct`` (``node.rpc_tunnel``)."""

    key: str  # the mesh's RPC key, which the workers demand of the host's llama-server

    async def endpoint(self, node_id: str, target: str) -> str:
        """The ``host:port`` llama-server's ``--rpc`` names for ``node_id``'s worker for ``target``."""
        ...

    async def probe(self, node_id: str, target: str) -> str | None:
        """None when ``node_id``'s worker for ``target`` answers now, else why not."""
        ...


@dataclass(frozen=True)
class DesiredServer:
    model: str
    path: Path
    ctx_size: int = 0
    draft: Path | None = None  # draft model for speculative decoding
    workers: tuple[str, ...] = ()  # split: the nodes holding the rest of the layers, nearest first
    tensor_split: tuple[float, ...] = ()  # split: layer shares, workers first, this node last
    n_layer: int = 0  # split on a CPU host: the model's layer count (the host keeps its share of them)


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    EXITED = "exited"


@dataclass(frozen=True)
class ActualServer:
    """What this node knows about the llama-server it runs for one model."""

    model: str
    port: int
    pid: int
    phase: Phase
    desired: DesiredServer
    started_at: float
    restarts: int = 0
    retry_at: float = 0.0
    message: str = ""
    ready_at: float = 0.0
    recovering: bool = False  # started after the previous server for the model failed


@dataclass(frozen=True)
class Start:
    model: str
    restarts: int = 0


@dataclass(frozen=True)
class Stop:
    model: str
    reason: str


@dataclass(frozen=True)
class Probe:
    model: str


@dataclass(frozen=True)
class Forget:
    model: str


@dataclass(frozen=True)
class Wait:
    model: str
    until: float


Action = Start | Stop | Probe | Forget | Wait


def plan(desired: DesiredServer | None, actual: ActualServer | None, now: float, *,
         load_timeout: float = LOAD_TIMEOUT) -> list[Action]:
    """What to do for one model, given what is wanted and what runs. Pure; stops come before starts."""
    if actual is None:
        return [Start(desired.model)] if desired is not None else []
    alive = actual.phase is not Phase.EXITED
    if desired is None:
        return [Stop(actual.model, "no longer desired"), Forget(actual.model)] if alive else [Forget(actual.model)]
    if alive and actual.desired != desired:
        return [Stop(actual.model, "spec changed"), Start(desired.model)]
    if not alive:
        if actual.desired != desired or now >= actual.retry_at:
            restarts = 0 if actual.desired != desired else actual.restarts + 1
            return [Start(desired.model, restarts=restarts)]
        return [Wait(actual.model, actual.retry_at)]
    if actual.phase is Phase.LOADING:
        if now - actual.started_at > load_timeout:
            return [Stop(actual.model, f"not ready after {load_timeout:.0f}s")]
        return [Probe(actual.model)]
    return []


def _exit_message(code: int, log_path: Path) -> str:
    if code < 0 and code != UNKNOWN_EXIT:
        return f"llama-server was {describe_exit(code)}"
    tail = log_tail(log_path)
    ended = f"llama-server exited with code {code}" if code >= 0 else f"llama-server ended, {describe_exit(code)}"
    return ended + (f": {tail}" if tail else f"; see {log_path}")


def backoff(restarts: int) -> float:
    return min(MAX_BACKOFF, BASE_BACKOFF * 2 ** restarts) * random.uniform(0.8, 1.2)


class ServedModelReconciler:
    """Runs one llama-server per model pinned to this node, and reports them in the document."""

    def __init__(self, state: MeshState, *, node_id: str, engine_dir: Path, log_dir: Path,
                 gpu_layers: int = 0, device: str = "", threads: int = 0, store: NodeStore | None = None,
                 rpc: RpcConnector | None = None, clock: Callable[[], float] = time.time,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.state = state
        self.node_id = node_id
        self.engine_dir = engine_dir
        self.log_dir = log_dir
        self.gpu_layers = gpu_layers
        self.device = device
        self.threads = threads
        self.store = store
        self.rpc = rpc
        self.clock = clock
        self.max_tokens = max_tokens
        self._started = clock()
        self.queue = WorkQueue(self.reconcile, name="served-model")
        self.actual: dict[str, ActualServer] = {}
        self.processes: dict[str, EngineProcess] = {}
        self.adoptable: dict[str, tuple[EngineProcess, ProcessRecord]] = {}  # found running, not yet claimed
        self._resolved: dict[tuple[str, str], ResolvedModel] = {}
        self._layers: dict[Path, int] = {}  # a model file's layer count (a CPU split host needs it)
        self._http = httpx.AsyncClient(timeout=2.0)

    # -- wiring -----------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._load_records()
        await run_observed(self.state, self.queue, self._enqueue_all, watch=self._watch_processes,
                           shutdown=self.shutdown, task_status=task_status)

    def _enqueue_all(self) -> None:
        for key in set(self._my_specs()) | set(self.actual) | set(self.adoptable):
            self.queue.add(key)

    async def _load_records(self) -> None:
        """The llama-servers a previous run of this node left running become adoptable; stale records go."""
        if self.store is None:
            return
        for record in await self.store.processes():
            if record.key.startswith(RPC_RECORD_PREFIX):
                continue  # a split worker's (the worker reconciler's)
            proc = adopt(record.pid, record.argv, log_path=Path(record.log_path))
            if proc is not None:
                self.adoptable[record.key] = (proc, record)
                continue
            await self.store.forget_process(record.key)  # gone, or the pid now belongs to someone else
            log.info("%s: recorded llama-server pid %d no longer runs", record.key, record.pid)
            await self._event(record.key, "Exited", f"llama-server pid {record.pid} ended while the node "
                              "was down", level="warning")

    async def _watch_processes(self) -> None:
        while True:
            for model, proc in list(self.processes.items()):
                if proc.poll() is not None:
                    self.queue.add(model)
            await anyio.sleep(0.2)

    def _my_specs(self) -> dict[str, ModelSpec]:
        """The models this node holds a placement lease of (see ``leases``)."""
        mine = {lease.model for lease in self.state.leases().values() if lease.node == self.node_id}
        return {name: spec for name, spec in self.state.models().items() if name in mine}

    # -- one reconcile ----------------------------------------------------------------------
    async def reconcile(self, model: str) -> Result:
        now = self.clock()
        await self._observe(model, now)
        try:
            desired = await self._desired(model)
        except ModelError as exc:
            await self._claim(model, None)
            await self._stop(model, "model unavailable")
            self.actual.pop(model, None)
            self._publish_failure(model, str(exc))
            await self._event(model, "Failed", str(exc), level="error")
            return Result(requeue_after=30.0)
        if desired is None and model in self.adoptable and now - self._started < ADOPT_GRACE:
            # a restarted node learns its leases from the mesh a moment after it starts: until then an
            # adoptable llama-server is neither claimed nor stopped
            return Result(requeue_after=min(1.0, ADOPT_GRACE - (now - self._started)))
        await self._claim(model, desired)
        current = self.actual.get(model)
        if current is not None and current.desired.workers and not current.recovering and (
                desired is None or desired.workers != current.desired.workers):
            # the split lost (or changed) a participant: the model is degraded until it is back
            was = ", ".join(current.desired.workers)
            now_workers = ", ".join(desired.workers) if desired is not None else "none"
            self.actual[model] = replace(current, recovering=True,
                                         message=f"split re-planned: workers {was} -> {now_workers}")
        actions = plan(desired, self.actual.get(model), now)
        if desired is not None and desired.workers and any(isinstance(a, Start) for a in actions):
            waiting = await self._split_waiting(desired)
            if waiting is not None:  # start the split only once every worker answers through the mesh
                for action in actions:
                    if isinstance(action, Stop):
                        await self._apply(action, desired, now)
                self._publish_waiting(model, waiting, now)
                return Result(requeue_after=SPLIT_WAIT)
        delays = [await self._apply(action, desired, now) for action in actions]
        self._publish(model)
        current = self.actual.get(model)
        if current is not None and current.phase is Phase.READY and current.restarts:
            delays.append(current.ready_at + STABLE_AFTER - now)  # to reset the restart count
        waits = [d for d in delays if d is not None]
        return Result(requeue_after=max(0.0, min(waits)) if waits else None)

    async def _observe(self, model: str, now: float) -> None:
        current, proc = self.actual.get(model), self.processes.get(model)
        if current is None or proc is None or current.phase is Phase.EXITED:
            return
        if current.phase is Phase.READY and current.restarts and now - current.ready_at >= STABLE_AFTER:
            self.actual[model] = current = replace(current, restarts=0)
        code = proc.poll()
        if code is None:
            return
        del self.processes[model]
        message = _exit_message(code, proc.log_path)
        log.warning("%s: %s", model, message)
        self.actual[model] = replace(current, phase=Phase.EXITED, message=message,
                                     retry_at=now + backoff(current.restarts), recovering=True)
        if self.store is not None:
            await self.store.forget_process(model)
        await self._event(model, "Exited", message, level="warning")

    async def _claim(self, model: str, desired: DesiredServer | None) -> None:
        """Take over the adoptable llama-server for ``model`` if it runs what ``desired`` would start, else
        stop it (``plan`` then starts the right one)."""
        found = self.adoptable.pop(model, None)
        if found is None:
            return
        proc, record = found
        self.processes[model] = proc
        if desired is None or self._config(desired, record.port).digest() != record.argv_hash:
            reason = "no longer desired" if desired is None else "spec changed while the node was down"
            await self._stop(model, reason)
            return
        self.actual[model] = ActualServer(model=model, port=record.port, pid=proc.pid, phase=Phase.LOADING,
                                          desired=desired, started_at=record.started_at)
        log.info("%s: adopted llama-server pid %d on 127.0.0.1:%d", model, proc.pid, record.port)
        await self._event(model, "Adopted", f"adopted llama-server pid {proc.pid} on 127.0.0.1:{record.port}")

    async def _desired(self, model: str) -> DesiredServer | None:
        spec = self._my_specs().get(model)
        if spec is None:
            return None
        path = await self._resolve(spec.source, spec.name)
        draft = await self._resolve(spec.draft, spec.name + "-draft") if spec.draft else None
        lease = next((lease for lease in self.state.leases().values()
                      if lease.node == self.node_id and lease.model == model), None)
        if lease is None or not lease.workers:
            return DesiredServer(model=model, path=path, ctx_size=spec.ctx_size, draft=draft)
        if not self.gpu_layers and path not in self._layers:  # read once, not at every reconcile
            self._layers[path] = await anyio.to_thread.run_sync(block_count, path)
        layers = 0 if self.gpu_layers else self._layers[path]
        return DesiredServer(model=model, path=path, ctx_size=spec.ctx_size, workers=tuple(lease.workers),
                             tensor_split=tuple(lease.tensor_split), n_layer=layers)

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
        return None

    def _publish_waiting(self, model: str, message: str, now: float) -> None:
        current = self.actual.get(model)
        recovering = current is not None and current.recovering
        self.state.put_server(ServerStatus(node=self.node_id, model=model, phase=ServerPhase.LOADING, port=0,
                                           message=message, since=now, recovering=recovering))

    async def _resolve(self, source: str, name: str) -> Path:
        key = (source, name)
        if key not in self._resolved:
            self._resolved[key] = await anyio.to_thread.run_sync(lambda: resolve_model(source, name=name))
        return self._resolved[key].path

    async def _apply(self, action: Action, desired: DesiredServer | None, now: float) -> float | None:
        """Carry out one action; returns a requeue delay when the action wants one."""
        match action:
            case Start(model, restarts):
                assert desired is not None
                await self._start(desired, restarts, now)
                return 0.2
            case Stop(model, reason):
                await self._stop(model, reason)
                return 0.0
            case Probe(model):
                return await self._probe(model)
            case Forget(model):
                gone = self.actual.pop(model, None)
                if gone is None or gone.retry_at == 0.0:  # stopped on purpose: nothing to remember
                    self.state.remove_server(server_key(self.node_id, model))
                # a crashed server's FAILED status stays: placement gives the model to another node
                return None
            case Wait(_, until):
                return max(0.0, until - now)
        return None

    def _config(self, desired: DesiredServer, port: int, rpc_endpoints: list[str] | None = None) -> LlamaServerConfig:
        gpu_layers, extra = self.gpu_layers, ()
        if desired.workers:
            gpu_layers, extra = split_args(desired, rpc_endpoints or [], gpu=self.gpu_layers > 0)
        return LlamaServerConfig(
            binary=self.engine_dir / "llama-server", model_path=desired.path, alias=desired.model, port=port,
            ctx_size=desired.ctx_size, gpu_layers=gpu_layers, threads=self.threads, device=self.device,
            draft_path=desired.draft, max_tokens=self.max_tokens, chat=chat_arguments(desired.path), extra=extra,
        )

    async def _start(self, desired: DesiredServer, restarts: int, now: float) -> None:
        model = desired.model
        rpc_endpoints, env = None, None
        if desired.workers:
            assert self.rpc is not None
            rpc_endpoints = [await self.rpc.endpoint(node, model) for node in desired.workers]
            # every weight is offered to the workers by name (patch 0003), and each worker loads it from
            # its own copy of the file, which the worker checked is the mesh's (ModelSpec.fingerprint);
            # the workers serve only a client that proves the mesh's RPC key (patch 0004)
            env = {"GGML_RPC_HASH_THRESHOLD": "1", "GGML_RPC_LOAD_BY_NAME": "1", RPC_SECRET_ENV: self.rpc.key}
        config = self._config(desired, self._pick_port(model), rpc_endpoints)
        log_path = self.log_dir / f"{safe_name(model)}.log"
        # decoding on the CPU, llama-server takes every core: as a batch job it leaves the node responsive
        proc = launch(config.argv(), log_path=log_path, env=env, batch=self.gpu_layers == 0)
        log.info("%s: started llama-server pid %d on 127.0.0.1:%d", model, proc.pid, config.port)
        self.processes[model] = proc
        previous = self.actual.get(model)
        recovering = previous is not None and previous.recovering
        message = ""
        if previous is not None and restarts:
            message = f"restart {restarts} after: {previous.message}"
        elif previous is not None and recovering:
            message = previous.message
        self.actual[model] = ActualServer(model=model, port=config.port, pid=proc.pid, phase=Phase.LOADING,
                                          desired=desired, started_at=now, restarts=restarts, message=message,
                                          recovering=recovering)
        if self.store is not None:
            await self.store.record_process(ProcessRecord(
                key=model, pid=proc.pid, port=config.port, model=model, argv=config.argv(),
                argv_hash=config.digest(), log_path=str(log_path), started_at=now))
        where = f"llama-server pid {proc.pid} on 127.0.0.1:{config.port}"
        await self._event(model, "Restarting" if restarts else "Started",
                          f"{message}; {where}" if message else where)

    def _pick_port(self, model: str) -> int:
        taken = {a.port for m, a in self.actual.items() if m != model}
        taken |= {record.port for m, (_, record) in self.adoptable.items() if m != model}
        for port in candidate_ports(server_key(self.node_id, model)):
            if port not in taken and port_is_free(port):
                return port
        raise RuntimeError("no free loopback port for llama-server")

    async def _stop(self, model: str, reason: str) -> None:
        proc = self.processes.pop(model, None)
        current = self.actual.get(model)
        if proc is not None:
            log.info("%s: stopping llama-server pid %d (%s)", model, proc.pid, reason)
            code = await stop_process(proc)
            if current is not None:
                stopped = f"stopped ({reason}), {describe_exit(code)}"
                self.actual[model] = replace(current, phase=Phase.EXITED, retry_at=0.0,
                                             message=current.message if current.recovering else stopped)
            if self.store is not None:
                await self.store.forget_process(model)
            await self._event(model, "Stopped", f"llama-server pid {proc.pid} stopped ({reason})")

    async def _probe(self, model: str) -> float | None:
        current = self.actual[model]
        try:
            response = await self._http.get(f"http://127.0.0.1:{current.port}/health")
            ready = response.status_code == 200
        except httpx.HTTPError:
            ready = False
        if not ready:
            return 0.2
        self.actual[model] = replace(current, phase=Phase.READY, ready_at=self.clock(), message="", recovering=False)
        log.info("%s: ready on 127.0.0.1:%d", model, current.port)
        await self._event(model, "Ready", f"ready on 127.0.0.1:{current.port}")
        return None

    async def _event(self, model: str, reason: str, message: str, *, level: str = "info") -> None:
        if self.store is not None:
            await self.store.record_event(model, reason, message, level=level)

    # -- reporting --------------------------------------------------------------------------
    def _publish(self, model: str) -> None:
        current = self.actual.get(model)
        if current is None:
            return
        phase = {Phase.LOADING: ServerPhase.LOADING, Phase.READY: ServerPhase.READY,
                 Phase.EXITED: ServerPhase.FAILED}[current.phase]
        self.state.put_server(ServerStatus(
            node=self.node_id, model=model, phase=phase, port=current.port, pid=current.pid,
            restarts=current.restarts, message=current.message,
            since=current.ready_at if phase is ServerPhase.READY else current.started_at,
            recovering=current.recovering and phase is not ServerPhase.READY, workers=list(current.desired.workers),
        ))

    def _publish_failure(self, model: str, message: str) -> None:
        self.state.put_server(ServerStatus(node=self.node_id, model=model, phase=ServerPhase.FAILED,
                                           port=0, message=message, since=self.clock()))

    async def shutdown(self) -> None:
        """Stop every process this reconciler started or found, and withdraw their statuses."""
        for model, (proc, _) in list(self.adoptable.items()):
            self.processes.setdefault(model, proc)
        self.adoptable.clear()
        async with anyio.create_task_group() as tg:
            for model in list(self.processes):
                tg.start_soon(self._stop, model, "node shutting down")
        for model in list(self.actual):
            self.state.remove_server(server_key(self.node_id, model))
        self.actual.clear()
        await self._http.aclose()

    def kill_all_now(self) -> None:
        """Synchronous last resort (atexit): no engine process outlives the node."""
        for proc in [*self.processes.values(), *(proc for proc, _ in self.adoptable.values())]:
            stop_process_now(proc)


def split_args(desired: DesiredServer, rpc_endpoints: list[str], *, gpu: bool) -> tuple[int, tuple[str, ...]]:
    """``--n-gpu-layers`` and the extra llama-server arguments of a split host.

    llama.cpp puts RPC devices first and the host's own GPU last, so on a GPU host every layer is
    offloaded and ``--tensor-split`` lists the workers' shares then the host's. A CPU is never a split
    device: a CPU host keeps its share of the layers by offloading only the rest, shared among the
    workers. ``--n-gpu-layers n`` offloads the output head and the last ``n - 1`` layers (llama.cpp
    counts the head as a layer and offloads it first), so the workers' layers are ``n - 1``."""
    rpc = ("--rpc", ",".join(rpc_endpoints))
    shares = list(desired.tensor_split)
    if gpu:
        return 999, (*rpc, "--tensor-split", ",".join(f"{x:.4g}" for x in shares))
    host_share = shares[-1] / sum(shares)
    host_layers = min(desired.n_layer - 1, round(host_share * desired.n_layer))
    return desired.n_layer - host_layers + 1, (*rpc, "--tensor-split", ",".join(f"{x:.4g}" for x in shares[:-1]))
