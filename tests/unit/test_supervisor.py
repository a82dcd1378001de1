"""The real process supervisor on small Python processes: launch, readiness, exits reported as events,
the one stop ladder (without blocking the caller), adoption of recorded processes, stop at shutdown."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from meshllm.engine.process import stop_process_now
from meshllm.reconcile.supervisor import HttpReady, LaunchSpec, ListenReady, ProcessPhase, ProcessSupervisor
from meshllm.store.db import NodeStore, ProcessRecord

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


LISTEN = """
import socket, sys, time
time.sleep(0.3)  # "loading"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
time.sleep(60)
"""
HEALTH = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *args): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('deaf' + ' now', flush=True); "
            "time.sleep(60)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def supervising(tmp_path: Path, *, grace: float = 5.0) -> AsyncIterator[tuple[ProcessSupervisor, NodeStore]]:
    store = await NodeStore.open(tmp_path / "state")
    try:
        supervisor = ProcessSupervisor(store=store, grace=grace, probe_every=0.05)
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            yield supervisor, store
            tg.cancel_scope.cancel()
    finally:
        await store.aclose()


async def until_phase(supervisor: ProcessSupervisor, key: str, phase: ProcessPhase, *, timeout: float = 30) -> None:
    changed = anyio.Event()
    handle = supervisor.subscribe(lambda _key: changed.set())
    try:
        with anyio.fail_after(timeout):  # generous: Python start-up on a loaded 2-core machine is slow
            while (view := supervisor.get(key)) is None or view.phase is not phase:
                with anyio.move_on_after(0.5):  # the events are the fast path; the look is the safety net
                    await changed.wait()
                changed = anyio.Event()
    finally:
        supervisor.unsubscribe(handle)


def spec(tmp_path: Path, key: str, code: str, port: int, *, ready: ListenReady | HttpReady | None = None) -> LaunchSpec:
    return LaunchSpec(key=key, model=key, argv=(sys.executable, "-c", code, str(port)), port=port,
                      log_path=tmp_path / f"{key}.log", ready=ready or ListenReady("127.0.0.1", port), argv_hash="h")


async def test_a_process_is_recorded_probed_ready_and_its_exit_reported(tmp_path: Path) -> None:
    async with supervising(tmp_path) as (supervisor, store):
        port = free_port()
        view = await supervisor.launch(spec(tmp_path, "listen", LISTEN, port))
        assert view.phase is ProcessPhase.STARTING
        assert [(r.key, r.pid, r.port) for r in await store.processes()] == [("listen", view.pid, port)]
        await until_phase(supervisor, "listen", ProcessPhase.READY)

        port = free_port()
        await supervisor.launch(spec(tmp_path, "health", HEALTH, port, ready=HttpReady(port)))
        await until_phase(supervisor, "health", ProcessPhase.READY)

        crash = "import sys; print('out of memory', flush=True); sys.exit(3)"
        await supervisor.launch(spec(tmp_path, "crash", crash, free_port()))
        await until_phase(supervisor, "crash", ProcessPhase.EXITED)
        ended = supervisor.get("crash")
        assert ended is not None and ended.exit_code == 3 and ended.stop_reason is None
        assert "exited with code 3" in ended.message and "out of memory" in ended.message
        assert "crash" not in {r.key for r in await store.processes()}  # only live processes are recorded


async def test_stop_returns_at_once_and_the_ladder_ends_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    async with supervising(tmp_path, grace=0.5) as (supervisor, _):
        await supervisor.launch(spec(tmp_path, "stubborn", STUBBORN, free_port()))
        deadline = time.monotonic() + 10
        while "deaf now" not in (tmp_path / "stubborn.log").read_text():  # it ignores SIGTERM from then on
            assert time.monotonic() < deadline
            await anyio.sleep(0.02)
        began = time.monotonic()
        supervisor.stop("stubborn", reason="test")
        assert time.monotonic() - began < 0.1  # the reconcile that asked goes on
        assert supervisor.get("stubborn").phase is ProcessPhase.STOPPING  # type: ignore[union-attr]
        await until_phase(supervisor, "stubborn", ProcessPhase.EXITED)
        ended = supervisor.get("stubborn")
        assert ended is not None and ended.exit_code == -9 and ended.stop_reason == "test"
        assert time.monotonic() - began >= 0.5  # SIGKILL only after the grace period


async def test_a_recorded_process_still_running_is_adopted_and_a_stale_record_dropped(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    left = subprocess.Popen(argv, start_new_session=True)
    try:
        store = await NodeStore.open(tmp_path / "state")
        deadline = time.monotonic() + 10
        while Path(f"/proc/{left.pid}/cmdline").read_bytes().split(b"\0")[:-1] != [a.encode() for a in argv]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        await store.record_process(ProcessRecord(key="kept", pid=left.pid, port=1, model="kept", argv=argv,
                                                 argv_hash="h", log_path=str(tmp_path / "k.log"), started_at=1.0))
        await store.record_process(ProcessRecord(key="stale", pid=left.pid, port=2, model="stale",
                                                 argv=[*argv, "other"], argv_hash="h",
                                                 log_path=str(tmp_path / "s.log"), started_at=1.0))
        await store.aclose()
        async with supervising(tmp_path) as (supervisor, store):
            kept = supervisor.get("kept")
            assert kept is not None and kept.adopted and not kept.claimed and kept.pid == left.pid
            assert supervisor.get("stale") is None
            assert [r.key for r in await store.processes()] == ["kept"]
            assert [e.reason for e in await store.events("stale")] == ["Exited"]
        assert left.wait(10) == -15  # the supervisor stopped it when it stopped
    finally:
        stop_process_now(left)
