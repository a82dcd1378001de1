"""How gossip and membership scale with the mesh: formation, convergence, steady traffic, failure detection.

Every node keeps QUIC connections to a few peers (ring neighbours and finger links, see
``meshllm.gossip.overlay``), floods each change of the state document to them, pulls a random peer's
state every few seconds (anti-entropy), and pings idle connections every second to notice deaths.
Whether that stays cheap and quick at 100 nodes is what this bench answers.

For each size N it runs N nodes spread over ``--procs`` worker processes (``_gossip_nodes.py``), each
node with its own identity, ``QuicEndpoint`` (a real UDP socket on 127.0.0.1), ``MeshState``,
``DocGossip`` and ``Membership``, wired as ``MeshRuntime.run`` wires them (no llama-server, no HTTP).
Node 0 founds the mesh, the others join with its address as seed and the same mesh credentials. Then
it measures:

1. formation: from starting node 0 until every node sees all N nodes alive;
2. convergence: a random node writes a ``ModelSpec``; time until every replica holds it (``--changes``
   times, ``--spacing`` apart), with the path that brought it to each replica: hops from the writer,
   and whether the last hop was a flooded update or an anti-entropy/session-start repair (sync step 2);
3. steady traffic over ``--window`` seconds without changes: UDP bytes sent + received per endpoint (QUIC
   keepalive pings, ACKs and anti-entropy included), gossip-layer bytes (``DocGossip.stats``), and the
   workers' CPU time per node and the event loops' lag, which tell whether the numbers are CPU-bound;
4. failure detection: one node dies as a killed process does (its socket closes first, so no
   CONNECTION_CLOSE goes out, then its tasks stop); time until every other replica has it not alive.

Times are taken in the replicas' own change callbacks, not by polling, on the one monotonic clock all
processes share. With ``--procs 1`` all nodes share one Python event loop: past a few dozen nodes at the
production timers it runs out of CPU, sockets overflow and nodes declare live peers dead (the "false
death verdicts" row); read the CPU, loop-lag and kernel-drop rows before the times. ``--procs`` spreads
that over cores (it cannot help beyond the cores the machine has free); ``--drain-sockets`` (what a
process per node would read in time), ``--join-interval`` and the protocol's own knobs (``--tick``,
``--ping-interval``, ``--peer-timeout``, ``--confirm-timeout``, ``--ring``, ``--fingers``,
``--anti-entropy``) show which numbers depend on what.

    .venv/bin/python bench/gossip_scale.py [--sizes 10,50,100] [--procs 2] [--window 20] [--json PATH]
    .venv/bin/python bench/gossip_scale.py --sizes 30 --drain-sockets --tick 1 --fingers ''

It prints a table and never asserts: benchmarks are not tests (see STYLE.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
from _gossip_nodes import Knobs, Result, worker_main
from pycrdt import YSyncMessageType

from meshllm.node.mesh import MESH_TRANSPORT
from meshllm.store.mesh import MeshCredentials


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


class Mesh:
    """The worker processes of one mesh size, and which node lives in which (node i in worker i % procs)."""

    def __init__(self, size: int, knobs: Knobs) -> None:
        self.size = size
        self.procs = max(1, min(knobs.procs, size))
        self.knobs = knobs
        creds = MeshCredentials.create()
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes = []
        for w in range(self.procs):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(theirs, self.local(w), creds, knobs),
                                      daemon=True)
            process.start()
            theirs.close()  # so that a worker's death reads as EOF here, not as silence
            self.conns.append(ours)
            self.processes.append(process)
        self.ids: dict[int, str] = {}
        self.index: dict[str, int] = {}

    def local(self, worker: int) -> list[int]:
        return list(range(worker, self.size, self.procs))

    def worker_of(self, index: int) -> int:
        return index % self.procs

    async def call(self, worker: int, command: str, **kwargs: Any) -> Any:
        conn = self.conns[worker]

        def roundtrip() -> Any:
            conn.send((command, kwargs))
            return conn.recv()

        try:
            reply = await anyio.to_thread.run_sync(roundtrip)
        except (EOFError, OSError) as exc:
            process = self.processes[worker]
            process.join(1)
            raise RuntimeError(f"worker {worker} died during {command} (exit code {process.exitcode})") from exc
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"worker {worker} failed {command}:\n{reply['error']}")
        return reply

    async def each(self, command: str, per_worker: Callable[[int], dict[str, Any]] | None = None,
                   **kwargs: Any) -> list[Any]:
        """Send ``command`` to every worker at once; their replies, by worker."""
        replies: list[Any] = [None] * self.procs

        async def one(w: int) -> None:
            replies[w] = await self.call(w, command, **kwargs, **(per_worker(w) if per_worker else {}))

        async with anyio.create_task_group() as tg:
            for w in range(self.procs):
                tg.start_soon(one, w)
        return replies

    async def open(self) -> None:
        for reply in await self.each("ids"):
            self.ids.update(reply)
        self.index = {nid: i for i, nid in self.ids.items()}

    async def cpu(self) -> float:
        return sum(await self.each("cpu"))

    async def wait(self, timeout: float) -> tuple[dict[int, float], dict[int, Any]]:
        seen: dict[int, float] = {}
        via: dict[int, Any] = {}
        for reply in await self.each("wait", timeout=timeout):
            seen.update(reply["seen"])
            via.update(reply["via"])
        return seen, via

    async def lags(self, on: bool) -> list[float]:
        return [lag for reply in await self.each("lag", on=on) for lag in reply]

    async def load(self) -> Result:
        """The workers' local health and handshake budgets since they started: worst and sums."""
        replies = await self.each("load")
        return {"worst_lag_s": max(r["worst_lag_s"] for r in replies),
                "multiplier_max": max(r["multiplier"] for r in replies),
                **{key: sum(r[key] for r in replies)
                   for key in ("dials", "dials_queued", "dial_wait_s", "dial_held_s")},
                "longest_queue": max(r["longest_queue"] for r in replies)}

    async def logs(self) -> dict[str, int]:
        counts = Counter[str]()
        for reply in await self.each("take_logs"):
            counts.update(reply)
        return dict(counts)

    async def close(self) -> Result:
        replies = []
        for conn in self.conns:
            conn.send(("finish", {}))
        for conn, process in zip(self.conns, self.processes, strict=True):
            replies.append(await anyio.to_thread.run_sync(conn.recv))
            await anyio.to_thread.run_sync(process.join, 10)
        return {"left_running": sum(r["running"] for r in replies),
                "tasks_left": sum(r["tasks_left"] for r in replies)}


