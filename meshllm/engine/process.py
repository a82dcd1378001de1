"""Start and stop engine processes (llama-server, ggml-rpc-server) the way a supervisor should.

Each process is launched directly (no shell), in its own session so a terminal's Ctrl-C reaches only
meshllm, with stdout and stderr appended to a log file (never an unread pipe). Stopping is one ladder
(``stop_steps``): SIGTERM to the process group, a grace period, then SIGKILL, waited on without
blocking the event loop (``stop_process``) or, for tests and benchmarks, in plain code
(``stop_process_now``).
Ports and log names derive from (node, model) so a restarted node finds its own processes again,
and ``adopt`` takes one of them back by pid: a process that is not our child, which we can poll
and stop (through /proc and signals) but whose exit status nobody can tell us.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from meshllm.engine.templates import template_arguments

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "UNKNOWN_EXIT",
    "EngineProcess",
    "LlamaServerConfig",
    "POOLING_TYPES",
    "ServingOptions",
    "adopt",
    "candidate_ports",
    "describe_exit",
    "launch",
    "log_tail",
    "port_is_free",
    "safe_name",
    "stop_process",
    "stop_process_now",
    "stop_processes_now",
    "stop_steps",
]

PORT_BASE = 41000
PORT_SPAN = 8000
UNKNOWN_EXIT = -256  # an adopted process ended: it is not our child, so its exit status is not ours to read


def safe_name(text: str) -> str:
    """A file-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def candidate_ports(key: str, *, base: int = PORT_BASE, span: int = PORT_SPAN) -> Iterator[int]:
    """Deterministic sequence of loopback ports for ``key``: the same key always tries the same ports first."""
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % span
    for i in range(span):
        yield base + (start + i) % span


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama-server binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# Tokens a request that sets no limit (no max_tokens, n_predict) may generate: llama-server's own default
# runs to the end of the context (32,767 tokens, 12 minutes on a 2-core CPU for a model that never stops).
DEFAULT_MAX_TOKENS = 512


POOLING_TYPES = ("none", "mean", "cls", "last", "rank")  # llama-server's --pooling


@dataclass(frozen=True)
class ServingOptions:
    """What a model's spec asks of its llama-server beyond loading it: embeddings (and their pooling),
    reranking, a chat template of its own."""

    embeddings: bool = False
    pooling: str = ""  # one of POOLING_TYPES; empty: the model's own
    rerank: bool = False
    chat_template: str = ""  # a built-in template's name or a jinja template; empty: the GGUF's (or meshllm's)

    def argv(self) -> list[str]:
        args = ["--embeddings"] if self.embeddings else []
        if self.pooling:
            args += ["--pooling", self.pooling]
        if self.rerank:
            args.append("--rerank")
        if self.chat_template:
            args += template_arguments(self.chat_template)
        return args


