"""The nodes of ``gossip_scale.py``: one OS process hosts some of them and answers the bench's commands.

100 aioquic endpoints in one Python process measure that process's CPU more than the protocol, so the
bench spreads the nodes over ``--procs`` worker processes. Each worker runs its nodes as
``MeshRuntime.run`` wires them (no llama-server, no HTTP), and answers commands from the bench over a
``multiprocessing`` pipe: start nodes, watch for a condition, write a change, read counters, crash a
node. Times are ``time.monotonic()``, one clock for every process on Linux, so the bench compares
times taken in different workers. Conditions are timed in the replicas' own change callbacks.
"""

from __future__ import annotations

import asyncio
import cProfile
import inspect
import logging
import time
import traceback
from asyncio import selector_events
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pycrdt import Doc, Map, create_sync_message, handle_sync_message

from meshllm import __version__
from meshllm.gossip.membership import Membership
from meshllm.gossip.sync import DocGossip
from meshllm.node.mesh import MESH_TRANSPORT
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeRole, NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import MeshCredentials
from meshllm.transport import QuicEndpoint, TransportError, TransportSettings
from meshllm.transport.budget import HandshakeBudget
from meshllm.transport.health import HealthSettings, LoopHealth

HOST = "127.0.0.1"
Result = dict[str, Any]
MEMBERSHIP = inspect.signature(Membership).parameters  # the production defaults, read where they are set
GOSSIP = inspect.signature(DocGossip).parameters


@dataclass(frozen=True)
class Knobs:
    """The protocol's timers (the production defaults unless overridden) and the bench's own."""

    transport: TransportSettings = MESH_TRANSPORT
    ring: int = MEMBERSHIP["ring"].default
    fingers: tuple[float, ...] = tuple(MEMBERSHIP["fingers"].default)
    tick: float = MEMBERSHIP["tick"].default
    confirm_timeout: float = MEMBERSHIP["confirm_timeout"].default
    anti_entropy: float = GOSSIP["anti_entropy"].default
    changes: int = 10
    spacing: float = 0.5
    window: float = 20.0
    settle: float = 2.0
    timeout: float = 30.0
    join_interval: float = 0.0
    drain_sockets: bool = False
    procs: int = 1
    dial_budget: int = MESH_TRANSPORT.max_dials  # handshakes in flight per worker process
    local_health: bool = True  # False: timeouts never widen (the detector before local health)
    profile: str = ""  # a folder: cProfile the workers over the steady window


