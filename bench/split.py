"""Pipeline split, measured side by side in one run: one llama-server on the whole model against
a stock llama.cpp RPC split and meshllm's 2- and 3-node splits (issue 5).

Per model, ``--rounds`` rounds over the modes (interleaved, so a busy machine slows all of them
alike); the table shows medians:

- ``solo``: one llama-server on the whole model (``-ngl 0`` on CPU, ``-ngl 999`` with ``--gpu``), the
  command line a meshllm node would run; ``solo-norepack`` (CPU only) the same with ``--no-repack``:
  the plain CPU kernels an RPC worker's CPU backend runs, so the output a CPU split must equal.
- ``stock-2``: llama-server ``--rpc`` to one plain ``ggml-rpc-server`` (no ``--gguf``, no
  ``GGML_RPC_HASH_THRESHOLD``) with the layer split meshllm computes for two equal nodes
  (``meshllm.reconcile.served.split_args``), the output head where stock llama.cpp puts it (a meshllm
  CPU host keeps it, ``split.head_args``). Its load time and decode come from a direct connection.
  Its bytes come from a second load in the first round through a ``CountingTcpRelay`` (stock RPC
  bytes do not vary between rounds), shown as the row ``stock-2 relay`` with that load's own
  figures, since a Python relay in the path costs decode.
- ``stock-2-head``: ``stock-2`` with the output head kept on the host, as a meshllm host does
  (``--override-tensor``; on a GPU host, where the head is on the host anyway, the same as ``stock-2``).
- ``stock-3``: the same with two plain ``ggml-rpc-server``s (three equal shares); ``stock-3-head``
  with the host's override as well.
- ``meshllm-2`` / ``meshllm-3``: real ``python -m meshllm`` node processes on 127.0.0.2.., one with
  ``--model M --max-vram CAP`` and the rest ``--standby --max-vram CAP --join TOKEN``, CAP chosen so
  that exactly 2 (3) nodes hold the model under placement's 1.1x rule. Load is from the start of the
  host's llama-server (``/proc`` start time) to its ``/health`` answering 200 (polled by the bench
  once the host's status names the port, else the ``since`` of the host's ready ServerStatus, which
  the node's 0.2 s probe sets); mesh formation and the workers' start are not included. Decode goes
  through the host node's OpenAI API (:9337 style port). Bytes over RPC are the host's
  ``rpc_tunnels`` counters in ``/api/status`` right after ready ("n/a" where the node has none).
  The default path: the host's llama-server connects to the workers' rpc-servers straight, proves the
  mesh's RPC key and seals every message (AES-256-GCM, engine patch 0005); no agent relays those
  bytes, so they are the kernel's counters of the host's connections to the workers (``ss -ti``:
  bytes acked and received). ``meshllm-2-direct`` / ``meshllm-3-direct``: ``--rpc-direct`` on every
  node (the same connection, unsealed); ``meshllm-2-tunnel`` / ``meshllm-3-tunnel``: ``--rpc-tunnel``
  (through the agents' QUIC tunnel, the default before patch 0005; bytes: the tunnel's counters).
  ``added ms/token vs solo`` is 1000/tok/s of the mode minus solo's; ``decode / stock-n`` compares
  with the stock split of as many participants.

Decode tok/s is llama-server's own ``timings.predicted_per_second`` of a non-streamed
``/v1/completions`` (temperature 0, ``ignore_eos``, ``--tokens``), after one warm-up request; the
median of ``--requests`` per round. Every mode's greedy text is compared with solo's (and on CPU
with solo ``--no-repack``'s: Q4_K weights are repacked for the solo host's kernels but not on an RPC
worker, and the text drifts apart after some tokens; F32/F16 models have no repack path).

    PYTHONPATH=$PWD .venv/bin/python bench/split.py [--rounds 3] [--save] [MODEL ...]
    PYTHONPATH=$PWD python3 bench/split.py --gpu [--model-dir DIR] 8b      # on a GPU machine

A MODEL is a .gguf path, ``tiny`` (a generated 8-layer F32 dense model, 32k vocabulary), ``8b``
(tinygguf's 8B-shaped F16 preset, 14.5 GB) or ``48b`` (its 48B preset, 96.9 GB; more than one 80 GB
GPU holds), written once into ``--model-dir``. Default: ``tiny`` and
gemma-3-270m on CPU, ``8b`` with ``--gpu``. It prints tables and never asserts (STYLE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from routed import NodeProcess, stop_nodes, wait_for

from meshllm.engine.build import find_engine
from meshllm.engine.capacity import detect_capacity
from meshllm.engine.ggufinfo import block_count
from meshllm.engine.process import LlamaServerConfig
from meshllm.reconcile.served import DesiredServer, split_args
from meshllm.testing.tcp_relay import CountingTcpRelay
from meshllm.testing.engines import terminate

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is Paris. The capital of Italy is"
MODES = ("solo", "solo-norepack", "stock-2", "stock-2-head", "stock-3", "stock-3-head", "meshllm-2", "meshllm-2-direct",
         "meshllm-2-tunnel", "meshllm-3", "meshllm-3-direct", "meshllm-3-tunnel")
PATH_FLAGS = {"": (), "-direct": ("--rpc-direct",), "-tunnel": ("--rpc-tunnel",)}  # mode suffix -> node flags
GEMMA = Path("~/.models/gemma-3-270m-q4_k_m.gguf").expanduser()
FIT = 1.1  # placement's rule: the participants' capacity must be >= 1.1 x the model's size
CAP_FRACTION = {2: 0.8, 3: 0.45}  # one node < 1.1, n nodes >= 1.1, n - 1 nodes < 1.1 (equal shares)
FAILED = "failed:"  # key prefix of the rounds a mode failed in
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- ports, processes, HTTP -----------------------------------------------------------------------
class Ports:
    """Free loopback ports, never the same one twice in a run (a node binds its ports only once it
    has started; meanwhile the kernel would offer the same free port again)."""

    def __init__(self) -> None:
        self.given: set[int] = set()

    def take(self, host: str = "127.0.0.1") -> int:
        import socket
        while True:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in self.given:
                self.given.add(port)
                return port


def http_json(url: str, body: dict[str, Any] | None = None, *, timeout: float = 2.0) -> Any:
    """GET (or POST ``body`` to) ``url``; the JSON answer, or None while nothing answers 200."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            return json.load(response) if response.status == 200 else None
    except (OSError, ValueError):
        return None


