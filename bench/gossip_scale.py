"""How gossip and membership scale with the mesh: formation, convergence, steady traffic, failure detection.

Every node keeps QUIC connections to a few ring neighbours, floods each change of the state document to
them, pulls a random peer's state every few seconds (anti-entropy), and pings every connection twice a
second to notice deaths. Whether that stays cheap and quick at 100 nodes is what this bench answers.

For each size N it runs N nodes in this one process, each with its own identity, ``QuicEndpoint`` (a real
UDP socket on 127.0.0.1), ``MeshState``, ``DocGossip`` and ``Membership``, wired as ``MeshRuntime.start``
wires them (no llama-server, no HTTP). Node 0 founds the mesh, the others join with its address as seed and
the same mesh credentials. Then it measures:

1. formation: from starting node 0 until every node sees all N nodes alive;
2. convergence: a random node writes a ``ModelSpec``; time until every replica holds it (``--changes``
   times, ``--spacing`` apart);
3. steady traffic over ``--window`` seconds without changes: UDP bytes sent + received per endpoint (QUIC
   keepalive pings, ACKs and anti-entropy included), gossip-layer bytes (``DocGossip.stats``), and this
   process's CPU time per node and the event loop's lag, which tell whether the numbers are CPU-bound;
4. failure detection: one node dies as a killed process does (its socket closes first, so no
   CONNECTION_CLOSE goes out, then its tasks stop); time until every other replica has it not alive.

Times are taken in the replicas' own change callbacks, not by polling. All nodes share one Python event loop
on however many cores the machine has: read the CPU, loop-lag and kernel-drop rows before the times. Past a
few dozen nodes at the production timers the one process runs out of CPU, sockets overflow and nodes declare
live peers dead (the "false death verdicts" row); then ``--drain-sockets`` (what a process per node would
read in time), ``--join-interval`` and the protocol's own knobs (``--tick``, ``--ping-interval``,
``--peer-timeout``, ``--confirm-timeout``, ``--ring``, ``--anti-entropy``) show which numbers depend on what.

    .venv/bin/python bench/gossip_scale.py [--sizes 10,50,100] [--window 20] [--json PATH]
    .venv/bin/python bench/gossip_scale.py --sizes 30 --drain-sockets --tick 1

It prints a table and never asserts: benchmarks are not tests (see STYLE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import random
import statistics
import time
from asyncio import selector_events
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pycrdt import Doc, Map, YSyncMessageType, create_sync_message, handle_sync_message

from meshllm import __version__
from meshllm.gossip.membership import Membership
from meshllm.gossip.sync import DocGossip
from meshllm.node.mesh import MESH_TRANSPORT
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeRole, NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import MeshCredentials
from meshllm.transport import QuicEndpoint, TransportError, TransportSettings

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


class BenchNode:
    """One mesh node's gossip half, run as a task of this process."""

    def __init__(self, index: int, creds: MeshCredentials, knobs: Knobs) -> None:
        self.index = index
        self.identity = NodeIdentity(Ed25519PrivateKey.generate())
        self.state = MeshState()
        self.endpoint = QuicEndpoint(self.identity, creds.mesh_id, creds.secret, host=HOST,
                                     settings=knobs.transport)
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
        """Start as ``MeshRuntime.start`` does; report the address to dial; run until cancelled."""
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
                                        tick=self.knobs.tick,
                                        confirm_timeout=self.knobs.confirm_timeout)
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


