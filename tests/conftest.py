"""Shared fixtures: the engine, tiny models, and free ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.engine.build import find_engine


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and never handed out before in this test run: a node given a port binds it
    only once it has started, so the kernel could offer the same port to the next node meanwhile."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="session")
def engine_dir() -> Path:
    found = find_engine()
    if found is None:
        pytest.fail("the llama.cpp engine is not built: run `meshllm engine build` (or .ci/run) first")
    return found


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshllm.engine.tinygguf import write_dense

    return write_dense(tmp_path_factory.mktemp("models") / "tiny-dense.gguf")


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshllm.engine.tinygguf import write_moe

    return write_moe(tmp_path_factory.mktemp("models") / "tiny-moe.gguf")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep tests away from the user's ~/.meshllm; models stay shared (assembling gemma is slow)."""
    monkeypatch.setenv("MESHLLM_STATE_DIR", str(tmp_path / "state"))
    os.environ.setdefault("MESHLLM_MODELS_DIR", str(Path.home() / ".models"))
    yield