async def start_profile(mesh: Mesh, knobs: Knobs) -> None:
    if knobs.profile:
        await mesh.each("profile", path=None)


async def stop_profile(mesh: Mesh, knobs: Knobs, phase: str) -> None:
    """Write each worker's profile of ``phase`` into the ``--profile`` folder (pstats files)."""
    if knobs.profile:
        Path(knobs.profile).mkdir(parents=True, exist_ok=True)
        await mesh.each("profile", lambda w: {"path": str(Path(knobs.profile, f"{phase}-N{mesh.size}-w{w}.prof"))})


# -- phases -----------------------------------------------------------------------------------------------
async def formation(mesh: Mesh, knobs: Knobs) -> Result:
    """Start node 0, then the others with node 0 as seed; time until every node sees all N alive."""
    size = mesh.size
    cpu, drops = await mesh.cpu(), kernel_udp_drops()
    await mesh.each("watch_for", kind="formed", arg=size)
    await start_profile(mesh, knobs)
    started = time.monotonic()
    seed = (await mesh.call(0, "start", indices=[0], seeds=[], delay=0.0, spacing=0.0))[0]
    # joins keep the --join-interval pace overall: each worker starts its nodes procs times that apart
    await mesh.each("start", lambda w: {"indices": [i for i in mesh.local(w) if i],
                                        "delay": w * knobs.join_interval},
                    seeds=[seed], spacing=mesh.procs * knobs.join_interval)
    all_started = time.monotonic() - started
    seen, _ = await mesh.wait(knobs.timeout + size)
    await stop_profile(mesh, knobs, "formation")
    delays = sorted(at - started for at in seen.values())
    complete = len(delays) == size
    return {"complete": complete, "all_s": delays[-1] if complete else None, "p50_s": pct(delays, 0.5),
            "formed": len(delays), "started_s": all_started, "cpu_s": await mesh.cpu() - cpu,
            "kernel_udp_drops": drops_since(drops)}


