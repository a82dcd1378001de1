"""The launchers' pure parts: the model rule, the join token, each tool's configuration, a missing tool."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshllm.engine.catalog import CatalogEntry
from meshllm.errors import MeshError
from meshllm.launchers import TOOLS
from meshllm.launchers.choice import choose_model, parameter_count
from meshllm.launchers.node import Sessions, join_token
from meshllm.launchers.run import _run
from meshllm.launchers.tools import Prepared, Target
from meshllm.store.mesh import InviteToken, MeshCredentials, save_mesh, save_peers
from tests.conftest import free_port


def entry(name: str, *, tools: bool, size: int = 1) -> CatalogEntry:
    return CatalogEntry(name=name, repo="org/repo", files=(f"{name}.gguf",), size_bytes=size, quantization="Q4_K_M",
                        moe=False, tools=tools)


CATALOG = (entry("Big-70B-Q4_K_M", tools=False, size=40), entry("Coder-7B-Q4_K_M", tools=True, size=4),
           entry("Coder-7B-Q8_0", tools=True, size=8), entry("Coder-32B-Q4_K_M", tools=True, size=20))


@pytest.mark.parametrize(("name", "expected"), [
    ("Qwen3-8B-Q4_K_M", 8e9), ("gemma-3-270m", 270e6), ("Mixtral-8x7B-Instruct", 56e9),
    ("Qwen3-30B-A3B-Q4_K_M", 30e9), ("Llama-3.2-1B", 1e9), ("tiny-dense", 0.0), ("phi-4-Q8_0", 0.0),
])
def test_parameters_are_read_from_the_name(name: str, expected: float) -> None:
    assert parameter_count(name) == expected


@pytest.mark.parametrize(("served", "chosen"), [
    (["Big-70B-Q4_K_M", "Coder-7B-Q4_K_M"], "Coder-7B-Q4_K_M"),  # tool calls beat size
    (["Big-70B-Q4_K_M", "my-finetune-3B"], "my-finetune-3B"),  # unknown beats known without tool calls
    (["Coder-7B-Q4_K_M", "Coder-32B-Q4_K_M", "local-70B"], "Coder-32B-Q4_K_M"),  # known tool calls beat unknown
    (["Coder-7B-Q4_K_M", "Coder-7B-Q8_0"], "Coder-7B-Q8_0"),  # then the larger quantization
    (["b-model", "a-model"], "a-model"), (["a-model", "b-model"], "a-model"),  # ties: by name, not by order
    (["tiny-3B", "tiny-1B"], "tiny-3B"),
])
def test_the_strongest_tool_capable_model_is_chosen(served: list[str], chosen: str) -> None:
    assert choose_model(served, entries=CATALOG) == chosen


def test_a_named_model_must_be_served_and_the_error_lists_what_is() -> None:
    assert choose_model(["a", "tiny-1B"], "tiny-1B.gguf", entries=CATALOG) == "tiny-1B"
    with pytest.raises(MeshError, match=r"does not serve 'nope'; it serves: a, b"):
        choose_model(["b", "a"], "nope", entries=CATALOG)
    with pytest.raises(MeshError, match="serves no model"):
        choose_model([], entries=CATALOG)


def token(addrs: tuple[str, ...], creds: MeshCredentials) -> str:
    return InviteToken(creds, addrs).encode()


def test_join_token_from_tokens_from_the_state_folder_or_none(tmp_path: Path) -> None:
    creds = MeshCredentials.create()
    merged = join_token([token(("10.0.0.1:1",), creds), token(("10.0.0.2:2",), creds)], {},
                        state_dir=tmp_path / "s", node_dir=tmp_path / "n")
    assert merged is not None and InviteToken.decode(merged).addrs == ("10.0.0.1:1", "10.0.0.2:2")
    with pytest.raises(MeshError, match="different meshes"):
        join_token([token(("a:1",), creds), token(("a:1",), MeshCredentials.create())], {},
                   state_dir=tmp_path / "s", node_dir=tmp_path / "n")
    with pytest.raises(MeshError, match="no mesh to join"):
        join_token([], {}, state_dir=tmp_path / "s", node_dir=tmp_path / "n")
    save_mesh(tmp_path / "s", creds)
    save_peers(tmp_path / "s", 4242, ["10.0.0.9:9"])
    saved = join_token([], {}, state_dir=tmp_path / "s", node_dir=tmp_path / "n")
    assert saved is not None
    assert InviteToken.decode(saved) == InviteToken(creds, ("10.0.0.9:9", "127.0.0.1:4242"))
    save_mesh(tmp_path / "n", creds)  # the launcher's node was in a mesh: it rejoins that one by itself
    assert join_token([], {}, state_dir=tmp_path / "empty", node_dir=tmp_path / "n") is None


TARGET = Target(port=9400, model="m-8B", models=("m-8B", "x-1B"), key="k-123")


def test_claude_gets_the_mesh_in_a_private_settings_file_and_its_environment(tmp_path: Path) -> None:
    prepared = TOOLS["claude"].prepare(TARGET, ["-p", "hi"], {"HOME": str(tmp_path)}, tmp_path / "private")
    settings = Path(prepared.args[1])
    assert prepared.args == ["--settings", str(settings), "--model", "m-8B", "-p", "hi"]
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600 and prepared.temporary == [settings]
    env = json.loads(settings.read_text())["env"]
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9400" and env["ANTHROPIC_AUTH_TOKEN"] == "k-123"
    assert env["ANTHROPIC_API_KEY"] == "" and "ANTHROPIC_API_KEY" in prepared.unset
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == env["ANTHROPIC_MODEL"] == "m-8B"


def test_goose_provider_file_follows_goose_config_folder(tmp_path: Path) -> None:
    prepared = TOOLS["goose"].prepare(TARGET, [], {"HOME": str(tmp_path)}, tmp_path)
    path = tmp_path / ".config/goose/custom_providers/mesh.json"
    assert prepared.written == [path] and prepared.args == ["session"]
    provider = json.loads(path.read_text())
    assert provider["base_url"] == "http://127.0.0.1:9400" and [m["name"] for m in provider["models"]] == ["m-8B", "x-1B"]
    assert prepared.env == {"GOOSE_PROVIDER": "mesh", "GOOSE_MODEL": "m-8B", "MESHLLM_CLIENT_KEY": "k-123"}
    root = TOOLS["goose"].prepare(TARGET, ["run"], {"HOME": str(tmp_path), "GOOSE_PATH_ROOT": str(tmp_path / "g")}, tmp_path)
    assert root.written == [tmp_path / "g/config/custom_providers/mesh.json"] and root.args == ["run"]


def test_pi_keeps_the_users_providers_and_refuses_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / ".pi/agent/models.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"providers": {"mesh": {"old": True}, "ollama": {"apiKey": "x"}}, "other": 1}))
    TOOLS["pi"].prepare(TARGET, [], {"HOME": str(tmp_path)}, tmp_path)
    body = json.loads(path.read_text())
    assert body["other"] == 1 and body["providers"]["ollama"] == {"apiKey": "x"}
    assert body["providers"]["mesh"]["baseUrl"] == "http://127.0.0.1:9400/v1" and "old" not in body["providers"]["mesh"]
    path.write_text("{broken")
    with pytest.raises(MeshError, match="not valid JSON"):
        TOOLS["pi"].prepare(TARGET, [], {"HOME": str(tmp_path)}, tmp_path)
    assert path.read_text() == "{broken"  # left as it was


def test_opencode_merges_into_the_users_inline_config(tmp_path: Path) -> None:
    mine = json.dumps({"theme": "dark", "provider": {"anthropic": {}}, "model": "anthropic/x"})
    prepared = TOOLS["opencode"].prepare(TARGET, ["run", "hi"], {"OPENCODE_CONFIG_CONTENT": mine}, tmp_path)
    config = json.loads(prepared.env["OPENCODE_CONFIG_CONTENT"])
    assert config["theme"] == "dark" and set(config["provider"]) == {"anthropic", "mesh"}
    assert config["model"] == "mesh/m-8B" and prepared.args == ["run", "hi"]
    assert config["provider"]["mesh"]["options"] == {"baseURL": "http://127.0.0.1:9400/v1", "apiKey": "k-123"}


@pytest.mark.parametrize("tool", ["claude", "goose", "opencode", "pi"])
def test_a_missing_tool_is_one_line_saying_how_to_install_it(tool: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "meshllm", tool, "--port", str(port), "--state-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert f"{tool} " in done.stderr and "install it: " + TOOLS[tool].install in done.stderr
    assert not (tmp_path / "launch").exists()  # nothing was started


def test_the_agents_exit_code_is_passed_through_and_a_signal_is_128_plus_it() -> None:
    env = dict(os.environ)
    assert _run(sys.executable, Prepared(["-c", "raise SystemExit(7)"]), env) == 7
    killed = Prepared(["-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert _run(sys.executable, killed, env) == 128 + 15
    check = "import os, sys; sys.exit(3 if 'MESHLLM_JOIN' in os.environ or os.environ['X'] != 'set' else 0)"
    assert _run(sys.executable, Prepared(["-c", check], env={"X": "set"}), {**env, "MESHLLM_JOIN": "secret"}) == 0


def test_the_last_launcher_out_is_the_one_that_stops_the_node(tmp_path: Path) -> None:
    first, second = Sessions(tmp_path), Sessions(tmp_path)
    try:
        assert not first.last()  # the other one still uses the node
        assert second.last()
    finally:
        first.close()
        second.close()
    alone = Sessions(tmp_path)
    assert alone.last()
    alone.close()
