"""The node an agent talks to: one already listening on the port, else a client node started for it.

``probe`` asks ``127.0.0.1:PORT/v1/models``: a meshllm node answers with the models it routes (it is
reused as it is), nothing listening means the launcher starts a client node there (``ClientNode``), and
anything else (a 401 without the right key, another program) is a MeshError saying what to do.

The started node is ``meshllm --client`` in its own session (a Ctrl-C meant for the agent does not
reach it) with its own state folder, ``STATE/launch/PORT`` (its identity and its log, ``node.log``),
so it never shares an identity with the user's own node. It joins the mesh of, in order: the
``--join`` tokens, ``$MESHLLM_JOIN``, the mesh of the user's state folder (its credentials and the
members it last knew, as an invite token), or the mesh this launcher's node was in last time. The
token reaches it through its environment, never its command line. It requires a key on its API (the
user's ``--api-key``, else a fresh one), which only the agents are given. ``stop`` ends that process,
and only that one: SIGTERM (the node leaves the mesh), then SIGKILL after a grace period. Its pid and
key are kept in its folder (0600) for the other launchers on the port (``Sessions``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshllm.engine.models import canonical_name
from meshllm.errors import MeshError
from meshllm.state.schema import ModelName
from meshllm.store.mesh import JOIN_ENV, MESH_FILE, InviteToken, MeshCredentials, join_arguments, load_peers

__all__ = ["ClientNode", "Sessions", "join_token", "probe", "wait_served"]

KEY_ENV = "MESHLLM_API_KEY"  # the node's own key (see meshllm.api.keys)
PID_FILE, KEY_FILE = "node.pid", "client.key"
STOP_GRACE = 20.0
SETTLE = 5.0  # seconds to wait for a --model the mesh does not list yet, once it lists others


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def probe(port: int, key: str | None) -> list[ModelName] | None:
    """The models the node on ``port`` routes; None when nothing listens there."""
    url = f"http://127.0.0.1:{port}/v1/models"
    try:
        response = httpx.get(url, headers=_headers(key), timeout=5)
    except httpx.ConnectError:
        return None
    except httpx.HTTPError as exc:
        raise MeshError(f"{url} does not answer ({exc.__class__.__name__}); pass --port of a meshllm node") from None
    if response.status_code == 401:
        raise MeshError(f"the node on port {port} requires an API key" + (" and refused this one" if key else "")
                        + ": pass --api-key KEY or set MESHLLM_API_KEY (`meshllm keys add` creates one)")
    try:
        return [ModelName(str(m["id"])) for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise MeshError(f"port {port} is held by something that is not a meshllm node (GET /v1/models answered "
                        f"{response.status_code}); pass another --port") from None


def _saved_token(state_dir: Path) -> str | None:
    """An invite token for the mesh of a node's state folder: its credentials, the members it last
    knew and its own address (the node may be running on another port)."""
    try:
        body = json.loads((state_dir / MESH_FILE).read_text())
        creds = MeshCredentials(mesh_id=str(body["mesh"]), secret=bytes.fromhex(body["secret"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    port, peers = load_peers(state_dir)
    addrs = tuple(dict.fromkeys([*peers, *([f"127.0.0.1:{port}"] if port else [])]))
    return InviteToken(creds, addrs).encode() if addrs else None


def join_token(joins: Sequence[str], environ: Mapping[str, str], *, state_dir: Path, node_dir: Path) -> str | None:
    """The token the started node joins with (several ``--join`` of one mesh become one token with all
    their addresses); None when it rejoins the mesh it was in last time. Raises MeshError when there
    is no mesh to join."""
    tokens = join_arguments(joins, environ)
    if tokens:
        try:
            decoded = [InviteToken.decode(t) for t in tokens]
        except ValueError as exc:
            raise MeshError(f"--join: {exc}") from None
        if len({t.credentials for t in decoded}) > 1:
            raise MeshError("--join: the tokens belong to different meshes; join one mesh at a time")
        addrs = tuple(dict.fromkeys(a for t in decoded for a in t.addrs))
        return InviteToken(decoded[0].credentials, addrs).encode()
    saved = _saved_token(state_dir)
    if saved is not None:
        return saved
    if (node_dir / MESH_FILE).is_file():
        return None
    raise MeshError(f"no mesh to join: nothing listens on the port, and {state_dir} holds no mesh; pass --join "
                    "TOKEN|@FILE (a member prints one with `meshllm token`) or set MESHLLM_JOIN")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not ours
        return False
    return True


def _runs_in(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is a meshllm node of ``state_dir`` (not a process that reused the pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        done = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False)
        return str(state_dir) in done.stdout
    return str(state_dir).encode() in cmdline


@dataclass
class ClientNode:
    """A ``meshllm --client`` process a launcher started on ``port``: its pid, its API key and its state
    folder (``node.pid`` and ``client.key`` in it, 0600, so that the other launchers of this user on the
    port use it too). ``proc`` is set in the launcher that started it."""

    pid: int
    port: int
    state_dir: Path
    key: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "node.log"

    @classmethod
    def start(cls, *, port: int, state_dir: Path, token: str | None, key: str) -> ClientNode:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {k: v for k, v in os.environ.items() if k not in (JOIN_ENV, KEY_ENV)}
        env[KEY_ENV] = key
        if token:
            env[JOIN_ENV] = token
        args = [sys.executable, "-m", "meshllm", "--client", "--port", str(port), "--console", str(_free_port()),
                "--state-dir", str(state_dir)]
        with (state_dir / "node.log").open("ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        for name, text in ((KEY_FILE, key), (PID_FILE, str(proc.pid))):
            fd = os.open(state_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
        return cls(proc.pid, port, state_dir, key, proc)

    @classmethod
    def running(cls, *, port: int, state_dir: Path) -> ClientNode | None:
        """The node another launcher started here and left running (for a launcher still using it, or
        killed before it could stop it); None when there is none."""
        try:
            pid = int((state_dir / PID_FILE).read_text())
            key = (state_dir / KEY_FILE).read_text().strip()
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid) or not _runs_in(pid, state_dir):
            return None
        return cls(pid, port, state_dir, key)

    def alive(self) -> bool:
        return self.proc.poll() is None if self.proc is not None else _pid_alive(self.pid)

    def check_alive(self) -> None:
        if not self.alive():
            code = f"exit {self.proc.returncode}" if self.proc is not None else "ended"
            raise MeshError(f"the client node started on port {self.port} ended ({code}): "
                            f"{self.last_line()} (log: {self.log_path})")

    def last_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1].strip() if lines else "no log"

    def stop(self) -> None:
        """SIGTERM (the node leaves the mesh), then SIGKILL after the grace period."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            deadline = time.monotonic() + STOP_GRACE
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        for name in (PID_FILE, KEY_FILE):
            (self.state_dir / name).unlink(missing_ok=True)


