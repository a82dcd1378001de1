"""What the node's OpenAI proxy (:9337) costs on top of llama-server, measured side by side in one run.

Every request a client sends to a node goes through ``meshllm/api/openai.py``, which relays llama-server's
response byte for byte. That relay must not slow decoding down or add latency anyone would notice. This bench
starts a real node as a subprocess (exactly as a user would), finds the llama-server it launched, and sends the
same ``/v1/completions`` requests alternately straight to llama-server ("direct") and through the node
("proxied"). Both paths hit the SAME llama-server process and share whatever else the machine is doing, so the
ratios are meaningful even on a noisy machine; the absolute numbers are not.

Measured client-side, per request: time to first content chunk (streaming) or total latency (non-streaming),
from many short requests in rounds of their own, and from full-length requests decode tokens/s (streaming: ``(chunks - 1) / (t_last - t_first)``; non-streaming: ``completion_tokens /
wall``). The node's CPU time is read from ``/proc`` around every request: while a stream goes direct the node
only does its background work, so what the proxied streams took above that rate is the proxy's CPU.

Requests within a round run back to back, so the "paired" columns (the median over rounds of proxied vs direct
within a round) are the ones to trust when other jobs come and go; the plain p50 columns drift with them.

    MESHLLM_ENGINE_DIR=/tmp/eng/build/bin .venv/bin/python bench/proxy_overhead.py [--tiny] [--rounds 20]

``--api-key`` starts two such nodes, one open and one requiring an API key, and runs both pairs in every
round: per round, what the keyed node's proxy adds over its llama-server minus what the open node's adds is
the key's cost, printed with its spread across rounds (the noise), beside the gate's own cost in process.

It prints a table and never asserts: benchmarks are not tests (see STYLE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from meshllm.api.keys import new_key

from _common import cpu_seconds, get_json, percentile, retryable, stream_once

from meshllm.engine.process import stop_process_now

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press"
TARGETS = ("direct", "proxied")
MODES = ("nonstream", "stream", "first", "first-stream")
DECODE_MODES, TTFT_MODES = MODES[:2], MODES[2:]


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
    pair: str = ""  # --api-key: which node ("open" or "keyed")


@dataclass(frozen=True)
class Pair:
    """One node's two targets (its llama-server straight, and its proxy) and the node's pid."""

    name: str
    clients: dict[str, httpx.Client]
    node_pid: int


# -- the node subprocess ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _engine_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) llama.cpp server process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X") and b"-server" in cmdline


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return found



def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _wait_ready(proc: subprocess.Popen[bytes], port: int, console: int, *, timeout: float,
                log: Path, key: str = "") -> Node:
    """Poll until /v1/models lists the model and /api/status shows its llama-server ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        models = get_json(f"http://127.0.0.1:{port}/v1/models", headers=_auth(key))
        status = get_json(f"http://127.0.0.1:{console}/api/status") if models and models["data"] else None
        for model in (status or {}).get("models", []):
            for server in model["servers"]:
                if model["name"] == models["data"][0]["id"] and server["phase"] == "ready":
                    return Node(pid=proc.pid, model=model["name"], proxied_url=f"http://127.0.0.1:{port}",
                                direct_url=f"http://127.0.0.1:{server['port']}", llama_pid=server["pid"])
        time.sleep(0.25)
    raise TimeoutError(f"the node was not serving within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_node(model: str, *, state_dir: Path, threads: int, timeout: float, key: str = "",
                 tree: Path | None = None) -> Iterator[Node]:
    """``python -m meshllm --model MODEL`` on free ports; stopped with SIGINT, as a user would, on exit.
    ``key``: the node requires it (given as MESHLLM_API_KEY). ``tree``: run the meshllm of that source
    tree instead of this one (``--baseline``)."""
    port, console = free_port(), free_port()
    cmd = [sys.executable, "-m", "meshllm", "--model", model, "--port", str(port), "--console", str(console),
           "--state-dir", str(state_dir)]
    if threads:
        cmd += ["--threads", str(threads)]
    log = state_dir / "node.out"
    with log.open("wb") as out:
        env = {**os.environ, **({"MESHLLM_API_KEY": key} if key else {}),
               **({"PYTHONPATH": str(tree)} if tree else {})}
        proc = subprocess.Popen(cmd, cwd=tree or REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    llama_pid = 0
    try:
        node = _wait_ready(proc, port, console, timeout=timeout, log=log, key=key)
        llama_pid = node.llama_pid
        yield node
    finally:
        _stop_node(proc, llama_pid)


def _stop_node(proc: subprocess.Popen[bytes], llama_pid: int) -> None:
    """SIGINT, as Ctrl-C would: the node stops its llama-server itself. Whatever outlives it is killed."""
    engines = {pid for pid in _children(proc.pid) | {llama_pid} if pid and _engine_alive(pid)}
    if stop_process_now(proc, grace=30, first=signal.SIGINT) == -signal.SIGKILL:
        print(f"warning: node pid {proc.pid} ignored SIGINT for 30s; it was killed", file=sys.stderr)
    left = sorted(pid for pid in engines if _engine_alive(pid))
    for pid in left:
        print(f"warning: llama-server pid {pid} outlived its node; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    print(f"node stopped (exit {proc.returncode}); engine processes it had: {sorted(engines)}, "
          f"left running: {left or 'none'}", file=sys.stderr)


# -- requests -----------------------------------------------------------------------------------
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
    return {"Connection": "close"} if target == "direct" and mode in ("stream", "first-stream") else {}



def measure(client: httpx.Client, body: dict[str, Any], *, mode: str, target: str, phase: str,
            round_: int, node_pid: int) -> Sample:
    """One request, retried (with a fresh clock, and counted in ``attempts``) after a stale connection."""
    once = stream_once if mode.endswith("stream") and mode != "nonstream" else complete_once
    if mode == "first":  # non-streaming time to first token: the latency of a one-token completion
        body = {**body, "max_tokens": 1}
    elif mode == "first-stream":  # streaming time to first token, from short streams
        body = {**body, "max_tokens": 2}
    for attempt in range(1, 4):
        cpu_before = cpu_seconds(node_pid)
        try:
            wall, ttft, tokens, tps = once(client, body, headers=_headers(target, mode))[:4]
        except httpx.HTTPError as exc:
            if attempt == 3 or not retryable(exc):
                raise
            what = f"HTTP {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError) else repr(exc)
            print(f"\n  {phase} {target} {mode} #{round_}: {what}; retrying", file=sys.stderr)
            continue
        return Sample(phase=phase, round=round_, target=target, mode=mode, wall_s=wall, ttft_s=ttft,
                      tokens=tokens, decode_tps=tps, node_cpu_s=cpu_seconds(node_pid) - cpu_before,
                      attempts=attempt)
    raise AssertionError("unreachable")


# -- phases -------------------------------------------------------------------------------------
def interleaved(pairs: list[Pair], body: dict[str, Any], *, rounds: int, warmup: int,
                ttft_rounds: int) -> list[Sample]:
    """Alternate direct and proxied, swapping which goes first every round: first full-length requests
    (decode rate, CPU), then many short ones (time to first token, which varies more than 1 ms).
    With two pairs (--api-key), each round does both, swapping which pair goes first every round and which
    target goes first every two rounds: the first request after the other node's (slower: caches gone
    cold) then falls as often on each node's direct as on its proxied target."""
    samples = []
    for modes, count, label in ((DECODE_MODES, rounds, "round"), (TTFT_MODES, ttft_rounds, "TTFT round")):
        for round_ in range(-warmup, count):
            order = TARGETS if (round_ // len(pairs)) % 2 == 0 else TARGETS[::-1]
            for pair in pairs if round_ % 2 == 0 else pairs[::-1]:
                for mode in modes:
                    for target in order:
                        sample = measure(pair.clients[target], body, mode=mode, target=target,
                                         node_pid=pair.node_pid, round_=round_,
                                         phase="warmup" if round_ < 0 else "interleaved")
                        samples.append(replace(sample, pair=pair.name))
            if round_ >= 0:
                print(f"\r  {label} {round_ + 1}/{count}   ", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return samples


# -- summary ------------------------------------------------------------------------------------

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
    paired_wall = [(by_round[r, "proxied"].wall_s - by_round[r, "direct"].wall_s) * 1e3 for r in rounds]
    out |= {"tps_ratio": out["proxied_tps_p50"] / out["direct_tps_p50"],
            "tps_ratio_paired_p50": percentile(paired_tps, 50),
            "ttft_added_ms_p50": out["proxied_ttft_ms_p50"] - out["direct_ttft_ms_p50"],
            "ttft_added_ms_p90": out["proxied_ttft_ms_p90"] - out["direct_ttft_ms_p90"],
            "ttft_added_ms_paired_p50": percentile(paired_ttft, 50),
            "wall_added_ms_paired_p50": percentile(paired_wall, 50),
            "proxied_retried": sum(s.attempts > 1 for s in mine if s.target == "proxied"),
            "direct_retried": sum(s.attempts > 1 for s in mine if s.target == "direct")}
    return out


def node_cpu(samples: list[Sample]) -> dict[str, float]:
    """The node's CPU over the interleaved streams. While a stream goes direct the node only does its background
    work, which gives the background rate; what a proxied stream took above that rate is the proxy's. Medians
    over requests, so a request that stalled behind another job's burst does not skew them."""
    streams = [s for s in samples if s.phase == "interleaved" and s.mode == "stream"]
    direct = [s for s in streams if s.target == "direct"]
    proxied = [s for s in streams if s.target == "proxied"]
    background_per_s = sum(s.node_cpu_s for s in direct) / sum(s.wall_s for s in direct)
    per_1k = [s.node_cpu_s * 1e6 / s.tokens for s in proxied]
    proxy_per_chunk = [(s.node_cpu_s - background_per_s * s.wall_s) * 1e6 / s.tokens for s in proxied]
    return {"proxied_ms_per_1k_tokens_p50": percentile(per_1k, 50),
            "proxied_ms_per_1k_tokens_total": sum(s.node_cpu_s for s in proxied) * 1e6
            / sum(s.tokens for s in proxied),
            "background_ms_per_s": background_per_s * 1e3,
            "proxy_us_per_chunk_p50": percentile(proxy_per_chunk, 50)}


def summarize(samples: list[Sample]) -> dict[str, Any]:
    stream = _mode_summary(samples, "stream")
    chunks = stream["proxied_tokens_p50"]
    wall_added_ms = stream["proxied_wall_ms_p50"] - stream["direct_wall_ms_p50"]
    return {
        "stream": stream,
        "nonstream": _mode_summary(samples, "nonstream"),
        "first": _mode_summary(samples, "first"),
        "first_stream": _mode_summary(samples, "first-stream"),
        "stream_wall_added_us_per_chunk": wall_added_ms * 1e3 / chunks,
        "stream_wall_added_us_per_chunk_paired": stream["wall_added_ms_paired_p50"] * 1e3 / chunks,
        "node_cpu": node_cpu(samples),
    }


_HEADER = (f"{'':11}{'':13}{'direct':>10}{'proxied':>10}{'proxied vs':>13}{'paired':>11}"
           f"{'direct':>11}{'proxied':>10}{'Δ':>11}\n"
           f"{'':11}{'':13}{'p50':>10}{'p50':>10}{'direct p50':>13}{'p50':>11}"
           f"{'tail':>11}{'tail':>10}{'tail':>11}")


def _time_row(metric: str, m: dict[str, float]) -> str:
    return (f"{'':<11}{metric:<13}{m['direct_ttft_ms_p50']:>10.2f}{m['proxied_ttft_ms_p50']:>10.2f}"
            f"{m['ttft_added_ms_p50']:>+10.2f} ms{m['ttft_added_ms_paired_p50']:>+8.2f} ms"
            f"{m['direct_ttft_ms_p90']:>11.2f}{m['proxied_ttft_ms_p90']:>10.2f}"
            f"{m['ttft_added_ms_p90']:>+8.2f} ms")


def _table(summary: dict[str, Any]) -> list[str]:
    lines = [_HEADER]
    for mode, label in (("stream", "streaming"), ("nonstream", "non-stream")):
        first = summary["first_stream" if mode == "stream" else "first"]
        m = summary[mode]
        lines.append(f"{label:<11}{'decode tok/s':<13}{m['direct_tps_p50']:>10.1f}{m['proxied_tps_p50']:>10.1f}"
                     f"{m['tps_ratio']:>12.3f}x{m['tps_ratio_paired_p50']:>10.3f}x"
                     f"{m['direct_tps_p10']:>11.1f}{m['proxied_tps_p10']:>10.1f}"
                     f"{m['proxied_tps_p10'] / m['direct_tps_p10']:>10.3f}x")
        lines.append(_time_row("TTFT ms", first))
        if mode == "nonstream":
            lines.append(_time_row("latency ms", m))
    lines.append("tail: p90 for times, p10 (the slow end) for tok/s. paired: median over rounds of the "
                 "proxied/direct ratio or difference within a round.\nTTFT: from short requests in rounds "
                 "of their own (streaming: max_tokens 2, first content chunk; non-streaming: the latency of a "
                 "one-token completion)")
    return lines


def print_report(node: Node, args: argparse.Namespace, summary: dict[str, Any]) -> None:
    s, cpu = summary["stream"], summary["node_cpu"]
    retried = {t: sum(summary[m][f"{t}_retried"] for m in ("stream", "nonstream", "first", "first_stream"))
               for t in TARGETS}
    print(f"\nproxy overhead: {node.model}, {args.rounds} rounds and {args.ttft_rounds} TTFT rounds "
          f"(+{args.warmup} warm-up each), max_tokens {args.max_tokens}, direct {node.direct_url} vs proxied "
          f"{node.proxied_url}")
    print("\n".join(_table(summary)))
    print(f"\nper streamed chunk: wall p50 direct {s['direct_wall_ms_p50']:.1f} ms, proxied "
          f"{s['proxied_wall_ms_p50']:.1f} ms, {s['proxied_tokens_p50']:.0f} chunks -> "
          f"{summary['stream_wall_added_us_per_chunk']:+.1f} µs per chunk "
          f"(paired: {summary['stream_wall_added_us_per_chunk_paired']:+.1f} µs)")
    print(f"node CPU per 1,000 streamed tokens through the proxy: {cpu['proxied_ms_per_1k_tokens_p50']:.1f} ms "
          f"(p50 over requests; all requests together {cpu['proxied_ms_per_1k_tokens_total']:.1f} ms); node "
          f"background {cpu['background_ms_per_s']:.1f} ms/s -> proxy {cpu['proxy_us_per_chunk_p50']:.0f} µs CPU "
          "per chunk")
    print(f"requests retried after a stale connection: direct {retried['direct']}, proxied {retried['proxied']} "
          "(each proxied one is a 503 the proxy answered)")


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="gemma-3-270m", help="model name or .gguf path (default gemma-3-270m)")
    parser.add_argument("--tiny", action="store_true", help="bench a generated tiny dense model instead")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--ttft-rounds", type=int, default=60,
                        help="interleaved rounds of short requests for time to first token (default 60)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds measured but not counted (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="llama-server --threads (default: its own)")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for the node")
    parser.add_argument("--json", type=Path, help="write raw samples and the summary here")
    parser.add_argument("--api-key", action="store_true",
                        help="two nodes side by side, one open and one requiring an API key: what the key costs")
    parser.add_argument("--baseline", type=Path,
                        help="two nodes side by side: this tree's meshllm (after) and the one in this source tree "
                             "(before, e.g. an older commit unpacked there)")
    args = parser.parse_args(argv)
    return args


def run(args: argparse.Namespace, workdir: Path) -> None:
    model = args.model
    if args.tiny:
        from meshllm.engine.tinygguf import write_dense
        model = str(write_dense(workdir / "tiny-dense.gguf"))
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    key = new_key() if args.api_key else ""
    names = ("open", "keyed") if key else ("before", "after") if args.baseline else ("",)
    with contextlib.ExitStack() as stack:
        nodes, pairs = {}, []
        for name in names:
            state_dir = workdir / f"state-{name or 'node'}"
            state_dir.mkdir()
            node = nodes[name] = stack.enter_context(running_node(
                model, state_dir=state_dir, threads=args.threads, timeout=args.ready_timeout,
                key=key if name == "keyed" else "", tree=args.baseline if name == "before" else None))
            body["model"] = node.model
            print(f"node {node.pid} {name} serving {node.model}: proxied {node.proxied_url}, direct "
                  f"{node.direct_url}", file=sys.stderr)
            clients = {t: stack.enter_context(httpx.Client(
                base_url=url, timeout=httpx.Timeout(300, connect=5), trust_env=False,
                headers=_auth(key) if name == "keyed" and t == "proxied" else None))
                for t, url in zip(TARGETS, (node.direct_url, node.proxied_url))}
            pairs.append(Pair(name, clients, node.pid))
        samples = interleaved(pairs, body, rounds=args.rounds, warmup=args.warmup, ttft_rounds=args.ttft_rounds)
    summaries = {name: summarize([s for s in samples if s.pair == name]) for name in names}
    for name, node in nodes.items():
        if name:
            print(f"\n== the {name} node: " + (
                "every proxied request carries `Authorization: Bearer KEY`, checked by the gate" if name == "keyed"
                else "no API key" if name == "open" else f"meshllm from {args.baseline}" if name == "before"
                else f"meshllm from {REPO}"))
        print_report(node, args, summaries[name])
    costs = print_key_costs(samples) if key else None
    if args.json:
        raw = {"args": {k: str(v) for k, v in vars(args).items()}, "nodes": {n: asdict(v) for n, v in nodes.items()},
               "summary": summaries, "key_costs": costs, "samples": [asdict(s) for s in samples]}
        args.json.write_text(json.dumps(raw, indent=1))


# -- --api-key: the key's cost ----------------------------------------------------------------------
def key_cost(samples: list[Sample], mode: str) -> dict[str, float]:
    """Each node's paired p50 (ms its proxy added over its own llama-server, and proxied/direct decode
    rate), and the keyed node's minus (over) the open node's with two standard errors: the median's
    standard error is about 0.93 IQR / sqrt(rounds), from the spread of the per-round values."""
    per: dict[str, tuple[list[float], list[float]]] = {}
    for pair in ("open", "keyed"):
        by = {(s.round, s.target): s for s in samples
              if s.phase == "interleaved" and s.mode == mode and s.pair == pair}
        rounds = sorted({r for r, _ in by})
        per[pair] = ([(by[r, "proxied"].ttft_s - by[r, "direct"].ttft_s) * 1e3 for r in rounds],
                     [by[r, "proxied"].decode_tps / by[r, "direct"].decode_tps for r in rounds])

    def median_and_se(values: list[float]) -> tuple[float, float]:
        iqr = percentile(values, 75) - percentile(values, 25)
        return percentile(values, 50), 0.93 * iqr / len(values) ** 0.5

    (o_ms, o_ms_se), (k_ms, k_ms_se) = median_and_se(per["open"][0]), median_and_se(per["keyed"][0])
    (o_r, o_r_se), (k_r, k_r_se) = median_and_se(per["open"][1]), median_and_se(per["keyed"][1])
    ratio = k_r / o_r
    return {"open_ms": o_ms, "keyed_ms": k_ms, "ms": k_ms - o_ms, "ms_2se": 2 * (o_ms_se ** 2 + k_ms_se ** 2) ** 0.5,
            "open_ratio": o_r, "keyed_ratio": k_r, "ratio": ratio,
            "ratio_2se": 2 * ratio * ((o_r_se / o_r) ** 2 + (k_r_se / k_r) ** 2) ** 0.5}


def gate_cost(calls: int = 20_000, mesh_keys: int = 100) -> float:
    """The gate alone, in this process: µs it adds per accepted request in front of an app that does
    nothing (a Bearer key among six headers, ``mesh_keys`` keys in the document), best of 5."""
    import asyncio
    from meshllm.api.keys import ApiKeyGate, KeyRing, hash_key
    from meshllm.state.document import MeshState
    from meshllm.state.schema import ApiKey

    state, keys = MeshState(), [new_key() for _ in range(mesh_keys)]
    for digest in map(hash_key, keys):
        state.put_api_key(ApiKey(id=digest[:12], hash=digest))

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        pass

    gate = ApiKeyGate(bare, KeyRing(state))
    headers = [(b"host", b"127.0.0.1:9337"), (b"user-agent", b"OpenAI/Python 1.99"), (b"accept", b"application/json"),
               (b"content-type", b"application/json"), (b"authorization", f"Bearer {keys[-1]}".encode()),
               (b"content-length", b"120")]
    scope = {"type": "http", "path": "/v1/chat/completions", "headers": headers}

    async def per_call(app: Any) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await app(scope, None, None)
        return (time.perf_counter() - start) / calls * 1e6

    return min(asyncio.run(per_call(gate)) for _ in range(5)) - min(asyncio.run(per_call(bare)) for _ in range(5))


def print_key_costs(samples: list[Sample]) -> dict[str, Any]:
    costs: dict[str, Any] = {mode: key_cost(samples, mode) for mode in MODES}
    costs["gate_us"] = gate_cost()
    print("\nAPI key on vs off, side by side in the same rounds: each node's paired p50 (its proxy against its own "
          "llama-server),\nand the key's cost: keyed node vs open node, ± two standard errors (the noise: within it, "
          "no difference can be told)")
    print(f"{'':34}{'open node':>12}{'keyed node':>12}{'key cost':>24}")
    for mode, label in (("stream", "streaming decode tok/s"), ("nonstream", "non-streaming decode tok/s")):
        c = costs[mode]
        print(f"  {label:<32}{c['open_ratio']:>11.3f}x{c['keyed_ratio']:>11.3f}x"
              f"{c['ratio']:>14.3f}x ± {c['ratio_2se']:.3f}")
    for mode, label in (("first-stream", "streaming TTFT added"), ("first", "1-token latency added"),
                        ("nonstream", "128-token latency added")):
        c = costs[mode]
        print(f"  {label:<32}{c['open_ms']:>+9.2f} ms{c['keyed_ms']:>+9.2f} ms"
              f"{c['ms']:>+12.2f} ± {c['ms_2se']:.2f} ms")
    print(f"  the gate alone, in process: {costs['gate_us']:.2f} µs per request (sha256 of the key and one dict "
          "lookup among 100 mesh keys)")
    return costs


def _raise_on_signals() -> None:
    """SIGINT and SIGTERM unwind the bench, so the node is always stopped. Started in the background by a
    non-interactive shell, a process inherits SIGINT ignored; this restores it too."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _raise_on_signals()
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