def delivery_paths(mesh: Mesh, seen: dict[int, float], via: dict[int, Any], writer: int,
                   started: float) -> Result:
    """Which path brought a change to each replica: hops from the writer and how the slowest got it.

    Each replica's parent is the peer whose message made the change appear there; "flood" is a
    forwarded update message, "repair" a sync step 2 (an anti-entropy pull, or a session's start)."""
    parent: dict[int, int | None] = {}
    kind: dict[int, str] = {}
    for i, source in via.items():
        if source is None:  # written here
            parent[i], kind[i] = None, "origin" if i == writer else "local"
        else:
            parent[i] = mesh.index.get(source[0])
            kind[i] = "flood" if source[1] == YSyncMessageType.SYNC_UPDATE else "repair"
    hops: dict[int, int] = {}

    def hop(i: int, depth: int = 0) -> int:
        if i not in hops:
            up = parent.get(i)
            hops[i] = 0 if up is None or depth > mesh.size else hop(up, depth + 1) + 1
        return hops[i]

    for i in parent:
        hop(i)
    if not seen:
        return {}
    slowest = max(seen, key=seen.__getitem__)
    path: list[int] = []
    step: int | None = slowest
    while step is not None and step in seen and len(path) <= mesh.size:
        path.append(step)
        step = parent.get(step)
    path.reverse()
    times = [seen[i] - started for i in path]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"hops_max": max(hops.values()), "hops_p50": pct(list(hops.values()), 0.5),
            "slowest": slowest, "slowest_hops": hops[slowest], "slowest_kind": kind[slowest],
            "slowest_path_repairs": sum(kind[i] == "repair" for i in path),
            "slowest_path_max_hop_s": max(gaps, default=0.0),
            "repaired": sum(k == "repair" for k in kind.values()),
            "slowest_path": [(i, kind[i], round(t, 3)) for i, t in zip(path, times, strict=True)]}


async def convergence(mesh: Mesh, knobs: Knobs, rng: random.Random) -> Result:
    """A random node writes a model spec; time until every replica holds it. ``knobs.changes`` times."""
    runs: list[Result] = []
    cpu = await mesh.cpu()
    await mesh.lags(True)
    await mesh.call(0, "count_changes", index=0, on=True)
    _, _, before = merged(await mesh.each("counters"))
    await start_profile(mesh, knobs)
    for i in range(knobs.changes):
        name, writer = f"m{i}", rng.randrange(mesh.size)
        await mesh.each("watch_for", kind="model", arg=name)
        started = await mesh.call(mesh.worker_of(writer), "write", index=writer, name=name)
        seen, via = await mesh.wait(knobs.timeout)
        delays = sorted(at - started for at in seen.values())
        complete = len(seen) == mesh.size
        runs.append({"writer": writer, "complete": complete, "all_s": delays[-1] if complete else None,
                     "node_p50_s": pct(delays, 0.5), "reached": len(delays),
                     **delivery_paths(mesh, seen, via, writer, started)})
        await anyio.sleep(knobs.spacing)
    await stop_profile(mesh, knobs, "convergence")
    _, _, after = merged(await mesh.each("counters"))
    others = await mesh.call(0, "count_changes", index=0, on=False)
    lags = await mesh.lags(False)
    names = [f"m{i}" for i in range(knobs.changes)]
    typed_misses = sum(await mesh.each("missing", names=names))
    alls = [run["all_s"] for run in runs if run["complete"]]
    slow = max((run for run in runs if run["complete"]), key=lambda run: run["all_s"], default={})
    return {"p50_s": pct(alls, 0.5), "p95_s": pct(alls, 0.95),
            "max_s": max(alls) if len(alls) == len(runs) else None,
            "complete": len(alls), "changes": len(runs), "typed_misses": typed_misses,
            "hops_max": max((run.get("hops_max", 0) for run in runs), default=0),
            "repaired_nodes": sum(run.get("repaired", 0) for run in runs),
            "slowest_by_repair": sum(run.get("slowest_kind") == "repair" for run in runs),
            "worst_hop_s": slow.get("slowest_path_max_hop_s"), "worst_hops": slow.get("slowest_hops"),
            "lag_p50_ms": 1000 * (pct(lags, 0.5) or 0.0), "lag_max_ms": 1000 * max(lags, default=0.0),
            "cpu_s": await mesh.cpu() - cpu, "runs": runs,
            # messages over the whole phase, so they include what else the mesh was doing
            "gossip_msgs_per_change": sum(a[3] - b[3] for a, b in zip(after, before, strict=True)) / 2 / len(runs),
            "other_changes_at_0": sum(n for field, n in others.items() if not field.startswith("models.")),
            "other_changes_by_field": others}


def merged(replies: Sequence[Result]) -> tuple[float, float, list[tuple[int, ...]]]:
    """The workers' counters as (time, CPU summed over workers, per-node tuples in node order)."""
    nodes: dict[int, tuple[int, ...]] = {}
    for reply in replies:
        nodes.update(reply["nodes"])
    return max(r["at"] for r in replies), sum(r["cpu"] for r in replies), [nodes[i] for i in sorted(nodes)]


