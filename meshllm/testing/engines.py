"""Find the llama.cpp servers a node started, from outside it: for tests and benchmarks that must
check that none is left behind, and clean up when one is. Stopping uses the one stop ladder
(``engine.process.stop_process_now``: the node's own ladder, in blocking form)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshllm.engine.process import stop_process_now

__all__ = ["engine_pids", "running", "terminate"]


@contextmanager
def running(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` started in its own session with its output in ``log``; stopped (``terminate``) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            terminate(proc)


def terminate(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> int:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL; returns the exit code once ``proc`` has ended."""
    return stop_process_now(proc, grace=grace)


def engine_pids(state_dir: Path) -> list[int]:
    """Live llama-server / ggml-rpc-server processes whose log is in ``state_dir`` (so: this node's)."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmd = (proc_dir / "cmdline").read_bytes().split(b"\0")
            stat = (proc_dir / "stat").read_text()
        except OSError:
            continue
        if not cmd or not cmd[0].endswith((b"llama-server", b"ggml-rpc-server")):
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            continue
        if _belongs_to(int(proc_dir.name), state_dir):
            pids.append(int(proc_dir.name))
    return pids


def _belongs_to(pid: int, state_dir: Path) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if str(fd.readlink()).startswith(str(state_dir)):
                return True
        except OSError:
            continue
    return False
