"""``meshllm claude|goose|opencode|pi`` with real node processes and fake agents on PATH.

The fakes (``fake_agent.py``) find the mesh the way each real tool does (environment, config file,
arguments) and make one real request through it: Anthropic's ``/v1/messages`` for claude, chat
completions for the others. What a user notices: with no node on the port the launcher starts a
client node that joins the mesh, the agent gets the strongest model and its own arguments, and when
the agent exits that node is gone, the mesh's own nodes untouched, and the agent's exit code is the
launcher's; a node already on the port is reused and left running; a node that requires a key gets
it; a model the mesh does not serve is a one-line error listing what it serves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshllm.engine.tinygguf import write_dense
from meshllm.store.mesh import InviteToken, MeshCredentials
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, wait_for

pytestmark = pytest.mark.engine

FAKE = Path(__file__).with_name("fake_agent.py")
SMALL, LARGE = "tiny-1B", "tiny-3B"  # the launcher picks the larger one when no --model is given
KEY = "key-of-the-client-node-0123"


@pytest.fixture
def agents(tmp_path: Path) -> Path:
    """A folder of fake claude, goose, opencode and pi executables."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("claude", "goose", "opencode", "pi"):
        script = folder / tool
        script.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {tool!r}\n"
                          f"runpy.run_path({str(FAKE)!r}, run_name='fake')['main']({tool!r})\n")
        script.chmod(0o755)
    return folder


@pytest.fixture
def serving(mesh: Mesh, tmp_path: Path, engine_dir: Path) -> NodeProcess:
    """A node serving both models, on 127.0.0.1 as a user's node is (its state folder's mesh is joinable)."""
    models = [write_dense(tmp_path / f"{name}.gguf") for name in (SMALL, LARGE)]
    node = NodeProcess(models=[str(m) for m in models], state_dir=tmp_path / "a", engine_dir=engine_dir).start()
    mesh.nodes.append(node)
    for name in (SMALL, LARGE):
        node.wait_ready(name)
    return node


def launcher_env(tmp_path: Path, agents: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "MESHLLM_API_KEY"}
    environ.update({"PATH": f"{agents}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
                    "FAKE_AGENT_RECORD": str(tmp_path / "record.json"), **(env or {})})
    (tmp_path / "record.json").unlink(missing_ok=True)
    return environ


def run_launcher(tmp_path: Path, agents: Path, *args: str, env: dict[str, str] | None = None,
                 exit_code: int = 0) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    environ = launcher_env(tmp_path, agents, {"FAKE_AGENT_EXIT": str(exit_code), **(env or {})})
    done = subprocess.run([sys.executable, "-m", "meshllm", *args], env=environ, capture_output=True, text=True,
                          timeout=240)
    record = tmp_path / "record.json"
    return done, json.loads(record.read_text()) if record.exists() else {}


