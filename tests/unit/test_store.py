"""The node's database: what one run of a node writes, the next run reads back, as it was written."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshllm.engine.process import UNKNOWN_EXIT, EngineProcess, adopt, describe_exit, stop_process
from meshllm.store.db import DB_FILE, AppliedManifest, NodeStore, ProcessRecord
from meshllm.store.identity import load_identity


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    opened = await NodeStore.open(tmp_path / "state")
    try:
        yield opened
    finally:
        await opened.aclose()


def _record(key: str = "tiny", *, pid: int = 4242) -> ProcessRecord:
    return ProcessRecord(key=key, pid=pid, port=41234, model=key, argv=["/bin/llama-server", "--port", "41234"],
                         argv_hash="abcd", log_path="/state/logs/tiny.log", started_at=1000.0)


async def test_database_is_created_in_wal_mode(tmp_path: Path, store: NodeStore) -> None:
    assert store.path == tmp_path / "state" / DB_FILE
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity = load_identity(state)
    first = await NodeStore.open(state)
    created = await first.record_identity(identity.node_id, identity.public_bytes)
    await first.save_applied([AppliedManifest(kind="Model", name="tiny", body={"spec": {"replicas": 2}})])
    await first.record_process(_record())
    await first.record_event("tiny", "Started", "llama-server pid 4242")
    await first.aclose()

    again = await NodeStore.open(state)
    try:
        assert load_identity(state).node_id == identity.node_id  # the key file still decides the id
        recorded = await again.record_identity(identity.node_id, identity.public_bytes)
        assert recorded.created_at == created.created_at
        assert recorded.public_key == identity.public_bytes.hex()
        assert (await again.identity()) == recorded
        [manifest] = await again.applied()
        assert (manifest.kind, manifest.name, manifest.body) == ("Model", "tiny", {"spec": {"replicas": 2}})
        assert await again.processes() == [_record()]
        [event] = await again.events()
        assert (event.model, event.reason, event.message, event.level) == ("tiny", "Started", "llama-server pid 4242",
                                                                           "info")
    finally:
        await again.aclose()


async def test_applied_manifests_are_replaced_by_kind_and_name(store: NodeStore) -> None:
    await store.save_applied([AppliedManifest(kind="Model", name="a", body={"v": 1}),
                              AppliedManifest(kind="Model", name="b", body={"v": 1})])
    await store.save_applied([AppliedManifest(kind="Model", name="a", body={"v": 2})])
    assert [(m.name, m.body) for m in await store.applied()] == [("a", {"v": 2}), ("b", {"v": 1})]
    assert await store.forget_applied("Model", "b")
    assert not await store.forget_applied("Model", "b")
    assert [m.name for m in await store.applied()] == ["a"]


async def test_process_records_are_replaced_and_forgotten_by_key(store: NodeStore) -> None:
    await store.record_process(_record("a", pid=1))
    await store.record_process(_record("b", pid=2))
    await store.record_process(_record("a", pid=3))
    assert [(r.key, r.pid) for r in await store.processes()] == [("a", 3), ("b", 2)]
    await store.forget_process("a")
    await store.forget_process("nothing")
    assert [r.key for r in await store.processes()] == ["b"]


async def test_events_are_newest_first_filtered_and_capped(tmp_path: Path) -> None:
    store = await NodeStore.open(tmp_path, event_cap=10)
    try:
        for i in range(25):
            await store.record_event("a" if i % 2 else "b", "Exited", f"#{i}", level="warning")
        everything = await store.events(limit=100)
        assert [e.message for e in everything] == [f"#{i}" for i in range(24, 14, -1)]
        assert [e.message for e in await store.events("a", limit=3)] == ["#23", "#21", "#19"]
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (10,)
    finally:
        await store.aclose()


@pytest.mark.parametrize(("reason", "level"), [("started", "info"), ("Not Camel", "info"), ("Started", "loud")])
async def test_bad_event_reason_or_level_is_refused(store: NodeStore, reason: str, level: str) -> None:
    with pytest.raises(ValueError):
        await store.record_event("m", reason, "x", level=level)
    assert await store.events() == []


def _adopt_once_running(pid: int, argv: list[str], log_path: Path) -> EngineProcess:
    """Adopt ``pid`` once it has exec'd ``argv`` (right after fork it still runs our own command line)."""
    deadline = time.monotonic() + 10
    while (found := adopt(pid, argv, log_path=log_path)) is None:
        assert time.monotonic() < deadline, f"pid {pid} never ran {argv}"
        time.sleep(0.01)
    return found


async def test_adopt_only_a_live_process_running_the_recorded_argv(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        adopted = _adopt_once_running(proc.pid, argv, tmp_path / "x.log")
        assert adopted.adopted and adopted.poll() is None
        assert adopt(proc.pid, [*argv[:-1], "import time; time.sleep(61)"], log_path=tmp_path / "x.log") is None
        assert await stop_process(adopted, grace=5.0) == UNKNOWN_EXIT
        assert proc.wait(5) == -15  # SIGTERM reached it through its process group
        assert adopt(proc.pid, argv, log_path=tmp_path / "x.log") is None  # gone (reaped) now
    finally:
        proc.kill()
        proc.wait()


def test_adopted_process_that_becomes_a_zombie_has_ended(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    proc = subprocess.Popen(argv)
    try:
        adopted = _adopt_once_running(proc.pid, argv, tmp_path / "x.log")
        deadline = time.monotonic() + 10
        while adopted.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert adopted.exit_code == UNKNOWN_EXIT
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z"  # not reaped yet (nobody waited): it still has a pid, and yet it has ended
    finally:
        proc.wait()


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert "unknown" in describe_exit(UNKNOWN_EXIT)
