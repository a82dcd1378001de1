"""What routing a request through another node of the mesh costs, measured side by side in one run.

A request sent to any node's :9337 for a model served elsewhere crosses the mesh in one QUIC stream
(``meshllm/tunnels/http.py``): node B takes the HTTP request, opens an HTTP-kind stream to node A, A forwards
it to its llama-server and sends the response back one QUIC message per upstream chunk. This bench starts
two real node processes on their own loopback addresses (A serves the model, B joins with ``--client``) and
streams the same ``/v1/completions`` request, round-robin, to three targets that all end at the SAME
llama-server, so the ratios hold on a busy machine even when the absolute numbers do not:

- ``direct``: A's llama-server itself;
- ``local``: A's OpenAI proxy (one HTTP hop inside A's node process);
- ``routed``: B's OpenAI proxy, tunnelled over QUIC to A.

Two scenarios: plain loopback, then about 20 ms of round-trip time between the nodes. The kernel has no
netem (TESTBED.md), so each node sits behind a ``UdpRelay`` running in this process (``--delay-ms`` each
way) and advertises the relay's address: whichever side dials, the QUIC connection crosses a relay. The
bench checks that it does (the relays' packet counters, and the RTT the mesh itself measured).

Per request, client-side: decode tok/s ``(chunks - 1) / (last chunk - first chunk)``, time to the first
content chunk, total wall time, and the streamed text (greedy decoding: routed must equal direct). The CPU
time of both node processes, A's llama-server and this process is read from ``/proc`` around every
request, so the routing cost per 1,000 streamed tokens is attributable to each of them.

    MESHLLM_ENGINE_DIR=/tmp/eng/build/bin .venv/bin/python bench/routed.py [--tiny] [--rounds 20]

It prints tables and never asserts: benchmarks are not tests (STYLE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _common import cpu_seconds, get_json, percentile, retryable, stream_once

from meshllm.engine.process import stop_processes_now
from meshllm.store.mesh import InviteToken
from meshllm.testing.engines import engine_pids
from meshllm.testing.udp_relay import UdpRelay

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press"
TARGETS = ("direct", "local", "routed")
A_HOST, B_HOST = "127.0.0.2", "127.0.0.3"
RELAY_A_HOST, RELAY_B_HOST = "127.0.0.10", "127.0.0.11"
PROCESSES = ("b_node", "a_node", "a_llama", "bench")  # whose CPU time is read around every request
TARGET_MIN_RATIO = 0.95  # the target for routed/direct decode tok/s


# -- processes ----------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class NodeProcess:
    """A ``python -m meshllm`` subprocess with its own ports and state folder."""

    name: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    port: int
    console: int

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any] | None:
        status: dict[str, Any] | None = get_json(f"http://127.0.0.1:{self.console}/api/status")
        return status

    def invite(self) -> str | None:
        """The invite token, with the admin token from the node's state folder (as `meshllm token` does)."""
        try:
            admin = (self.state_dir / "admin.token").read_text().strip()
        except FileNotFoundError:
            return None
        answer = get_json(f"http://127.0.0.1:{self.console}/api/token", headers={"Authorization": f"Bearer {admin}"})
        return answer["token"] if answer else None

    def listed(self) -> set[str]:
        models = get_json(f"{self.api}/v1/models")
        return {m["id"] for m in models["data"]} if models else set()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"node {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        log = self.state_dir / "node.out"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def start_node(name: str, host: str, workdir: Path, *args: str) -> NodeProcess:
    state_dir = workdir / name
    state_dir.mkdir(parents=True)
    port, console = free_port(), free_port()
    cmd = [sys.executable, "-m", "meshllm", "--port", str(port), "--console", str(console),
           "--state-dir", str(state_dir), "--bind-host", host, *args]
    with (state_dir / "node.out").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return NodeProcess(name, state_dir, proc, port, console)


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, nodes: list[NodeProcess]) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail early if a node died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            node.check_alive()
        if result := check():
            return result
        time.sleep(0.25)
    logs = "\n".join(f"--- {n.name}:\n{n.log_tail()}" for n in nodes)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def stop_nodes(nodes: list[NodeProcess]) -> None:
    """SIGINT every node, as Ctrl-C would; wait; kill what ignores it and any llama-server left behind."""
    codes = stop_processes_now([node.proc for node in nodes], grace=30, first=signal.SIGINT)
    for node, code in zip(nodes, codes, strict=True):
        if code == -signal.SIGKILL:
            print(f"warning: node {node.name} ignored SIGINT for 30s; it was killed", file=sys.stderr)
    left = [(node.name, pid) for node in nodes for pid in engine_pids(node.state_dir)]
    for name, pid in left:
        print(f"warning: llama-server pid {pid} outlived node {name}; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    print(f"nodes stopped (exit codes {[n.proc.returncode for n in nodes]}); llama-server left running: "
          f"{[pid for _, pid in left] or 'none'}", file=sys.stderr)


