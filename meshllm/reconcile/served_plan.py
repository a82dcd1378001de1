"""What the served-model controller decides, as a pure function: ``plan(desired, actual, now)``.

For one model it takes what the document wants (``DesiredServer``; ``Unavailable`` when the model
cannot be had on this node; None when this node holds no lease of it) and what is (``ActualServer``:
the supervisor's view of the llama-server, what the controller remembers of earlier servers, the
status it published, and for a split whether its workers are ready), and returns the actions:

- an ended process is taken in first: stopped on purpose, or crashed (counted, restarted after the
  runtime's ``Backoff``, drawn when applied: ``Remember.backoff``);
- an adopted process (left running by the previous run of the node) is claimed when it runs exactly
  what this node would start, and stopped otherwise; it waits ``adopt_until`` for the node's leases;
- a running server is stopped when it is no longer desired, its settings changed (a split's workers
  included), or it was not ready within ``load_timeout``; a stopping one is waited for; a ready solo
  server that is to become a split (``--split``, its workers joined later) serves until they are ready;
- the model's files are being fetched (``Fetching``): publish ``Downloading`` with the progress, look
  again shortly; nothing starts until the files are there;
- nothing runs: start (a crashed one once its backoff is over; a split once its workers are ready);
- the ``ServerStatus`` the situation calls for is published when it differs from the one in the
  document, and events are recorded on the transitions (Started, Ready, Exited, Stopped, ...).
Stops come before starts: a start is planned only when no process runs for the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from meshllm.engine.process import ServingOptions
from meshllm.reconcile.supervisor import ProcessPhase, ProcessView
from meshllm.state.schema import ModelName, NodeId, ServerPhase, ServerStatus

__all__ = [
    "ADOPT_GRACE", "FETCH_POLL", "LOAD_TIMEOUT", "SPLIT_WAIT", "STABLE_AFTER", "Action", "ActualServer", "Claim",
    "Desired", "DesiredServer", "Fetching", "Forget", "GiveUp", "Memory", "Publish", "Record", "Remember", "Start",
    "Stop", "Unavailable",
    "Wait", "Withdraw", "plan",
]

LOAD_TIMEOUT = 900.0  # seconds a llama-server may take to answer /health with 200
STABLE_AFTER = 60.0  # a server ready this long has its restart count reset
ADOPT_GRACE = 15.0  # seconds after start an adopted llama-server waits for this node's leases
SPLIT_WAIT = 0.5  # seconds between looks while a split's workers are not all reachable
FETCH_POLL = 1.0  # seconds between two progress reports of a download


@dataclass(frozen=True)
class DesiredServer:
    model: ModelName
    path: Path
    ctx_size: int = 0
    draft: Path | None = None  # draft model for speculative decoding
    workers: tuple[NodeId, ...] = ()  # split: the nodes holding the rest of the layers, nearest first
    tensor_split: tuple[float, ...] = ()  # split: layer shares, workers first, this node last
    n_layer: int = 0  # split on a CPU host: the model's layer count (the host keeps its share of them)
    workers_gpu: tuple[bool, ...] = ()  # split: whether each worker computes on a GPU (split.host_keeps_head)
    argv_hash: str = ""  # the llama-server command line this node would run, hashed (port left out)
    serving: ServingOptions = ServingOptions()  # the spec's embeddings, pooling, rerank, chat template
    shard: str = ""  # an expert shard ("index/count", 1-based; ``path`` is its file); empty: the whole model
    experts: int = 0  # expert shard: experts per layer it keeps
    file_bytes: int = 0  # expert shard: bytes of its file
    quality: str = ""  # expert shard: measured quality, if any (``moe.quality``)


@dataclass(frozen=True)
class Unavailable:
    """The model is this node's to serve, but it cannot be had here (its file is missing, ...)."""

    model: ModelName
    message: str


@dataclass(frozen=True)
class Fetching:
    """The model's files (or its draft's) are being downloaded; ``message`` is the progress."""

    model: ModelName
    message: str


Desired = DesiredServer | Unavailable | Fetching | None


@dataclass(frozen=True)
class Memory:
    """What the controller keeps about a model between reconciles (the rest is read afresh)."""

    serves: DesiredServer | None = None  # what the current (or last) server was started for
    restarts: int = 0  # restarts after failures in a row; reset once a server stays ready
    failed: bool = False  # the last server failed (crashed, or never got ready) and is not replaced yet
    failed_at: float = 0.0
    retry_at: float = 0.0  # failed: start again from then on
    message: str = ""  # what its status says: why it failed, or why this server is a restart
    recovering: bool = False  # it served and lost that: degraded until ready again
    port: int = 0  # of the last server (a failed one's status shows it)
    pid: int = 0