def healthy(port: int) -> bool:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def started_epoch(pid: int) -> float | None:
    """When ``pid`` started, as a ``time.time()`` value (10 ms resolution), from ``/proc``."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_boot


def argv_of(pid: int) -> list[str]:
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class Processes:
    """Every engine process the bench starts itself, stopped on exit whatever happened."""

    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], name: str, *, batch: bool,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` (``env`` added to the bench's); ``batch``: as SCHED_BATCH, as a meshllm node runs
        its CPU engines (``launch``), so that on a busy machine the bench's own engines are scheduled like
        the nodes' ones."""
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_as_batch if batch else None,
                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Newest first: a split's llama-server goes before the ggml-rpc-server it talks to (the other
        way round it aborts with "Remote RPC server crashed")."""
        for proc in reversed(self.procs):
            terminate(proc)
        self.procs.clear()


def _as_batch() -> None:
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # its threads inherit it


# -- what one mode measured -------------------------------------------------------------------------
@dataclass
class Sample:
    """One mode in one round."""

    mode: str
    participants: int
    load_s: float
    decode_tps: float
    text: str
    sent: int | None = None  # bytes host -> workers while loading (None: not measured)
    received: int | None = None  # bytes workers -> host while loading
    note: str = ""
    texts_agree: bool = True  # every measured request of the round gave the same text


@dataclass(frozen=True)
class Setup:
    engine: Path
    gpu: bool
    threads: int
    device: str
    tokens: int
    requests: int
    timeout: float
    workdir: Path
    ports: Ports
    gpus: int = 0  # --pin-gpus: participant i runs on GPU i mod gpus (CUDA_VISIBLE_DEVICES)
    stock_bytes: bool = True  # count stock-2's bytes in an extra load through a relay (round 1)

    def pinned(self, participant: int) -> dict[str, str]:
        """The environment that puts participant ``participant`` (0: the host) on its own GPU."""
        return {"CUDA_VISIBLE_DEVICES": str(participant % self.gpus)} if self.gpus else {}


def complete(url: str, model: str, tokens: int) -> tuple[str, float]:
    """One greedy non-streamed completion: (text, llama-server's decode tok/s)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "top_k": 1, "seed": 1,
            "ignore_eos": True, "cache_prompt": False}
    answer = http_json(f"{url}/v1/completions", body, timeout=600)
    if answer is None:
        raise RuntimeError(f"{url}/v1/completions did not answer 200")
    return answer["choices"][0]["text"], float(answer["timings"]["predicted_per_second"])