class BenchNode:
    """One mesh node's gossip half, run as a task of its worker process."""

    def __init__(self, index: int, creds: MeshCredentials, knobs: Knobs, health: LoopHealth,
                 budget: HandshakeBudget) -> None:
        self.index = index
        self.identity = NodeIdentity(Ed25519PrivateKey.generate())
        self.state = MeshState()
        # the loop and the CPU are the process's: its nodes share one health monitor and one
        # handshake budget, as the endpoints of one node process would
        self.endpoint = QuicEndpoint(self.identity, creds.mesh_id, creds.secret, host=HOST,
                                     settings=knobs.transport, health=health, budget=budget)
        self.gossip = DocGossip(self.state.doc, node_id=self.node_id, anti_entropy=knobs.anti_entropy)
        self.maps = {kind: self.state.doc.get(kind, type=Map) for kind in ("models", "nodes", "deaths")}
        self.knobs = knobs
        self.scope: anyio.CancelScope | None = None
        self.addr = ""

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    async def serve(self, seeds: Sequence[str], *,
                    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start as ``MeshRuntime.run`` does; report the address to dial; run until cancelled."""
        now = time.time()
        try:
            async with anyio.create_task_group() as tg:
                self.scope = tg.cancel_scope
                port = await tg.start(self.endpoint.run)
                self.addr = f"{HOST}:{port}"
                me = NodeStatus(id=self.node_id, name=f"bench-{self.index}", role=NodeRole.SERVER,
                                api_url=f"http://{HOST}:{9000 + self.index}/v1", addrs=[self.addr],
                                version=__version__, started_at=now, incarnation=now)
                await tg.start(self.gossip.run)
                membership = Membership(self.state, self.gossip, self.endpoint, me=me, seeds=seeds,
                                        ring=self.knobs.ring, fingers=self.knobs.fingers,
                                        tick=self.knobs.tick, confirm_timeout=self.knobs.confirm_timeout)
                await tg.start(membership.run)
                task_status.started(self.addr)
        finally:
            self.gossip.close()

    def crash(self) -> None:
        """Die as a killed process does: the socket first (no CONNECTION_CLOSE leaves), then every task.

        ``QuicEndpoint`` has no crash switch (a clean stop says goodbye to every peer), so this closes its
        UDP transport directly; the shutdown that follows finds the socket closing and sends nothing.
        """
        running = self.endpoint._running  # private on purpose: no public API should offer this
        assert running is not None and self.scope is not None
        running.transport.close()
        self.scope.cancel()

    @property
    def running(self) -> bool:
        try:
            self.endpoint.address
        except TransportError:
            return False
        return True


def condition(kind: str, arg: Any) -> Callable[[BenchNode], bool]:
    """What a ``Watch`` waits for: ``formed`` (all ``arg`` nodes alive), ``model`` ``arg`` present,
    node ``arg`` ``dead``."""
    if kind == "formed":
        return lambda node: len(node.maps["nodes"]) >= arg and len(node.state.alive_nodes()) == arg
    if kind == "model":
        return lambda node: arg in node.maps["models"]
    if kind == "dead":
        return lambda node: arg in node.maps["deaths"] and arg not in node.state.alive_nodes()
    raise ValueError(f"no such condition: {kind}")


class Watch:
    """When each replica first satisfies ``holds``, and who delivered the change that satisfied it.

    It listens through ``MeshState.observe``, whose listeners run after the state's decoded entries are
    refreshed (pycrdt calls a table's own observers in no fixed order), inside the transaction that
    applied the peer's message, so ``DocGossip.delivering`` names that peer and message type."""

    def __init__(self, nodes: Sequence[BenchNode], holds: Callable[[BenchNode], bool]) -> None:
        self.holds = holds
        self.expected = len(nodes)
        self.seen: dict[int, float] = {}
        self.via: dict[int, tuple[str, int] | None] = {}
        self.done = anyio.Event()
        self._subs = [(node, node.state.observe(partial(self._changed, node))) for node in nodes]
        for node in nodes:
            self._changed(node)

    def _changed(self, node: BenchNode) -> None:
        if node.index in self.seen:
            return
        try:
            satisfied = self.holds(node)
        except Exception:  # never raise into pycrdt's callback
            logging.getLogger(__name__).exception("watch predicate failed")
            return
        if satisfied:
            self.seen[node.index] = time.monotonic()
            self.via[node.index] = node.gossip.delivering
            if len(self.seen) == self.expected:
                self.done.set()

    async def wait(self, timeout: float) -> Result:
        with anyio.move_on_after(timeout):
            await self.done.wait()
        for node, handle in self._subs:
            node.state.unobserve(handle)
        self._subs.clear()
        return {"seen": self.seen, "via": self.via}


class LogCounter(logging.Handler):
    """Counts warnings by message template (peer timeouts, death verdicts, dropped handshakes)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.name}: {record.msg}"] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last ``take``."""
        counts, self.counts = dict(self.counts), Counter()
        return counts


@contextmanager
def drained_datagram_reads(enabled: bool, *, burst: int = 64) -> Iterator[None]:
    """While enabled, asyncio reads up to ``burst`` queued datagrams per socket wake-up instead of one.

    asyncio's datagram transport calls ``recvfrom`` once per readiness event, so a socket is read once per
    pass of the event loop. With N nodes in one loop a pass takes ~N times longer while each socket's
    traffic does not shrink: busy sockets (the seed's first) fill their receive buffer and the kernel drops
    pings, handshakes and CONNECTION_CLOSEs, which a process per node would read in time. This patches
    asyncio's private ``_SelectorDatagramTransport._read_ready`` for the run and restores it after.
    """
    transport = selector_events._SelectorDatagramTransport  # type: ignore[attr-defined]
    original = transport._read_ready

    def read_ready(self: Any) -> None:
        for _ in range(burst):
            if self._conn_lost:
                return
            try:
                data, addr = self._sock.recvfrom(self.max_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            self._protocol.datagram_received(data, addr)

    if enabled:
        transport._read_ready = read_ready
    try:
        yield
    finally:
        transport._read_ready = original


async def sample_lag(samples: list[float], period: float = 0.05) -> None:
    """How late the event loop wakes a sleeper: near zero unless the process is CPU-bound."""
    while True:
        before = time.monotonic()
        await anyio.sleep(period)
        samples.append(time.monotonic() - before - period)


def sync_sizes(a: Doc, b: Doc) -> Result:
    """What one anti-entropy exchange between two converged replicas carries, and the whole document."""
    probe = Doc()
    probe.apply_update(b.get_update())  # a copy: the live replica's gossip must not see this exchange
    step1 = create_sync_message(a)
    step2 = handle_sync_message(step1[1:], probe) or b""
    return {"sync_step1_bytes": len(step1), "sync_step2_bytes": len(step2), "doc_bytes": len(a.get_update())}


class Worker:
    """The nodes of one process, and the commands the bench sends them (each returns a picklable value)."""

    def __init__(self, tg: TaskGroup, indices: Sequence[int], creds: MeshCredentials, knobs: Knobs) -> None:
        self.tg = tg
        self.health = LoopHealth(HealthSettings() if knobs.local_health else HealthSettings(max_multiplier=1.0))
        self.budget = HandshakeBudget(knobs.dial_budget)
        self.nodes = {i: BenchNode(i, creds, knobs, self.health, self.budget) for i in indices}
        self.logs = LogCounter()
        logging.getLogger().addHandler(self.logs)
        self.watch: Watch | None = None
        self.lags: list[float] | None = None
        self._lag_scope: anyio.CancelScope | None = None
        self.changes = Counter[str]()
        self._profiler: cProfile.Profile | None = None
        self._change_subs: list[tuple[Map, Any]] = []

    async def ids(self) -> dict[int, str]:
        return {i: node.node_id for i, node in self.nodes.items()}

    async def start(self, indices: Sequence[int], seeds: Sequence[str], delay: float,
                    spacing: float) -> Result:
        await anyio.sleep(delay)
        addrs = {}
        for n, i in enumerate(indices):
            if n:
                await anyio.sleep(spacing)
            addrs[i] = await self.tg.start(self.nodes[i].serve, seeds)
        return addrs

    async def watch_for(self, kind: str, arg: Any, skip: Sequence[int] = ()) -> None:
        nodes = [node for i, node in self.nodes.items() if i not in skip]
        self.watch = Watch(nodes, condition(kind, arg))

    async def wait(self, timeout: float) -> Result:
        assert self.watch is not None
        result = await self.watch.wait(timeout)
        self.watch = None
        return result

    async def write(self, index: int, name: str) -> float:
        at = time.monotonic()
        self.nodes[index].state.put_model(ModelSpec(name=name, source="x"))
        return at

    async def lag(self, on: bool) -> list[float]:
        """Start sampling the event loop's lag, or stop and return the samples."""
        if on:
            self.lags, self._lag_scope = [], anyio.CancelScope()
            self.tg.start_soon(self._sample, self._lag_scope, self.lags)
            return []
        assert self._lag_scope is not None and self.lags is not None
        self._lag_scope.cancel()
        return self.lags

    @staticmethod
    async def _sample(scope: anyio.CancelScope, samples: list[float]) -> None:
        with scope:
            await sample_lag(samples)

    async def count_changes(self, index: int, on: bool) -> dict[str, int]:
        """Count the document changes ``index`` sees, by table and field (``nodes.rtt_ms``; a whole
        entry written or removed is ``nodes.*``), or stop and return the counts."""
        if index not in self.nodes:
            return {}
        if on:
            self.changes.clear()

            def changed(kind: str, events: Sequence[Any]) -> None:
                fields = {key if event.path else "*" for event in events for key in getattr(event, "keys", {})}
                self.changes.update(f"{kind}.{field}" for field in fields or {"*"})

            self._change_subs = [(table, table.observe_deep(partial(changed, kind)))
                                 for kind, table in self.nodes[index].maps.items()]
            return {}
        for table, sub in self._change_subs:
            table.unobserve(sub)
        return dict(self.changes)

    async def counters(self) -> Result:
        per_node = {i: (n.endpoint.stats.bytes_sent + n.endpoint.stats.bytes_received,
                        n.endpoint.stats.datagrams_sent + n.endpoint.stats.datagrams_received,
                        n.gossip.stats.bytes_sent + n.gossip.stats.bytes_received,
                        n.gossip.stats.messages_sent + n.gossip.stats.messages_received,
                        len(n.endpoint.peers), len(n.gossip.sessions)) for i, n in self.nodes.items()}
        return {"at": time.monotonic(), "cpu": time.process_time(), "nodes": per_node}

    async def cpu(self) -> float:
        return time.process_time()

    async def load(self) -> Result:
        """This process's local health and handshake budget, so far."""
        b = self.budget.stats
        return {"worst_lag_s": self.health.worst, "multiplier": self.health.multiplier,
                "dials": b.granted, "dials_queued": b.queued, "dial_wait_s": b.waited_s, "dial_held_s": b.held_s,
                "longest_queue": b.longest_queue}

    async def sync_sizes(self) -> Result:
        docs = [node.state.doc for node in self.nodes.values()]
        return sync_sizes(docs[-1], docs[len(docs) // 2]) if len(docs) > 1 else {}

    async def missing(self, names: Sequence[str]) -> int:
        return sum(len(set(names) - set(node.state.models())) for node in self.nodes.values())

    async def peers(self, index: int) -> int:
        return len(self.nodes[index].endpoint.peers)

    async def crash(self, index: int) -> float:
        at = time.monotonic()
        self.nodes[index].crash()
        return at

    async def deaths(self) -> dict[str, str]:
        return {nid: death.by for nid, death in next(iter(self.nodes.values())).state.deaths().items()}

    async def profile(self, path: str | None) -> None:
        """Start profiling this process (``path`` None), or stop and write the profile to ``path``."""
        if path is None:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
            return
        assert self._profiler is not None
        self._profiler.disable()
        self._profiler.dump_stats(path)
        self._profiler = None

    async def take_logs(self) -> dict[str, int]:
        return self.logs.take()


async def serve_commands(conn: Connection, indices: Sequence[int], creds: MeshCredentials,
                         knobs: Knobs) -> None:
    """Answer the bench's commands until ``finish``; an exception goes back as ``{"error": ...}``.
    ``finish`` stops every node and answers how many endpoints and tasks were left running."""
    async with anyio.create_task_group() as tg:
        worker = Worker(tg, indices, creds, knobs)
        await tg.start(worker.health.run)
        while True:
            name, kwargs = await anyio.to_thread.run_sync(conn.recv)
            if name == "finish":
                break
            try:
                reply: Any = await getattr(worker, name)(**kwargs)
            except Exception:
                reply = {"error": traceback.format_exc()}
            await anyio.to_thread.run_sync(conn.send, reply)
        tg.cancel_scope.cancel()
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    conn.send({"running": sum(node.running for node in worker.nodes.values()), "tasks_left": len(tasks)})


def worker_main(conn: Connection, indices: Sequence[int], creds: MeshCredentials, knobs: Knobs) -> None:
    """A worker process's entry point."""
    logging.getLogger().setLevel(logging.WARNING)
    with drained_datagram_reads(knobs.drain_sockets):
        anyio.run(serve_commands, conn, indices, creds, knobs)
