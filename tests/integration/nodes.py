"""Run real meshllm node processes for integration tests, and clean them up whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshllm.testing.engines import engine_pids
from tests.conftest import free_port


@dataclass
class NodeProcess:
    """A ``python -m meshllm`` subprocess with its own ports and state folder."""

    models: list[str]
    state_dir: Path
    engine_dir: Path
    extra: list[str] = field(default_factory=list)
    allow_models: list[Path] = field(default_factory=list)  # folders manifests may name (--allow-models)
    port: int = field(default_factory=free_port)
    console: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "node.log"

    def start(self) -> NodeProcess:
        args = [sys.executable, "-m", "meshllm", "--port", str(self.port), "--console", str(self.console),
                "--state-dir", str(self.state_dir), *self.extra]
        for model in self.models:
            args += ["--model", model]
        for folder in self.allow_models:
            args += ["--allow-models", str(folder)]
        env = {**os.environ, "MESHLLM_ENGINE_DIR": str(self.engine_dir)}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.console}/api/status", timeout=5).json()
        return result

    def admin_headers(self) -> dict[str, str]:
        """The node's admin token, as the CLI presents it (read from the node's state folder)."""
        return {"Authorization": "Bearer " + (self.state_dir / "admin.token").read_text().strip()}

    def token(self, *, timeout: float = 60.0) -> str:
        """The invite token (``meshllm token``; for holders of the admin token), once the console is up."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                answer = httpx.get(f"http://127.0.0.1:{self.console}/api/token", headers=self.admin_headers(),
                                   timeout=5)
                answer.raise_for_status()
                token: str = answer.json()["token"]
                return token
            except (httpx.HTTPError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``meshllm ARGS`` against this node's console, as its operator (its state folder, its token)."""
        return subprocess.run([sys.executable, "-m", "meshllm", *args, "--console", str(self.console),
                               "--state-dir", str(self.state_dir)], input=stdin, capture_output=True, text=True,
                              timeout=timeout)

    def server(self, model: str) -> dict[str, Any]:
        for entry in self.status()["models"]:
            if entry["name"] == model and entry["servers"]:
                server: dict[str, Any] = entry["servers"][0]
                return server
        raise KeyError(model)

    def wait_ready(self, model: str, *, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until ``model`` is listed by /v1/models; returns its server status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                listed = httpx.get(f"{self.api}/v1/models", timeout=2).json()
                if any(m["id"] == model for m in listed["data"]):
                    return self.server(model)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{model} not ready after {timeout}s; node log:\n{self.log_text()}")

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}; log:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self, sig: signal.Signals = signal.SIGINT, *, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill_everything(self) -> None:
        """Teardown: the node and any llama-server it left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in engine_pids(self.state_dir):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Mesh:
    """Starts nodes on their own loopback addresses and tears every one of them down."""

    def __init__(self, root: Path, engine_dir: Path, *, allow_models: tuple[Path, ...] = ()) -> None:
        self.root, self.engine_dir, self.allow_models = root, engine_dir, allow_models
        self.nodes: list[NodeProcess] = []

    def start(self, name: str, host: str, *extra: str, models: tuple[str, ...] = ()) -> NodeProcess:
        node = NodeProcess(models=list(models), state_dir=self.root / name, engine_dir=self.engine_dir,
                           extra=["--bind-host", host, *extra], allow_models=list(self.allow_models)).start()
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.kill_everything()


def wait_for(check: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def listed(node: NodeProcess) -> set[str]:
    return {m["id"] for m in httpx.get(f"{node.api}/v1/models", timeout=5).json()["data"]}
