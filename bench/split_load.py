"""Zero-transfer loading of a layer split, measured: bytes sent to the RPC workers while a model
loads, load time, and whether greedy output matches the solo run.

Stock llama.cpp RPC uploads every weight to the workers. Two ways to have each worker load its
layers from its own disk are compared side by side with it and with a solo llama-server, in one run:

* ``preseed``: before the worker starts, write llama.cpp's RPC hash cache (``$LLAMA_CACHE/rpc/<16 hex
  digits of FNV-1a>``, one file per tensor) from the local GGUF, and run ``ggml-rpc-server -c``;
* ``local``: the meshllm patch (``llama.cpp/patches/0001-rpc-server-local-gguf.patch``): run
  ``ggml-rpc-server --gguf MODEL``, which answers hash offers from the file itself.

Stock clients offer a hash only for weight tensors above 10 MiB; the patch's client reads
``GGML_RPC_HASH_THRESHOLD`` (bytes), so the ``-all`` variants offer every weight by hash.

The host runs on CPU, which llama.cpp never counts as a split device, so a split here is
``--rpc W1,W2 -ngl 99 --tensor-split 1,1``: the host keeps the input embedding, each worker half the
layers (the second also the output). Each worker sits behind a TCP relay that counts the bytes.

    PYTHONPATH=$PWD python bench/split_load.py --engine DIR [--rpc-engine DIR] MODEL.gguf ...
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from meshllm.engine.process import stop_process_now
from meshllm.testing.tcp_relay import CountingTcpRelay

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
PROMPT = "The capital of France is Paris. The capital of Italy is"
MODES = ("solo", "solo-norepack", "stock", "preseed", "local", "preseed-all", "local-all")

_FNV_C = r"""
#include <stdint.h>
#include <stddef.h>
uint64_t fnv1a(const uint8_t * p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}
"""


def _fnv_lib() -> ctypes.CDLL:
    """FNV-1a in C (llama.cpp's hash for RPC_CMD_SET_TENSOR_HASH); pure Python is 100x too slow."""
    folder = Path(tempfile.gettempdir()) / "meshllm-bench"
    folder.mkdir(exist_ok=True)
    lib = folder / "fnv1a.so"
    if not lib.exists():
        src = folder / "fnv1a.c"
        src.write_text(_FNV_C)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.fnv1a.restype = ctypes.c_uint64
    dll.fnv1a.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return dll


@functools.cache
def tensor_spans(model: Path) -> tuple[tuple[int, int], ...]:
    """(file offset, bytes) of each tensor. Parsed once and not timed: gguf.GGUFReader takes ~15 s
    on gemma-3's 262k-token vocabulary, which a node would do once per file, in C."""
    return tuple((int(t.data_offset), int(t.n_bytes)) for t in gguf.GGUFReader(model).tensors)


def preseed(model: Path, cache: Path, *, threshold: int) -> tuple[int, int]:
    """Write ``cache/<hash>`` for every tensor above ``threshold`` bytes; returns (files, bytes)."""
    fnv = _fnv_lib()
    cache.mkdir(parents=True, exist_ok=True)
    data = np.memmap(model, dtype=np.uint8, mode="r")
    files = total = 0
    for offset, size in tensor_spans(model):
        if size <= threshold:
            continue
        span = np.ascontiguousarray(data[offset:offset + size])
        digest = fnv.fnv1a(span.ctypes.data, size)
        (cache / f"{digest:016x}").write_bytes(span.tobytes())
        files, total = files + 1, total + size
    return files, total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} never opened")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with _HTTP.open(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("llama-server never became ready")