@dataclass(frozen=True)
class LlamaServerConfig:
    """Everything that shapes a llama-server command line; its digest tells whether a restart is due."""

    binary: Path
    model_path: Path
    alias: str
    port: int
    ctx_size: int = 0
    gpu_layers: int = 0
    threads: int = 0
    parallel: int = 0
    device: str = ""
    draft_path: Path | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS  # what a request that sets no limit may generate (-1: no limit)
    chat: tuple[str, ...] = ()  # a chat format for a GGUF without a template (engine.templates.chat_arguments)
    serving: ServingOptions = ServingOptions()  # the spec's own (its chat template replaces ``chat``)
    extra: tuple[str, ...] = field(default=())

    def argv(self) -> list[str]:
        args = [
            str(self.binary), "--model", str(self.model_path), "--alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n-gpu-layers", str(self.gpu_layers), "--no-webui", "--n-predict", str(self.max_tokens),
        ]
        if self.ctx_size:
            args += ["--ctx-size", str(self.ctx_size)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.parallel:
            args += ["--parallel", str(self.parallel)]
        if self.device:
            args += ["--device", self.device]
        if self.draft_path is not None:  # speculative decoding, the draft wholly on the same device
            args += ["--model-draft", str(self.draft_path), "--n-gpu-layers-draft", str(self.gpu_layers)]
        chat = [] if self.serving.chat_template else list(self.chat)
        return args + chat + self.serving.argv() + list(self.extra)

    def digest(self) -> str:
        return hashlib.sha256("\0".join(self.argv()).encode()).hexdigest()[:16]


@dataclass
class EngineProcess:
    """A running engine process we launched (``popen`` set) or adopted by pid (``start_ticks`` set)."""

    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    start_ticks: int = 0  # /proc/<pid>/stat start time of an adopted process: a reused pid is not it

    @property
    def adopted(self) -> bool:
        return self.popen is None

    def poll(self) -> int | None:
        """The exit code once the process has ended (``UNKNOWN_EXIT`` for an adopted one), else None.
        Never blocks."""
        if self.exit_code is not None:
            return self.exit_code
        if self.popen is not None:
            self.exit_code = self.popen.poll()
        else:
            stat = _proc_stat(self.pid)
            if stat is None or stat[0] in _DEAD or stat[1] != self.start_ticks:
                self.exit_code = UNKNOWN_EXIT
        return self.exit_code


_DEAD = ("Z", "X")  # a zombie has ended: only its parent (no longer us, after a restart) can reap it


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of ``pid``, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def adopt(pid: int, argv: Sequence[str], *, log_path: Path) -> EngineProcess | None:
    """A handle on a process this node started before it restarted, or None when ``pid`` is gone, a
    zombie, or runs anything but exactly ``argv`` (the pid was reused: that process is not ours)."""
    before = _proc_stat(pid)
    if before is None or before[0] in _DEAD:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if cmdline.split(b"\0")[:-1] != [os.fsencode(arg) for arg in argv]:
        return None
    proc = EngineProcess(pid=pid, log_path=log_path, start_ticks=before[1])
    return proc if proc.poll() is None else None


def describe_exit(code: int) -> str:
    """How a process ended, in words: 'exit code 1', 'killed by SIGKILL'."""
    if code == UNKNOWN_EXIT:
        return "exit status unknown (adopted, not our child)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def launch(argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
           batch: bool = False) -> EngineProcess:
    """Start ``argv`` in its own session with output appended to ``log_path``.

    ``batch`` schedules it as a batch job (SCHED_BATCH): its threads then never preempt another task
    on wakeup. For an engine that decodes on the CPU this keeps the node itself (proxy, gossip
    heartbeats) responsive while the engine takes every core; it costs the engine nothing when the
    node is idle."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **(env or {})},
        )
    if batch:
        _schedule_as_batch(popen.pid)
    return EngineProcess(pid=popen.pid, log_path=log_path, popen=popen)


def _schedule_as_batch(pid: int) -> None:
    """SCHED_BATCH for every thread of ``pid`` (threads it starts later inherit it)."""
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except (OSError, AttributeError):
            pass  # gone already, or a platform without SCHED_BATCH: the default policy is fine


def stop_steps(proc: EngineProcess | subprocess.Popen[bytes], *, grace: float,
               first: signal.Signals = signal.SIGTERM) -> Iterator[float]:
    """The one stop ladder: ``first`` (SIGTERM) to the process group, up to ``grace`` seconds for it to
    end, then SIGKILL until it is gone. It yields how long to wait before looking again, so that the
    caller waits its own way: ``stop_process`` without blocking the event loop, ``stop_process_now``
    in plain code, ``stop_processes_now`` for several at once."""
    proc = _handle(proc)
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, first)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        yield 0.02
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
        while proc.poll() is None:
            yield 0.02


async def stop_process(proc: EngineProcess, *, grace: float = 5.0) -> int:
    """The stop ladder (``stop_steps``) without blocking the event loop. Returns the exit code."""
    for pause in stop_steps(proc, grace=grace):
        await anyio.sleep(pause)
    return proc.exit_code or 0


def stop_process_now(proc: EngineProcess | subprocess.Popen[bytes], *, grace: float = 3.0,
                     first: signal.Signals = signal.SIGTERM) -> int:
    """The stop ladder, blocking: for plain code (tests, benchmarks, a last resort at exit)."""
    return stop_processes_now([proc], grace=grace, first=first)[0]


def stop_processes_now(procs: Sequence[EngineProcess | subprocess.Popen[bytes]], *, grace: float = 3.0,
                       first: signal.Signals = signal.SIGTERM) -> list[int]:
    """The stop ladder for several processes at once (one grace period for all), blocking; their exit
    codes."""
    handles = [_handle(proc) for proc in procs]
    ladders = [stop_steps(proc, grace=grace, first=first) for proc in handles]
    while ladders:
        steps = [(ladder, next(ladder, None)) for ladder in ladders]
        ladders = [ladder for ladder, pause in steps if pause is not None]
        if ladders:
            time.sleep(min(pause for _, pause in steps if pause is not None))
    return [proc.exit_code or 0 for proc in handles]


def _handle(proc: EngineProcess | subprocess.Popen[bytes]) -> EngineProcess:
    if isinstance(proc, EngineProcess):
        return proc
    handle = EngineProcess(pid=proc.pid, log_path=Path(os.devnull), popen=proc)
    handle.poll()
    return handle


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def log_tail(path: Path, *, lines: int = 3, max_bytes: int = 8192) -> str:
    """The last non-empty lines of a log file, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])
