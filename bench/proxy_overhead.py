"""What the node's OpenAI proxy (:9337) costs on top of llama-server, measured side by side in one run.

Every request a client sends to a node goes through ``meshllm/api/openai.py``, which relays llama-server's
response byte for byte. That relay must not slow decoding down or add latency anyone would notice. This bench
starts a real node as a subprocess (exactly as a user would), finds the llama-server it launched, and sends the
same ``/v1/completions`` requests alternately straight to llama-server ("direct") and through the node
("proxied"). Both paths hit the SAME llama-server process and share whatever else the machine is doing, so the
ratios are meaningful even on a noisy machine; the absolute numbers are not.

Measured client-side, per request: time to first content chunk (streaming) or total latency (non-streaming),
and decode tokens/s (streaming: ``(chunks - 1) / (t_last - t_first)``; non-streaming: ``completion_tokens /
wall``). A separate phase streams through the proxy back to back while reading the node's CPU time from
``/proc``, so the proxy's CPU per streamed token is attributable; the same phase run direct gives the node's
background CPU to subtract.

    MESHLLM_ENGINE_DIR=/tmp/eng/build/bin .venv/bin/python bench/proxy_overhead.py [--tiny] [--rounds 20]

It prints a table and never asserts: benchmarks are not tests (see STYLE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press"
TARGETS = ("direct", "proxied")


@dataclass(frozen=True)
class Node:
    """A running node subprocess and the llama-server it started for the one model it serves."""

    pid: int
    model: str
    proxied_url: str
    direct_url: str
    llama_pid: int


@dataclass(frozen=True)
class Sample:
    """One request, as the client saw it. ``ttft_s`` equals ``wall_s`` for non-streaming requests."""

    phase: str
    round: int
    target: str
    mode: str
    wall_s: float
    ttft_s: float
    tokens: int
    decode_tps: float
    node_cpu_s: float
    attempts: int


# -- the node subprocess ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _get_json(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=2, trust_env=False)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _wait_ready(proc: subprocess.Popen[bytes], port: int, console: int, *, timeout: float,
                log: Path) -> Node:
    """Poll until /v1/models lists the model and /api/status shows its llama-server ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        models = _get_json(f"http://127.0.0.1:{port}/v1/models")
        status = _get_json(f"http://127.0.0.1:{console}/api/status") if models and models["data"] else None
        for model in (status or {}).get("models", []):
            for server in model["servers"]:
                if model["name"] == models["data"][0]["id"] and server["phase"] == "ready":
                    return Node(pid=proc.pid, model=model["name"], proxied_url=f"http://127.0.0.1:{port}",
                                direct_url=f"http://127.0.0.1:{server['port']}", llama_pid=server["pid"])
        time.sleep(0.25)
    raise TimeoutError(f"the node was not serving within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextmanager
def running_node(model: str, *, state_dir: Path, threads: int, timeout: float) -> Iterator[Node]:
    """``python -m meshllm --model MODEL`` on free ports; stopped with SIGINT, as a user would, on exit."""
    port, console = free_port(), free_port()
    cmd = [sys.executable, "-m", "meshllm", "--model", model, "--port", str(port), "--console", str(console),
           "--state-dir", str(state_dir)]
    if threads:
        cmd += ["--threads", str(threads)]
    log = state_dir / "node.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    llama_pid = 0
    try:
        node = _wait_ready(proc, port, console, timeout=timeout, log=log)
        llama_pid = node.llama_pid
        yield node
    finally:
        _stop_node(proc, llama_pid)


def _stop_node(proc: subprocess.Popen[bytes], llama_pid: int) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print(f"warning: node pid {proc.pid} ignored SIGINT for 30s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()
    if llama_pid and _alive(llama_pid):
        print(f"warning: llama-server pid {llama_pid} outlived its node; killing it", file=sys.stderr)
        os.kill(llama_pid, signal.SIGKILL)


# -- requests -----------------------------------------------------------------------------------
def _content_chunk(event: bytes) -> bool:
    """Whether one SSE event carries generated text (not the final usage event, not ``[DONE]``)."""
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return False
    choices = json.loads(event[6:]).get("choices") or [{}]
    return bool(choices[0].get("text"))


def stream_once(client: httpx.Client, body: dict[str, Any], *,
                headers: dict[str, str]) -> tuple[float, float, int, float]:
    """One streaming request: (wall s, time to first content chunk s, content chunks, decode tok/s)."""
    stamps: list[float] = []
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=headers) as response:
        response.raise_for_status()
        pending = b""
        for raw in response.iter_raw():
            now = time.perf_counter()
            pending += raw
            *events, pending = pending.split(b"\n\n")
            stamps += [now for event in events if _content_chunk(event.strip())]
    wall = time.perf_counter() - start
    if len(stamps) < 2:
        raise RuntimeError(f"expected a stream of content chunks, got {len(stamps)}")
    return wall, stamps[0] - start, len(stamps), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def complete_once(client: httpx.Client, body: dict[str, Any], *,
                  headers: dict[str, str]) -> tuple[float, float, int, float]:
    """One non-streaming request: (wall s, wall s, completion tokens, completion tokens / wall)."""
    start = time.perf_counter()
    response = client.post("/v1/completions", json={**body, "stream": False}, headers=headers)
    wall = time.perf_counter() - start
    response.raise_for_status()
    tokens = int(response.json()["usage"]["completion_tokens"])
    return wall, wall, tokens, tokens / wall


def _headers(target: str, mode: str) -> dict[str, str]:
    """llama-server closes the connection after every streamed response, without saying so (its chunked
    content provider returns false after ``sink.done()``, which cpp-httplib takes for a failure). Saying
    ``Connection: close`` on direct streams keeps the client from reusing that dead connection; the proxy
    keeps the client's connection alive and must cope with the closed one upstream itself."""
    return {"Connection": "close"} if (target, mode) == ("direct", "stream") else {}


def _retryable(exc: httpx.HTTPError) -> bool:
    """A stale kept-alive connection: llama-server closed it (direct), or the proxy answered 503 for that."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 503
    return isinstance(exc, httpx.RemoteProtocolError)


def measure(client: httpx.Client, body: dict[str, Any], *, mode: str, target: str, phase: str,
            round_: int, node_pid: int) -> Sample:
    """One request, retried (with a fresh clock, and counted in ``attempts``) after a stale connection."""
    once = stream_once if mode == "stream" else complete_once
    for attempt in range(1, 4):
        cpu_before = cpu_seconds(node_pid)
        try:
            wall, ttft, tokens, tps = once(client, body, headers=_headers(target, mode))
        except httpx.HTTPError as exc:
            if attempt == 3 or not _retryable(exc):
                raise
            print(f"\n  {phase} {target} {mode} #{round_}: {exc!r}; retrying", file=sys.stderr)
            continue
        return Sample(phase=phase, round=round_, target=target, mode=mode, wall_s=wall, ttft_s=ttft,
                      tokens=tokens, decode_tps=tps, node_cpu_s=cpu_seconds(node_pid) - cpu_before,
                      attempts=attempt)
    raise AssertionError("unreachable")


# -- phases -------------------------------------------------------------------------------------
def interleaved(clients: dict[str, httpx.Client], body: dict[str, Any], *, rounds: int, warmup: int,
                node_pid: int) -> list[Sample]:
    """Alternate direct and proxied, swapping which goes first every round, for both modes."""
    samples = []
    for round_ in range(-warmup, rounds):
        order = TARGETS if round_ % 2 == 0 else TARGETS[::-1]
        for mode in ("nonstream", "stream"):
            for target in order:
                sample = measure(clients[target], body, mode=mode, target=target, node_pid=node_pid,
                                 phase="warmup" if round_ < 0 else "interleaved", round_=round_)
                samples.append(sample)
        if round_ >= 0:
            print(f"\r  round {round_ + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return samples


def cpu_phase(clients: dict[str, httpx.Client], body: dict[str, Any], *, requests: int,
              node_pid: int) -> dict[str, dict[str, float]]:
    """Stream ``requests`` times direct, then as many proxied, reading the node's CPU around each block.

    During the direct block the node only does its background work, so that block's CPU is the baseline.
    """
    result = {}
    for target in TARGETS:
        cpu_before, start = cpu_seconds(node_pid), time.perf_counter()
        tokens = sum(measure(clients[target], body, mode="stream", target=target, phase="cpu", round_=i,
                             node_pid=node_pid).tokens for i in range(requests))
        result[target] = {"node_cpu_s": cpu_seconds(node_pid) - cpu_before, "tokens": tokens,
                          "wall_s": time.perf_counter() - start}
    return result


# -- summary ------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mode_summary(samples: list[Sample], mode: str) -> dict[str, float]:
    """Direct vs proxied for one mode: p50 and tail of decode rate and TTFT, and paired differences."""
    mine = [s for s in samples if s.phase == "interleaved" and s.mode == mode]
    out: dict[str, float] = {}
    for target in TARGETS:
        of = [s for s in mine if s.target == target]
        tps, ttft = [s.decode_tps for s in of], [s.ttft_s * 1e3 for s in of]
        out |= {f"{target}_tps_p50": percentile(tps, 50), f"{target}_tps_p10": percentile(tps, 10),
                f"{target}_ttft_ms_p50": percentile(ttft, 50), f"{target}_ttft_ms_p90": percentile(ttft, 90),
                f"{target}_wall_ms_p50": percentile([s.wall_s * 1e3 for s in of], 50),
                f"{target}_tokens_p50": percentile([float(s.tokens) for s in of], 50)}
    by_round = {(s.round, s.target): s for s in mine}
    rounds = sorted({s.round for s in mine})
    paired_ttft = [(by_round[r, "proxied"].ttft_s - by_round[r, "direct"].ttft_s) * 1e3 for r in rounds]
    paired_tps = [by_round[r, "proxied"].decode_tps / by_round[r, "direct"].decode_tps for r in rounds]
    out |= {"tps_ratio": out["proxied_tps_p50"] / out["direct_tps_p50"],
            "tps_ratio_paired_p50": percentile(paired_tps, 50),
            "ttft_added_ms_p50": out["proxied_ttft_ms_p50"] - out["direct_ttft_ms_p50"],
            "ttft_added_ms_p90": out["proxied_ttft_ms_p90"] - out["direct_ttft_ms_p90"],
            "ttft_added_ms_paired_p50": percentile(paired_ttft, 50)}
    return out


def summarize(samples: list[Sample], cpu: dict[str, dict[str, float]]) -> dict[str, Any]:
    stream = _mode_summary(samples, "stream")
    chunks = stream["proxied_tokens_p50"]
    wall_added_ms = stream["proxied_wall_ms_p50"] - stream["direct_wall_ms_p50"]
    per_1k = {t: cpu[t]["node_cpu_s"] * 1e3 / cpu[t]["tokens"] * 1e3 for t in TARGETS}
    return {
        "stream": stream,
        "nonstream": _mode_summary(samples, "nonstream"),
        "stream_wall_added_us_per_chunk": wall_added_ms * 1e3 / chunks,
        "node_cpu_ms_per_1k_tokens_proxied": per_1k["proxied"],
        "node_cpu_ms_per_1k_tokens_background": per_1k["direct"],
        "proxy_cpu_us_per_chunk": per_1k["proxied"] - per_1k["direct"],  # ms per 1,000 = µs per one
    }


def print_report(node: Node, args: argparse.Namespace, summary: dict[str, Any],
                 cpu: dict[str, dict[str, float]]) -> None:
    print(f"\nproxy overhead: model {node.model}, {args.rounds} interleaved rounds, max_tokens {args.max_tokens}, "
          f"node pid {node.pid}, llama-server pid {node.llama_pid}")
    print(f"{'':12}{'metric':<14}{'direct p50':>12}{'proxied p50':>13}{'proxied/direct':>16}"
          f"{'paired p50':>12}{'direct tail':>13}{'proxied tail':>14}{'Δ tail':>10}")
    for mode, label in (("stream", "streaming"), ("nonstream", "non-stream")):
        m = summary[mode]
        print(f"{label:<12}{'decode tok/s':<14}{m['direct_tps_p50']:>12.1f}{m['proxied_tps_p50']:>13.1f}"
              f"{m['tps_ratio']:>15.3f}x{m['tps_ratio_paired_p50']:>11.3f}x"
              f"{m['direct_tps_p10']:>13.1f}{m['proxied_tps_p10']:>14.1f}"
              f"{m['proxied_tps_p10'] / m['direct_tps_p10']:>9.3f}x")
        metric = "TTFT ms" if mode == "stream" else "latency ms"
        print(f"{'':<12}{metric:<14}{m['direct_ttft_ms_p50']:>12.2f}{m['proxied_ttft_ms_p50']:>13.2f}"
              f"{m['ttft_added_ms_p50']:>+13.2f} ms{m['ttft_added_ms_paired_p50']:>+9.2f} ms"
              f"{m['direct_ttft_ms_p90']:>10.2f}{m['proxied_ttft_ms_p90']:>14.2f}"
              f"{m['ttft_added_ms_p90']:>+7.2f} ms")
    print("tail = p90 for times, p10 (the slow end) for tok/s; paired = median over rounds of proxied vs direct")
    s = summary["stream"]
    print(f"\nper streamed chunk: wall p50 direct {s['direct_wall_ms_p50']:.1f} ms, proxied "
          f"{s['proxied_wall_ms_p50']:.1f} ms over {s['proxied_tokens_p50']:.0f} chunks -> "
          f"{summary['stream_wall_added_us_per_chunk']:+.1f} µs added per chunk")
    print(f"node CPU ({args.cpu_requests} streams each, back to back): proxied "
          f"{summary['node_cpu_ms_per_1k_tokens_proxied']:.1f} ms per 1,000 tokens "
          f"({cpu['proxied']['node_cpu_s'] * 1e3:.0f} ms for {cpu['proxied']['tokens']:.0f}); background while "
          f"streaming direct {summary['node_cpu_ms_per_1k_tokens_background']:.1f} ms per 1,000 -> proxy "
          f"{summary['proxy_cpu_us_per_chunk']:.0f} µs CPU per chunk")


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="gemma-3-270m", help="model name or .gguf path (default gemma-3-270m)")
    parser.add_argument("--tiny", action="store_true", help="bench a generated tiny dense model instead")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds measured but not counted (default 2)")
    parser.add_argument("--cpu-requests", type=int, default=0,
                        help="streams per target in the CPU phase (default: --rounds)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="llama-server --threads (default: its own)")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for the node")
    parser.add_argument("--json", type=Path, help="write raw samples and the summary here")
    args = parser.parse_args(argv)
    args.cpu_requests = args.cpu_requests or args.rounds
    return args


def run(args: argparse.Namespace, workdir: Path) -> None:
    model = args.model
    if args.tiny:
        from meshllm.engine.tinygguf import write_dense
        model = str(write_dense(workdir / "tiny-dense.gguf"))
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    with running_node(model, state_dir=workdir / "state", threads=args.threads,
                      timeout=args.ready_timeout) as node:
        body["model"] = node.model
        print(f"node {node.pid} serving {node.model}: proxied {node.proxied_url}, direct {node.direct_url}",
              file=sys.stderr)
        clients = {t: httpx.Client(base_url=url, timeout=httpx.Timeout(300, connect=5), trust_env=False)
                   for t, url in zip(TARGETS, (node.direct_url, node.proxied_url))}
        try:
            samples = interleaved(clients, body, rounds=args.rounds, warmup=args.warmup, node_pid=node.pid)
            cpu = cpu_phase(clients, body, requests=args.cpu_requests, node_pid=node.pid)
        finally:
            for client in clients.values():
                client.close()
    summary = summarize(samples, cpu)
    print_report(node, args, summary, cpu)
    if args.json:
        raw = {"args": {k: str(v) for k, v in vars(args).items()}, "node": asdict(node), "summary": summary,
               "cpu_phase": cpu, "samples": [asdict(s) for s in samples]}
        args.json.write_text(json.dumps(raw, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-") as tmp:
        (Path(tmp) / "state").mkdir()
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
