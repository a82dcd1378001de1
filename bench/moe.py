"""Expert sharding's throughput and memory: N shards serving N sessions against one whole model serving N sessions.

An expert shard (``meshllm.moe``) is a standalone GGUF with the whole trunk and a subset of the experts; each node
runs its own llama-server on its own shard and a session stays on one node, so nothing crosses the network while
it decodes. This bench measures, side by side in one run, on one machine:

- ``full xN``: one llama-server on the whole model (``-np N``) decoding N concurrent sessions: what one node that
  holds the whole model gives;
- ``shard i``: one llama-server on shard i decoding one session, alone on the machine with all its threads: what
  one node of the mesh gives. The shards sit on separate nodes, so the mesh's aggregate is their sum;
- ``shards xN here`` (``--colocated``): the N shard servers at once on this machine, the threads split between
  them: the aggregate when the "nodes" share one host's cores (no gain expected on a CPU: shown for honesty);
Every server is loaded first; then each round runs every configuration once, and the median round of each is shown
(``--rounds``): a spell of CPU taken by another job then spoils one round of several configurations, not every
round of one.

- memory per node: the file each node loads and llama-server's resident memory (peak, ``VmHWM``) after decoding,
  plus GPU memory per process with ``--ngl``.

The model: ``--model`` (an MoE GGUF, e.g. ``bench/out/moe/stdlib-moe.gguf`` from ``bench/moe_train.py``), else a
synthetic qwen3moe written once with ``meshllm.engine.tinygguf`` in the shape given (``--layers``, ``--experts``,
...; default a 1 GB F16 model that decodes at CPU speed). The plan is the planner's (``moe.plan``): the core of the
most important experts in every shard (routing statistics when cached, else id order), the rest dealt once.

    MESHLLM_ENGINE_DIR=... PYTHONPATH=$PWD .venv/bin/python bench/moe.py [--shards 3] [--tokens 64] [--rounds 3] [--colocated]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from meshllm.engine.build import find_engine
from meshllm.engine.models import file_fingerprint
from meshllm.engine.tinygguf import ModelShape, write_shaped
from meshllm.moe.detect import MoeInfo, detect_moe
from meshllm.moe.importance import expert_ranks, load_importance
from meshllm.moe.plan import core_size, shard_experts
from meshllm.moe.shard import shard_ready, write_shard

_PROMPTS = ("def parse(self, text):\n", "class Queue:\n    def __init__(self", "import os\n\ndef walk(",
            "    for line in lines:\n", "def main(argv=None):\n", "class Error(Exception):\n", "    with open(path)",
            "    return {key: value for")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(port: int, path: str, body: dict[str, object], timeout: float = 600) -> dict[str, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return dict(json.loads(response.read()))


def _start(engine: Path, model: Path, *, parallel: int, threads: int, args: argparse.Namespace, name: str) -> Server:
    port = _free_port()
    log = args.out / f"{name}.log"
    cmd = [str(engine / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(parallel), "-c", str(parallel * args.ctx), "-t", str(threads), "-ngl", str(args.ngl),
           "--no-warmup"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"llama-server on {model.name} exited: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    _post(port, "/completion", {"prompt": "x", "n_predict": 2, "temperature": 0})  # warm up
                    return Server(proc, port, log)
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"llama-server on {model.name} not ready in {args.ready_timeout} s: see {log}")


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def _memory(server: Server) -> dict[str, float]:
    """Resident and peak resident MB of the server; its GPU memory MB when nvidia-smi lists it."""
    figures = {}
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            figures[line.split(":")[0]] = int(line.split()[1]) / 1024
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        for row in out.splitlines():
            pid, used = (part.strip() for part in row.split(","))
            if int(pid) == server.proc.pid:
                figures["GPU"] = float(used)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return figures


def _sessions(ports: list[int], args: argparse.Namespace) -> tuple[float, list[float]]:
    """``--rounds`` times, decode one session per port, all at once; the round of median aggregate tokens/s:
    (aggregate tokens/s over its wall time, each session's decode tok/s). The median, because the machine is
    shared and a round can lose the CPU."""
    rounds = sorted((_round(ports, args) for _ in range(args.rounds)), key=lambda r: r[0])
    return rounds[len(rounds) // 2]


def _round(ports: list[int], args: argparse.Namespace) -> tuple[float, list[float]]:
    results: list[dict[str, object]] = [{} for _ in ports]

    def one(i: int) -> None:
        body = {"prompt": _PROMPTS[i % len(_PROMPTS)], "n_predict": args.tokens, "temperature": 0,
                "ignore_eos": True, "cache_prompt": False}
        results[i] = _post(ports[i], "/completion", body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ports))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = [int(r["tokens_predicted"]) for r in results]  # type: ignore[call-overload]
    rates = [float(r["timings"]["predicted_per_second"]) for r in results]  # type: ignore[index]
    return sum(tokens) / wall, rates


def _shards(model: Path, info: MoeInfo, args: argparse.Namespace) -> list[Path]:
    importance = load_importance(model)
    ranks = expert_ranks(importance, n_layer=info.n_layer, n_expert=info.n_expert)
    core = core_size(info.n_expert, info.n_used, args.core)
    fingerprint = file_fingerprint(model)
    print(f"plan: {args.shards} shards, core {core} of {info.n_expert} experts per layer, each other expert once; "
          f"order: {'routing statistics' if importance else 'expert id (no statistics cached)'}")
    paths = []
    for index in range(args.measure_shards or args.shards):
        experts = shard_experts([ranks[layer] for layer in info.moe_layers], core=core, shards=args.shards, copies=1,
                                index=index)
        path = args.out / f"{model.stem}.shard{index}of{args.shards}.gguf"
        if not shard_ready(path, source_fingerprint=fingerprint, experts=experts):
            started = time.monotonic()
            write_shard(model, path, dict(zip(info.moe_layers, experts, strict=True)), source_fingerprint=fingerprint)
            print(f"  wrote {path.name}: {len(experts[0])} experts/layer, {path.stat().st_size / 1e9:.3f} GB in "
                  f"{time.monotonic() - started:.1f} s")
        paths.append(path)
    return paths


def _row(label: str, size: int, agg: float, rates: list[float], mem: dict[str, float]) -> None:
    gpu = f"{mem['GPU']:>9.0f}" if "GPU" in mem else f"{'-':>9}"
    rss = f"{mem['VmHWM']:>9.0f}" if "VmHWM" in mem else f"{'-':>9}"
    print(f"{label:<18} {size / 1e9:>8.3f} {rss} {gpu} {agg:>10.2f} "
          f"{min(rates):>8.2f} {max(rates):>8.2f}", flush=True)


def _interleaved(servers: dict[str, Server], n: int, args: argparse.Namespace) -> dict[str, tuple[float, list[float]]]:
    """Every configuration once per round, round after round, all servers loaded throughout, so a spell of CPU
    taken by another job hits one round of several configurations rather than every round of one; per
    configuration, the round of median aggregate."""
    plans = {"full x1": [servers["full"].port], f"full x{n}": [servers["full"].port] * n}
    plans.update({f"{name} x1": [server.port] for name, server in servers.items() if name != "full"})
    samples: dict[str, list[tuple[float, list[float]]]] = {label: [] for label in plans}
    for _ in range(args.rounds):
        for label, ports in plans.items():
            samples[label].append(_round(ports, args))
    return {label: sorted(rounds, key=lambda r: r[0])[len(rounds) // 2] for label, rounds in samples.items()}


def run(engine: Path, model: Path, args: argparse.Namespace) -> None:
    info = detect_moe(model)
    if info is None:
        sys.exit(f"{model} is not a mixture of experts")
    shards = _shards(model, info, args)
    n = args.sessions or args.shards
    threads = args.threads or os.cpu_count() or 2
    print(f"\n{model.name}: {info.n_layer} layers, {info.n_expert} experts ({info.n_used} used), "
          f"{model.stat().st_size / 1e9:.3f} GB; {n} sessions of {args.tokens} tokens; {threads} threads; ngl {args.ngl}; "
          f"median of {args.rounds} interleaved rounds")
    files = {"full": model, **{f"shard {i}": path for i, path in enumerate(shards)}}
    servers: dict[str, Server] = {}
    try:
        for name, path in files.items():
            servers[name] = _start(engine, path, parallel=n if name == "full" else 1, threads=threads, args=args,
                                   name=name.replace(" ", ""))
        results = _interleaved(servers, n, args)
        memory = {name: _memory(server) for name, server in servers.items()}
    finally:
        for server in servers.values():
            _stop(server)
    print(f"{'server':<18} {'file GB':>8} {'peak RSS':>9} {'GPU MB':>9} {'agg tok/s':>10} {'min/s':>8} {'max/s':>8}")
    for label, (agg, rates) in results.items():
        name = label.rsplit(" x", 1)[0]
        _row(label, files[name].stat().st_size, agg, rates, memory[name])
    if args.colocated and len(shards) == args.shards:
        per = max(1, threads // len(shards))
        servers = {f"coloc{i}": _start(engine, p, parallel=1, threads=per, args=args, name=f"coloc{i}")
                   for i, p in enumerate(shards)}
        try:
            agg, rates = _sessions([s.port for s in servers.values()], args)
        finally:
            for server in servers.values():
                _stop(server)
        _row(f"shards x{n} here", sum(p.stat().st_size for p in shards), agg, rates, {})
    shard_aggs = [results[f"shard {i} x1"][0] for i in range(len(shards))]
    agg_full = results[f"full x{n}"][0]
    mesh = sum(shard_aggs[i % len(shard_aggs)] for i in range(n))
    print(f"\n{n} sessions: mesh of {n} shard nodes {mesh:.2f} tok/s (sum of the nodes) against one node with "
          f"the whole model {agg_full:.2f} tok/s: {mesh / agg_full:.2f}x; against {n} nodes each holding the whole "
          f"model (if they could), one session each, {n * results['full x1'][0]:.2f} tok/s: "
          f"{mesh / (n * results['full x1'][0]):.2f}x")
    largest = max(p.stat().st_size for p in shards)
    print(f"memory per node: largest shard {largest / 1e9:.3f} GB = {largest / model.stat().st_size:.2f}x the whole "
          f"model's {model.stat().st_size / 1e9:.3f} GB; the trunk ({info.trunk_bytes / 1e9:.3f} GB) is on every node")


def _model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    shape = ModelShape(kind="moe", n_layer=args.layers, n_embd=args.embd, n_ff=args.ff, n_head=args.heads,
                       n_head_kv=args.kv_heads, n_expert=args.experts, n_expert_used=args.used, n_vocab=args.vocab,
                       n_ctx=max(args.ctx, 512), dtype="f16")
    path = args.out / (f"synthetic-moe-{args.layers}L-{args.embd}d-{args.experts}x{args.ff}-top{args.used}-"
                       f"v{args.vocab}.gguf")
    if not path.exists():
        started = time.monotonic()
        write_shaped(path, shape)
        print(f"wrote {path.name}: {path.stat().st_size / 1e9:.3f} GB in {time.monotonic() - started:.1f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an MoE GGUF (default: a synthetic one of the shape below)")
    p.add_argument("--out", type=Path, default=Path("bench/out/moe-bench"))
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--sessions", type=int, default=0, help="concurrent sessions (default: one per shard)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (the median is shown)")
    p.add_argument("--ctx", type=int, default=512, help="context per session")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ngl", type=int, default=0, help="layers on the GPU (99: all)")
    p.add_argument("--core", type=float, default=0.5)
    p.add_argument("--measure-shards", type=int, default=0,
                   help="write and measure only the first N shards (they have the same active size): where the disk "
                        "cannot hold every shard beside the model; the mesh figure then repeats them")
    p.add_argument("--colocated", action="store_true", help="also run the N shard servers at once on this machine")
    p.add_argument("--ready-timeout", type=float, default=600)
    for name, default in (("layers", 8), ("embd", 1024), ("ff", 512), ("heads", 16), ("kv-heads", 4),
                          ("experts", 32), ("used", 4), ("vocab", 32000)):
        p.add_argument(f"--{name}", type=int, default=default, help="synthetic model shape")
    args = p.parse_args(argv)
    engine = find_engine()
    if engine is None:
        sys.exit("no engine: run `meshllm engine build` or set MESHLLM_ENGINE_DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    run(engine, _model(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
