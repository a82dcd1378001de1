"""``launch``: point an agent at the mesh, run it, and clean up after it.

In order: the tool must be installed (else one line saying how to install it, and nothing started);
the node on ``--port`` is reused when one answers, else a client node is started there
(``launchers.node``); once the node routes a model, the model is chosen (``launchers.choice``), the
tool's configuration is written (``launchers.tools``) and the tool runs with the user's arguments, in
the foreground. When it exits, the node the launcher started, and only that one, is stopped, and
the tool's exit code is the launcher's (128 + N when a signal N ended it).

While the tool runs, the launcher ignores SIGINT (the terminal sends Ctrl-C to the tool too, which
decides what it means) and hands SIGTERM and SIGHUP on to the tool, so the node is stopped however
the session ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from meshllm.api.keys import new_key
from meshllm.errors import MeshError
from meshllm.launchers.choice import choose_model
from meshllm.launchers.node import ClientNode, Sessions, join_token, probe, wait_served
from meshllm.launchers.tools import Prepared, Target, Tool

__all__ = ["LaunchRequest", "launch"]

PLACEHOLDER_KEY = "mesh"  # what an agent presents to a node that requires no key (they insist on one)
_CONSUMED = ("MESHLLM_JOIN", "MESHLLM_API_KEY")  # read by the launcher, not handed on to the agent


@dataclass(frozen=True)
class LaunchRequest:
    state_dir: Path
    model: str = ""
    port: int = 9337
    joins: tuple[str, ...] = ()
    api_key: str | None = None
    args: tuple[str, ...] = field(default=())
    wait: float = 90.0  # seconds for a node to route a model


def launch(tool: Tool, request: LaunchRequest, *, environ: Mapping[str, str] | None = None,
           announce: Callable[[str], None] = print) -> int:
    """Run ``tool`` against the mesh as ``request`` says; its exit code."""
    environ = dict(os.environ if environ is None else environ)
    exe = shutil.which(tool.binary, path=environ.get("PATH"))
    if exe is None:
        raise MeshError(f"{tool.binary} ({tool.title}) is not installed or not on PATH; install it: {tool.install}")
    sessions = Sessions(request.state_dir / "launch" / str(request.port))
    node: ClientNode | None = None
    prepared: Prepared | None = None
    try:
        with sessions.starting():
            node = _node(request, environ, sessions.state_dir, announce)
            key = node.key if node is not None else request.api_key
            served = wait_served(request.port, key, wanted=request.model, timeout=request.wait, node=node)
        model = choose_model(served, request.model)
        target = Target(request.port, model, tuple(served), key or PLACEHOLDER_KEY)
        prepared = tool.prepare(target, request.args, environ, request.state_dir / "launch")
        for path in prepared.written:
            announce(f"meshllm: wrote {path}")
        announce(f"meshllm: {tool.title} on {model} via http://127.0.0.1:{request.port}"
                 + (f" (the mesh serves {len(served)} models)" if len(served) > 1 else ""))
        return _run(exe, prepared, environ)
    finally:
        for path in prepared.temporary if prepared else []:
            path.unlink(missing_ok=True)
        if node is not None and sessions.last():
            node.stop()
            announce(f"meshllm: stopped the client node on port {request.port}")
        sessions.close()


def _node(request: LaunchRequest, environ: Mapping[str, str], node_dir: Path,
          announce: Callable[[str], None]) -> ClientNode | None:
    """The launchers' node on the port: one a launcher started there, else None when a node (the
    user's own, never stopped) answers there, else a new client node."""
    node = ClientNode.running(port=request.port, state_dir=node_dir)
    if node is not None:
        announce(f"meshllm: using the client node another launcher started on port {request.port} "
                 "(the last launcher to exit stops it)")
    elif probe(request.port, request.api_key) is None:
        token = join_token(request.joins, environ, state_dir=request.state_dir, node_dir=node_dir)
        node = ClientNode.start(port=request.port, state_dir=node_dir, token=token,
                                key=request.api_key or new_key())
        announce(f"meshllm: started a client node on port {request.port} (log: {node.log_path})")
    elif request.joins:
        announce(f"meshllm: a node already listens on port {request.port}: using it (--join is not needed)")
    return node


def _run(exe: str, prepared: Prepared, environ: dict[str, str]) -> int:
    env = {k: v for k, v in environ.items() if k not in (*_CONSUMED, *prepared.unset)}
    env.update(prepared.env)
    proc = subprocess.Popen([exe, *prepared.args], env=env)
    with _forwarding(proc):
        code = proc.wait()
    return 128 - code if code < 0 else code


@contextmanager
def _forwarding(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """While the tool runs: ignore SIGINT, pass SIGTERM and SIGHUP on to it."""
    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGHUP: signal.signal(signal.SIGHUP, forward)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