def rates(before: list[tuple[int, ...]], after: list[tuple[int, ...]], column: int,
          seconds: float) -> list[float]:
    return [(a[column] - b[column]) / seconds for a, b in zip(after, before, strict=True)]


async def steady(mesh: Mesh, knobs: Knobs) -> Result:
    """Traffic and CPU over ``knobs.window`` seconds in which nobody changes the desired state."""
    await anyio.sleep(knobs.settle)
    await mesh.call(0, "count_changes", index=0, on=True)
    drops = kernel_udp_drops()
    await mesh.lags(True)
    await start_profile(mesh, knobs)
    t0, cpu0, before = merged(await mesh.each("counters"))
    await anyio.sleep(knobs.window)
    t1, cpu1, after = merged(await mesh.each("counters"))
    await stop_profile(mesh, knobs, "steady")
    lags = await mesh.lags(False)
    changes = await mesh.call(0, "count_changes", index=0, on=False)
    seconds, cpu = t1 - t0, cpu1 - cpu0
    udp, gossip = rates(before, after, 0, seconds), rates(before, after, 2, seconds)
    degrees = [node[4] for node in after]
    return {
        "seconds": seconds, "udp_Bps_mean": statistics.mean(udp), "udp_Bps_max": max(udp),
        "udp_Bps_seed": udp[0], "udp_Bps_max_non_seed": max(udp[1:], default=0.0),
        "datagrams_per_s_mean": statistics.mean(rates(before, after, 1, seconds)),
        "gossip_Bps_mean": statistics.mean(gossip), "gossip_Bps_max": max(gossip),
        "non_gossip_Bps_mean": statistics.mean(udp) - statistics.mean(gossip),
        "gossip_msgs_per_s_mean": statistics.mean(rates(before, after, 3, seconds)),
        "doc_changes_per_s": {kind: count / seconds for kind, count in changes.items()},
        "cpu_share": cpu / seconds, "cpu_ms_per_node_s": 1000 * cpu / seconds / mesh.size,
        "lag_p50_ms": 1000 * (pct(lags, 0.5) or 0.0), "lag_max_ms": 1000 * max(lags, default=0.0),
        "degree_mean": statistics.mean(degrees), "degree_max": max(degrees), "degree_seed": degrees[0],
        "sessions_mean": statistics.mean(node[5] for node in after),
        "kernel_udp_drops": drops_since(drops),
        **(await mesh.call(0, "sync_sizes")),
    }


async def detection(mesh: Mesh, knobs: Knobs, rng: random.Random) -> Result:
    """Crash a random non-seed node; time until every other replica has it not alive."""
    victim = rng.randrange(1, mesh.size)
    home = mesh.worker_of(victim)
    connected = await mesh.call(home, "peers", index=victim)
    cpu = await mesh.cpu()
    await mesh.each("watch_for", kind="dead", arg=mesh.ids[victim], skip=[victim])
    started = await mesh.call(home, "crash", index=victim)
    seen, _ = await mesh.wait(knobs.timeout)
    delays = sorted(at - started for at in seen.values())
    complete = len(delays) == mesh.size - 1
    by = (await mesh.call(0, "deaths")).get(mesh.ids[victim])
    return {"victim": victim, "connected_peers": connected, "complete": complete,
            "first_s": delays[0] if delays else None, "p50_s": pct(delays, 0.5),
            "all_s": delays[-1] if complete else None, "reached": len(delays),
            "declared_by": mesh.index.get(by) if by else None, "cpu_s": await mesh.cpu() - cpu}


# -- one size, all sizes ----------------------------------------------------------------------------------
async def run_size(size: int, knobs: Knobs, rng: random.Random) -> Result:
    """Form a mesh of ``size`` nodes, run the four phases on it, and stop every node."""
    started = time.monotonic()
    mesh = Mesh(size, knobs)
    result: Result = {"nodes": size, "procs": mesh.procs}
    try:
        await mesh.open()
        result["formation"] = await formation(mesh, knobs)
        result["formation"]["warnings"] = await mesh.logs()
        result["formation"]["load"] = await mesh.load()
        print(f"N={size}: formation {fmt(result['formation']['all_s'])} s, {result['formation']['formed']} of "
              f"{size} nodes saw all alive", flush=True)
        if result["formation"]["complete"]:
            await run_phases(mesh, knobs, rng, result)
        deaths = await mesh.call(0, "deaths")
        victim = result.get("detection", {}).get("victim")
        result["false_deaths"] = sum(1 for i, nid in mesh.ids.items() if nid in deaths and i != victim)
    finally:
        result.update(await mesh.close())
    result["wall_s"] = time.monotonic() - started
    return result