@dataclass(frozen=True)
class ActualServer:
    model: ModelName
    node: NodeId
    process: ProcessView | None = None
    memory: Memory = Memory()
    published: ServerStatus | None = None  # this node's status for the model in the document
    waiting: str | None = None  # a split that cannot start yet: why (its workers)
    adopt_until: float = 0.0  # an adopted process waits for this node's leases until then


@dataclass(frozen=True)
class Start:
    desired: DesiredServer
    restarts: int = 0
    message: str = ""  # why it starts again, if it does


@dataclass(frozen=True)
class Stop:
    model: ModelName
    reason: str


@dataclass(frozen=True)
class Claim:
    """Take the adopted llama-server as this node's."""

    model: ModelName


@dataclass(frozen=True)
class Forget:
    """Drop the supervisor's view of an ended process."""

    model: ModelName


@dataclass(frozen=True)
class Remember:
    """Keep ``memory``; with ``backoff`` set, apply adds that attempt's backoff (with jitter, so not
    drawn here) to ``memory.retry_at`` and asks for a look then."""

    model: ModelName
    memory: Memory
    backoff: int | None = None


@dataclass(frozen=True)
class Publish:
    status: ServerStatus


@dataclass(frozen=True)
class Withdraw:
    model: ModelName


@dataclass(frozen=True)
class Record:
    """An event in the node's log (``store.db``)."""

    model: ModelName
    reason: str
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Wait:
    model: ModelName
    until: float


@dataclass(frozen=True)
class GiveUp:
    """Nothing to retry until the model's spec or lease changes (a ``TerminalError``)."""

    model: ModelName
    message: str


Action = Start | Stop | Claim | Forget | Remember | Publish | Withdraw | Record | Wait | GiveUp


def plan(desired: Desired, actual: ActualServer, now: float, *, load_timeout: float = LOAD_TIMEOUT,
         stable_after: float = STABLE_AFTER) -> list[Action]:
    """What to do for one model (see the module docstring). Pure."""
    actions: list[Action] = []
    memory, proc = actual.memory, actual.process
    if proc is not None and proc.phase is ProcessPhase.EXITED:
        memory = _take_exit(actual.model, proc, memory, actions)
        proc = None
    if isinstance(desired, Unavailable):
        return actions + _unavailable(desired, actual, proc)
    if isinstance(desired, Fetching):
        return actions + _fetching(desired, actual, proc, now)
    if proc is not None and proc.running and not proc.claimed:
        proc, memory = _adoption(desired, actual, proc, memory, now, actions)
        if proc is None:
            return actions
    if proc is not None and proc.running:
        proc, memory = _check_running(actual.model, desired, proc, memory, now, actions, load_timeout=load_timeout,
                                      stable_after=stable_after, waiting=actual.waiting)
    status = _status(desired, actual, proc, memory, now)
    drawing = memory.failed and memory.retry_at == 0.0  # a failure just taken in: its backoff is drawn below
    if proc is None and desired is not None and not drawing:
        status, memory = _start_or_wait(desired, actual, memory, status, now, actions)
    if proc is None and desired is None:
        memory = Memory()  # nothing runs and nothing is wanted: a later start begins afresh
    if memory != actual.memory:
        backoff = memory.restarts if memory.failed and memory.retry_at == 0.0 else None
        if backoff is not None:
            memory = replace(memory, retry_at=memory.failed_at)  # apply adds the drawn delay
        actions.insert(0, Remember(actual.model, memory, backoff=backoff))
    actions += _report(actual, status)
    return actions


def _take_exit(model: ModelName, proc: ProcessView, memory: Memory, actions: list[Action]) -> Memory:
    """Account for ``model``'s process that ended: stopped on purpose, or failed."""
    actions.append(Forget(model))
    if proc.stop_reason is not None:
        actions.append(Record(model, "Stopped", f"{proc.name} pid {proc.pid} stopped ({proc.stop_reason})"))
        return memory  # a stop for a failure (never ready) set ``failed`` when it asked
    actions.append(Record(model, "Exited", proc.message, "warning"))
    return replace(memory, failed=True, failed_at=proc.exited_at, retry_at=0.0, message=proc.message,
                   recovering=True, port=proc.port, pid=proc.pid, serves=memory.serves if proc.claimed else None)


