"""The command line as a user meets it: help, one-line errors and exit codes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import free_port


def meshllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60)


def test_no_arguments_print_how_to_start_and_serve_a_read_only_console() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meshllm", "--console", str(port), "--relay", "none",
                             "--no-mdns"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Read-only console" in line:
                break
        assert any("meshllm --model gemma-3-270m" in line for line in lines)
        status = httpx.get(f"http://127.0.0.1:{port}/api/status").json()
        assert status["readonly"] is True and status["models"] == []
        assert status["node"]["capacity_bytes"] > 0  # what this machine could offer
        refused = httpx.delete(f"http://127.0.0.1:{port}/api/models/x")
        assert refused.status_code == 405 and refused.json()["error"]["code"] == "read_only"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        proc.stdout.close()  # type: ignore[union-attr]


def test_no_arguments_beside_a_running_console_only_print_how_to_start() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        done = meshllm("--console", str(held.getsockname()[1]), "--relay", "none", "--no-mdns")
    assert done.returncode == 0
    assert "meshllm --model gemma-3-270m" in done.stdout
    assert "already answers" in done.stdout


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
    model.write_bytes(b"GGUF\x03" + b"\0" * 59)  # version 3, no tensors, no metadata
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = meshllm("--model", str(model), "--port", str(port), "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert f"127.0.0.1:{port}" in done.stderr and "another port" in done.stderr


def test_a_bad_manifest_is_one_located_line_before_any_node_is_asked(tmp_path: Path) -> None:
    bad = tmp_path / "mesh.yaml"
    bad.write_text("apiVersion: meshllm/v1\nkind: Model\nmetadata: {name: m}\nspec: {source: m.gguf}\n---\n"
                   "apiVersion: meshllm/v1\nkind: Mesh\nspec:\n  models:\n"
                   "    - {name: a, source: a.gguf}\n    - {name: b, source: b.gguf, replicas: two}\n")
    for command in ("apply", "diff", "delete"):
        # no node listens on this port: the error must come from the file, not from the connection
        done = meshllm(command, "-f", str(bad), "--console", str(free_port()))
        assert done.returncode == 1
        assert done.stderr.strip().count("\n") == 0
        assert f"{bad}: document 2: spec.models[1].replicas: Input should be a valid integer" in done.stderr


def test_a_manifest_from_stdin_is_validated_too() -> None:
    done = subprocess.run([sys.executable, "-m", "meshllm", "apply", "-f", "-", "--console", str(free_port())],
                          input="apiVersion: meshllm/v1\nkind: Pod\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "stdin: document 1: kind: unknown kind 'Pod'" in done.stderr


def test_commands_of_a_missing_node_say_how_to_start_one(tmp_path: Path) -> None:
    good = Path(__file__).resolve().parents[2] / "examples" / "one-model.yaml"
    port = str(free_port())
    for args in (["apply", "-f", str(good)], ["get", "demand"], ["describe", "model", "m"], ["drop", "m"]):
        done = meshllm(*args, "--console", port)
        assert done.returncode == 1, args
        assert "meshllm --model" in done.stderr
