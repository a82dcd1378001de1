"""What one decoded token costs on the RPC wire: commands and bytes per command type (issue 19).

A patched ggml-rpc-server (``GGML_RPC_STATS=<file>``, engine patch 0005) counts, per command type,
the commands it served and the RPC bytes each brought in and sent back, and writes them when the
connection ends. This bench splits a model onto one such worker (by-name loading, as a meshllm host
does), decodes ``N1`` then ``N2`` greedy tokens in two sessions of llama-server, and divides the
difference by ``N2 - N1``: loading and the prompt cancel out, what is left is one decoded token.
Per path: ``stock`` (no key), ``clear`` (the mesh's key, unsealed: ``--rpc-direct``), ``sealed``
(every message sealed with AES-256-GCM) and ``push`` (sealed, and with ``--workers 2`` or more the
activations between two workers go from one to the next, engine patch 0006) and ``default`` (push,
and the small inputs set again each token cross as what changed, patch 0008: what a meshllm split
host runs); ``--context N`` puts N words before the prompt, for the attention mask of a longer
context; the RPC bytes are the same on each path (the
sealing adds 20 bytes per message on the wire), the decode speed is each session's own. ``--heads``:
``host`` (a meshllm CPU host keeps the output head, ``split.host_keeps_head``) and/or ``worker``
(where stock llama.cpp puts it on a CPU host: the last worker, which then sends back every token's
logits). ``--link-mbit N`` puts the worker in a network namespace of its own, joined to the host by a
veth pair limited to N Mbit/s each way (``tbf``; root only): what the bytes cost on a real link, which
loopback hides. ``--threads N`` gives both engine processes N threads (default: their own defaults,
1 for the rpc-server's CPU backend, all cores for llama-server).

Where time goes: built with ``bench/patches/rpc-timing.patch`` on top of the engine's patches, the
worker also counts the microseconds it spends on each command type (from its first byte to the
command done: receiving the payload, copies to and from the device, the graph) and the time it
waits between commands (the host computing its layers, the host's copies, the network); the bench
then shows them per decoded token beside the token's whole time, and ``--solo`` adds the model
alone on one llama-server for comparison. Without the timing patch those columns stay empty.

    PYTHONPATH=$PWD .venv/bin/python bench/rpc_per_token.py [--engine DIR] [--gpu] [--heads worker,host] MODEL.gguf

It prints a table and never asserts (STYLE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from meshllm.engine.build import find_engine
from meshllm.engine.ggufinfo import block_count
from meshllm.engine.rpc_auth import rpc_key
from meshllm.reconcile.served import DesiredServer, split_args
from meshllm.testing.engines import terminate

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PATHS: dict[str, dict[str, str]] = {"stock": {}, "clear": {"GGML_RPC_SECRET": rpc_key(b"b" * 32), "GGML_RPC_CLEAR": "1"},
         "sealed": {"GGML_RPC_SECRET": rpc_key(b"b" * 32)},
         "push": {"GGML_RPC_SECRET": rpc_key(b"b" * 32), "GGML_RPC_PUSH": "1"},
         "default": {"GGML_RPC_SECRET": rpc_key(b"b" * 32), "GGML_RPC_PUSH": "1", "GGML_RPC_DELTA": "1"}}
PROMPT = "The capital of France is"


def with_context(words: int) -> str:
    """The prompt after ``words`` filler words (--context): a longer context, a longer attention mask."""
    return " ".join([*(f"w{i}" for i in range(words)), PROMPT])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def session(engine: Path, model: Path, rpc_ports: list[int], env: dict[str, str], tokens: int, gpu: bool,
            log: Path, head: str = "host", *, worker_host: str = "127.0.0.1", threads: int = 0,
            prompt: str = PROMPT) -> float:
    """One llama-server split onto the workers (equal shares with the host), one greedy completion of
    ``tokens``; its decode tok/s."""
    n = len(rpc_ports) + 1
    desired = DesiredServer(model=model.stem, path=model, workers=tuple(f"w{i}" for i in range(n - 1)),
                            tensor_split=tuple(round(1 / n, 4) for _ in range(n)),
                            n_layer=0 if gpu else block_count(model))
    gpu_layers, extra = split_args(desired, [f"{worker_host}:{port}" for port in rpc_ports], gpu=gpu)
    extra = (*extra, *(("--threads", str(threads)) if threads else ()))
    if head == "worker" and "--override-tensor" in extra:  # as stock llama.cpp places it
        at = extra.index("--override-tensor")
        extra = extra[:at] + extra[at + 2:]
    return served_once(engine, model, [str(gpu_layers), *extra], tokens, log,
                       {**env, "GGML_RPC_HASH_THRESHOLD": "1", "GGML_RPC_LOAD_BY_NAME": "1"}, prompt=prompt)


def served_once(engine: Path, model: Path, layers_and_args: list[str], tokens: int, log: Path,
                env: dict[str, str] | None = None, *, prompt: str = PROMPT) -> float:
    """One llama-server (``--n-gpu-layers`` and what follows it), one greedy completion; its decode tok/s."""
    port = free_port()
    argv = [str(engine / "llama-server"), "--model", str(model), "--port", str(port), "--n-gpu-layers",
            *layers_and_args, "--no-webui", "-c", "2048", "--no-warmup"]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
            return complete(port, tokens, prompt)
        finally:
            terminate(proc)


def complete(port: int, tokens: int, prompt: str = PROMPT) -> float:
    """One greedy completion of ``tokens`` tokens after ``prompt``; its decode tok/s."""
    body = json.dumps({"prompt": prompt, "n_predict": tokens, "temperature": 0,
                       "ignore_eos": True, "cache_prompt": False}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return float(json.load(answer)["timings"]["predicted_per_second"])


def read_stats(path: Path, log: Path, sessions: int, timeout: float = 30) -> dict[str, tuple[int, int, int, int]]:
    """Per command type: commands, bytes in, bytes out, microseconds busy (0 without the timing patch);
    ``idle``: the microseconds the worker waited for commands. Read once the worker has closed
    ``sessions`` connections (the file is also rewritten once a second while one runs: not final)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("Client connection closed") < sessions:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not close connection {sessions}")
        time.sleep(0.05)
    stats = {}
    for line in path.read_text().splitlines():
        name, *fields = line.split()
        count, bytes_in, bytes_out, busy = ([int(f) for f in fields] + [0])[:4]
        stats[name] = (count, bytes_in, bytes_out, busy)
    path.unlink()
    return stats