def _unavailable(desired: Unavailable, actual: ActualServer, proc: ProcessView | None) -> list[Action]:
    actions: list[Action] = []
    if proc is not None and proc.running:
        actions.append(Stop(desired.model, "model unavailable"))
    if actual.memory != Memory():
        actions.append(Remember(desired.model, Memory()))
    status = ServerStatus(node=actual.node, model=desired.model, phase=ServerPhase.FAILED, port=0,
                          message=desired.message)
    if actual.published is None or not _same(actual.published, status):
        actions += [Publish(status), Record(desired.model, "Failed", desired.message, "error"),
                    GiveUp(desired.model, desired.message)]
    return actions


def _fetching(desired: Fetching, actual: ActualServer, proc: ProcessView | None, now: float) -> list[Action]:
    """Nothing runs while the files come (a server of an older spec is stopped); the progress is published."""
    actions: list[Action] = []
    if proc is not None and proc.running:
        actions.append(Stop(desired.model, "model files are downloading"))
    if actual.memory != Memory():
        actions.append(Remember(desired.model, Memory()))
    status = ServerStatus(node=actual.node, model=desired.model, phase=ServerPhase.DOWNLOADING, port=0,
                          message=desired.message, since=now)
    published = actual.published
    if published is None or not _same(published, status):
        actions.append(Publish(status))
        if published is None or published.phase is not ServerPhase.DOWNLOADING:
            actions.append(Record(desired.model, "Downloading", desired.message))
    return actions + [Wait(desired.model, now + FETCH_POLL)]


def _adoption(desired: DesiredServer | None, actual: ActualServer, proc: ProcessView, memory: Memory, now: float,
              actions: list[Action]) -> tuple[ProcessView | None, Memory]:
    """Claim an adopted llama-server that runs what ``desired`` would start; stop any other."""
    model = actual.model
    if desired is None and now < actual.adopt_until:
        actions.append(Wait(model, actual.adopt_until))  # a restarted node learns its leases a moment later
        return None, memory
    if desired is None:
        actions.append(Stop(model, "no longer desired"))
        return None, memory
    if desired.workers or proc.argv_hash != desired.argv_hash:
        reason = "spec changed while the node was down"
        actions.append(Stop(model, reason))
        return replace(proc, phase=ProcessPhase.STOPPING, stop_reason=reason), memory
    actions += [Claim(model), Record(model, "Adopted", f"adopted {proc.name} pid {proc.pid} on 127.0.0.1:{proc.port}")]
    return replace(proc, claimed=True), replace(memory, serves=desired, restarts=0, failed=False, message="",
                                                  recovering=False)


def _check_running(model: ModelName, desired: DesiredServer | None, proc: ProcessView, memory: Memory, now: float,
                   actions: list[Action], *, load_timeout: float, stable_after: float,
                   waiting: str | None = None) -> tuple[ProcessView, Memory]:
    """Stop a running server that should not run as it does; keep track of a ready one. A ready solo
    server whose model is now planned as a split keeps serving until the split's workers are ready."""
    reason = ""
    if desired is None:
        reason = "no longer desired"
    elif (desired.workers and waiting is not None and proc.phase is ProcessPhase.READY
          and memory.serves is not None and not memory.serves.workers):
        actions.append(Wait(model, now + SPLIT_WAIT))
    elif memory.serves != desired:
        reason = "spec changed"
        old = memory.serves.workers if memory.serves is not None else ()
        if old and old != desired.workers and not memory.recovering:
            new = ", ".join(desired.workers) or "none"
            memory = replace(memory, recovering=True, message=f"split re-planned: workers {', '.join(old)} -> {new}")
    elif proc.phase is ProcessPhase.STARTING and now - proc.seen_at > load_timeout:
        reason = f"not ready after {load_timeout:.0f}s"
        memory = replace(memory, failed=True, failed_at=now, retry_at=0.0, message=f"llama-server {reason}",
                         recovering=True, port=proc.port, pid=proc.pid)
    if reason:
        actions.append(Stop(model, reason))
        return replace(proc, phase=ProcessPhase.STOPPING, stop_reason=reason), memory
    if proc.phase is ProcessPhase.STARTING:
        actions.append(Wait(model, proc.seen_at + load_timeout))
    elif proc.phase is ProcessPhase.READY:
        memory = replace(memory, failed=False, message="", recovering=False)
        if memory.restarts and now - proc.ready_at >= stable_after:
            memory = replace(memory, restarts=0)
        elif memory.restarts:
            actions.append(Wait(model, proc.ready_at + stable_after))
    return proc, memory


