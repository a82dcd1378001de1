"""The process supervisor: the one owner of this node's engine processes (llama-server, ggml-rpc-server).

Controllers never touch a process themselves: they read a ``ProcessView`` (a frozen snapshot) and ask
the ``Supervisor`` to launch, claim, stop or forget one, each by a key (a model name; ``rpc:<model>``
for split workers). Every change of a view (started, ready, stopping, exited) is reported to the
subscribers with its key, so process exits and readiness reach the runner as events, with no polling
loop in any controller. ``ProcessSupervisor`` is the real one; ``meshllm.testing.fakes.FakeSupervisor``
stands in for it in unit tests.

The real supervisor:
- launches each process directly, in its own session, logging to a file (``engine.process.launch``),
  and records it in the node's database (pid, port, argv, argv hash, log) until it has ended;
- at start, takes back the processes a previous run of the node left running: a recorded pid that
  still runs exactly its recorded argv is *adopted* (``ProcessView.adopted``, not yet ``claimed``: a
  controller claims it, or stops it); other records are dropped;
- watches each process's exit through a pidfd (no polling) and probes a starting one until it is
  ready (``HttpReady``: llama-server's /health answers 200; ``ListenReady``: something listens);
- stops with the one ladder (``engine.process.stop_process``: SIGTERM, grace, SIGKILL) in its own task,
  so ``stop`` returns at once and the reconcile that asked goes on; ``halt`` waits for the end (shutdown).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus

from meshllm.engine.process import (
    UNKNOWN_EXIT, EngineProcess, adopt, candidate_ports, describe_exit, launch, log_tail, port_is_free,
    stop_process, stop_processes_now,
)
from meshllm.reconcile.timing import Clock, SystemClock
from meshllm.state.schema import ModelName
from meshllm.store.db import NodeStore, ProcessRecord

__all__ = [
    "PROCESSES", "HttpReady", "LaunchSpec", "ListenReady", "ProcessPhase", "ProcessSupervisor", "ProcessView",
    "ReadyCheck", "Supervisor",
]

log = logging.getLogger(__name__)

PROCESSES = "processes"  # the table name a supervisor's changes carry (``Changed(PROCESSES, key)``)
GRACE = 5.0  # seconds between SIGTERM and SIGKILL
PROBE_EVERY = 0.2  # seconds between readiness probes of a starting process


class ProcessPhase(StrEnum):
    STARTING = "starting"  # running, not ready yet (or adopted and not claimed: nobody probes it)
    READY = "ready"  # its readiness check passed
    STOPPING = "stopping"  # the stop ladder is under way
    EXITED = "exited"  # ended (on its own, or stopped); stays until the controller forgets it


@dataclass(frozen=True)
class HttpReady:
    """Ready once ``GET http://127.0.0.1:<port><path>`` answers 200 (llama-server's /health)."""

    port: int
    path: str = "/health"


@dataclass(frozen=True)
class ListenReady:
    """Ready once something listens on ``host:port`` (a ggml-rpc-server that has indexed its file)."""

    host: str
    port: int


ReadyCheck = HttpReady | ListenReady


@dataclass(frozen=True)
class LaunchSpec:
    """One process to start for ``key``: its command line, where it logs, how to tell it is ready."""

    key: str
    model: ModelName
    argv: tuple[str, ...]
    port: int
    log_path: Path
    ready: ReadyCheck
    env: Mapping[str, str] = field(default_factory=dict)
    batch: bool = False  # schedule as SCHED_BATCH (an engine decoding on the CPU)
    argv_hash: str = ""  # what a later run compares to decide whether to adopt it


@dataclass(frozen=True)
class ProcessView:
    """What the supervisor knows about the process of one key, at one moment."""

    key: str
    pid: int
    port: int
    argv: tuple[str, ...]
    argv_hash: str
    log_path: Path
    started_at: float
    phase: ProcessPhase
    seen_at: float = 0.0  # when this supervisor launched it, or found it running (timeouts count from then)
    adopted: bool = False  # found running at start, left by a previous run of the node
    claimed: bool = True  # a controller took it as its own (an adopted one is not, until claimed)
    ready_at: float = 0.0
    exit_code: int | None = None
    exited_at: float = 0.0
    stop_reason: str | None = None  # why it was asked to stop; None: it ended on its own
    message: str = ""  # how it ended, in words, with its log's last lines

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name if self.argv else "process"

    @property
    def running(self) -> bool:
        """Started or ready: not stopping and not ended."""
        return self.phase in (ProcessPhase.STARTING, ProcessPhase.READY)