def _complete(port: int, n_predict: int) -> str:
    body = json.dumps({"prompt": PROMPT, "n_predict": n_predict, "temperature": 0, "top_k": 1, "seed": 1,
                       "cache_prompt": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                 headers={"Content-Type": "application/json"})
    with _HTTP.open(req, timeout=300) as r:
        return json.load(r)["content"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process_now(proc, grace=10)


@dataclass
class Row:
    model: str
    mode: str
    load_s: float
    sent_bytes: int  # host -> workers during load (0 for solo)
    seed_s: float  # preseed only: writing the cache from the local file, before the worker starts
    output: str
    repeatable: bool = True  # every round of this mode gave the same output


@dataclass
class Setup:
    engine: Path
    rpc_engine: Path
    workers: int
    threads: int
    n_predict: int
    logs: Path


def _start_workers(setup: Setup, model: Path, mode: str, scratch: Path) -> tuple[list, list, float]:
    procs, relays, seed_s = [], [], 0.0
    for i in range(setup.workers):
        port = _free_port()
        cmd = [str(setup.rpc_engine / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(setup.threads)]
        env = dict(os.environ)
        if mode.startswith("preseed"):
            env["LLAMA_CACHE"] = str(scratch / f"cache{i}")
            started = time.monotonic()
            preseed(model, scratch / f"cache{i}" / "rpc", threshold=1 if mode.endswith("-all") else 10 << 20)
            seed_s += time.monotonic() - started
            cmd.append("-c")
        elif mode.startswith("local"):
            cmd += ["--gguf", str(model)]
        log = open(setup.logs / f"{model.stem}-{mode}-rpc{i}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        _wait_port(port, proc)
        relays.append(CountingTcpRelay(port))
    return procs, relays, seed_s


def run_mode(setup: Setup, model: Path, mode: str) -> Row:
    with tempfile.TemporaryDirectory(prefix="split-load-") as tmp:
        solo = mode.startswith("solo")
        workers, relays, seed_s = ([], [], 0.0) if solo else _start_workers(setup, model, mode, Path(tmp))
        port = _free_port()
        cmd = [str(setup.engine / "llama-server"), "-m", str(model), "--port", str(port), "-t", str(setup.threads),
               "-c", "512", "--no-warmup"]
        env = dict(os.environ)
        if mode == "solo-norepack":
            cmd.append("--no-repack")  # plain CPU buffers and kernels, as an RPC worker's CPU backend has
        if relays:
            cmd += ["--rpc", ",".join(f"127.0.0.1:{r.port}" for r in relays), "-ngl", "99",
                    "--tensor-split", ",".join("1" for _ in relays)]
        if mode.endswith("-all"):
            env["GGML_RPC_HASH_THRESHOLD"] = "1"
        log = open(setup.logs / f"{model.stem}-{mode}-server.log", "wb")  # noqa: SIM115
        started = time.monotonic()
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_ready(port, server)
            load_s = time.monotonic() - started
            sent = sum(r.to_server for r in relays)
            output = _complete(port, setup.n_predict)
        finally:
            _stop(server)
            for proc in workers:
                _stop(proc)
            for relay in relays:
                relay.close()
    return Row(model.name, mode, round(load_s, 2), sent, round(seed_s, 2), output)


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 10**5 else f"{n / 1e3:,.1f} kB"


def _same(row: Row, ref: Row | None) -> str:
    return "-" if ref is None else "yes" if row.output == ref.output else "NO"


def print_table(rows: list[Row], weights: dict[str, int]) -> None:
    """Markdown table: one row per (model, mode); outputs compared with solo, solo without weight
    repacking (the kernels an RPC worker's CPU backend runs) and the stock split."""
    print("| model | mode | load s | bytes to workers at load | % of stock | seed s"
          " | output = solo | = solo --no-repack | = stock split |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r.model, r.mode): r for r in rows}
    for r in rows:
        stock = by.get((r.model, "stock"))
        solo = r.mode.startswith("solo")
        share = f"{100 * r.sent_bytes / stock.sent_bytes:.2f}%" if stock and not solo else "-"
        same = [_same(r, by.get((r.model, ref))) for ref in ("solo", "solo-norepack", "stock")]
        flaky = "" if r.repeatable else " (varied between rounds)"
        print(f"| {r.model} ({_fmt_bytes(weights[r.model])} weights) | {r.mode}{flaky} | {r.load_s:.2f} |"
              f" {'-' if solo else _fmt_bytes(r.sent_bytes)} | {share} |"
              f" {r.seed_s if r.mode.startswith('preseed') else '-'} | {' | '.join(same)} |")


def _medians(rows: list[Row]) -> list[Row]:
    """One row per (model, mode): median load and seed times, the most bytes, the first output."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.mode), []).append(row)
    return [Row(model, mode, statistics.median(r.load_s for r in g), max(r.sent_bytes for r in g),
                round(statistics.median(r.seed_s for r in g), 2), g[0].output,
                len({r.output for r in g}) == 1)
            for (model, mode), g in groups.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--engine", type=Path, required=True, help="folder with llama-server (patched for -all)")
    parser.add_argument("--rpc-engine", type=Path, help="folder with the patched ggml-rpc-server (default: --engine)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-predict", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the modes; the table shows median load")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="split-load-logs-"))
    _fnv_lib()  # compiled once up front, so that seeding times count hashing and writing only
    setup = Setup(args.engine, args.rpc_engine or args.engine, args.workers, args.threads, args.n_predict, logs)
    rows: list[Row] = []
    weights = {}
    for model in args.models:
        weights[model.name] = sum(size for _, size in tensor_spans(model))
        for _ in range(args.repeat):  # modes interleaved, so a busy moment hits all of them alike
            for mode in args.modes.split(","):
                row = run_mode(setup, model, mode)
                rows.append(row)
                print(f"{row.model} {mode}: load {row.load_s} s, {row.sent_bytes} bytes, {row.output!r:.60}",
                      file=sys.stderr, flush=True)
    print_table(_medians(rows), weights)
    print(f"\nlogs: {logs}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    shutil.rmtree(Path(tempfile.gettempdir()) / "meshllm-bench", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