def _start_or_wait(desired: DesiredServer, actual: ActualServer, memory: Memory, status: ServerStatus | None,
                   now: float, actions: list[Action]) -> tuple[ServerStatus | None, Memory]:
    """Nothing runs for a desired model: start it, unless a crash's backoff or a split's workers say wait."""
    same = memory.serves == desired
    if memory.failed and same and now < memory.retry_at:
        actions.append(Wait(desired.model, memory.retry_at))
        return status, memory
    if desired.workers and actual.waiting is not None:
        actions.append(Wait(desired.model, now + SPLIT_WAIT))
        waiting = ServerStatus(node=actual.node, model=desired.model, phase=ServerPhase.LOADING, port=0,
                               message=actual.waiting, since=now, recovering=memory.recovering)
        return waiting, memory
    restarts = memory.restarts + 1 if memory.failed and same else 0
    message = f"restart {restarts} after: {memory.message}" if restarts else memory.message if memory.recovering else ""
    actions.append(Start(desired, restarts=restarts, message=message))
    return status, replace(memory, serves=desired, restarts=restarts, failed=False, retry_at=0.0, message=message)


def _status(desired: DesiredServer | None, actual: ActualServer, proc: ProcessView | None, memory: Memory,
            now: float) -> ServerStatus | None:
    """The status this node should publish for the model (None: none), with the expert shard it serves."""
    status = _server_status(desired, actual, proc, memory, now)
    serves = memory.serves
    if status is None or status is actual.published or serves is None or not serves.shard:
        return status
    return status.model_copy(update={"shard": serves.shard, "experts": serves.experts,
                                     "file_bytes": serves.file_bytes, "quality": serves.quality})


def _server_status(desired: DesiredServer | None, actual: ActualServer, proc: ProcessView | None, memory: Memory,
                   now: float) -> ServerStatus | None:
    server = partial(ServerStatus, node=actual.node, model=actual.model)
    workers = list(memory.serves.workers) if memory.serves is not None else []
    if proc is not None and proc.phase is ProcessPhase.STOPPING:
        if desired is None:
            return None
        message = memory.message if memory.recovering else f"replacing llama-server: {proc.stop_reason}"
        return server(phase=ServerPhase.LOADING, port=0, message=message, since=now,
                            recovering=memory.recovering)
    if proc is not None and proc.phase is ProcessPhase.READY:
        return server(phase=ServerPhase.READY, port=proc.port, pid=proc.pid, restarts=memory.restarts,
                            since=proc.ready_at, workers=workers)
    if proc is not None:
        return server(phase=ServerPhase.LOADING, port=proc.port, pid=proc.pid, restarts=memory.restarts,
                            message=memory.message, since=proc.started_at, recovering=memory.recovering,
                            workers=workers)
    if memory.failed:
        return server(phase=ServerPhase.FAILED, port=memory.port, pid=memory.pid,
                            restarts=memory.restarts, message=memory.message, since=memory.failed_at,
                            recovering=True, workers=workers)
    if desired is None and actual.published is not None and actual.published.phase is ServerPhase.FAILED:
        return actual.published  # a failure stays on record: placement gives the model to another node
    if desired is None:
        return None
    return actual.published  # about to start: the new server's status comes with it


def _report(actual: ActualServer, status: ServerStatus | None) -> list[Action]:
    """Publish ``status`` if the document says otherwise; record the transitions users look for."""
    published = actual.published
    if status is None:
        return [Withdraw(actual.model)] if published is not None else []
    if published is not None and _same(published, status):
        return []
    actions: list[Action] = [Publish(status)]
    if status.phase is ServerPhase.READY and (published is None or published.phase is not ServerPhase.READY
                                              or published.pid != status.pid):
        actions.append(Record(actual.model, "Ready", f"ready on 127.0.0.1:{status.port}"))
    return actions


def _same(a: ServerStatus, b: ServerStatus) -> bool:
    """Equal but for ``since`` (a status is not rewritten just to move its time)."""
    return a.model_copy(update={"since": 0.0}) == b.model_copy(update={"since": 0.0})