class Supervisor(Protocol):
    """Launches, watches, probes and stops this node's engine processes, by key."""

    def get(self, key: str) -> ProcessView | None: ...

    def keys(self) -> set[str]: ...

    def pick_port(self, seed: str, *, host: str = "127.0.0.1") -> int:
        """A free port for a process, the same one for the same ``seed`` whenever it is free."""
        ...

    async def launch(self, spec: LaunchSpec) -> ProcessView: ...

    def claim(self, key: str, ready: ReadyCheck) -> None:
        """Take an adopted process as ours: it is probed from now on."""
        ...

    def stop(self, key: str, *, reason: str) -> None:
        """Start the stop ladder and return at once; the exit is reported like any other."""
        ...

    async def halt(self, key: str, *, reason: str) -> ProcessView | None:
        """Stop the process and return once it has ended (shutdown)."""
        ...

    async def forget(self, key: str) -> None:
        """Drop an ended process's view."""
        ...

    def subscribe(self, listener: Callable[[str], None]) -> int:
        """Call ``listener(key)`` after each change of a view; it must not raise. A handle for
        ``unsubscribe``."""
        ...

    def unsubscribe(self, handle: int) -> None: ...


@dataclass
class _Entry:
    view: ProcessView
    proc: EngineProcess


def exit_message(view: ProcessView, code: int) -> str:
    """How a process ended, for statuses and the event log."""
    if view.stop_reason is not None:
        return f"{view.name} stopped ({view.stop_reason}), {describe_exit(code)}"
    if code < 0 and code != UNKNOWN_EXIT:
        return f"{view.name} was {describe_exit(code)}"
    tail = log_tail(view.log_path)
    ended = f"{view.name} exited with code {code}" if code >= 0 else f"{view.name} ended, {describe_exit(code)}"
    return ended + (f": {tail}" if tail else f"; see {view.log_path}")