def decode(setup: Setup, url: str, model: str) -> tuple[float, str, bool]:
    """(median decode tok/s, the greedy text, whether every request gave that text); one warm-up first."""
    complete(url, model, setup.tokens)
    runs = [complete(url, model, setup.tokens) for _ in range(setup.requests)]
    texts = {text for text, _ in runs}
    return statistics.median(tps for _, tps in runs), runs[0][0], len(texts) == 1


def server_argv(setup: Setup, model: Path, port: int, *, gpu_layers: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The llama-server command line a meshllm node runs (``LlamaServerConfig``), here for the bench."""
    return LlamaServerConfig(binary=setup.engine / "llama-server", model_path=model, alias=model.stem, port=port,
                             gpu_layers=gpu_layers, threads=setup.threads, device=setup.device,
                             extra=extra).argv()


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Poll ``/health`` every 20 ms; the time.monotonic() it first answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with {proc.returncode}")
        if healthy(port):
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"llama-server on :{port} not ready after {timeout:.0f}s")


def run_solo(setup: Setup, model: Path, *, norepack: bool) -> Sample:
    mode = "solo-norepack" if norepack else "solo"
    procs = Processes(setup.workdir)
    try:
        port = setup.ports.take()
        argv = server_argv(setup, model, port, gpu_layers=999 if setup.gpu else 0,
                           extra=("--no-repack",) if norepack else ())
        started = time.monotonic()
        server = procs.start(argv, f"{model.stem}-{mode}", batch=not setup.gpu, env=setup.pinned(0))
        load = wait_healthy(port, server, setup.timeout) - started
        tps, text, agree = decode(setup, f"http://127.0.0.1:{port}", model.stem)
        return Sample(mode, 1, load, tps, text, texts_agree=agree)
    finally:
        procs.stop_all()


def stock_split_args(setup: Setup, model: Path, ports: list[int], *,
                     host_head: bool = False) -> tuple[int, tuple[str, ...]]:
    """The ``-ngl`` and ``--rpc``/``--tensor-split`` a meshllm host of an equal split uses; the output
    head left where stock llama.cpp puts it (the last device: on a CPU host, the last worker) unless
    ``host_head``."""
    n = len(ports) + 1
    desired = DesiredServer(model=model.stem, path=model, workers=tuple(f"w{i}" for i in ports),
                            tensor_split=tuple(round(1 / n, 4) for _ in range(n)),
                            n_layer=0 if setup.gpu else block_count(model))
    gpu_layers, extra = split_args(desired, [f"127.0.0.1:{port}" for port in ports], gpu=setup.gpu)
    if "--override-tensor" in extra and not host_head:
        at = extra.index("--override-tensor")
        extra = extra[:at] + extra[at + 2:]
    return gpu_layers, extra


def run_stock(setup: Setup, model: Path, *, relay: bool, n: int = 2, host_head: bool = False) -> Sample:
    """A stock RPC split of ``n`` participants on this machine, direct or (n = 2) through a byte-counting relay;
    ``host_head``: the host keeps the output head, as a meshllm host does."""
    mode = f"stock-{n}" + ("-head" if host_head else "") + (" relay" if relay else "")
    procs = Processes(setup.workdir)
    counter = None
    try:
        rpc_ports = [setup.ports.take() for _ in range(n - 1)]
        threads = setup.threads or max(1, (os.cpu_count() or 2) // 2)  # as meshllm's worker reconciler
        for i, rpc_port in enumerate(rpc_ports):
            worker_argv = [str(setup.engine / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port),
                           "-t", str(threads), *(["-d", setup.device] if setup.device else [])]
            worker = procs.start(worker_argv, f"{model.stem}-{mode.replace(' ', '-')}-rpc{i}",
                                 batch=not setup.device, env=setup.pinned(i + 1))
            wait_for(lambda: _port_open(rpc_port) or worker.poll() is not None, timeout=60,  # noqa: B023
                     what="ggml-rpc-server", nodes=[])
            if worker.poll() is not None:
                raise RuntimeError(f"ggml-rpc-server exited with {worker.returncode}")
        if relay:
            counter = CountingTcpRelay(rpc_ports[0])
        port = setup.ports.take()
        gpu_layers, extra = stock_split_args(setup, model, [counter.port] if counter else rpc_ports,
                                             host_head=host_head)
        started = time.monotonic()
        server = procs.start(server_argv(setup, model, port, gpu_layers=gpu_layers, extra=extra),
                             f"{model.stem}-{mode.replace(' ', '-')}-server", batch=not setup.gpu,
                             env=setup.pinned(0))
        load = wait_healthy(port, server, setup.timeout) - started
        sent = counter.to_server if counter else None
        received = counter.to_client if counter else None
        tps, text, agree = decode(setup, f"http://127.0.0.1:{port}", model.stem)
        return Sample(mode, n, load, tps, text, sent=sent, received=received, texts_agree=agree,
                      note=f"llama-server --n-gpu-layers {gpu_layers} {' '.join(extra)}"
                      + ("; through a CountingTcpRelay, first round only (its bytes are stock-2's)" if relay else ""))
    finally:
        procs.stop_all()
        if counter is not None:
            counter.close()


def _port_open(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# -- meshllm nodes ----------------------------------------------------------------------------------
def start_node(setup: Setup, name: str, host: str, *args: str, participant: int = 0) -> NodeProcess:
    """A ``python -m meshllm`` node on its own loopback address (its own process group, so a Ctrl-C
    reaches the bench first and the bench stops it in order), on its own GPU with ``--pin-gpus``."""
    state_dir = setup.workdir / name
    state_dir.mkdir(parents=True)
    port, console = setup.ports.take(), setup.ports.take()
    cmd = [sys.executable, "-m", "meshllm", "--port", str(port), "--console", str(console),
           "--state-dir", str(state_dir), "--bind-host", host, *args]
    if setup.threads:
        cmd += ["--threads", str(setup.threads)]
    if setup.device:
        cmd += ["--device", setup.device]
    env = {**os.environ, "MESHLLM_ENGINE_DIR": str(setup.engine), **setup.pinned(participant),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with (state_dir / "node.out").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return NodeProcess(name, state_dir, proc, port, console)


@dataclass
class HostServer:
    """The split's host llama-server as the bench saw it load."""

    node: NodeProcess
    model: str
    pid: int
    started: float  # time.time()
    ready: float  # time.time()
    how: str  # how ready was timed
    workers: list[str]


def _split_server(status: dict[str, Any] | None, n_workers: int) -> tuple[str, dict[str, Any]] | None:
    """(model name, the host's ServerStatus) of a split with ``n_workers`` workers, once it has a pid."""
    for model in (status or {}).get("models", []):
        for server in model["servers"]:
            if len(server.get("workers") or []) == n_workers and server["pid"] and server["port"]:
                return model["name"], server
    return None


def wait_host(setup: Setup, nodes: list[NodeProcess], n_workers: int) -> HostServer:
    """Watch the first node's status until the split's host llama-server answers ``/health``."""
    def seen() -> tuple[str, dict[str, Any]] | None:
        return _split_server(nodes[0].status(), n_workers)

    name, server = wait_for(seen, timeout=setup.timeout, what=f"a split with {n_workers} worker(s) to start",
                            nodes=nodes)
    pid, port = server["pid"], server["port"]
    started = started_epoch(pid) or server["since"]
    deadline = time.monotonic() + setup.timeout
    polls = 0
    while server["phase"] != "ready" and time.monotonic() < deadline:
        if healthy(port):  # polled by the bench: 20 ms resolution, not the node's 0.2 s probe
            ready, how = time.time(), "bench /health poll"
            break
        time.sleep(0.02)
        for node in nodes:
            node.check_alive()
        polls += 1
        if polls % 25:  # the node's status only twice a second: on 2 cores it competes with the load
            continue
        found = seen()
        if found is None or found[1]["pid"] != pid:
            raise RuntimeError(f"the host llama-server pid {pid} went away while loading")
        server = found[1]
    else:
        if server["phase"] != "ready":
            raise TimeoutError(f"the split's host llama-server not ready after {setup.timeout:.0f}s")
        ready, how = server["since"], "node probe (0.2 s)"
    ids = {node_id(n): n for n in nodes}
    return HostServer(ids[server["node"]], name, pid, started, ready, how, list(server["workers"]))


def log_tails(nodes: list[NodeProcess], lines: int = 12) -> None:
    """The last lines of each node's own log and of its engines' logs: why a split failed."""
    for node in nodes:
        for path in [node.state_dir / "node.out", *sorted((node.state_dir / "logs").glob("*.log"))]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                log(f"  --- {node.name} {path.name}:\n" + "\n".join(f"    {line[:300]}" for line in tail))


def node_id(node: NodeProcess) -> str:
    status = wait_for(node.status, timeout=30, what=f"node {node.name}'s API", nodes=[node])
    return str(status["node"]["id"])


def tunnel_bytes(host: HostServer) -> tuple[int | None, int | None]:
    """(sent, received) over the host's RPC tunnels for the model, or (None, None) where the node's
    status has no ``rpc_tunnels``."""
    tunnels = (host.node.status() or {}).get("rpc_tunnels")
    if tunnels is None:
        return None, None
    mine = [t for t in tunnels if t.get("target") in (None, host.model)]
    return sum(int(t.get("sent", 0)) for t in mine), sum(int(t.get("received", 0)) for t in mine)


def socket_bytes(endpoints: list[str]) -> tuple[int | None, int | None]:
    """(sent, received) of a direct split, which no agent relays: the kernel's counters of this
    machine's established TCP connections to ``endpoints`` (``ss -ti``: bytes acked, bytes received);
    (None, None) without ``ss`` (iproute2)."""
    if shutil.which("ss") is None:
        return None, None
    sent = received = 0
    for endpoint in endpoints:
        try:
            out = subprocess.run(["ss", "-tinH", "state", "established", "dst", endpoint], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
        sent += sum(int(n) for n in re.findall(r"bytes_acked:(\d+)", out))
        received += sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))
    return sent, received


