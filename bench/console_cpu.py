"""What open consoles cost a node: its CPU with 0 and with 10 ``/api/events`` clients, idle and busy.

Starts a real node A serving a tiny model and a ``--client`` node B joined to it (real processes, real
QUIC), then measures A's CPU time (``/proc``, all its threads; its llama-server is another process
and not counted) over four phases, interleaved over ``--rounds`` rounds so that other jobs on the
machine land on every phase alike:

    idle/0    nothing asked, no console open
    idle/10   ten consoles streaming /api/events (keepalives, the hub's tick)
    busy/0    two clients streaming completions through B (routed to A over the HTTP tunnel) at a
              fixed rate (``--rate``, 10/s), and a model spec changed ``--churn`` (5) times a
              second through /api/apply: each change, and the metrics, become events
    busy/10   the same load with ten consoles open

Per event: the CPU the ten consoles add on a busy node (busy/10 minus busy/0) divided by the events
the hub published meanwhile (each one sent to ten clients). It prints a table and never asserts.

    MESHLLM_ENGINE_DIR=~/.cache/meshllm/engine/<build>/bin python bench/console_cpu.py [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from meshllm.engine.build import find_engine
from meshllm.engine.tinygguf import write_dense

from _common import cpu_seconds

PHASES = ("idle/0", "idle/10", "busy/0", "busy/10")
LINGER = 10.0  # api.events.EventHub: seconds its feed keeps going after the last console left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, root: Path, name: str, host: str, *extra: str) -> None:
        self.state_dir = root / name
        self.console, self.port = _free_port(), _free_port()
        self.state_dir.mkdir(parents=True)
        args = [sys.executable, "-m", "meshllm", "--bind-host", host, "--console", str(self.console), "--port",
                str(self.port), "--state-dir", str(self.state_dir), "--name", name, *extra]
        with (self.state_dir / "node.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def admin(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + (self.state_dir / "admin.token").read_text().strip()}

    def wait(self, check: str, timeout: float = 120) -> str:
        """Wait for the console (``token``) or for ``check`` to be listed in /v1/models."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited; see {self.state_dir / 'node.log'}")
            try:
                if check == "token":
                    return str(httpx.get(f"http://127.0.0.1:{self.console}/api/token", headers=self.admin(),
                                         timeout=5).json()["token"])
                models = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5).json()["data"]
                if any(m["id"] == check for m in models):
                    return check
            except (httpx.HTTPError, FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{check} not up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def console(port: int, stop: threading.Event, counts: list[int]) -> None:
    """One console on a plain socket (closed as soon as ``stop`` is set): count the events it gets."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        sock.settimeout(0.2)
        tail = b""
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            counts[0] += (tail + data).count(b"\nevent: ")
            tail = data[-7:]  # a marker cut in two is counted once, in the next read


def load(url: str, stop: threading.Event, done: list[int], rate: float) -> None:
    """Streamed completions at a fixed ``rate`` per second (the same load in every busy phase)."""
    body = {"model": "tiny-dense", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0, "stream": True}
    next_at = time.monotonic()
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            with client.stream("POST", url, json=body) as response:
                for _ in response.iter_raw():
                    pass
            done[0] += 1
            next_at += 1 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))


def churn(a: Node, model: Path, stop: threading.Event, rate: float) -> None:
    """Change the desired state ``rate`` times a second: a model pinned to no node (it never loads)
    whose context size flips, so each apply is one change event and no engine work."""
    url, flip, next_at = f"http://127.0.0.1:{a.console}/api/apply", 0, time.monotonic()
    with httpx.Client(timeout=30, headers=a.admin()) as client:
        while not stop.is_set():
            flip ^= 1
            spec = {"source": str(model), "ctxSize": 512 << flip, "placement": {"node": "nowhere"}}
            client.post(url, json=[{"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": "churn"},
                                    "spec": spec}]).raise_for_status()
            next_at += 1 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))


def phase(a: Node, b: Node, name: str, seconds: float, rate: float,
          changes: tuple[Path, float]) -> dict[str, float]:
    stop = threading.Event()
    consoles = 10 if name.endswith("/10") else 0
    counts = [[0] for _ in range(consoles)]
    requests = [0]
    threads = [threading.Thread(target=console, args=(a.console, stop, c))
               for c in counts]
    if name.startswith("busy"):
        threads += [threading.Thread(target=load, args=(f"http://127.0.0.1:{b.port}/v1/completions", stop, requests,
                                                        rate / 2))
                    for _ in range(2)]
        threads.append(threading.Thread(target=churn, args=(a, changes[0], stop, changes[1])))
    for thread in threads:
        thread.start()
    # connections open and snapshots sent, or (no console) the node's feed gone idle: the steady state
    time.sleep(1.0 if consoles else LINGER + 1.0)
    before, published, start = cpu_seconds(a.proc.pid), _published(counts), time.monotonic()
    asked = requests[0]
    time.sleep(seconds)
    cpu, wall = cpu_seconds(a.proc.pid) - before, time.monotonic() - start
    events = (_published(counts) - published) / max(1, consoles)
    asked = requests[0] - asked
    stop.set()
    for thread in threads:
        thread.join(40)
    return {"cpu": cpu / wall, "events": events / wall, "requests": asked / wall}


def _published(counts: list[list[int]]) -> int:
    return sum(c[0] for c in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second in the busy phases")
    parser.add_argument("--churn", type=float, default=5.0, help="desired-state changes per second when busy")
    args = parser.parse_args()
    engine = os.environ.get("MESHLLM_ENGINE_DIR") or str(find_engine() or "")
    if not engine:
        sys.exit("the llama.cpp engine is not built: meshllm engine build")
    os.environ["MESHLLM_ENGINE_DIR"] = engine
    with tempfile.TemporaryDirectory(prefix="console-cpu-") as tmp:
        root = Path(tmp)
        model = write_dense(root / "tiny-dense.gguf")
        a = Node(root, "a", "127.0.0.2", "--model", str(model))
        b: Node | None = None
        try:
            token = a.wait("token")
            a.wait("tiny-dense")
            b = Node(root, "b", "127.0.0.3", "--client", "--join", token)
            b.wait("tiny-dense")
            results: dict[str, list[dict[str, float]]] = {p: [] for p in PHASES}
            for _ in range(args.rounds):
                for name in PHASES:
                    results[name].append(phase(a, b, name, args.seconds, args.rate, (model, args.churn)))
        finally:
            for node in (b, a):
                if node is not None:
                    node.stop()
    report(results, args)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    mean = {p: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for p, rs in results.items()}
    print(f"node CPU with consoles open ({args.rounds} rounds x {args.seconds:.0f} s per phase, {os.cpu_count()} cores)")
    print(f"{'phase':<10} {'node CPU %':>11} {'events/s per console':>21} {'requests/s':>11}")
    for name in PHASES:
        m = mean[name]
        print(f"{name:<10} {100 * m['cpu']:>10.2f}% {m['events']:>21.2f} {m['requests']:>11.1f}")
    idle_extra = mean["idle/10"]["cpu"] - mean["idle/0"]["cpu"]
    busy_extra = mean["busy/10"]["cpu"] - mean["busy/0"]["cpu"]
    per_event = busy_extra / mean["busy/10"]["events"] if mean["busy/10"]["events"] else float("nan")
    print(f"10 consoles add {100 * idle_extra:.2f}% of a core idle, {100 * busy_extra:.2f}% busy; "
          f"{1000 * per_event:.2f} ms CPU per event sent to 10 consoles ({100 * per_event:.3f} ms per client)")


if __name__ == "__main__":
    main()