class ProcessSupervisor:
    """The real supervisor (see the module docstring). ``await tg.start(supervisor.run)`` before any
    controller uses it; cancelling ``run`` stops whatever still runs."""

    def __init__(self, *, store: NodeStore | None = None, clock: Clock | None = None, grace: float = GRACE,
                 probe_every: float = PROBE_EVERY) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        self.grace = grace
        self.probe_every = probe_every
        self._entries: dict[str, _Entry] = {}
        self._listeners: dict[int, Callable[[str], None]] = {}
        self._next_listener = 0
        self._tg: TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None

    # -- running ------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http, anyio.create_task_group() as tg:
            self._http, self._tg = http, tg
            try:
                await self._adopt_records()
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                self._tg = None

    async def _adopt_records(self) -> None:
        """The processes a previous run left running become adoptable; the records of the others go."""
        if self.store is None:
            return
        for record in await self.store.processes():
            proc = adopt(record.pid, record.argv, log_path=Path(record.log_path))
            if proc is None:  # gone, or the pid now belongs to someone else
                await self.store.forget_process(record.key)
                name = Path(record.argv[0]).name if record.argv else "process"
                log.info("%s: recorded %s pid %d no longer runs", record.key, name, record.pid)
                model = ModelName(record.model)  # the database keeps names as plain text
                await self.store.record_event(model, "Exited", f"{name} pid {record.pid} ended while "
                                              "the node was down", level="warning")
                continue
            view = ProcessView(key=record.key, pid=record.pid, port=record.port, argv=tuple(record.argv),
                               argv_hash=record.argv_hash, log_path=Path(record.log_path),
                               started_at=record.started_at, seen_at=self.clock.now(),
                               phase=ProcessPhase.STARTING, adopted=True, claimed=False)
            self._entries[record.key] = _Entry(view, proc)
            self._spawn(self._watch, record.key, proc)
            log.info("%s: found %s pid %d left running by the previous run", record.key, view.name, record.pid)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        if self._tg is None:
            raise RuntimeError("the process supervisor is not running")
        self._tg.start_soon(fn, *args)

    # -- reads --------------------------------------------------------------------------------
    def get(self, key: str) -> ProcessView | None:
        entry = self._entries.get(key)
        return entry.view if entry is not None else None

    def keys(self) -> set[str]:
        return set(self._entries)

    def pick_port(self, seed: str, *, host: str = "127.0.0.1") -> int:
        taken = {e.view.port for e in self._entries.values() if e.view.phase is not ProcessPhase.EXITED}
        for port in candidate_ports(seed):
            if port not in taken and port_is_free(port, host):
                return port
        raise RuntimeError(f"no free port on {host} for an engine process")

    # -- changes ------------------------------------------------------------------------------
    async def launch(self, spec: LaunchSpec) -> ProcessView:
        current = self._entries.get(spec.key)
        if current is not None and current.view.phase is not ProcessPhase.EXITED:
            raise RuntimeError(f"{spec.key}: a process runs already (pid {current.view.pid})")
        proc = launch(spec.argv, log_path=spec.log_path, env=dict(spec.env), batch=spec.batch)
        view = ProcessView(key=spec.key, pid=proc.pid, port=spec.port, argv=spec.argv, argv_hash=spec.argv_hash,
                           log_path=spec.log_path, started_at=self.clock.now(), seen_at=self.clock.now(),
                           phase=ProcessPhase.STARTING)
        self._entries[spec.key] = _Entry(view, proc)
        self._spawn(self._watch, spec.key, proc)
        self._spawn(self._probe, spec.key, proc, spec.ready)
        if self.store is not None:
            await self.store.record_process(ProcessRecord(
                key=spec.key, pid=proc.pid, port=spec.port, model=spec.model, argv=list(spec.argv),
                argv_hash=spec.argv_hash, log_path=str(spec.log_path), started_at=view.started_at))
        self._notify(spec.key)
        return view

    def claim(self, key: str, ready: ReadyCheck) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.view.claimed or not entry.view.running:
            return
        entry.view = replace(entry.view, claimed=True)
        self._spawn(self._probe, key, entry.proc, ready)
        self._notify(key)

    def stop(self, key: str, *, reason: str) -> None:
        entry = self._entries.get(key)
        if entry is None or not entry.view.running:
            return
        entry.view = replace(entry.view, phase=ProcessPhase.STOPPING, stop_reason=reason)
        log.info("%s: stopping %s pid %d (%s)", key, entry.view.name, entry.view.pid, reason)
        self._spawn(self._ladder, key, entry.proc)
        self._notify(key)

    async def halt(self, key: str, *, reason: str) -> ProcessView | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.view.running:
            entry.view = replace(entry.view, phase=ProcessPhase.STOPPING, stop_reason=reason)
            log.info("%s: stopping %s pid %d (%s)", key, entry.view.name, entry.view.pid, reason)
        if entry.view.phase is ProcessPhase.STOPPING:
            code = await stop_process(entry.proc, grace=self.grace)
            await self._ended(key, entry.proc, code)
        return self.get(key)

    async def forget(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.view.phase is ProcessPhase.EXITED:
            del self._entries[key]

    def subscribe(self, listener: Callable[[str], None]) -> int:
        self._next_listener += 1
        self._listeners[self._next_listener] = listener
        return self._next_listener

    def unsubscribe(self, handle: int) -> None:
        self._listeners.pop(handle, None)

    def _notify(self, key: str) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener(key)
            except Exception:  # a listener must not raise; one that does must not stop the others
                log.exception("process listener failed for %s", key)

    def kill_all_now(self) -> None:
        """Blocking last resort (the interpreter is exiting): no engine process outlives the node."""
        stop_processes_now([e.proc for e in self._entries.values() if e.proc.poll() is None], grace=3.0)

    # -- tasks --------------------------------------------------------------------------------
    async def _watch(self, key: str, proc: EngineProcess) -> None:
        """Wait for the process to end (a pidfd becomes readable then), and report it."""
        try:
            fd: int | None = os.pidfd_open(proc.pid)
        except OSError:
            fd = None  # it has ended already
        try:
            while proc.poll() is None:
                if fd is None:
                    await anyio.sleep(0.5)
                else:
                    await anyio.wait_readable(fd)
                    if proc.poll() is None:  # readable, yet /proc still shows it: a moment more
                        await anyio.sleep(0.02)
        finally:
            if fd is not None:
                os.close(fd)
        await self._ended(key, proc, proc.exit_code if proc.exit_code is not None else UNKNOWN_EXIT)

    async def _ended(self, key: str, proc: EngineProcess, code: int) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.proc is not proc or entry.view.phase is ProcessPhase.EXITED:
            return
        exited_at = self.clock.now()
        if self.store is not None:  # the record goes first: whoever sees the exit finds no stale record
            await self.store.forget_process(key)
        entry.view = replace(entry.view, phase=ProcessPhase.EXITED, exit_code=code, exited_at=exited_at,
                             message=exit_message(entry.view, code))
        if entry.view.stop_reason is None:
            log.warning("%s: %s", key, entry.view.message)
        self._notify(key)

    async def _ladder(self, key: str, proc: EngineProcess) -> None:
        await stop_process(proc, grace=self.grace)  # the exit itself is reported by _watch

    async def _probe(self, key: str, proc: EngineProcess, check: ReadyCheck) -> None:
        """Probe a starting process until it is ready, ends, or is stopped."""
        while True:
            entry = self._entries.get(key)
            if entry is None or entry.proc is not proc or entry.view.phase is not ProcessPhase.STARTING:
                return
            if await self._answers(check):
                entry.view = replace(entry.view, phase=ProcessPhase.READY, ready_at=self.clock.now())
                self._notify(key)
                return
            await self.clock.sleep(self.probe_every)

    async def _answers(self, check: ReadyCheck) -> bool:
        if isinstance(check, ListenReady):
            host = "127.0.0.1" if check.host in ("0.0.0.0", "") else check.host
            return not port_is_free(check.port, host)
        assert self._http is not None
        try:
            response = await self._http.get(f"http://127.0.0.1:{check.port}{check.path}")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def shutdown(self) -> None:
        """Stop every process still running (the controllers stopped theirs already, when they shut down
        first) and return once all have ended. ``run`` does this when it is cancelled."""
        async with anyio.create_task_group() as tg:
            for key, entry in list(self._entries.items()):
                if entry.view.phase is not ProcessPhase.EXITED:
                    tg.start_soon(partial(self.halt, key, reason="node shutting down"))