async def run_phases(mesh: Mesh, knobs: Knobs, rng: random.Random, result: Result) -> None:
    for name, phase in (("convergence", partial(convergence, mesh, knobs, rng)),
                        ("steady", partial(steady, mesh, knobs)),
                        ("detection", partial(detection, mesh, knobs, rng))):
        result[name] = await phase()
        result[name]["warnings"] = await mesh.logs()
        result[name]["load"] = await mesh.load()
        print(f"N={mesh.size}: {name} done", flush=True)
        if name == "convergence":
            for run in result[name]["runs"]:
                print(f"  {fmt(run['all_s'])} s, {run.get('hops_max')} hops, slowest by "
                      f"{run.get('slowest_kind')}: {run.get('slowest_path')}", flush=True)
            print(f"  changes seen at node 0 meanwhile, by field: {result[name]['other_changes_by_field']}")


Row = tuple[str, str, Callable[[Result], Any]]


def at(phase: str, key: str) -> Callable[[Result], Any]:
    return lambda result: result[phase][key]


def pair(phase: str, first: str, second: str) -> Callable[[Result], str]:
    return lambda result: f"{fmt(result[phase][first])} / {fmt(result[phase][second])}"


def warned(result: Result, words: str) -> int:
    """How many warnings containing ``words`` the whole run of one size logged."""
    return sum(n for phase in ("formation", "convergence", "steady", "detection")
               for msg, n in result.get(phase, {}).get("warnings", {}).items() if words in msg)


def last_load(result: Result, key: str) -> Any:
    for phase in ("detection", "steady", "convergence", "formation"):
        if "load" in result.get(phase, {}):
            return result[phase]["load"][key]
    return None


SUMMARY: list[Row] = [
    ("formation: all see all alive (s)", "", at("formation", "all_s")),
    ("convergence p50 (s)", "", at("convergence", "p50_s")),
    ("convergence p95 (s)", "", at("convergence", "p95_s")),
    ("convergence max (s)", "<= 2", at("convergence", "max_s")),
    ("steady UDP B/s per node, mean", "<= 2048", at("steady", "udp_Bps_mean")),
    ("steady UDP B/s per node, max", "", at("steady", "udp_Bps_max")),
    ("failure: all nodes know (s)", "<= 5", at("detection", "all_s")),
    ("false death verdicts", "0", lambda r: r["false_deaths"]),
    ("peer timeouts / death verdicts, all phases", "",
     lambda r: f"{warned(r, 'nothing heard')} / {warned(r, 'declaring it dead')}"),
    ("worst loop lag (s) / dials queued", "",
     lambda r: f"{fmt(last_load(r, 'worst_lag_s'))} / {fmt(last_load(r, 'dials_queued'))}"),
    ("steady CPU share of one core", "", at("steady", "cpu_share")),
]

