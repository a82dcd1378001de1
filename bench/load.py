"""Many streams at once: 256 concurrent streams through one node and through a routed client node.

The same two real node processes as ``routed.py`` (A serves a generated tiny model, B joins with
``--client``) take, in turn, a wave of ``--streams`` concurrent streamed ``/v1/completions`` (greedy,
``--tokens`` each) at three targets that all end at A's one llama-server:

- ``direct``: A's llama-server itself (the baseline: no meshllm in the path);
- ``local``: A's OpenAI proxy;
- ``routed``: B's OpenAI proxy, tunnelled over QUIC to A.

Per target: errors (any non-200, error event, or stream without ``[DONE]``), time to first content
chunk and total time of each stream (p50 and p99; "added" is the target's percentile minus
direct's, measured in the same round), and the CPU time of A's and B's node processes over the wave,
per 1,000 streamed tokens. Waves repeat ``--rounds`` times, targets in turn, so the machine's other
load falls on all three alike.

    MESHLLM_ENGINE_DIR=... .venv/bin/python bench/load.py [--streams 256] [--tokens 64] [--rounds 3]

llama-server queues what its slots cannot hold (``--parallel``, passed as LLAMA_ARG_N_PARALLEL), so
the absolute times are mostly queueing; the differences between targets are the proxies' share.
It prints a table and never asserts: benchmarks are not tests (STYLE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from _common import cpu_seconds, percentile
from routed import Mesh, two_nodes

PROMPT = "The history of the printing press"
TARGETS = ("direct", "local", "routed")


@dataclass
class Wave:
    target: str
    ttft: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


async def one_stream(client: httpx.AsyncClient, url: str, body: dict[str, object], wave: Wave) -> None:
    start = time.perf_counter()
    first: float | None = None
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                wave.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            pending = b""
            async for raw in response.aiter_raw():
                pending += raw
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: [DONE]"):
                        done = True
                    elif event.startswith(b"data: {"):
                        payload = json.loads(event[6:])
                        if "error" in payload:
                            wave.errors.append(f"error event: {payload['error']}")
                            return
                        if (payload.get("choices") or [{}])[0].get("text"):
                            first = first if first is not None else time.perf_counter()
                            wave.tokens += 1
    except httpx.HTTPError as exc:
        wave.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if not done:
        wave.errors.append("the stream ended without [DONE]")
        return
    wave.wall.append(time.perf_counter() - start)
    if first is not None:
        wave.ttft.append(first - start)


async def wave(mesh: Mesh, target: str, *, streams: int, tokens: int) -> Wave:
    url = {"direct": mesh.direct_url, "local": mesh.a.api, "routed": mesh.b.api}[target]
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    result = Wave(target)
    pids = {"a_node": mesh.a.proc.pid, "b_node": mesh.b.proc.pid, "a_llama": mesh.llama_pid, "bench": os.getpid()}
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits, trust_env=False) as client:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        await asyncio.gather(*(one_stream(client, url, body, result) for _ in range(streams)))
        result.seconds = time.perf_counter() - start
        result.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    return result


def report(waves: list[Wave], *, streams: int) -> None:
    print(f"\n{streams} concurrent streams a wave; {len(waves) // len(TARGETS)} waves per target")
    print(f"{'target':8} {'errors':>6} {'tokens':>7} {'ttft p50':>9} {'p99':>7} {'added p50':>9} {'p99':>7} "
          f"{'wall p50':>9} {'p99':>7} {'added p50':>9} {'p99':>7} {'A cpu/1k':>9} {'B cpu/1k':>9} {'llama/1k':>9}")
    base: dict[str, tuple[float, float, float, float]] = {}
    for target in TARGETS:
        mine = [w for w in waves if w.target == target]
        ttft = [t for w in mine for t in w.ttft]
        wall = [t for w in mine for t in w.wall]
        tokens = sum(w.tokens for w in mine)
        errors = sum(len(w.errors) for w in mine)
        figures = (percentile(ttft, 50), percentile(ttft, 99), percentile(wall, 50), percentile(wall, 99)) \
            if ttft and wall else (0.0, 0.0, 0.0, 0.0)
        base.setdefault("direct", figures)
        added = [f - b for f, b in zip(figures, base["direct"], strict=True)]
        per_k = {name: sum(w.cpu[name] for w in mine) / max(tokens, 1) * 1000 for name in ("a_node", "b_node", "a_llama")}
        print(f"{target:8} {errors:>6} {tokens:>7} {figures[0] * 1000:>7.0f}ms {figures[1] * 1000:>5.0f}ms "
              f"{added[0] * 1000:>7.0f}ms {added[1] * 1000:>5.0f}ms {figures[2] * 1000:>7.0f}ms "
              f"{figures[3] * 1000:>5.0f}ms {added[2] * 1000:>7.0f}ms {added[3] * 1000:>5.0f}ms "
              f"{per_k['a_node']:>8.3f}s {per_k['b_node']:>8.3f}s {per_k['a_llama']:>8.3f}s")
        for w in mine:
            for error in w.errors[:3]:
                print(f"  {target}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=16, help="llama-server slots (LLAMA_ARG_N_PARALLEL)")
    args = parser.parse_args()
    os.environ["LLAMA_ARG_N_PARALLEL"] = str(args.parallel)
    with tempfile.TemporaryDirectory(prefix="meshllm-load-") as tmp:
        from meshllm.engine.tinygguf import write_dense

        model = str(write_dense(Path(tmp) / "tiny-dense.gguf", n_ctx=args.parallel * 256))
        with two_nodes(model, Path(tmp), delay=None, threads=0, timeout=120) as mesh:
            waves: list[Wave] = []
            asyncio.run(_warm(mesh))
            for _ in range(args.rounds):
                for target in TARGETS:
                    waves.append(asyncio.run(wave(mesh, target, streams=args.streams, tokens=args.tokens)))
                    print(f"{target}: {len(waves[-1].errors)} errors, {waves[-1].seconds:.1f}s", file=sys.stderr)
            report(waves, streams=args.streams)


async def _warm(mesh: Mesh) -> None:
    for target in TARGETS:
        await wave(mesh, target, streams=4, tokens=4)


if __name__ == "__main__":
    main()
