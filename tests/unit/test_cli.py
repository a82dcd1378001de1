"""The command line as a user meets it: help, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port


def meshllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60)


def test_no_arguments_prints_how_to_start() -> None:
    done = meshllm()
    assert done.returncode == 0
    assert "meshllm --model gemma-3-270m" in done.stdout


def test_missing_model_file_is_one_clear_line(tmp_path: Path) -> None:
    done = meshllm("--model", str(tmp_path / "nope.gguf"), "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "does not exist" in done.stderr


def test_get_without_a_node_says_how_to_start_one() -> None:
    done = meshllm("get", "models", "--console", str(free_port()))
    assert done.returncode == 1
    assert "meshllm --model" in done.stderr


def test_bad_size_and_bad_kind_are_usage_errors(tmp_path: Path) -> None:
    assert meshllm("--model", "x.gguf", "--max-vram", "lots").returncode == 2
    assert meshllm("get", "pods", "--console", str(free_port())).returncode == 2


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    import socket

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = meshllm("--model", str(model), "--port", str(port), "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert f"127.0.0.1:{port}" in done.stderr and "another port" in done.stderr
