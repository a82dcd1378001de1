"""The split-worker reconciler: run a ggml-rpc-server for each split model this node holds layers of.

Desired: every split lease (``PlacementLease.workers``) naming this node. For each, the node finds
its own copy of the model file, checks it is the mesh's file (``ModelSpec.fingerprint``), and runs
``ggml-rpc-server --gguf <file>``: the patched server answers the host's weight offers from that
file, so no weights cross the network while the split loads, and it serves only clients that prove
the mesh's RPC key (``engine.rpc_auth``). It binds 127.0.0.1 and is reached through the QUIC tunnel
(``node.rpc_tunnel``, which asks ``endpoint_for`` where it is); with ``--rpc-direct`` it binds the
node's address instead, published as ``WorkerStatus.direct``, and hosts with ``--rpc-direct`` connect
to it straight.
Each worker is reported as a ``WorkerStatus``: loading until its port accepts connections, then
ready; failed when this node has no identical copy or the server keeps dying (placement then leaves
this node out of the split for a while).

A ggml-rpc-server serves one host connection at a time and keeps no state a restart would lose, so
worker processes are not adopted after a restart of the node agent: the tunnel they were reached
through ended with the agent anyway. Ones a killed agent left running are stopped at start-up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from meshllm.engine.models import file_fingerprint, resolve_model
from meshllm.engine.process import (
    EngineProcess, adopt, candidate_ports, describe_exit, launch, log_tail, port_is_free, safe_name, stop_process,
    stop_process_now,
)
from meshllm.engine.rpc_auth import RPC_SECRET_ENV
from meshllm.errors import ModelError
from meshllm.reconcile.queue import Result, WorkQueue, run_observed
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, PlacementLease, ServerPhase, WorkerStatus, server_key
from meshllm.store.db import NodeStore, ProcessRecord

__all__ = ["RPC_RECORD_PREFIX", "RpcWorkerConfig", "WorkerReconciler"]

log = logging.getLogger(__name__)

RPC_RECORD_PREFIX = "rpc:"  # process records of workers, beside the llama-servers' (keyed by model)
START_TIMEOUT = 120.0  # seconds a ggml-rpc-server may take to index its file and listen
MAX_RESTARTS = 3  # crashes in a row before the worker is reported failed


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


@dataclass
class _Worker:
    model: str
    host: str
    config: RpcWorkerConfig
    proc: EngineProcess
    started_at: float
    ready: bool = False
    restarts: int = 0


@dataclass
class _Failure:
    """Why this node waits before running the worker again: for ``host``, until ``retry_at``."""

    host: str
    restarts: int = 0
    retry_at: float = 0.0


class WorkerReconciler:
    """Runs this node's split workers and reports them in the document."""

    def __init__(self, state: MeshState, *, node_id: str, engine_dir: Path, log_dir: Path, key: str,
                 threads: int = 0, device: str = "", store: NodeStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``key``: the mesh's RPC key every rpc-server demands."""
        self.state = state
        self.key = key
        self.bind_host = "127.0.0.1"  # where rpc-servers listen, and
        self.direct_host = ""  # the address published for hosts to reach them straight (serve_direct)
        self.node_id = node_id
        self.engine_dir = engine_dir
        self.log_dir = log_dir
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.device = device
        self.store = store
        self.clock = clock
        self.queue = WorkQueue(self.reconcile, name="split-worker")
        self.workers: dict[str, _Worker] = {}
        self.failures: dict[str, _Failure] = {}
        self._files: dict[tuple[str, str], tuple[Path, str]] = {}  # (source, name) -> (path, fingerprint)

    # -- wiring -----------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._stop_leftovers()
        await run_observed(self.state, self.queue, self._enqueue_all, watch=self._watch, shutdown=self.shutdown,
                           task_status=task_status)

    def _enqueue_all(self) -> None:
        for model in set(self._leases()) | set(self.workers) | set(self.failures):
            self.queue.add(model)

    async def _watch(self) -> None:
        while True:
            for model, worker in list(self.workers.items()):
                if worker.proc.poll() is not None or not worker.ready:
                    self.queue.add(model)
            await anyio.sleep(0.2)

    async def _stop_leftovers(self) -> None:
        if self.store is None:
            return
        for record in await self.store.processes():
            if not record.key.startswith(RPC_RECORD_PREFIX):
                continue
            proc = adopt(record.pid, record.argv, log_path=Path(record.log_path))
            if proc is not None:
                log.info("stopping ggml-rpc-server pid %d left by the previous run", record.pid)
                await stop_process(proc)
            await self.store.forget_process(record.key)

    def serve_direct(self, bind_host: str, address: str) -> None:
        """``--rpc-direct``: rpc-servers started from now on listen on ``bind_host`` and are published as
        ``address:<port>`` (``WorkerStatus.direct``) for hosts with ``--rpc-direct`` to connect to."""
        self.bind_host, self.direct_host = bind_host, address

    def endpoint_for(self, model: str) -> tuple[str, int] | None:
        """Where this node's ready worker for ``model`` listens, as this node reaches it (the RPC
        tunnel's lookup)."""
        worker = self.workers.get(model)
        if worker is None or not worker.ready or worker.proc.poll() is not None:
            return None
        return self._local_host, worker.config.port

    @property
    def _local_host(self) -> str:
        return "127.0.0.1" if self.bind_host in ("0.0.0.0", "") else self.bind_host

    def _leases(self) -> dict[str, PlacementLease]:
        """Split leases naming this node as a worker, by model (their host alive)."""
        alive = self.state.alive_nodes()
        return {lease.model: lease for lease in self.state.leases().values()
                if self.node_id in lease.workers and lease.node in alive}

    # -- one reconcile ----------------------------------------------------------------------
    async def reconcile(self, model: str) -> Result:
        now = self.clock()
        lease = self._leases().get(model)
        spec = self.state.models().get(model)
        worker = self.workers.get(model)
        if lease is None or spec is None:
            self.failures.pop(model, None)
            if worker is not None:
                await self._stop(model, "no longer a worker of this split")
            self.state.remove_worker(server_key(self.node_id, model))
            return Result()
        if worker is not None and worker.host != lease.node:
            await self._stop(model, f"the split's host is now {lease.node}")
            worker = None
        if worker is None:
            return await self._start(spec, lease, now)
        code = worker.proc.poll()
        if code is not None:
            return await self._exited(worker, code, lease, now)
        if not worker.ready:
            return await self._probe(worker, now)
        return Result()

    async def _start(self, spec: ModelSpec, lease: PlacementLease, now: float) -> Result:
        model = spec.name
        failure = self.failures.get(model)
        if failure is not None and failure.host == lease.node and now < failure.retry_at:
            return Result(requeue_after=failure.retry_at - now)
        try:
            path, fingerprint = await self._local_file(spec)
        except ModelError as exc:
            return self._fail(model, lease.node, f"no copy of {model} on this node: {exc}", now, retry=30.0)
        if spec.fingerprint and fingerprint != spec.fingerprint:
            return self._fail(model, lease.node, f"this node's {path} is not the mesh's {model} (file "
                              f"{fingerprint}, mesh {spec.fingerprint}); replace it with the same file", now,
                              retry=30.0)
        config = RpcWorkerConfig(binary=self.engine_dir / "ggml-rpc-server", gguf=path, port=self._pick_port(model),
                                 threads=self.threads, device=self.device, host=self.bind_host)
        log_path = self.log_dir / f"rpc-{safe_name(model)}.log"
        proc = launch(config.argv(), log_path=log_path, env={RPC_SECRET_ENV: self.key}, batch=not self.device)
        restarts = failure.restarts if failure is not None and failure.host == lease.node else 0
        self.workers[model] = _Worker(model, lease.node, config, proc, now, restarts=restarts)
        log.info("%s: started ggml-rpc-server pid %d on %s:%d for host %s", model, proc.pid, config.host,
                 config.port, lease.node)
        if self.store is not None:
            await self.store.record_process(ProcessRecord(
                key=RPC_RECORD_PREFIX + model, pid=proc.pid, port=config.port, model=model, argv=config.argv(),
                argv_hash="", log_path=str(log_path), started_at=now))
            await self.store.record_event(model, "WorkerStarted", f"ggml-rpc-server pid {proc.pid} on "
                                          f"{config.host}:{config.port} holds layers for host {lease.node}")
        self._publish(self.workers[model], ServerPhase.LOADING)
        return Result(requeue_after=0.1)

    async def _exited(self, worker: _Worker, code: int, lease: PlacementLease, now: float) -> Result:
        del self.workers[worker.model]
        if self.store is not None:
            await self.store.forget_process(RPC_RECORD_PREFIX + worker.model)
        message = f"ggml-rpc-server {describe_exit(code)}: {log_tail(worker.proc.log_path) or worker.proc.log_path}"
        log.warning("%s: %s", worker.model, message)
        restarts = worker.restarts + 1
        if restarts > MAX_RESTARTS:
            return self._fail(worker.model, lease.node, message, now, retry=60.0, restarts=0)
        delay = min(10.0, 0.5 * 2 ** restarts)
        self.failures[worker.model] = _Failure(lease.node, restarts=restarts, retry_at=now + delay)
        self.state.put_worker(WorkerStatus(node=self.node_id, model=worker.model, host=lease.node,
                                           phase=ServerPhase.LOADING, message=f"restarting after: {message}",
                                           since=now))
        return Result(requeue_after=delay)

    def _fail(self, model: str, host: str, message: str, now: float, *, retry: float, restarts: int = 0) -> Result:
        log.warning("%s: split worker failed: %s", model, message)
        self.failures[model] = _Failure(host, restarts=restarts, retry_at=now + retry)
        self.state.put_worker(WorkerStatus(node=self.node_id, model=model, host=host, phase=ServerPhase.FAILED,
                                           message=message, since=now))
        return Result(requeue_after=retry)

    async def _probe(self, worker: _Worker, now: float) -> Result:
        if now - worker.started_at > START_TIMEOUT:
            await self._stop(worker.model, f"not listening after {START_TIMEOUT:.0f}s")
            return self._fail(worker.model, worker.host, f"ggml-rpc-server did not listen within "
                              f"{START_TIMEOUT:.0f}s; see {worker.proc.log_path}", now, retry=60.0)
        if port_is_free(worker.config.port, self._local_host):  # not bound yet: still indexing its file
            return Result(requeue_after=0.1)
        worker.ready = True
        self.failures.pop(worker.model, None)
        log.info("%s: split worker ready on %s:%d", worker.model, worker.config.host, worker.config.port)
        self._publish(worker, ServerPhase.READY)
        return Result()

    async def _local_file(self, spec: ModelSpec) -> tuple[Path, str]:
        key = (spec.source, spec.name)
        if key not in self._files:
            def find() -> tuple[Path, str]:
                path = resolve_model(spec.source, name=spec.name).path
                return path, file_fingerprint(path)
            self._files[key] = await anyio.to_thread.run_sync(find)
        return self._files[key]

    def _pick_port(self, model: str) -> int:
        taken = {w.config.port for m, w in self.workers.items() if m != model}
        for port in candidate_ports(RPC_RECORD_PREFIX + server_key(self.node_id, model)):
            if port not in taken and port_is_free(port, self.bind_host):
                return port
        raise RuntimeError(f"no free port on {self.bind_host} for ggml-rpc-server")

    def _publish(self, worker: _Worker, phase: ServerPhase) -> None:
        direct = f"{self.direct_host}:{worker.config.port}" if self.direct_host else ""
        self.state.put_worker(WorkerStatus(node=self.node_id, model=worker.model, host=worker.host, phase=phase,
                                           port=worker.config.port, direct=direct, pid=worker.proc.pid,
                                           since=self.clock()))

    async def _stop(self, model: str, reason: str) -> None:
        worker = self.workers.pop(model, None)
        if worker is None:
            return
        log.info("%s: stopping ggml-rpc-server pid %d (%s)", model, worker.proc.pid, reason)
        await stop_process(worker.proc)
        if self.store is not None:
            await self.store.forget_process(RPC_RECORD_PREFIX + model)
            await self.store.record_event(model, "WorkerStopped", f"ggml-rpc-server pid {worker.proc.pid} stopped "
                                          f"({reason})")

    async def shutdown(self) -> None:
        async with anyio.create_task_group() as tg:
            for model in list(self.workers):
                tg.start_soon(self._stop, model, "node shutting down")
        for key, status in list(self.state.workers().items()):
            if status.node == self.node_id:
                self.state.remove_worker(key)

    def kill_all_now(self) -> None:
        for worker in self.workers.values():
            stop_process_now(worker.proc)