ROWS: list[Row] = [
    ("formation: all see all alive (s)", "", at("formation", "all_s")),
    ("  all nodes started after (s)", "", at("formation", "started_s")),
    ("  CPU during formation (s)", "", at("formation", "cpu_s")),
    ("  kernel UDP drops during formation", "0", at("formation", "kernel_udp_drops")),
    ("  dials in formation: started / had to wait", "",
     lambda r: f"{r['formation']['load']['dials']} / {r['formation']['load']['dials_queued']}"),
    ("  dials in formation: mean wait / hold (s)", "", lambda r: (
        f"{fmt(r['formation']['load']['dial_wait_s'] / max(1, r['formation']['load']['dials_queued']))} / "
        f"{fmt(r['formation']['load']['dial_held_s'] / max(1, r['formation']['load']['dials']))}")),
    ("convergence p50 / p95 (s)", "", pair("convergence", "p50_s", "p95_s")),
    ("convergence max (s)", "<= 2", at("convergence", "max_s")),
    ("  changes reaching every node", "", pair("convergence", "complete", "changes")),
    ("  hops from the writer, max", "", at("convergence", "hops_max")),
    ("  nodes reached by repair, not flood", "", at("convergence", "repaired_nodes")),
    ("  slowest change: hops / longest hop (s)", "", pair("convergence", "worst_hops", "worst_hop_s")),
    ("  loop lag p50 / max (ms)", "", pair("convergence", "lag_p50_ms", "lag_max_ms")),
    ("  gossip messages per change, all nodes", "", at("convergence", "gossip_msgs_per_change")),
    ("  other doc changes seen at node 0", "", at("convergence", "other_changes_at_0")),
    ("  CPU during the changes (s)", "", at("convergence", "cpu_s")),
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


def print_table(results: Sequence[Result], rows: Sequence[Row] = ROWS, title: str = "") -> None:
    print(f"\n{title:44}{'target':>9}" + "".join(f"{'N=' + str(r['nodes']):>16}" for r in results))
    for label, target, read in rows:
        cells = []
        for result in results:
            try:
                cells.append(fmt(read(result)))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{label:44}{target:>9}" + "".join(f"{cell:>16}" for cell in cells))


async def main(sizes: Sequence[int], knobs: Knobs, seed: int, json_path: Path | None) -> None:
    rng = random.Random(seed)
    load = os.getloadavg()
    t = knobs.transport
    print(f"ping {t.ping_interval:g}s, peer timeout {t.peer_timeout:g}s, ring {knobs.ring}, fingers "
          f"{','.join(f'{f:g}' for f in knobs.fingers) or 'none'}, membership tick {knobs.tick:g}s, "
          f"dial timeout {knobs.confirm_timeout:g}s, anti-entropy {knobs.anti_entropy:g}s; datagram reads "
          f"per wake-up: {'up to 64' if knobs.drain_sockets else 'one (asyncio)'}; handshakes in flight "
          f"{knobs.dial_budget} per process; local health {'on' if knobs.local_health else 'off'}; "
          f"{knobs.procs} worker "
          f"process(es); {os.cpu_count()} cores, load average {load[0]:.2f} at start", flush=True)
    results: list[Result] = []
    for size in sizes:
        results.append(await run_size(size, knobs, rng))
        if json_path is not None:  # after each size, so that a run cut short keeps what it measured
            json_path.write_text(json.dumps({"knobs": {**asdict(knobs), "transport": asdict(t)},
                                             "seed": seed, "results": results}, indent=2))
    print_table(results, ROWS, "details")
    print_table(results, SUMMARY, f"summary ({knobs.procs} processes, {os.cpu_count()} cores)")
    print(f"\nendpoints left running: {sum(r['left_running'] for r in results)}, "
          f"tasks left: {sum(r['tasks_left'] for r in results)}")
    for result in results:
        warnings = Counter[str]()
        for phase in ("formation", "convergence", "steady", "detection"):
            warnings.update(result.get(phase, {}).get("warnings", {}))
        print(f"N={result['nodes']} warnings: " + (", ".join(f"{n}x {m!r}" for m, n in warnings.most_common(4))
                                                   or "none"))


def parse_args() -> tuple[list[int], Knobs, int, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,100", help="comma-separated mesh sizes")
    parser.add_argument("--procs", type=int, default=1, help="worker processes the nodes are spread over")
    parser.add_argument("--window", type=float, default=20.0, help="steady-state window (s)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--changes", type=int, default=20, help="model specs written in the convergence phase")
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
    parser.add_argument("--dial-budget", type=int, default=Knobs.dial_budget,
                        help="QUIC handshakes in flight per worker process (its nodes share it)")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="cProfile each worker over formation, convergence and the steady window into DIR "
                             "(pstats files)")
    parser.add_argument("--no-local-health", action="store_true",
                        help="never widen timeouts for this process's own loop lag (for comparison)")
    args = parser.parse_args()
    transport = replace(MESH_TRANSPORT, ping_interval=args.ping_interval, peer_timeout=args.peer_timeout)
    knobs = Knobs(transport=transport, ring=args.ring, tick=args.tick,
                  fingers=tuple(float(f) for f in args.fingers.split(",") if f),
                  confirm_timeout=args.confirm_timeout, anti_entropy=args.anti_entropy,
                  changes=args.changes, spacing=args.spacing, window=args.window,
                  join_interval=args.join_interval, drain_sockets=args.drain_sockets, procs=args.procs,
                  dial_budget=args.dial_budget, local_health=not args.no_local_health, profile=args.profile)
    return [int(s) for s in args.sizes.split(",")], knobs, args.seed, args.json


if __name__ == "__main__":
    sizes, knobs, seed, json_path = parse_args()
    anyio.run(main, sizes, knobs, seed, json_path)