def solo_ms(engine: Path, model: Path, n1: int, n2: int, gpu: bool, log: Path, prompt: str = PROMPT) -> float:
    """Milliseconds per decoded token of the model alone on one llama-server."""
    runs = [(tokens, served_once(engine, model, ["99" if gpu else "0"], tokens, log, prompt=prompt))
            for tokens in (n1, n2)]
    return per_token_ms(runs[0], runs[1])


def per_token_ms(first: tuple[int, float], second: tuple[int, float]) -> float:
    """(tokens, tok/s) of two runs: the milliseconds one more decoded token takes."""
    (n1, tps1), (n2, tps2) = first, second
    return (n2 / tps2 - n1 / tps1) / (n2 - n1) * 1000


@contextlib.contextmanager
def limited_link(mbit: int) -> Iterator[tuple[list[str], str]]:
    """A network namespace joined to this one by a veth pair limited to ``mbit`` Mbit/s each way:
    (the prefix that runs a command in it, its address). Removed on exit."""
    ns, here, there = "mlrpc-bench", "mlrpc-h", "mlrpc-w"
    inside = ["ip", "netns", "exec", ns]
    limit = ["root", "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "50ms"]
    steps = [["ip", "netns", "add", ns], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns], ["ip", "addr", "add", "10.197.0.1/30", "dev", here],
             ["ip", "link", "set", here, "up"], [*inside, "ip", "addr", "add", "10.197.0.2/30", "dev", there],
             [*inside, "ip", "link", "set", there, "up"], [*inside, "ip", "link", "set", "lo", "up"],
             ["tc", "qdisc", "add", "dev", here, *limit], [*inside, "tc", "qdisc", "add", "dev", there, *limit]]
    try:
        for step in steps:
            subprocess.run(step, check=True)
        yield inside, "10.197.0.2"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)  # takes the veth pair with it


