"""Split bring-up from nothing: each node fetching only its share, against every node fetching the whole file.

Three real node processes (``python -m meshllm``) on 127.0.0.2-4, each with an empty models folder of its
own, a model on the local hub server (``meshllm.testing.hubserver``) that no node can hold alone (``--max-vram``
0.5 / 0.35 / 0.35 of its size: host and two workers). The hub is throttled per response (``--link-mbps``,
default 100 MB/s: a fast link from each node to the hub, the CPU of this machine is not the limit then).
Two modes, run in turn in one process, the order rotating every round:

- ``share``: the nodes start at once with ``--model ORG/REPO/FILE.gguf``; each fetches the GGUF header and
  only the tensors it holds (``reconcile.shares``), then the split loads;
- ``whole``: every node first fetches the whole file (``meshllm download``, the three in parallel, as three
  machines would), then the nodes start with the file in place, and the split loads.

It prints, per mode, seconds from nothing to the first greedy answer through the host's API (median of the
rounds), bytes each node fetched and the disk its copy takes (st_blocks), and share / whole.
Usage: python bench/split_fetch.py [--layers 8] [--embd 768] [--ff 2048] [--rounds 2] [--link-mbps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from meshllm.engine.build import find_engine
from meshllm.engine.tinygguf import write_dense
from meshllm.testing.hubserver import HubServer

REPO, FILE, MODEL = "bench/split-fetch-GGUF", "split-fetch.gguf", "split-fetch"
NODES = (("a", "127.0.0.2", 0.5), ("b", "127.0.0.3", 0.35), ("c", "127.0.0.4", 0.35))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, root: Path, name: str, host: str, vram: int, env: dict[str, str]) -> None:
        self.name, self.host, self.vram = name, host, vram
        self.state, self.models = root / name, root / f"models-{name}"
        self.port, self.console = free_port(), free_port()
        self.env = {**env, "MESHLLM_MODELS_DIR": str(self.models)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "meshllm", "--port", str(self.port), "--console", str(self.console),
                "--state-dir", str(self.state), "--bind-host", self.host, "--max-vram", f"{self.vram}B", *extra]
        with (self.state / "node.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    def get(self, path: str) -> Any:
        headers = {}
        if (self.state / "admin.token").exists():
            headers["Authorization"] = "Bearer " + (self.state / "admin.token").read_text().strip()
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.console}{path}", headers=headers, timeout=5)
            return answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def answer(node: Node) -> bool:
    try:
        r = httpx.post(f"http://127.0.0.1:{node.port}/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def bring_up(root: Path, size: int, env: dict[str, str], *, whole: bool) -> dict[str, Any]:
    nodes = [Node(root, name, host, int(size * share), env) for name, host, share in NODES]
    source = f"{REPO}/{FILE}"
    start = time.perf_counter()
    try:
        if whole:  # as three machines would: each downloads the file, at once
            fetches = [subprocess.Popen([sys.executable, "-m", "meshllm", "download", "--quiet", source],
                                        env=n.env) for n in nodes]
            assert all(p.wait() == 0 for p in fetches)
        a = nodes[0]
        a.start("--model", source)
        token = wait(lambda: (a.get("/api/token") or {}).get("token"), 60, "the invite token")
        for n in nodes[1:]:
            n.start("--standby", "--join", token)
        wait(lambda: answer(a), 300, "the split's first answer")
        took = time.perf_counter() - start
        condition = next(m["condition"] for m in a.get("/api/status")["models"] if m["name"] == MODEL)
        assert condition["workers"] and len(condition["workers"]) == 2, condition
    finally:
        for n in reversed(nodes):
            n.stop()
    fetched, disk = {}, {}
    for n in nodes:
        copies = list(n.models.glob(".split/*/*.tensors.json"))
        if copies:
            fetched[n.name] = json.loads(copies[0].read_text())["fetched"]
            disk[n.name] = Path(str(copies[0]).removesuffix(".tensors.json")).stat().st_blocks * 512
        elif (n.models / FILE).exists():
            fetched[n.name] = disk[n.name] = (n.models / FILE).stat().st_blocks * 512
    return {"seconds": took, "fetched": fetched, "disk": disk}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--ff", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--link-mbps", type=float, default=100.0, help="MB/s per response from the hub")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    engine = find_engine()
    if engine is None:
        print("the llama.cpp engine is not built: run `meshllm engine build`", file=sys.stderr)
        return 1
    results: dict[str, list[dict[str, Any]]] = {"share": [], "whole": []}
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-splitfetch-") as tmp, \
            HubServer(rate=int(args.link_mbps * 1e6)) as hub:
        model = write_dense(Path(tmp) / FILE, n_layer=args.layers, n_embd=args.embd, n_ff=args.ff, n_vocab=512)
        size = model.stat().st_size
        hub.add(REPO, FILE, model)
        env = {**os.environ, "MESHLLM_ENGINE_DIR": str(engine), "HF_ENDPOINT": hub.url}
        for round_ in range(args.rounds):
            for mode in (("share", "whole") if round_ % 2 == 0 else ("whole", "share")):
                root = Path(tmp) / f"{mode}-{round_}"
                results[mode].append(bring_up(root, size, env, whole=mode == "whole"))
                shutil.rmtree(root, ignore_errors=True)
                print(f"round {round_} {mode}: {results[mode][-1]['seconds']:.1f} s", flush=True)
    lines = [f"split bring-up from nothing, 3 nodes (host + 2 workers), model {size / 1e6:.1f} MB "
             f"({args.layers} layers, d {args.embd}, ff {args.ff}, F32), hub at {args.link_mbps:g} MB/s per "
             f"response, {args.rounds} rounds, {os.cpu_count()} cores",
             f"{'mode':<7}{'s (p50)':>9}{'fetched MB a/b/c':>22}{'disk MB a/b/c':>20}"]
    for mode, runs in results.items():
        last = runs[-1]
        fetched = "/".join(f"{last['fetched'].get(n, 0) / 1e6:.1f}" for n, _, _ in NODES)
        disk = "/".join(f"{last['disk'].get(n, 0) / 1e6:.1f}" for n, _, _ in NODES)
        lines.append(f"{mode:<7}{statistics.median(r['seconds'] for r in runs):>9.1f}{fetched:>22}{disk:>20}")
    ratio = statistics.median(s["seconds"] / w["seconds"] for s, w in zip(results["share"], results["whole"],
                                                                           strict=True))
    lines.append(f"share / whole bring-up time: {ratio:.2f}x (median of per-round ratios)")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