class Watch:
    """When each replica first satisfies ``holds``, timed in its own document's change callbacks.

    It listens through ``MeshState.observe``, whose listeners run after the state's decoded
    entries are refreshed (pycrdt calls a table's own observers in no fixed order)."""

    def __init__(self, nodes: Sequence[BenchNode], holds: Callable[[BenchNode], bool]) -> None:
        self.holds = holds
        self.expected = len(nodes)
        self.seen: dict[int, float] = {}
        self.via: dict[int, tuple[str, int] | None] = {}  # who delivered it, by which message type
        self.done = anyio.Event()
        self.started = time.monotonic()
        self._subs: list[tuple[BenchNode, int]] = []
        for node in nodes:
            self._subs.append((node, node.state.observe(partial(self._changed, node))))
            self._changed(node)

    def start(self) -> None:
        self.started = time.monotonic()

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

    async def wait(self, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            await self.done.wait()
        for node, handle in self._subs:
            node.state.unobserve(handle)
        self._subs.clear()
        return self.done.is_set()

    def delays(self) -> list[float]:
        return sorted(at - self.started for at in self.seen.values())


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


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def kernel_udp_drops() -> int | None:
    """Datagrams the kernel dropped because a UDP socket's receive buffer was full (machine-wide, Linux)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
                 if line.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def drops_since(before: int | None) -> int | None:
    after = kernel_udp_drops()
    return None if before is None or after is None else after - before


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


# -- phases -----------------------------------------------------------------------------------------------
async def formation(tg: TaskGroup, nodes: list[BenchNode], knobs: Knobs) -> Result:
    """Start node 0, then the others with node 0 as seed; time until every node sees all N alive."""
    size = len(nodes)

    def formed(node: BenchNode) -> bool:
        return len(node.maps["nodes"]) >= size and len(node.state.alive_nodes()) == size

    watch = Watch(nodes, formed)
    cpu, drops = time.process_time(), kernel_udp_drops()
    watch.start()
    seed = await tg.start(nodes[0].serve, [])
    for node in nodes[1:]:
        await anyio.sleep(knobs.join_interval)
        await tg.start(node.serve, [seed])
    all_started = time.monotonic() - watch.started
    complete = await watch.wait(knobs.timeout + size)
    delays = watch.delays()
    return {"complete": complete, "all_s": delays[-1] if complete else None, "p50_s": pct(delays, 0.5),
            "formed": len(delays), "started_s": all_started, "cpu_s": time.process_time() - cpu,
            "kernel_udp_drops": drops_since(drops)}


def delivery_paths(nodes: Sequence[BenchNode], watch: Watch, writer: BenchNode) -> Result:
    """Which path brought a change to each replica: hops from the writer and how the slowest got it.

    Each replica's parent is the peer whose message made the change appear there; "flood" is a
    forwarded update message, "repair" a sync step 2 (an anti-entropy pull, or a session's start)."""
    index = {node.node_id: node.index for node in nodes}
    parent: dict[int, int | None] = {}
    kind: dict[int, str] = {}
    for i, via in watch.via.items():
        if via is None:  # written here
            parent[i], kind[i] = None, "origin" if i == writer.index else "local"
        else:
            parent[i] = index.get(via[0])
            kind[i] = "flood" if via[1] == YSyncMessageType.SYNC_UPDATE else "repair"
    hops: dict[int, int] = {}

    def hop(i: int, depth: int = 0) -> int:
        if i not in hops:
            up = parent.get(i)
            hops[i] = 0 if up is None or depth > len(nodes) else hop(up, depth + 1) + 1
        return hops[i]

    for i in parent:
        hop(i)
    if not watch.seen:
        return {}
    slowest = max(watch.seen, key=watch.seen.__getitem__)
    path, at = [], slowest
    while at is not None and len(path) <= len(nodes):
        path.append(at)
        at = parent.get(at)
    times = [watch.seen[i] - watch.started for i in reversed(path)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"hops_max": max(hops.values()), "hops_p50": pct(list(hops.values()), 0.5),
            "slowest": slowest, "slowest_hops": hops[slowest], "slowest_kind": kind[slowest],
            "slowest_path_repairs": sum(kind[i] == "repair" for i in path),
            "slowest_path_max_hop_s": max(gaps, default=0.0),
            "repaired": sum(k == "repair" for k in kind.values()),
            "slowest_path": [(i, kind[i], round(t, 3)) for i, t in zip(reversed(path), times)]}


async def convergence(nodes: list[BenchNode], knobs: Knobs, rng: random.Random) -> Result:
    """A random node writes a model spec; time until every replica holds it. ``knobs.changes`` times."""
    runs: list[Result] = []
    cpu = time.process_time()
    lags: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(sample_lag, lags)
        for i in range(knobs.changes):
            name, writer = f"m{i}", rng.choice(nodes)
            watch = Watch(nodes, lambda node, name=name: name in node.maps["models"])
            watch.start()
            writer.state.put_model(ModelSpec(name=name, source="x"))
            complete = await watch.wait(knobs.timeout)
            delays = watch.delays()
            runs.append({"writer": writer.index, "complete": complete,
                         "all_s": delays[-1] if complete else None,
                         "node_p50_s": pct(delays, 0.5), "reached": len(delays),
                         **delivery_paths(nodes, watch, writer)})
            await anyio.sleep(knobs.spacing)
        tg.cancel_scope.cancel()
    names = {f"m{i}" for i in range(knobs.changes)}
    typed_misses = sum(len(names - set(node.state.models())) for node in nodes)
    alls = [run["all_s"] for run in runs if run["complete"]]
    slow = max((run for run in runs if run["complete"]), key=lambda run: run["all_s"], default={})
    return {"p50_s": pct(alls, 0.5), "max_s": max(alls) if len(alls) == len(runs) else None,
            "complete": len(alls), "changes": len(runs), "typed_misses": typed_misses,
            "hops_max": max((run.get("hops_max", 0) for run in runs), default=0),
            "repaired_nodes": sum(run.get("repaired", 0) for run in runs),
            "slowest_by_repair": sum(run.get("slowest_kind") == "repair" for run in runs),
            "worst_hop_s": slow.get("slowest_path_max_hop_s"), "worst_hops": slow.get("slowest_hops"),
            "lag_p50_ms": 1000 * (pct(lags, 0.5) or 0.0), "lag_max_ms": 1000 * max(lags, default=0.0),
            "cpu_s": time.process_time() - cpu, "runs": runs}


@dataclass(frozen=True)
class Counters:
    at: float
    cpu: float
    udp: list[int]
    datagrams: list[int]
    gossip: list[int]
    gossip_messages: list[int]


def read_counters(nodes: Sequence[BenchNode]) -> Counters:
    return Counters(
        at=time.monotonic(), cpu=time.process_time(),
        udp=[n.endpoint.stats.bytes_sent + n.endpoint.stats.bytes_received for n in nodes],
        datagrams=[n.endpoint.stats.datagrams_sent + n.endpoint.stats.datagrams_received for n in nodes],
        gossip=[n.gossip.stats.bytes_sent + n.gossip.stats.bytes_received for n in nodes],
        gossip_messages=[n.gossip.stats.messages_sent + n.gossip.stats.messages_received for n in nodes])


def rates(before: list[int], after: list[int], seconds: float) -> list[float]:
    return [(a - b) / seconds for a, b in zip(after, before, strict=True)]


async def sample_lag(samples: list[float], period: float = 0.05) -> None:
    """How late the event loop wakes a sleeper: near zero unless the process is CPU-bound."""
    while True:
        before = time.monotonic()
        await anyio.sleep(period)
        samples.append(time.monotonic() - before - period)


async def steady(nodes: list[BenchNode], knobs: Knobs) -> Result:
    """Traffic and CPU over ``knobs.window`` seconds in which nobody changes the desired state."""
    await anyio.sleep(knobs.settle)
    changes = Counter[str]()

    def changed(kind: str, _events: object) -> None:
        changes[kind] += 1

    subs = [(table, table.observe_deep(partial(changed, kind))) for kind, table in nodes[0].maps.items()]
    lags: list[float] = []
    drops = kernel_udp_drops()
    before = read_counters(nodes)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sample_lag, lags)
        await anyio.sleep(knobs.window)
        tg.cancel_scope.cancel()
    after = read_counters(nodes)
    for table, sub in subs:
        table.unobserve(sub)
    seconds = after.at - before.at
    udp = rates(before.udp, after.udp, seconds)
    gossip = rates(before.gossip, after.gossip, seconds)
    cpu = after.cpu - before.cpu
    degrees = [len(n.endpoint.peers) for n in nodes]
    return {
        "seconds": seconds, "udp_Bps_mean": statistics.mean(udp), "udp_Bps_max": max(udp),
        "udp_Bps_seed": udp[0], "udp_Bps_max_non_seed": max(udp[1:], default=0.0),
        "datagrams_per_s_mean": statistics.mean(rates(before.datagrams, after.datagrams, seconds)),
        "gossip_Bps_mean": statistics.mean(gossip), "gossip_Bps_max": max(gossip),
        "non_gossip_Bps_mean": statistics.mean(udp) - statistics.mean(gossip),
        "gossip_msgs_per_s_mean": statistics.mean(rates(before.gossip_messages, after.gossip_messages, seconds)),
        "doc_changes_per_s": {kind: count / seconds for kind, count in changes.items()},
        "cpu_share": cpu / seconds, "cpu_ms_per_node_s": 1000 * cpu / seconds / len(nodes),
        "lag_p50_ms": 1000 * (pct(lags, 0.5) or 0.0), "lag_max_ms": 1000 * max(lags, default=0.0),
        "degree_mean": statistics.mean(degrees), "degree_max": max(degrees), "degree_seed": degrees[0],
        "sessions_mean": statistics.mean(len(n.gossip.sessions) for n in nodes),
        "kernel_udp_drops": drops_since(drops),
        **sync_sizes(nodes),
    }


def sync_sizes(nodes: Sequence[BenchNode]) -> Result:
    """What one anti-entropy exchange between two converged replicas carries, and the whole document."""
    a, b = nodes[-1].state.doc, nodes[len(nodes) // 2].state.doc
    probe = Doc()
    probe.apply_update(b.get_update())  # a copy: the live replica's gossip must not see this exchange
    step1 = create_sync_message(a)
    step2 = handle_sync_message(step1[1:], probe) or b""
    return {"sync_step1_bytes": len(step1), "sync_step2_bytes": len(step2), "doc_bytes": len(a.get_update())}


async def detection(nodes: list[BenchNode], knobs: Knobs, rng: random.Random) -> Result:
    """Crash a random non-seed node; time until every other replica has it not alive."""
    victim = rng.choice(nodes[1:])
    others = [n for n in nodes if n is not victim]
    neighbours = [n.index for n in others if n.endpoint.peer(victim.node_id) is not None]

    def gone(node: BenchNode) -> bool:
        return victim.node_id in node.maps["deaths"] and victim.node_id not in node.state.alive_nodes()

    watch = Watch(others, gone)
    cpu = time.process_time()
    watch.start()
    victim.crash()
    complete = await watch.wait(knobs.timeout)
    delays = watch.delays()
    death = others[0].state.deaths().get(victim.node_id)
    return {"victim": victim.index, "connected_peers": len(neighbours), "complete": complete,
            "first_s": delays[0] if delays else None, "p50_s": pct(delays, 0.5),
            "all_s": delays[-1] if complete else None, "reached": len(delays),
            "declared_by": next((n.index for n in others if death and n.node_id == death.by), None),
            "cpu_s": time.process_time() - cpu}


# -- one size, all sizes ----------------------------------------------------------------------------------
async def run_size(size: int, knobs: Knobs, rng: random.Random, logs: LogCounter) -> Result:
    """Form a mesh of ``size`` nodes, run the four phases on it, and stop every node."""
    creds = MeshCredentials.create()
    nodes = [BenchNode(i, creds, knobs) for i in range(size)]
    result: Result = {"nodes": size}
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        result["formation"] = await formation(tg, nodes, knobs)
        result["formation"]["warnings"] = logs.take()
        print(f"N={size}: formation {fmt(result['formation']['all_s'])} s", flush=True)
        if result["formation"]["complete"]:
            for name, phase in (("convergence", partial(convergence, nodes, knobs, rng)),
                                ("steady", partial(steady, nodes, knobs)),
                                ("detection", partial(detection, nodes, knobs, rng))):
                result[name] = await phase()
                result[name]["warnings"] = logs.take()
                print(f"N={size}: {name} done", flush=True)
                if name == "convergence":
                    for run in result[name]["runs"]:
                        print(f"  {fmt(run['all_s'])} s, {run.get('hops_max')} hops, slowest by "
                              f"{run.get('slowest_kind')}: {run.get('slowest_path')}", flush=True)
        deaths = nodes[0].state.deaths()
        victim = result.get("detection", {}).get("victim")
        result["false_deaths"] = sum(1 for n in nodes if n.node_id in deaths and n.index != victim)
        tg.cancel_scope.cancel()
    result["left_running"] = sum(node.running for node in nodes)
    result["wall_s"] = time.monotonic() - started
    return result


Row = tuple[str, str, Callable[[Result], Any]]


def at(phase: str, key: str) -> Callable[[Result], Any]:
    return lambda result: result[phase][key]


def pair(phase: str, first: str, second: str) -> Callable[[Result], str]:
    return lambda result: f"{fmt(result[phase][first])} / {fmt(result[phase][second])}"


ROWS: list[Row] = [
    ("formation: all see all alive (s)", "", at("formation", "all_s")),
    ("  all nodes started after (s)", "", at("formation", "started_s")),
    ("  CPU during formation (s)", "", at("formation", "cpu_s")),
    ("  kernel UDP drops during formation", "0", at("formation", "kernel_udp_drops")),
    ("convergence p50 (s)", "", at("convergence", "p50_s")),
    ("convergence max (s)", "<= 2", at("convergence", "max_s")),
    ("  changes reaching every node", "", pair("convergence", "complete", "changes")),
    ("  hops from the writer, max", "", at("convergence", "hops_max")),
    ("  nodes reached by repair, not flood", "", at("convergence", "repaired_nodes")),
    ("  slowest change: hops / longest hop (s)", "", pair("convergence", "worst_hops", "worst_hop_s")),
    ("  loop lag p50 / max (ms)", "", pair("convergence", "lag_p50_ms", "lag_max_ms")),
    ("steady UDP B/s per node, mean", "<= 2048", at("steady", "udp_Bps_mean")),
    ("steady UDP B/s per node, max", "<= 2048", at("steady", "udp_Bps_max")),
    ("  seed node 0 / max of the others", "", pair("steady", "udp_Bps_seed", "udp_Bps_max_non_seed")),
    ("  UDP datagrams/s per node, mean", "", at("steady", "datagrams_per_s_mean")),
    ("  gossip B/s per node, mean / max", "", pair("steady", "gossip_Bps_mean", "gossip_Bps_max")),
    ("  UDP minus gossip B/s per node, mean", "", at("steady", "non_gossip_Bps_mean")),
    ("  gossip messages/s per node, mean", "", at("steady", "gossip_msgs_per_s_mean")),
    ("  doc changes/s seen at node 0", "", lambda r: sum(r["steady"]["doc_changes_per_s"].values())),
    ("  connections per node, mean / seed", "", pair("steady", "degree_mean", "degree_seed")),
    ("  anti-entropy step 1 / step 2 (B)", "", pair("steady", "sync_step1_bytes", "sync_step2_bytes")),
    ("  whole document (B)", "", at("steady", "doc_bytes")),
    ("  kernel UDP drops during the window", "0", at("steady", "kernel_udp_drops")),
    ("steady CPU share of one core", "", at("steady", "cpu_share")),
    ("steady CPU ms per node per s", "", at("steady", "cpu_ms_per_node_s")),
    ("steady loop lag p50 / max (ms)", "", pair("steady", "lag_p50_ms", "lag_max_ms")),
    ("failure: first verdict (s)", "", at("detection", "first_s")),
    ("failure: p50 of nodes (s)", "", at("detection", "p50_s")),
    ("failure: all nodes know (s)", "<= 5", at("detection", "all_s")),
    ("false death verdicts", "0", lambda r: r["false_deaths"]),
    ("wall time of this size (s)", "", lambda r: r["wall_s"]),
]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_table(results: Sequence[Result]) -> None:
    print(f"\n{'':38}{'target':>9}" + "".join(f"{'N=' + str(r['nodes']):>16}" for r in results))
    for label, target, read in ROWS:
        cells = []
        for result in results:
            try:
                cells.append(fmt(read(result)))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{label:38}{target:>9}" + "".join(f"{cell:>16}" for cell in cells))


async def main(sizes: Sequence[int], knobs: Knobs, seed: int, json_path: Path | None) -> None:
    logs = LogCounter()
    logging.getLogger().addHandler(logs)
    logging.getLogger().setLevel(logging.WARNING)
    rng = random.Random(seed)
    load = os.getloadavg()
    t = knobs.transport
    print(f"ping {t.ping_interval:g}s, peer timeout {t.peer_timeout:g}s, ring {knobs.ring}, fingers "
          f"{','.join(f'{f:g}' for f in knobs.fingers) or 'none'}, membership tick "
          f"{knobs.tick:g}s, dial timeout {knobs.confirm_timeout:g}s, anti-entropy {knobs.anti_entropy:g}s; "
          f"datagram reads per wake-up: {'up to 64' if knobs.drain_sockets else 'one (asyncio)'}; "
          f"{os.cpu_count()} cores, load average "
          f"{load[0]:.2f} at start", flush=True)
    with drained_datagram_reads(knobs.drain_sockets):
        results = [await run_size(size, knobs, rng, logs) for size in sizes]
    print_table(results)
    leaked = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    print(f"\nendpoints left running: {sum(r['left_running'] for r in results)}, tasks left: {len(leaked)}")
    for result in results:
        warnings = Counter[str]()
        for phase in ("formation", "convergence", "steady", "detection"):
            warnings.update(result.get(phase, {}).get("warnings", {}))
        print(f"N={result['nodes']} warnings: " + (", ".join(f"{n}x {m!r}" for m, n in warnings.most_common(4))
                                                   or "none"))
    if json_path is not None:
        json_path.write_text(json.dumps({"knobs": {**asdict(knobs), "transport": asdict(t)}, "seed": seed,
                                         "results": results}, indent=2))


def parse_args() -> tuple[list[int], Knobs, int, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,100", help="comma-separated mesh sizes")
    parser.add_argument("--window", type=float, default=20.0, help="steady-state window (s)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--changes", type=int, default=10, help="model specs written in the convergence phase")
    parser.add_argument("--spacing", type=float, default=0.5, help="seconds between those writes")
    parser.add_argument("--seed", type=int, default=1, help="picks writers and the victim")
    parser.add_argument("--ping-interval", type=float, default=MESH_TRANSPORT.ping_interval)
    parser.add_argument("--peer-timeout", type=float, default=MESH_TRANSPORT.peer_timeout)
    parser.add_argument("--ring", type=int, default=Knobs.ring, help="ring neighbours on each side")
    parser.add_argument("--fingers", default=",".join(f"{f:g}" for f in Knobs.fingers),
                        help="finger offsets as fractions of the ring, comma-separated ('' for none)")
    parser.add_argument("--tick", type=float, default=Knobs.tick, help="membership round interval (s)")
    parser.add_argument("--confirm-timeout", type=float, default=Knobs.confirm_timeout,
                        help="membership's limit on one dial (joining, and confirming a death)")
    parser.add_argument("--anti-entropy", type=float, default=Knobs.anti_entropy, help="seconds between pulls")
    parser.add_argument("--join-interval", type=float, default=0.0,
                        help="seconds between two nodes joining (default: all at once)")
    parser.add_argument("--drain-sockets", action="store_true",
                        help="read every queued datagram per wake-up, as a process per node would keep up")
    parser.add_argument("--verbose", action="store_true", help="print warnings as they happen")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f %(name)s: %(message)s")
    transport = replace(MESH_TRANSPORT, ping_interval=args.ping_interval, peer_timeout=args.peer_timeout)
    knobs = Knobs(transport=transport, ring=args.ring, tick=args.tick,
                  fingers=tuple(float(f) for f in args.fingers.split(",") if f),
                  confirm_timeout=args.confirm_timeout,
                  anti_entropy=args.anti_entropy,
                  changes=args.changes, spacing=args.spacing, window=args.window,
                  join_interval=args.join_interval, drain_sockets=args.drain_sockets)
    return [int(s) for s in args.sizes.split(",")], knobs, args.seed, args.json


if __name__ == "__main__":
    sizes, knobs, seed, json_path = parse_args()
    anyio.run(main, sizes, knobs, seed, json_path)