def measure(engine: Path, model: Path, path: str, n1: int, n2: int, gpu: bool, work: Path,
            head: str = "host", *, link: tuple[list[str], str] | None = None, threads: int = 0,
            workers: int = 1, prompt: str = PROMPT) -> tuple[list[str], float]:
    """Table rows for one path: per worker, per command type, what one decoded token costs; and the
    milliseconds one decoded token took."""
    ports = [free_port() for _ in range(workers)]
    stats_files = [work / f"stats-{path}-{i}.txt" for i in range(workers)]
    logs = [work / f"{path}-{head}-{i}.log" for i in range(workers)]
    prefix, where = link or ([], "127.0.0.1")
    procs = []
    try:
        for port, stats_file, log in zip(ports, stats_files, logs, strict=True):
            env = {**os.environ, **PATHS[path], "GGML_RPC_STATS": str(stats_file)}
            procs.append(subprocess.Popen(
                [*prefix, str(engine / "ggml-rpc-server"), "-H", where, "-p", str(port), "--gguf", str(model),
                 *(["-d", "CUDA0"] if gpu else []), *(["-t", str(threads)] if threads else [])],
                stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env))
        runs = []
        for k, tokens in enumerate((n1, n2), 1):
            time.sleep(0.5)
            tps = session(engine, model, ports, PATHS[path], tokens, gpu, logs[0], head, worker_host=where,
                          threads=threads, prompt=prompt)
            runs.append((tps, [read_stats(f, log, k) for f, log in zip(stats_files, logs, strict=True)]))
    finally:
        for proc in procs:
            terminate(proc)
    (tps1, firsts), (tps2, seconds) = runs
    n = n2 - n1
    lines = []
    empty = (0, 0, 0, 0)
    grand = [0.0, 0.0, 0.0, 0.0]
    for i, (first, second) in enumerate(zip(firsts, seconds, strict=True)):
        who = f"worker {i + 1}: " if workers > 1 else ""
        for name in sorted(set(first) | set(second)):
            a, b = first.get(name, empty), second.get(name, empty)
            per = [(b[j] - a[j]) / n for j in range(4)]
            if any(abs(v) > 1e-9 for v in per):
                what = "(waiting for the host)" if name == "idle" else name
                busy = f"{per[3] / 1000:.3f}" if per[3] else ""
                lines.append(f"| {path} | {who}{what} | {per[0]:.2f} | {per[1]:.0f} | {per[2]:.0f} | {busy} |")
        total = [sum(second.get(k, empty)[j] - first.get(k, empty)[j] for k in set(first) | set(second)) / n
                 for j in range(4)]
        grand = [g + t for g, t in zip(grand, total, strict=True)]
    ms = per_token_ms((n1, tps1), (n2, tps2))
    lines.append(f"| {path} | **all** | {grand[0]:.2f} | {grand[1]:.0f} | {grand[2]:.0f} | "
                 f"{grand[3] / 1000:.3f} of {ms:.3f} | decode {tps1:.1f} / {tps2:.1f} tok/s ({n1} / {n2} tokens) |")
    return lines, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--engine", type=Path, default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--n1", type=int, default=16)
    parser.add_argument("--n2", type=int, default=80)
    parser.add_argument("--paths", default="stock,clear,sealed")
    parser.add_argument("--solo", action="store_true", help="also time the model alone on one llama-server")
    parser.add_argument("--heads", default="host", help="host and/or worker: where a CPU host's output head goes")
    parser.add_argument("--link-mbit", type=int, default=0, help="the worker behind a link of this many Mbit/s")
    parser.add_argument("--threads", type=int, default=0, help="threads of both engine processes (0: theirs)")
    parser.add_argument("--workers", type=int, default=1, help="rpc-servers in the split (push needs 2 or more)")
    parser.add_argument("--context", type=int, default=0, help="words before the prompt (a longer context)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds over the paths: the table is round 1's, then the median ms a token")
    args = parser.parse_args()
    prompt = with_context(args.context)
    engine = args.engine or Path(os.environ.get("MESHLLM_ENGINE_DIR", "") or (find_engine() or "."))
    print(f"{args.model.name}: per decoded token, {args.n2} - {args.n1} tokens; engine {engine}")
    with tempfile.TemporaryDirectory(prefix="rpc-per-token-") as tmp, contextlib.ExitStack() as stack:
        link = stack.enter_context(limited_link(args.link_mbit)) if args.link_mbit else None
        if link:
            print(f"worker behind a {args.link_mbit} Mbit/s link (veth + tbf, each way)")
        if args.solo:
            ms = solo_ms(engine, args.model.expanduser(), args.n1, args.n2, args.gpu, Path(tmp) / "solo.log",
                         prompt)
            print(f"solo: {ms:.3f} ms per decoded token")
        print("| path | command | commands | bytes in (to the worker) | bytes out (back) | worker ms | |")
        print("|---|---|---|---|---|---|---|")
        times: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            for head in args.heads.split(","):
                for path in args.paths.split(","):
                    label = f"{path}, head on {head}"
                    lines, ms = measure(engine, args.model.expanduser(), path, args.n1, args.n2, args.gpu,
                                        Path(tmp), head, link=link, threads=args.threads, workers=args.workers,
                                        prompt=prompt)
                    times.setdefault(label, []).append(ms)
                    for line in lines if round_ == 0 else []:
                        print(line.replace(f"| {path} |", f"| {label} |", 1), flush=True)
        if args.rounds > 1:
            print_medians(times)


def print_medians(times: dict[str, list[float]]) -> None:
    """Per path, the median milliseconds a decoded token took over the rounds, and its ratio to stock's."""
    print(f"\nms a decoded token, median of {len(next(iter(times.values())))} interleaved rounds:")
    print("| path | median ms | / stock's | rounds |")
    print("|---|---|---|---|")
    for label, values in times.items():
        stock = times.get("stock" + label[label.index(","):]) if "," in label else None
        ratio = f"{statistics.median(values) / statistics.median(stock):.3f}x" if stock else "-"
        print(f"| {label} | {statistics.median(values):.3f} | {ratio} | {', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