def wait_listed(host: HostServer, timeout: float) -> None:
    def listed() -> bool:
        models = http_json(f"{host.node.api}/v1/models")
        return bool(models) and any(m["id"] == host.model for m in models["data"])
    wait_for(listed, timeout=timeout, what=f"{host.model} in the host's /v1/models", nodes=[host.node])


def form_mesh(setup: Setup, model: Path, n: int, *, path: str = "") -> list[NodeProcess]:
    cap = f"{int(model.stat().st_size * CAP_FRACTION[n])}B"
    flags = PATH_FLAGS[path]
    first = start_node(setup, "n1", "127.0.0.2", "--model", str(model), "--max-vram", cap, *flags)
    nodes = [first]
    token = wait_for(first.invite, timeout=60, what="the first node's token",
                     nodes=nodes)
    for i in range(2, n + 1):
        nodes.append(start_node(setup, f"n{i}", f"127.0.0.{i + 1}", "--standby", "--max-vram", cap,
                                "--join", token, *flags, participant=i - 1))
    return nodes


def run_meshllm(setup: Setup, model: Path, n: int, round_: int, *, path: str = "") -> Sample:
    nodes: list[NodeProcess] = []
    host: HostServer | None = None
    name = f"meshllm-{n}{path}"
    run_dir = setup.workdir / f"{model.stem}-{name}-r{round_}"
    mesh_setup = replace(setup, workdir=run_dir)
    try:
        formed = time.monotonic()
        nodes = form_mesh(mesh_setup, model, n, path=path)
        host = wait_host(mesh_setup, nodes, n - 1)
        argv = argv_of(host.pid)
        rpc = argv[argv.index("--rpc") + 1].split(",") if "--rpc" in argv else []
        direct_rpc = [e for e in rpc if not e.startswith("127.0.0.1:")]  # the workers' own addresses
        sent, received = socket_bytes(direct_rpc) if direct_rpc else tunnel_bytes(host)
        counted = "TCP counters (ss)" if direct_rpc else "tunnel counters"
        log(f"  host {host.node.name}, workers {len(host.workers)}, split started "
            f"{host.started - time.time() + time.monotonic() - formed:.1f}s after the first node; "
            f"ready timed by {host.how}; host argv: {' '.join(argv[argv.index('--n-gpu-layers'):]) if argv else '?'}")
        if setup.gpu and argv and argv[argv.index("--n-gpu-layers") + 1] != "999":
            log("  WARNING: the node did not run its llama-server on the GPU (no pynvml/NVML in the node?)")
        wait_listed(host, 60)
        tps, text, agree = decode(setup, host.node.api, host.model)
        split = " ".join(argv[argv.index("--n-gpu-layers"):]).replace(" --no-webui", "") if argv else "?"
        return Sample(name, n, host.ready - host.started, tps, text, sent=sent, received=received,
                      texts_agree=agree, note=f"host llama-server {split}; ready timed by {host.how}; "
                                            f"bytes: {counted}")
    except (RuntimeError, TimeoutError, OSError, KeyError, ValueError):
        log_tails(nodes)
        raise
    finally:
        if host is not None:  # the host first: its llama-server goes before the workers it depends on
            stop_nodes([host.node])
        if rest := [n for n in nodes if host is None or n is not host.node]:
            stop_nodes(rest)


