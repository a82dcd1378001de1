"""The fault suite's harness: a mesh under a steady load of greedy streams, one fault at a time, and
what a user of the mesh saw (shared by ``test_faults.py`` and ``bench/faults.py``).

The mesh: two standby nodes ``a`` and ``b`` serving one model (a manifest with ``replicas: 2``) and a
client node ``c`` that every request goes through, as an application's would. ``Load`` keeps
``workers`` greedy chat streams going through ``c`` and classifies each one:

- ``ok``: it ended with a finish reason and ``[DONE]``; ``wrong`` counts those whose text differs
  from the uninterrupted answer (taken before the faults);
- ``error``: an HTTP error or an error event in the stream: the user was told;
- ``cut``: the stream ended (or the connection broke) with neither: a silent cut, never acceptable.

For each fault: the requests that failed (error + cut), the streams resumed on another server mid-way
and the requests re-sent to another before their answer began (``c``'s ``meshllm_failovers_total`` by
stage), the time from the fault to the
first request started after it that was served, servers beyond the desired replicas once the mesh
settled (``duplicates``: ready servers in the status plus engine processes no status accounts for),
and what the mesh forgot (``lost``: models, mesh id, nodes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshllm.testing.engines import engine_pids
from tests.integration.nodes import Mesh, NodeProcess, wait_for

MODEL = "faulty"
# The nodes pass it on to their llama-servers: with flash attention on the CPU, a greedy answer can change
# with what else is in the batch (after a fault, every stream lands on one server), so "equals the
# uninterrupted answer" would test the batching, not the fault.
BATCH_INVARIANT = ("LLAMA_ARG_FLASH_ATTN", "off")
PROMPT = "Tell me a long story about a lighthouse keeper"
A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@dataclass
class Outcome:
    start: float
    end: float
    kind: str  # ok, error, cut
    text: str = ""
    detail: str = ""


@dataclass
class FaultRow:
    fault: str
    requests: int = 0
    failed: int = 0
    cut: int = 0
    wrong: int = 0
    resumed: int = 0
    retried: int = 0
    serve_again_s: float | None = None
    errors_for_s: float = 0.0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    notes: str = ""

    def cells(self) -> list[str]:
        again = "-" if self.serve_again_s is None else f"{self.serve_again_s:.1f}"
        return [self.fault, str(self.requests), str(self.failed), str(self.cut), str(self.wrong), str(self.resumed),
                str(self.retried), again, f"{self.errors_for_s:.1f}", str(self.duplicates), ", ".join(self.lost) or "none", self.notes]


HEADER = ["fault", "requests", "failed", "silent cuts", "wrong text", "resumed", "re-sent", "serve again s", "errors for s",
          "duplicates",
          "state lost", "notes"]


def _message(answer: httpx.Response) -> str:
    """The error message of a failed answer (the OpenAI error object's), for the table's notes."""
    body = answer.read()
    try:
        return str(json.loads(body)["error"]["message"])[:100]
    except (ValueError, KeyError, TypeError):
        return body[:100].decode(errors="replace")


def stream_once(api: str, *, max_tokens: int, timeout: float = 60.0) -> Outcome:
    """One greedy chat stream through ``api``, classified."""
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    start, parts, finished, done = time.monotonic(), [], False, False
    try:
        with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=timeout) as answer:
            if answer.status_code >= 400:
                return Outcome(start, time.monotonic(), "error", detail=f"HTTP {answer.status_code}: {_message(answer)}")
            for line in answer.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Outcome(start, time.monotonic(), "error", "".join(parts),
                                       detail=str(chunk["error"].get("message", ""))[:120])
                    for choice in chunk.get("choices") or []:
                        parts.append((choice.get("delta") or {}).get("content") or "")
                        finished = finished or bool(choice.get("finish_reason"))
                elif line.startswith("event: error"):
                    return Outcome(start, time.monotonic(), "error", "".join(parts), detail="error event")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Outcome(start, time.monotonic(), "cut", "".join(parts), detail=f"{type(exc).__name__}: {exc}"[:120])
    kind = "ok" if finished and done else "cut"
    return Outcome(start, time.monotonic(), kind, "".join(parts), detail="" if kind == "ok" else "no end")


class Load:
    """``workers`` threads sending greedy streams through ``api`` back to back until stopped."""

    def __init__(self, api: str, *, workers: int, max_tokens: int) -> None:
        self.api, self.workers, self.max_tokens = api, workers, max_tokens
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = stream_once(self.api, max_tokens=self.max_tokens)
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


def failovers(node: NodeProcess, *, stage: str) -> int:
    """How many requests ``node``'s /metrics counts as moved to another server at ``stage``
    (``before_start``: before the answer began; ``mid_stream``: a stream carried on)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{node.console}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0
    pattern = rf'^meshllm_failovers_total\{{[^}}]*stage="{stage}"[^}}]*\}} (\S+)$'
    return int(sum(float(m[1]) for m in re.finditer(pattern, text, re.MULTILINE)))


def ready_servers(node: NodeProcess) -> list[dict[str, Any]]:
    for entry in node.status()["models"]:
        if entry["name"] == MODEL:
            return [s for s in entry["servers"] if s["phase"] == "ready"]
    return []


class FaultMesh:
    """Nodes a and b (standby, each serving a replica of MODEL) and client c, on their own loopback addresses."""

    def __init__(self, mesh: Mesh, model: Path, *, replicas: int = 2, max_vram: str = "") -> None:
        """``max_vram``: each server node offers that much, too little to hold the model alone: its one
        replica is split over a and b (pipeline parallel), for the split worker's faults."""
        self.mesh, self.model, self.replicas = mesh, model, replicas
        cap = ("--max-vram", max_vram) if max_vram else ()
        self.a = mesh.start("a", A, "--standby", *cap)
        token = self.a.token()
        self.b = mesh.start("b", B, "--standby", *cap, "--join", token)
        self.c = mesh.start("c", C, "--client", "--join", token)
        self.token = token
        manifest = json.dumps({"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": MODEL},
                               "spec": {"source": str(model), "replicas": replicas}})
        done = self.a.cli("apply", "-f", "-", stdin=manifest)
        assert done.returncode == 0, done.stderr
        self.settle()
        if max_vram:
            wait_for(lambda: self.workers() != [], timeout=60, what="the split's worker")
        self.mesh_id = self.c.status()["mesh_id"]

    def workers(self) -> list[NodeProcess]:
        """The server nodes that hold layers of MODEL as split workers."""
        ids = {w["node"] for m in self.c.status()["models"] if m["name"] == MODEL for w in m["workers"]}
        return [n for n in self.servers if n.status()["node"]["id"] in ids]

    @property
    def servers(self) -> list[NodeProcess]:
        return [self.a, self.b]

    def restart(self, node: NodeProcess) -> None:
        """Start ``node`` again from its state folder (same identity), joining the mesh."""
        node.stop(signal.SIGKILL, timeout=5)
        if "--join" not in node.extra:
            node.extra = [*node.extra, "--join", self.token]
        node.start()

    def settle(self, *, timeout: float = 90.0) -> float:
        """Wait until every server node is alive and the model has its replicas, seen from the client."""
        return wait_for(lambda: len(ready_servers(self.c)) == self.replicas and
                        sum(n["state"] == "alive" for n in self.c.status()["nodes"]) == 3,
                        timeout=timeout, what=f"{MODEL} to have {self.replicas} ready servers")

    def duplicates(self) -> int:
        """Servers beyond the desired replicas, and engine processes (llama-server, rpc-server) that no
        server or worker status accounts for."""
        servers = ready_servers(self.c)
        workers = [w for m in self.c.status()["models"] if m["name"] == MODEL for w in m["workers"]]
        pids = {s.get("pid") for s in servers} | {w.get("pid") for w in workers}
        orphans = [pid for node in self.servers for pid in engine_pids(node.state_dir) if pid not in pids]
        return max(0, len(servers) - self.replicas) + len(orphans)

    def duplicates_once_settled(self, *, grace: float = 15.0) -> int:
        """``duplicates`` once the status caught up with the processes: a node restarted a moment ago
        publishes its adopted server a little later, and its engine looks unaccounted for meanwhile.
        A duplicate that outlasts ``grace`` seconds is counted."""
        deadline = time.monotonic() + grace
        while (found := self.duplicates()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def lost(self) -> list[str]:
        status = self.c.status()
        gone = []
        if status.get("mesh_id") != self.mesh_id:
            gone.append("mesh id")
        if MODEL not in {m["name"] for m in status["models"]}:
            gone.append(f"model {MODEL}")
        else:
            spec = next(m for m in status["models"] if m["name"] == MODEL)
            if spec.get("replicas") != self.replicas:
                gone.append("replicas")
        return gone


@contextmanager
def iptables_drop(pairs: list[tuple[str, str]], *, probability: float | None = None) -> Iterator[None]:
    """DROP UDP between each pair of addresses, both ways (a fraction when ``probability``) while inside."""
    rules = []
    for x, y in pairs:
        for src, dst in ((x, y), (y, x)):
            rule = ["INPUT", "-s", src, "-d", dst, "-p", "udp"]
            if probability is not None:
                rule += ["-m", "statistic", "--mode", "random", "--probability", str(probability)]
            rule += ["-j", "DROP", "-m", "comment", "--comment", "meshllm-faults"]
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            rules.append(rule)
    try:
        yield
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


def _engine_pid(node: NodeProcess) -> int:
    ident = node.status()["node"]["id"]
    for server in ready_servers(node):
        if server["node"] == ident:
            return int(server["pid"])
    raise AssertionError(f"{node.state_dir.name} serves no ready {MODEL}")


# -- the faults: each injects, waits for its own end, and leaves the mesh to recover -----------------

def kill_node(fm: FaultMesh) -> None:
    """kill -9 of a serving node: its agent and its llama-server at once; it comes back later."""
    ident, pids = fm.a.status()["node"]["id"], engine_pids(fm.a.state_dir)
    assert fm.a.proc is not None
    fm.a.proc.kill()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    fm.a.proc.wait()
    wait_for(lambda: all(s["node"] != ident for s in ready_servers(fm.c)), timeout=60,
             what="the dead node's server to leave the routes")  # meanwhile the load goes to b
    fm.restart(fm.a)


def kill_engine(fm: FaultMesh) -> None:
    """kill -9 of a serving node's llama-server; its node restarts it."""
    os.kill(_engine_pid(fm.a), signal.SIGKILL)


def kill_agent(fm: FaultMesh) -> None:
    """kill -9 of a node agent alone (its llama-server lives on), then the agent restarted as a supervisor would."""
    assert fm.a.proc is not None
    fm.a.proc.kill()
    fm.a.proc.wait()
    fm.restart(fm.a)


def sigterm_node(fm: FaultMesh) -> None:
    """SIGTERM of a serving node while streams run (a graceful stop), then it starts again."""
    fm.a.stop(signal.SIGTERM, timeout=30)
    fm.restart(fm.a)


def partition(fm: FaultMesh, *, seconds: float = 8.0) -> None:
    """Node a cut off from b and c for ``seconds`` (longer than the failure detector's timeout), then healed."""
    with iptables_drop([(A, B), (A, C)]):
        time.sleep(seconds)  # the fault's duration itself, not a wait for a condition


def stall(fm: FaultMesh, *, seconds: float = 8.0) -> None:
    """Node a and its engine stopped (SIGSTOP) for ``seconds``, then continued."""
    assert fm.a.proc is not None
    pids = [fm.a.proc.pid, *engine_pids(fm.a.state_dir)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the fault's duration
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def packet_loss(fm: FaultMesh, *, seconds: float = 10.0, probability: float = 0.2) -> None:
    """20% of the UDP datagrams between every pair of nodes dropped for ``seconds``."""
    with iptables_drop([(A, B), (A, C), (B, C)], probability=probability):
        time.sleep(seconds)  # the fault's duration


def kill_worker(fm: FaultMesh) -> None:
    """kill -9 of a split worker's node and its rpc-server; the split is served again once it is back."""
    worker = fm.workers()[0]
    pids = engine_pids(worker.state_dir)
    assert worker.proc is not None
    worker.proc.kill()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    worker.proc.wait()
    fm.restart(worker)


FAULTS: dict[str, Callable[[FaultMesh], None]] = {
    "kill -9 serving node": kill_node,
    "kill -9 llama-server": kill_engine,
    "kill -9 node agent": kill_agent,
    "SIGTERM during streams": sigterm_node,
    "partition 8 s, healed": partition,
    "SIGSTOP 8 s": stall,
    "20% packet loss 10 s": packet_loss,
}
SPLIT_FAULTS: dict[str, Callable[[FaultMesh], None]] = {"kill -9 split worker": kill_worker}


def run_fault(fm: FaultMesh, name: str, *, workers: int, max_tokens: int, reference: str,
              warmup: int = 4, settle_timeout: float = 120.0) -> FaultRow:
    """Run one fault under load; the mesh is settled again when it returns."""
    before = failovers(fm.c, stage="mid_stream"), failovers(fm.c, stage="before_start")
    row = FaultRow(name)
    with Load(fm.c.api, workers=workers, max_tokens=max_tokens) as load:
        wait_for(lambda: load.count() >= warmup, timeout=60, what="the load to run")
        injected = time.monotonic()
        {**FAULTS, **SPLIT_FAULTS}[name](fm)
        fm.settle(timeout=settle_timeout)
        settled = time.monotonic()
        wait_for(lambda: any(o.kind == "ok" and o.start >= settled for o in list(load.outcomes)),
                 timeout=settle_timeout, what="a request served after the recovery")
    outcomes = load.outcomes
    row.requests = len(outcomes)
    row.failed = sum(o.kind != "ok" for o in outcomes)
    row.cut = sum(o.kind == "cut" for o in outcomes)
    row.wrong = sum(o.kind == "ok" and o.text != reference for o in outcomes)
    row.resumed = failovers(fm.c, stage="mid_stream") - before[0]
    row.retried = failovers(fm.c, stage="before_start") - before[1]
    served_after = [o.end for o in outcomes if o.kind == "ok" and o.start >= injected]
    row.serve_again_s = min(served_after) - injected if served_after else None
    failed_after = [o.end for o in outcomes if o.kind != "ok" and o.end >= injected]
    row.errors_for_s = max(failed_after) - injected if failed_after else 0.0
    row.duplicates = fm.duplicates_once_settled()
    row.lost = fm.lost()
    details = sorted({o.detail for o in outcomes if o.kind != "ok"})
    row.notes = "; ".join(details)[:160]
    return row


def reference_text(fm: FaultMesh, *, max_tokens: int) -> str:
    outcome = stream_once(fm.c.api, max_tokens=max_tokens)
    assert outcome.kind == "ok", outcome
    return outcome.text


def table(rows: list[FaultRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