def direct(node: NodeProcess, model: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same request straight to the model's llama-server, for the greedy output to compare."""
    url = f"http://127.0.0.1:{node.server(model)['port']}{path}"
    answer: dict[str, Any] = httpx.post(url, json={"model": model, **body}, timeout=60).json()
    return answer


def test_claude_starts_a_client_node_uses_the_strongest_model_and_stops_only_that_node(
        serving: NodeProcess, tmp_path: Path, agents: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(serving.token() + "\n")
    port = free_port()
    done, record = run_launcher(tmp_path, agents, "claude", "--port", str(port), "--join", f"@{token_file}",
                                "--state-dir", str(tmp_path / "user"), "-p", "hello", "--", "--verbose",
                                exit_code=3)
    assert done.returncode == 3, done.stderr  # the agent's exit code is the launcher's
    assert f"started a client node on port {port}" in done.stderr
    settings = record["argv"][1]
    assert record["argv"] == ["--settings", settings, "--model", LARGE, "-p", "hello", "--verbose"]
    assert not Path(settings).exists()  # the settings file (it holds the key) is removed with the agent
    assert record["config"]["env"]["ANTHROPIC_AUTH_TOKEN"] not in " ".join(record["argv"])
    assert record["config"]["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    assert record["env"]["ANTHROPIC_MODEL"] == LARGE and "ANTHROPIC_API_KEY" not in record["env"]
    assert "MESHLLM_JOIN" not in record["env"]  # the mesh secret stays with the node
    request = record["request"]
    assert request["status"] == 200, request
    body = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Say hello"}]}
    assert request["body"]["content"] == direct(serving, LARGE, "/v1/messages", body)["content"]
    with pytest.raises(httpx.ConnectError):  # the started node is gone ...
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    assert serving.proc is not None and serving.proc.poll() is None  # ... and the mesh's own node serves on
    assert {m["id"] for m in httpx.get(f"{serving.api}/v1/models", timeout=5).json()["data"]} == {SMALL, LARGE}


def test_launchers_on_one_port_share_the_node_and_the_last_one_out_stops_it_even_on_sigterm(
        serving: NodeProcess, tmp_path: Path, agents: Path) -> None:
    port = ["--port", str(free_port())]
    user = ["--state-dir", str(serving.state_dir)]  # no --join: the mesh of the user's node's state folder
    environ = launcher_env(tmp_path, agents, {"FAKE_AGENT_HOLD": "1"})
    stderr = tmp_path / "launcher.err"
    with stderr.open("w") as err:
        first = subprocess.Popen([sys.executable, "-m", "meshllm", "opencode", *port, *user], env=environ, stderr=err)
    try:
        record = tmp_path / "record.json"
        wait_for(lambda: record.exists() or first.poll() is not None, timeout=120, what="the first agent's request")
        assert first.poll() is None, stderr.read_text()
        assert json.loads(record.read_text())["request"]["status"] == 200

        done, second = run_launcher(tmp_path, agents, "pi", *port, *user)  # meanwhile, in another terminal
        assert done.returncode == 0, done.stderr
        assert "using the client node another launcher started" in done.stderr
        assert second["request"]["status"] == 200 and "stopped the client node" not in done.stderr
        assert httpx.get(f"http://127.0.0.1:{port[1]}/health", timeout=5).status_code == 200  # still up for the first

        first.send_signal(signal.SIGTERM)  # the first terminal closes: its agent ends, then the node
        assert first.wait(60) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "stopped the client node on port" in stderr.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port[1]}/v1/models", timeout=5)
    assert serving.proc is not None and serving.proc.poll() is None


def test_a_node_left_by_a_killed_launcher_is_stopped_by_the_next_one(
        serving: NodeProcess, tmp_path: Path, agents: Path) -> None:
    port = ["--port", str(free_port())]
    user = ["--state-dir", str(serving.state_dir)]
    environ = launcher_env(tmp_path, agents, {"FAKE_AGENT_HOLD": "1"})
    killed = subprocess.Popen([sys.executable, "-m", "meshllm", "goose", *port, *user], env=environ,
                              stderr=subprocess.DEVNULL)
    record = tmp_path / "record.json"
    try:
        wait_for(lambda: record.exists() or killed.poll() is not None, timeout=120, what="the agent's request")
    finally:
        killed.kill()  # no chance to stop its node
        killed.wait()
        if record.exists():
            os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
    assert httpx.get(f"http://127.0.0.1:{port[1]}/health", timeout=5).status_code == 200  # the node is left over
    done, again = run_launcher(tmp_path, agents, "claude", *port, *user)
    assert done.returncode == 0, done.stderr
    assert "using the client node another launcher started" in done.stderr and again["request"]["status"] == 200
    assert "stopped the client node" in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port[1]}/v1/models", timeout=5)


def test_goose_pi_and_opencode_reuse_the_node_on_the_port_and_leave_it_running(
        mesh: Mesh, serving: NodeProcess, tmp_path: Path, agents: Path) -> None:
    client = mesh.start("c", "127.0.0.3", "--client", "--join", serving.token(), "--api-key", KEY)

    def routes_both() -> bool:
        listed = httpx.get(f"{client.api}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        return {m["id"] for m in listed.json()["data"]} == {SMALL, LARGE}
    wait_for(routes_both, timeout=60, what="the client node routing both models")
    port = ["--port", str(client.port)]

    done, _ = run_launcher(tmp_path, agents, "goose", *port)
    assert done.returncode == 1 and "requires an API key" in done.stderr and done.stderr.count("\n") == 1

    done, record = run_launcher(tmp_path, agents, "goose", *port, "--model", SMALL, "run", "-t", "hi",
                                env={"MESHLLM_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert "started a client node" not in done.stderr
    assert record["argv"] == ["run", "-t", "hi"] and record["env"]["GOOSE_MODEL"] == SMALL
    assert record["env"]["GOOSE_PROVIDER"] == "mesh"
    assert sorted(m["name"] for m in record["config"]["models"]) == [SMALL, LARGE]
    assert record["request"]["status"] == 200, record["request"]

    pi_models = tmp_path / "home/.pi/agent/models.json"
    pi_models.parent.mkdir(parents=True)
    pi_models.write_text(json.dumps({"providers": {"ollama": {"baseUrl": "http://localhost:11434/v1"}}}))
    done, record = run_launcher(tmp_path, agents, "pi", *port, "--api-key", KEY, "-p", "hi")
    assert done.returncode == 0, done.stderr
    assert record["argv"] == ["--provider", "mesh", "--model", LARGE, "-p", "hi"]
    assert set(record["config"]["providers"]) == {"ollama", "mesh"}  # the user's providers are kept
    assert KEY not in pi_models.read_text()  # the file names the key's variable, not the key
    assert record["request"]["status"] == 200, record["request"]
    body = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Say hello"}]}
    assert record["request"]["body"]["choices"][0]["message"] == \
        direct(serving, LARGE, "/v1/chat/completions", body)["choices"][0]["message"]

    done, record = run_launcher(tmp_path, agents, "opencode", *port, "--api-key", KEY, "--model", f"{SMALL}.gguf",
                                "run", "hi")
    assert done.returncode == 0, done.stderr
    assert record["argv"] == ["run", "hi"] and record["config"]["model"] == f"mesh/{SMALL}"
    assert record["request"]["status"] == 200, record["request"]

    done, record = run_launcher(tmp_path, agents, "pi", *port, "--api-key", KEY, "--model", "tiny-70B")
    assert done.returncode == 1 and not record
    assert f"does not serve 'tiny-70B'; it serves: {SMALL}, {LARGE}" in done.stderr
    assert done.stderr.count("\n") == 1

    assert client.proc is not None and client.proc.poll() is None  # reused, never stopped
    assert routes_both()


def test_a_mesh_that_routes_no_model_is_an_error_and_the_started_node_is_stopped(
        tmp_path: Path, agents: Path) -> None:
    nowhere = InviteToken(MeshCredentials.create(), ("127.0.0.1:9",)).encode()  # a mesh no one answers for
    port = free_port()
    done, record = run_launcher(tmp_path, agents, "goose", "--port", str(port), "--join", nowhere, "--wait", "3",
                                "--state-dir", str(tmp_path / "user"))
    assert done.returncode == 1 and not record
    assert "error: no model is ready in the mesh after 3s" in done.stderr
    assert f"stopped the client node on port {port}" in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