class Sessions:
    """The launchers using the node of one port: each holds a shared lock on ``sessions.lock`` while its
    agent runs, and an exclusive one on ``start.lock`` while it finds or starts the node (two launchers
    never start two nodes on one port). The last launcher to leave stops a node a launcher started."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir = state_dir
        self._fd = os.open(state_dir / "sessions.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        fd = os.open(self.state_dir / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def last(self) -> bool:
        """Whether no other launcher uses the node now; if so this one holds the lock alone until ``close``."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self._fd)


def wait_served(port: int, key: str | None, *, wanted: str = "", timeout: float,
                node: ClientNode | None = None) -> list[ModelName]:
    """The models the node on ``port`` routes, once it routes one (and ``wanted``, or ``SETTLE`` seconds
    passed since it listed others). Raises MeshError when the node ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    first_listed: float | None = None
    served: list[ModelName] = []
    while True:
        if node is not None:
            node.check_alive()
        try:
            served = probe(port, key) or []
        except MeshError:
            if node is None:
                raise
        now = time.monotonic()
        if served and first_listed is None:
            first_listed = now
        settled = first_listed is not None and now - first_listed > SETTLE
        if served and (not wanted or {wanted, canonical_name(wanted)} & set(served) or settled):
            return served
        if now > deadline:
            where = f" (log: {node.log_path}: {node.last_line()})" if node else ""
            raise MeshError(f"no model is ready in the mesh after {timeout:.0f}s on port {port}{where}; "
                            "is a member serving one? (`meshllm get models` on it)")
        time.sleep(0.2)
