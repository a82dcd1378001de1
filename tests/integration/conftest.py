"""Fixtures of the integration tests: a mesh of real node processes, torn down whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from meshllm.discovery import nostr
from tests.conftest import free_port
from tests.integration.nodes import Mesh, wait_for


@pytest.fixture
def mesh(tmp_path: Path, engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # the session's test models live under the base temp folder: manifests may name them
    mesh = Mesh(tmp_path, engine_dir, allow_models=(tmp_path_factory.getbasetemp(),))
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[str]:
    """A nostr-relay process on a free port; it stores events without checking them (a hostile relay)."""
    port = free_port()
    folder = tmp_path / "relay"
    folder.mkdir()
    (folder / "config.yaml").write_text(f"""
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{folder}/nostr.sqlite3
  validators: []
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: warning
authentication:
  enabled: false
""")
    binary = Path(sys.executable).with_name("nostr-relay")
    with (folder / "relay.log").open("wb") as log:
        proc = subprocess.Popen([str(binary), "-c", str(folder / "config.yaml"), "serve"], stdout=log,
                                stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    url = f"ws://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=30, what="the relay to answer")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _answers(url: str) -> bool:
    try:
        anyio.run(lambda: nostr.query(url, [{"limit": 1}], timeout=2))
        return True
    except nostr.RelayError:
        return False