# -- models -----------------------------------------------------------------------------------------
def weight_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF file: the file after its (aligned) header and tensor infos."""
    from meshllm.engine.ggufinfo import _read, _skip, _string  # the header walker ggufinfo uses itself

    with path.open("rb") as f:
        f.read(4)
        _read(f, "I")
        n_tensors, n_kv = int(_read(f, "Q")), int(_read(f, "Q"))  # type: ignore[call-overload]
        alignment = 32
        for _ in range(n_kv):
            key, kind = _string(f), int(_read(f, "I"))  # type: ignore[call-overload]
            if key == "general.alignment" and kind == 4:
                alignment = int(_read(f, "I"))  # type: ignore[call-overload]
            else:
                _skip(f, kind)
        for _ in range(n_tensors):
            _string(f)
            f.seek(8 * int(_read(f, "I")) + 4 + 8, 1)  # type: ignore[call-overload]  # dims, type, offset
        start = -(-f.tell() // alignment) * alignment
    return path.stat().st_size - start


def prepare_model(spec: str, model_dir: Path) -> Path:
    """The .gguf for ``spec``: a path, ``gemma`` (``GEMMA``), or ``tiny`` / ``8b`` / ``48b`` written once into
    ``model_dir``."""
    from meshllm.engine.tinygguf import PRESETS, write_dense, write_shaped

    model_dir.mkdir(parents=True, exist_ok=True)
    if spec == "tiny":
        path = model_dir / "tiny-dense-8L-256d-32k.gguf"
        if not path.exists():
            write_dense(path, n_layer=8, n_embd=256, n_ff=512, n_vocab=32000, dtype="f32")
        return path
    if spec in ("8b", "48b"):
        path = model_dir / f"synthetic-{spec}-f16.gguf"
        if not path.exists():
            log(f"writing the {spec.upper()}-shaped F16 model ({PRESETS[spec].n_bytes / 1e9:.1f} GB) to {path} ...")
            started = time.monotonic()
            write_shaped(path, spec)
            log(f"  written in {time.monotonic() - started:.0f}s")
        return path
    path = GEMMA if spec == "gemma" else Path(spec).expanduser()
    if not path.exists():
        raise SystemExit(f"no such model: {path}")
    return path


# -- rounds, medians, the table -----------------------------------------------------------------------
def run_mode(setup: Setup, model: Path, mode: str, round_: int) -> list[Sample]:
    if mode in ("solo", "solo-norepack"):
        return [run_solo(setup, model, norepack=mode == "solo-norepack")]
    if mode.startswith("stock-"):
        n, head = int(mode.split("-")[1]), mode.endswith("-head")
        direct = [run_stock(setup, model, relay=False, n=n, host_head=head)]
        if head:
            return direct
        return direct + ([run_stock(setup, model, relay=True)] if round_ == 0 and n == 2 and setup.stock_bytes else [])
    path = next(suffix for suffix in ("-direct", "-tunnel", "") if mode.endswith(suffix))
    return [run_meshllm(setup, model, int(mode.removesuffix(path).rsplit("-", 1)[1]), round_, path=path)]


def run_model(setup: Setup, model: Path, modes: list[str], rounds: int, *,
              after_round: Callable[[dict[str, list[Sample]], int], None]) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {}
    for round_ in range(rounds):
        order = modes[round_ % len(modes):] + modes[:round_ % len(modes)]  # who goes first rotates
        for mode in order:
            log(f"{model.name}: round {round_ + 1}/{rounds}, {mode} ...")
            try:
                got = run_mode(setup, model, mode, round_)
            except (RuntimeError, TimeoutError, OSError, KeyError, ValueError) as exc:
                log(f"  {mode} FAILED: {exc}")
                failed = Sample(mode, 0, 0.0, 0.0, "", note=f"FAILED in round {round_ + 1}: {str(exc)[:200]}")
                samples.setdefault(FAILED + mode, []).append(failed)
                continue
            for sample in got:
                samples.setdefault(sample.mode, []).append(sample)
                log(f"  {sample.mode}: load {sample.load_s:.2f}s, decode {sample.decode_tps:.1f} tok/s, "
                    f"sent {fmt_bytes(sample.sent)}, text {sample.text[:40]!r}")
        after_round(samples, round_ + 1)
    return samples


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _median(values: list[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if value is not None and ref else "-"


def _same(text: str, ref: list[Sample] | None) -> str:
    """yes, or NO with the character where the greedy texts part (- without a reference)."""
    if not ref:
        return "-"
    other = ref[0].text
    if text == other:
        return "yes"
    at = next((i for i, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
    return f"NO (from char {at})"


def table(model: Path, samples: dict[str, list[Sample]], *, gpu: bool, rounds: int) -> list[str]:
    weights = weight_bytes(model)
    load = {m: _median([s.load_s for s in g]) for m, g in samples.items()}
    tps = {m: _median([s.decode_tps for s in g]) for m, g in samples.items()}
    columns = ["mode", "participants", "load s", "load / solo", "decode tok/s", "decode / solo",
               "added ms/token vs solo", "decode / stock-2", "decode / stock-n", "bytes over RPC at load (to workers / back)", "% of weights", "output = solo"]
    if not gpu:
        columns.append("= solo --no-repack")
    columns.append("= stock-2")
    lines = [f"{model.name}: {fmt_bytes(weights)} of weights, medians of {rounds} round(s)",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    failures = {m[len(FAILED):]: g for m, g in samples.items() if m.startswith(FAILED)}
    samples = {m: g for m, g in samples.items() if not m.startswith(FAILED)}
    order = [*MODES[:3], "stock-2 relay", *MODES[3:]]

    def added(mode: str) -> str:
        solo, mine = tps.get("solo"), tps.get(mode)
        return f"{1000 / mine - 1000 / solo:+.2f}" if solo and mine else "-"

    samples = dict(sorted(samples.items(), key=lambda item: order.index(item[0]) if item[0] in order else 99))
    for mode, group in samples.items():
        sent = _median([s.sent for s in group])
        received = _median([s.received for s in group])
        varied = not all(s.texts_agree for s in group) or len({s.text for s in group}) > 1
        if mode == "stock-2" and sent is None and "stock-2 relay" in samples:  # counted in the relay's load
            sent = _median([s.sent for s in samples["stock-2 relay"]])
            received = _median([s.received for s in samples["stock-2 relay"]])
        share = f"{100 * sent / weights:.2f}%" if sent is not None else ("-" if mode.startswith("solo") else "n/a")
        moved = "-" if mode.startswith("solo") else \
            f"{fmt_bytes(None if sent is None else int(sent))} / {fmt_bytes(None if received is None else int(received))}"
        row = [mode, str(group[0].participants), f"{load[mode]:.2f}", _ratio(load[mode], load.get("solo")),
               f"{tps[mode]:.1f}", _ratio(tps[mode], tps.get("solo")), added(mode), _ratio(tps[mode], tps.get("stock-2")),
               _ratio(tps[mode], tps.get(f"stock-{group[0].participants}")),
               moved, share, _same(group[0].text, samples.get("solo")) + (" (varied)" if varied else "")]
        if not gpu:
            row.append(_same(group[0].text, samples.get("solo-norepack")))
        row.append(_same(group[0].text, samples.get("stock-2")))
        lines.append("| " + " | ".join(row) + " |")
    for mode, group in samples.items():
        notes = sorted({re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", s.note) for s in group if s.note})
        lines += [f"  {mode}: {note}" for note in notes]
    for mode, group in failures.items():
        lines += [f"  {mode}: {s.note}" for s in group]
    return lines


# -- command line -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="tiny, 8b, 48b or .gguf paths (default: tiny and gemma; 8b with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="llama-server on the GPU: -ngl 999, GPU split args")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the modes (default 3)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per request (default 64)")
    parser.add_argument("--requests", type=int, default=3, help="measured requests per mode and round (default 3)")
    parser.add_argument("--modes", default=None, help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--threads", type=int, default=0, help="llama-server/ggml-rpc-server threads (0: meshllm's)")
    parser.add_argument("--device", default="", help="--device for every engine process (default: llama.cpp's)")
    parser.add_argument("--pin-gpus", type=int, default=0, metavar="N",
                        help="N GPUs here: each participant on its own GPU (CUDA_VISIBLE_DEVICES): solo and the stock "
                             "split's host on GPU 0, its worker on GPU 1, meshllm node n<i> on GPU (i-1) mod N")
    parser.add_argument("--engine", type=Path, help="folder with the patched llama-server and ggml-rpc-server")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "meshllm-bench-models",
                        help="where tiny / 8b models are written once and reused")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds a load may take")
    parser.add_argument("--workdir", type=Path, help="keep the nodes' state and every log here (default: a temporary folder)")
    parser.add_argument("--no-stock-bytes", action="store_true",
                        help="skip the extra stock-2 load through a byte-counting relay (the 'stock-2 relay' row)")
    parser.add_argument("--save", action="store_true", help="also write the tables to bench/results/split-*.txt")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a killed bench still stops every process it started
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    modes = args.modes.split(",") if args.modes else [m for m in MODES if not (args.gpu and m == "solo-norepack")]
    engine = args.engine or find_engine(flavour="cuda" if args.gpu else None)
    if engine is None:
        raise SystemExit("no engine: build it (python -m meshllm engine build) or pass --engine / MESHLLM_ENGINE_DIR")
    if args.gpu and not detect_capacity().gpu:
        raise SystemExit("--gpu, but meshllm detects no GPU here (NVML through pynvml: pip install nvidia-ml-py);"
                         " its nodes would run llama-server on the CPU")
    specs = args.models or (["8b"] if args.gpu else ["tiny", str(GEMMA)])
    header = (f"bench/split.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, {'GPU' if args.gpu else 'CPU'}, "
              f"engine {engine}; rounds {args.rounds}, {args.tokens} tokens x {args.requests} requests "
              f"(+1 warm-up), modes {','.join(modes)}")
    log(header.replace("\n", "; "))
    out: list[str] = [header, ""]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.workdir)) if args.workdir
          else tempfile.TemporaryDirectory(prefix="meshllm-split-bench-")) as tmp:
        setup = Setup(engine=engine, gpu=args.gpu, threads=args.threads, device=args.device, tokens=args.tokens,
                      requests=args.requests, timeout=args.ready_timeout, workdir=Path(tmp), ports=Ports(),
                      gpus=args.pin_gpus, stock_bytes=not args.no_stock_bytes)
        for spec in specs:
            model = prepare_model(spec, args.model_dir)

            def partial(samples: dict[str, list[Sample]], done: int, model: Path = model) -> None:
                if args.save and done < args.rounds:  # after each round, so a run cut short keeps what it measured
                    save([*out, *table(model, samples, gpu=args.gpu, rounds=done),
                          f"(cut short? {done} of {args.rounds} rounds so far)"], gpu=args.gpu)

            samples = run_model(setup, model, modes, args.rounds, after_round=partial)
            lines = table(model, samples, gpu=args.gpu, rounds=args.rounds)
            print("\n".join(lines) + "\n", flush=True)
            out += [*lines, ""]
            if args.save:
                save(out, gpu=args.gpu)
    return 0


def save(lines: list[str], *, gpu: bool) -> None:
    path = REPO / "bench" / "results" / f"split-{'gpu' if gpu else 'cpu'}-{datetime.date.today()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