# -- relays -------------------------------------------------------------------------------------
class RelayLoop:
    """An asyncio loop in a thread, running ``UdpRelay``s while the (synchronous) bench sends requests."""

    def __init__(self, *, delay: float) -> None:
        self.delay = delay  # one way, seconds
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="udp-relays", daemon=True)
        self.thread.start()
        self.relays: list[UdpRelay] = []

    def relay(self, listen: tuple[str, int], target: tuple[str, int]) -> UdpRelay:
        relay = UdpRelay(listen, target, delay=self.delay)
        asyncio.run_coroutine_threadsafe(relay.start(), self.loop).result(timeout=5)
        self.relays.append(relay)
        return relay

    def forwarded(self) -> list[int]:
        return [relay.forwarded for relay in self.relays]

    def close(self) -> None:
        for relay in self.relays:
            self.loop.call_soon_threadsafe(relay.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


# -- the two-node mesh --------------------------------------------------------------------------
@dataclass
class Mesh:
    """A serving A, a client B that routes to it, and where each of them can be reached."""

    a: NodeProcess
    b: NodeProcess
    model: str
    a_id: str
    b_id: str
    direct_url: str
    llama_pid: int
    relays: RelayLoop | None
    path: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        return {"b_node": self.b.proc.pid, "a_node": self.a.proc.pid, "a_llama": self.llama_pid,
                "bench": os.getpid()}


def _serving(a: NodeProcess) -> tuple[str, str, str, int] | None:
    """(A's node id, model, llama-server URL, its pid) once A's server is ready and listed."""
    status, listed = a.status(), a.listed()
    if status is None:
        return None
    me = status["node"]["id"]
    for model in status["models"]:
        for server in model["servers"]:
            if server["node"] == me and server["phase"] == "ready" and model["name"] in listed:
                return me, model["name"], f"http://127.0.0.1:{server['port']}", server["pid"]
    return None


def _behind_relays(relays: RelayLoop) -> tuple[list[str], list[str]]:
    """Put A and B each behind a relay: pinned QUIC ports, and the relay's address advertised.

    Advertising only the relay means that whichever node dials (B joining, or A redialling B after a
    lost connection), the connection crosses a relay, so every path between them has the added RTT.
    """
    a_port, b_port = free_port(A_HOST, socket.SOCK_DGRAM), free_port(B_HOST, socket.SOCK_DGRAM)
    to_a = relays.relay((RELAY_A_HOST, 0), (A_HOST, a_port))
    to_b = relays.relay((RELAY_B_HOST, 0), (B_HOST, b_port))
    return (["--bind-port", str(a_port), "--advertise", "{}:{}".format(*to_a.address)],
            ["--bind-port", str(b_port), "--advertise", "{}:{}".format(*to_b.address)])


def _invite(a: NodeProcess, relays: RelayLoop | None, nodes: list[NodeProcess]) -> str:
    """A's invite token; behind relays, rewritten to name only A's relay (B must not find A directly)."""
    token = InviteToken.decode(wait_for(a.invite, timeout=10, what="A's token",
                                        nodes=nodes))
    if relays is not None:
        token = InviteToken(token.credentials, ("{}:{}".format(*relays.relays[0].address),))
    return token.encode()


@contextlib.contextmanager
def two_nodes(model: str, workdir: Path, *, delay: float | None, threads: int,
              timeout: float) -> Iterator[Mesh]:
    """Start A then B (behind relays when ``delay`` is given); stop both, and the relays, on exit."""
    relays = RelayLoop(delay=delay) if delay is not None else None
    nodes: list[NodeProcess] = []
    try:
        a_extra, b_extra = _behind_relays(relays) if relays is not None else ([], [])
        threads_args = ["--threads", str(threads)] if threads else []
        a = start_node("a", A_HOST, workdir, "--model", model, *threads_args, *a_extra)
        nodes.append(a)
        a_id, name, direct_url, llama_pid = wait_for(lambda: _serving(a), timeout=timeout,
                                                     what="A to serve the model", nodes=nodes)
        b = start_node("b", B_HOST, workdir, "--client", *b_extra, "--join", _invite(a, relays, nodes))
        nodes.append(b)
        wait_for(lambda: name in b.listed(), timeout=60, what="B to list A's model", nodes=nodes)
        b_id = wait_for(lambda: (b.status() or {}).get("node", {}).get("id"), timeout=10, what="B's node id",
                        nodes=nodes)
        mesh = Mesh(a, b, model=name, a_id=a_id, b_id=b_id, direct_url=direct_url, llama_pid=llama_pid,
                    relays=relays)
        mesh.path = check_path(mesh, nodes)
        yield mesh
    finally:
        stop_nodes(nodes)
        if relays is not None:
            relays.close()


def _rtt_ms(node: NodeProcess, me: str, peer: str) -> float | None:
    for entry in (node.status() or {}).get("nodes", []):
        if entry["id"] == me and peer in entry.get("rtt_ms", {}):
            return float(entry["rtt_ms"][peer])
    return None


def check_path(mesh: Mesh, nodes: list[NodeProcess]) -> dict[str, Any]:
    """The RTT each side published for the other (every ~5 s) and which relay carries the connection."""
    def both() -> tuple[float, float] | None:
        b_to_a, a_to_b = _rtt_ms(mesh.b, mesh.b_id, mesh.a_id), _rtt_ms(mesh.a, mesh.a_id, mesh.b_id)
        return (b_to_a, a_to_b) if b_to_a is not None and a_to_b is not None else None

    b_to_a, a_to_b = wait_for(both, timeout=20, what="both nodes to publish their RTT", nodes=nodes)
    path: dict[str, Any] = {"b_rtt_to_a_ms": b_to_a, "a_rtt_to_b_ms": a_to_b}
    if mesh.relays is not None:
        before = mesh.relays.forwarded()
        time.sleep(1.0)  # the transport pings every 0.5 s: a live relayed connection forwards some
        path["relay_datagrams_per_s_idle"] = [n - b for n, b in zip(mesh.relays.forwarded(), before)]
    return path


# -- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One streamed request, as the client saw it, and the CPU each process spent meanwhile."""

    scenario: str
    round: int
    target: str
    wall_s: float
    ttft_s: float
    chunks: int
    decode_tps: float
    attempts: int
    text: str
    prompt_n: int  # prompt tokens llama-server evaluated: all of them when its prompt cache was cold
    cpu_s: dict[str, float]
    relay_datagrams: int


def measure(client: httpx.Client, body: dict[str, Any], *, scenario: str, target: str, round_: int,
            mesh: Mesh) -> Sample:
    """One request, retried (with a fresh clock, counted in ``attempts``) after a stale connection.

    llama-server closes the connection after every streamed response without saying so, so direct
    requests say ``Connection: close``; the proxies keep the client's connection and cope upstream.
    """
    headers = {"Connection": "close"} if target == "direct" else {}
    pids = mesh.pids()
    for attempt in range(1, 4):
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        relayed_before = sum(mesh.relays.forwarded()) if mesh.relays else 0
        try:
            timings: dict[str, Any] = {}
            wall, ttft, chunks, tps, text = stream_once(client, body, headers=headers, timings=timings)
        except httpx.HTTPError as exc:
            if attempt == 3 or not retryable(exc):
                raise
            print(f"\n  {scenario} {target} #{round_}: {exc!r}; retrying", file=sys.stderr)
            continue
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        relayed = sum(mesh.relays.forwarded()) - relayed_before if mesh.relays else 0
        return Sample(scenario=scenario, round=round_, target=target, wall_s=wall, ttft_s=ttft, chunks=chunks,
                      decode_tps=tps, attempts=attempt, text=text, cpu_s=cpu, relay_datagrams=relayed,
                      prompt_n=int(timings.get("prompt_n", -1)))
    raise AssertionError("unreachable")


def interleaved(mesh: Mesh, body: dict[str, Any], *, scenario: str, rounds: int, warmup: int,
                prime: bool = True) -> list[Sample]:
    """Round-robin over the three targets, rotating which goes first every round.

    ``prime``: one request straight to llama-server first, not counted. The first request a fresh
    llama-server sees evaluates the whole prompt in one batch; every later one finds it in the prompt
    cache and evaluates only its last token. On a GPU the two paths give slightly different logits
    (batched vs single-token kernels; llama.cpp documents it under ``cache_prompt``), enough to flip a
    greedy choice now and then. Unprimed, that first request is this bench's first routed stream."""
    urls = {"direct": mesh.direct_url, "local": mesh.a.api, "routed": mesh.b.api}
    clients = {t: httpx.Client(base_url=url, timeout=httpx.Timeout(300, connect=5), trust_env=False)
               for t, url in urls.items()}
    samples = []
    if prime:
        stream_once(clients["direct"], body, headers={"Connection": "close"})
    try:
        for round_ in range(-warmup, rounds):
            shift = round_ % len(TARGETS)
            for target in TARGETS[shift:] + TARGETS[:shift]:
                samples.append(measure(clients[target], body, scenario=scenario, target=target, round_=round_,
                                       mesh=mesh))
            print(f"\r  {scenario}: round {round_ + 1}/{rounds}" if round_ >= 0 else f"\r  {scenario}: warm-up",
                  end="", file=sys.stderr, flush=True)
    finally:
        for client in clients.values():
            client.close()
    print(file=sys.stderr)
    return samples


# -- summary ------------------------------------------------------------------------------------

def _target_summary(of: list[Sample]) -> dict[str, float]:
    tps, ttft, wall = [s.decode_tps for s in of], [s.ttft_s * 1e3 for s in of], [s.wall_s * 1e3 for s in of]
    tokens = sum(s.chunks for s in of)
    out = {"tps_p50": percentile(tps, 50), "tps_p10": percentile(tps, 10),
           "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p90": percentile(ttft, 90),
           "wall_ms_p50": percentile(wall, 50), "wall_ms_p90": percentile(wall, 90),
           "chunks_p50": percentile([float(s.chunks) for s in of], 50), "tokens": float(tokens),
           "retried": float(sum(s.attempts > 1 for s in of)),
           "relay_datagrams_p50": percentile([float(s.relay_datagrams) for s in of], 50)}
    out["wall_s_total"] = sum(s.wall_s for s in of)
    for name in PROCESSES:
        out[f"cpu_s_{name}"] = sum(s.cpu_s[name] for s in of)
        out[f"cpu_ms_per_1k_{name}"] = out[f"cpu_s_{name}"] * 1e6 / tokens
    return out


def _net_cpu(per: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """CPU per 1,000 tokens above what each process spends per second while the client streams direct.

    Direct streams never touch the node processes, so their CPU rate then is background (gossip, pings,
    status polls); what a process spends above that rate during local or routed streams is the cost of
    relaying them. Subtracting a rate rather than a per-token figure keeps slower streams from looking
    dearer only because they lasted longer.
    """
    direct = per["direct"]
    rates = {name: direct[f"cpu_s_{name}"] / direct["wall_s_total"] for name in PROCESSES}
    net = {t: {name: (per[t][f"cpu_s_{name}"] - rates[name] * per[t]["wall_s_total"]) * 1e6 / per[t]["tokens"]
               for name in PROCESSES} for t in TARGETS}
    return {"direct_rate_ms_per_s": {name: rate * 1e3 for name, rate in rates.items()}, **net}


def _paired(by: dict[tuple[int, str], Sample], rounds: list[int], target: str) -> dict[str, float]:
    """Medians over rounds of the within-round ratio (tok/s) and differences (ms) against direct."""
    pairs = [(by[r, target], by[r, "direct"]) for r in rounds]
    return {"tps_ratio_paired": percentile([t.decode_tps / d.decode_tps for t, d in pairs], 50),
            "ttft_added_ms_paired": percentile([(t.ttft_s - d.ttft_s) * 1e3 for t, d in pairs], 50),
            "wall_added_ms_paired": percentile([(t.wall_s - d.wall_s) * 1e3 for t, d in pairs], 50)}


def summarize(samples: list[Sample]) -> dict[str, Any]:
    counted = [s for s in samples if s.round >= 0]
    per = {t: _target_summary([s for s in counted if s.target == t]) for t in TARGETS}
    by = {(s.round, s.target): s for s in counted}
    rounds = sorted({s.round for s in counted})
    reference = next(s.text for s in samples if s.target == "direct")
    out: dict[str, Any] = {"targets": per, "reference_text": reference, "net_cpu_ms_per_1k": _net_cpu(per)}
    for target in ("local", "routed"):
        mine, direct = per[target], per["direct"]
        out[target] = {
            "tps_ratio": mine["tps_p50"] / direct["tps_p50"],
            "tps_ratio_p10": mine["tps_p10"] / direct["tps_p10"],
            "ttft_added_ms": mine["ttft_ms_p50"] - direct["ttft_ms_p50"],
            "wall_added_us_per_chunk": (mine["wall_ms_p50"] - direct["wall_ms_p50"]) * 1e3 / mine["chunks_p50"],
            **_paired(by, rounds, target),
        }
        out[target]["wall_added_us_per_chunk_paired"] = out[target]["wall_added_ms_paired"] * 1e3 / mine["chunks_p50"]
    out["text_mismatches"] = {t: sum(s.text != reference for s in samples if s.target == t) for t in TARGETS}
    out["text_compared"] = {t: sum(1 for s in samples if s.target == t) for t in TARGETS}
    full = max(s.prompt_n for s in samples)
    out["cold_prompt"] = {t: sum(1 for s in samples if s.target == t and s.prompt_n == full > 1) for t in TARGETS}
    return out


def _row(label: str, values: list[float], fmt: str, *, ratio: bool) -> str:
    direct, local, routed = values
    cells = "".join(f"{v:>10{fmt}}" for v in values)
    if ratio:
        return f"  {label:<24}{cells}{local / direct:>13.3f}x{routed / direct:>13.3f}x"
    return f"  {label:<24}{cells}{local - direct:>+11.2f} ms{routed - direct:>+11.2f} ms"


def scenario_table(name: str, mesh: Mesh, summary: dict[str, Any]) -> list[str]:
    per = summary["targets"]
    col = {key: [per[t][key] for t in TARGETS] for key in per["direct"]}
    path = mesh.path
    lines = [f"\n== {name}: RTT measured by the mesh B->A {path['b_rtt_to_a_ms']:.2f} ms, "
             f"A->B {path['a_rtt_to_b_ms']:.2f} ms",
             f"  {'':<24}{'direct':>10}{'local':>10}{'routed':>10}{'local/direct':>14}{'routed/direct':>14}",
             _row("decode tok/s p50", col["tps_p50"], ".1f", ratio=True),
             _row("decode tok/s p10 (slow)", col["tps_p10"], ".1f", ratio=True),
             _row("TTFT ms p50", col["ttft_ms_p50"], ".2f", ratio=False),
             _row("TTFT ms p90", col["ttft_ms_p90"], ".2f", ratio=False),
             _row("wall ms p50", col["wall_ms_p50"], ".1f", ratio=False),
             _row("wall ms p90", col["wall_ms_p90"], ".1f", ratio=False)]
    local, routed = summary["local"], summary["routed"]
    if per["direct"]["wall_ms_p50"] < 250:
        lines.append("  (streams last under 0.25 s: chunks arrive in bursts, so decode tok/s measures bursts, not "
                     "decoding; read the wall time per chunk instead)")
    lines += [f"  {'paired (median in-round)':<54}{local['tps_ratio_paired']:>13.3f}x"
              f"{routed['tps_ratio_paired']:>13.3f}x   decode ratio",
              f"  {'':<54}{local['ttft_added_ms_paired']:>+11.2f} ms{routed['ttft_added_ms_paired']:>+11.2f} ms"
              f"   TTFT added",
              f"  added wall per streamed chunk vs direct ({per['routed']['chunks_p50']:.0f} chunks): "
              f"local {local['wall_added_us_per_chunk']:+.0f} µs, routed {routed['wall_added_us_per_chunk']:+.0f} µs "
              f"(paired: {local['wall_added_us_per_chunk_paired']:+.0f} / "
              f"{routed['wall_added_us_per_chunk_paired']:+.0f} µs)"]
    bad, seen = summary["text_mismatches"], summary["text_compared"]
    verdict = {t: "OK" if bad[t] == 0 else f"MISMATCH ({bad[t]} of {seen[t]})" for t in TARGETS}
    lines.append(f"  greedy text vs the first direct stream: routed {verdict['routed']}, local {verdict['local']}, "
                 f"direct {verdict['direct']} ({seen['routed']} routed streams compared)")
    cold = summary["cold_prompt"]
    lines.append(f"  streams that met a cold prompt cache (whole prompt evaluated): routed {cold['routed']}, "
                 f"local {cold['local']}, direct {cold['direct']}")
    net = summary["net_cpu_ms_per_1k"]
    lines.append(f"  CPU ms per 1,000 streamed tokens  {'as measured':^30} | {'net of direct rate':^22} | rate during")
    lines.append(f"  {'':<32}{'direct':>10}{'local':>10}{'routed':>10} | {'local':>12}{'routed':>10} | direct")
    for proc, label in (("b_node", "B node (routes)"), ("a_node", "A node (serves tunnel)"),
                        ("a_llama", "A llama-server"), ("bench", "bench (client+relays)")):
        values = "".join(f"{per[t][f'cpu_ms_per_1k_{proc}']:>10.0f}" for t in TARGETS)
        lines.append(f"    {label:<28}{values} | {net['local'][proc]:>+12.0f}{net['routed'][proc]:>+10.0f} | "
                     f"{net['direct_rate_ms_per_s'][proc]:.0f} ms/s")
    retried = {t: int(per[t]["retried"]) for t in TARGETS}
    lines.append(f"  requests retried after a stale connection: {retried}")
    if mesh.relays is not None:
        lines.append("  relay datagrams forwarded per request (p50): " + ", ".join(
            f"{t} {per[t]['relay_datagrams_p50']:.0f}" for t in TARGETS)
            + f"; idle per relay (A's, B's) per s: {path['relay_datagrams_per_s_idle']}")
        if per["routed"]["relay_datagrams_p50"] < per["routed"]["chunks_p50"] / 8 and per["direct"]["wall_ms_p50"] > 250:
            lines.append("  WARNING: routed streams hardly crossed the relays; the nodes may have found a direct path")
        if min(path["b_rtt_to_a_ms"], path["a_rtt_to_b_ms"]) < 1.5 * mesh.relays.delay * 1e3:
            lines.append(f"  WARNING: the RTT the mesh measured is well below the {2 * mesh.relays.delay * 1e3:g} ms "
                         "the relays add")
    return lines


# -- command line -------------------------------------------------------------------------------
def _scenarios(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or set(names) - {"loopback", "rtt"}:
        raise argparse.ArgumentTypeError("choose from loopback, rtt")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="gemma-3-270m", help="model name or .gguf path (default gemma-3-270m)")
    parser.add_argument("--tiny", action="store_true", help="bench a generated tiny dense model instead")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per scenario (default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    parser.add_argument("--no-prime", action="store_true",
                        help="no uncounted request before the rounds: the first stream meets a cold prompt cache")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    parser.add_argument("--delay-ms", type=float, default=10.0,
                        help="one-way delay of each relay in the RTT scenario (default 10: ~20 ms RTT)")
    parser.add_argument("--scenarios", default="loopback,rtt", type=_scenarios,
                        help="which to run, comma-separated (default loopback,rtt)")
    parser.add_argument("--threads", type=int, default=0, help="A's llama-server --threads (default: its own)")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for A to serve")
    parser.add_argument("--json", type=Path, help="write every sample and the summaries here")
    return parser.parse_args(argv)


def run_scenario(name: str, model: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    delay = args.delay_ms / 1e3 if name == "rtt" else None
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    with two_nodes(model, workdir / name, delay=delay, threads=args.threads, timeout=args.ready_timeout) as mesh:
        body["model"] = mesh.model
        print(f"{name}: A {mesh.a_id} serves {mesh.model} (llama-server {mesh.direct_url}, pid {mesh.llama_pid}), "
              f"B {mesh.b_id} routes; path {mesh.path}", file=sys.stderr)
        samples = interleaved(mesh, body, scenario=name, rounds=args.rounds, warmup=args.warmup,
                              prime=not args.no_prime)
        summary = summarize(samples)
        title = "loopback" if delay is None else f"+{args.delay_ms:g} ms each way through UDP relays"
        table = scenario_table(title, mesh, summary)
        info = {"model": mesh.model, "a": mesh.a_id, "b": mesh.b_id, "path": mesh.path,
                "relay_forwarded_total": mesh.relays.forwarded() if mesh.relays else []}
    return {"mesh": info, "summary": summary, "table": table, "samples": [asdict(s) for s in samples]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshllm-routed-") as tmp:
        model = args.model
        if args.tiny:
            from meshllm.engine.tinygguf import write_dense
            model = str(write_dense(Path(tmp) / "tiny-dense.gguf"))
        for name in args.scenarios:
            results[name] = run_scenario(name, model, Path(tmp), args)
            print("\n".join(results[name]["table"]), file=sys.stderr)  # early, in case a later one fails
            if args.json:  # after each scenario, for the same reason
                args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 **{n: {k: v for k, v in r.items() if k != "table"}
                                                    for n, r in results.items()}}, indent=1))
    print(f"\nrouted vs direct: {Path(model).name}, {args.rounds} rounds (+{args.warmup} warm-up) x "
          f"{len(TARGETS)} targets round-robin, max_tokens {args.max_tokens}, temperature 0, ignore_eos"
          + (f", llama-server --threads {args.threads}" if args.threads else ""))
    for result in results.values():
        print("\n".join(result["table"]))
    print()
    for name, result in results.items():
        ratio = result["summary"]["routed"]["tps_ratio"]
        print(f"{name}: routed/direct decode {ratio:.3f}x ({'meets' if ratio >= TARGET_MIN_RATIO else 'MISSES'} "
              f"the {TARGET_MIN_RATIO} target)")


if __name__ == "__main__":
    main()
