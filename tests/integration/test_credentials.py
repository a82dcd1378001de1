"""Mesh credentials with real node processes on 127.0.0.x: a bad token fails fast and says why, tokens stay
off the command line, a restarted node rejoins from its state folder, and ``meshllm rotate-key`` gives
a running mesh a new secret that every member follows while the old token stops working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshllm.engine.rpc_auth import RPC_SECRET_ENV, rpc_key
from meshllm.store.mesh import MESH_FILE, InviteToken, MeshCredentials
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, listed, wait_for
from tests.integration.test_split import MODEL, cap, condition, solo, split_model

__all__ = ["solo", "split_model"]  # fixtures used here

pytestmark = pytest.mark.engine


def node_states(node: NodeProcess) -> dict[str, str]:
    return {n["id"]: n["state"] for n in node.status()["nodes"]}


def retoken(token: str, *, mesh_id: str | None = None, secret: bytes | None = None,
            addrs: tuple[str, ...] | None = None) -> str:
    real = InviteToken.decode(token)
    creds = MeshCredentials(mesh_id=mesh_id or real.credentials.mesh_id, secret=secret or real.credentials.secret)
    return InviteToken(creds, addrs or real.addrs).encode()


def saved_secret(node: NodeProcess) -> bytes:
    path = node.state_dir / MESH_FILE
    return bytes.fromhex(json.loads(path.read_text())["secret"]) if path.exists() else b""


def refused_start(mesh: Mesh, name: str, token: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Start a client node with ``token``; it must exit on its own. Returns it and the seconds it ran."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "meshllm", "--client", "--join", token, "--bind-host", "127.0.0.9",
                           "--state-dir", str(mesh.root / name), "--port", str(free_port()),
                           "--console", str(free_port())],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MESHLLM_ENGINE_DIR": str(mesh.engine_dir)})
    return done, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_wrong_secret_or_mesh_id_exits_within_seconds_saying_which(mesh: Mesh) -> None:
    a = mesh.start("a", "127.0.0.2", "--client")
    token = a.token()
    seed = InviteToken.decode(token).addrs[0]
    cases = {"wrong secret": retoken(token, secret=os.urandom(32)), "wrong mesh": retoken(token, mesh_id="0" * 16)}
    for reason, bad in cases.items():
        done, took = refused_start(mesh, reason.replace(" ", "-"), bad)
        print(f"\n{reason}: exit {done.returncode} after {took:.1f}s")
        assert done.returncode == 1, done.stderr
        [line] = error_lines(done.stderr)
        assert line.startswith(f"error: --join: the mesh at {seed} refused this token: {reason} ("), line
        assert took < 20  # python start included, on a loaded machine; the refusal itself takes one RTT
        assert not (mesh.root / reason.replace(" ", "-") / MESH_FILE).exists()  # nothing accepted, nothing kept
    assert len(a.status()["nodes"]) == 1


def cmdline(node: NodeProcess) -> bytes:
    assert node.proc is not None
    return Path(f"/proc/{node.proc.pid}/cmdline").read_bytes()


def test_tokens_from_a_file_or_the_environment_stay_off_the_command_line(mesh: Mesh, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a = mesh.start("a", "127.0.0.2", "--client")
    token = a.token()
    secret = InviteToken.decode(token).credentials.secret
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    b = mesh.start("b", "127.0.0.3", "--client", "--join", f"@{token_file}")
    monkeypatch.setenv("MESHLLM_JOIN", token)
    c = mesh.start("c", "127.0.0.4", "--client")
    monkeypatch.delenv("MESHLLM_JOIN")
    wait_for(lambda: all(len(node_states(n)) == 3 and set(node_states(n).values()) == {"alive"} for n in (a, b, c)),
             timeout=30, what="three alive nodes everywhere")
    assert f"@{token_file}".encode() in cmdline(b)
    for node in (b, c):
        line = cmdline(node)
        assert token.encode() not in line and secret.hex().encode() not in line
        wait_for(lambda: saved_secret(node) == secret, timeout=10,  # accepted by a member: kept
                 what="the joined credentials in the state folder")
        assert (node.state_dir / MESH_FILE).stat().st_mode & 0o777 == 0o600

    b_id = b.status()["node"]["id"]
    assert b.stop() == 0
    wait_for(lambda: node_states(a)[b_id] == "dead", timeout=20, what="A to see B leave")
    again = mesh.start("b", "127.0.0.3", "--client")  # no token: the state folder's credentials and peers
    took = wait_for(lambda: node_states(a)[b_id] == "alive" and len(node_states(again)) == 3, timeout=30,
                    what="B to rejoin without a token")
    print(f"\nrestarted without a token, B rejoined in {took:.2f}s")
    assert b"--join" not in cmdline(again)


def greedy(node: NodeProcess, model: str) -> str:
    response = httpx.post(f"{node.api}/v1/completions", json={"model": model, "prompt": "Once upon a time",
                                                              "max_tokens": 24, "temperature": 0}, timeout=60)
    response.raise_for_status()
    text: str = response.json()["choices"][0]["text"]
    return text


def key_ids(*nodes: NodeProcess) -> set[Any]:
    return {n.status()["key_id"] for n in nodes}


def test_rotate_key_moves_every_member_to_a_new_secret_and_retires_the_old_token(
        mesh: Mesh, tiny_dense: Path, second_dense: Path) -> None:
    a = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    a.wait_ready("tiny-dense")
    old_token = a.token()
    b = mesh.start("b", "127.0.0.3", "--client", "--join", old_token)
    c = mesh.start("c", "127.0.0.4", "--client", "--join", old_token, "--allow-models", str(second_dense.parent))
    wait_for(lambda: listed(b) == listed(c) == {"tiny-dense"}, timeout=30, what="B and C to list tiny-dense")
    before = greedy(c, "tiny-dense")
    ids = {n.status()["node"]["id"] for n in (a, b, c)}

    done = b.cli("rotate-key")  # on a client node: any member can rotate
    assert done.returncode == 0, done.stderr
    new_token = done.stdout.strip()
    new = InviteToken.decode(new_token).credentials
    old = InviteToken.decode(old_token).credentials
    assert (new.mesh_id, new.key_id != old.key_id) == (old.mesh_id, True)
    took = wait_for(lambda: all(saved_secret(n) == new.secret for n in (a, b, c)) and key_ids(a, b, c) == {new.key_id},
                    timeout=10, what="every member to hold the new secret")
    print(f"\nrotation reached all three members in {took:.2f}s")
    assert all(InviteToken.decode(n.token()).credentials == new for n in (a, b, c))  # meshllm token: the new one

    # they carry on: no connection lost, the model still reached through the mesh, gossip flows
    assert all(set(node_states(n).values()) == {"alive"} and set(node_states(n)) == ids for n in (a, b, c))
    assert greedy(b, "tiny-dense") == greedy(c, "tiny-dense") == before
    manifest = ("apiVersion: meshllm/v1\nkind: Model\nmetadata: {name: second-dense}\n"
                f"spec: {{source: {second_dense}}}\n")
    assert c.cli("apply", "-f", "-", stdin=manifest).returncode == 0
    wait_for(lambda: all(listed(n) == {"tiny-dense", "second-dense"} for n in (a, b, c)), timeout=60,
             what="the manifest applied after the rotation to be served and listed everywhere")

    # a node holding only the old token is refused by every member, exits, and sees nothing meanwhile
    everyone = tuple(addr for n in (a, b, c) for addr in n.status()["node"]["addrs"])
    d = mesh.start("d", "127.0.0.5", "--client", "--join", retoken(old_token, addrs=everyone))
    assert d.proc is not None
    while d.proc.poll() is None:
        try:
            assert listed(d) == set()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    assert d.proc.returncode == 1
    [line] = [line for line in d.log_text().splitlines() if line.startswith("error:")]
    assert line.startswith("error: --join: the mesh at ") and "refused this token: retired key (" in line, line
    assert not (d.state_dir / MESH_FILE).exists()
    assert len(a.status()["nodes"]) == 3

    e = mesh.start("e", "127.0.0.6", "--client", "--join", new_token)
    wait_for(lambda: listed(e) == {"tiny-dense", "second-dense"}, timeout=30, what="a node with the new token to join")
    assert greedy(e, "tiny-dense") == before


@pytest.fixture(scope="module")
def second_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshllm.engine.tinygguf import write_dense

    return write_dense(tmp_path_factory.mktemp("models") / "second-dense.gguf", n_layer=3, seed=7)


def test_a_member_offline_during_a_rotation_needs_the_new_token(mesh: Mesh, tmp_path: Path) -> None:
    a = mesh.start("a", "127.0.0.2", "--client")
    f = mesh.start("f", "127.0.0.3", "--client", "--join", a.token())
    wait_for(lambda: len(f.status()["nodes"]) == 2, timeout=30, what="F to join")
    f_id = f.status()["node"]["id"]
    wait_for(lambda: (f.state_dir / "peers.json").exists() and saved_secret(f) != b"", timeout=10,
             what="F to keep the mesh's credentials and peers")
    assert f.stop() == 0
    done = a.cli("rotate-key")
    assert done.returncode == 0, done.stderr

    again = mesh.start("f", "127.0.0.3", "--client")  # the saved (now retired) credentials
    assert again.proc is not None and again.proc.wait(timeout=30) == 1
    [line] = [line for line in again.log_text().splitlines() if line.startswith("error:")]
    assert f"refused the credentials saved in {f.state_dir / MESH_FILE}: retired key (" in line, line
    token_file = tmp_path / "new-token"
    token_file.write_text(done.stdout)
    rejoined = mesh.start("f", "127.0.0.3", "--client", "--join", f"@{token_file}")
    wait_for(lambda: node_states(a).get(f_id) == "alive" and rejoined.status()["node"]["id"] == f_id, timeout=30,
             what="F to rejoin with the new token")


def rpc_key_of(pid: int) -> str:
    """The RPC key an engine process was started with (its environment)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == RPC_SECRET_ENV.encode():
            return value.decode()
    return ""


def split_pids(node: NodeProcess) -> tuple[int, int]:
    """The pids of the split's host llama-server and its worker's ggml-rpc-server."""
    entry = next(m for m in node.status()["models"] if m["name"] == MODEL)
    host = next((s["pid"] for s in entry["servers"] if s["phase"] == "ready"), 0)
    return int(host), int(entry["workers"][0]["pid"]) if entry["workers"] else 0


def split_worker(node: NodeProcess) -> dict[str, Any]:
    entry = next(m for m in node.status()["models"] if m["name"] == MODEL)
    return dict(entry["workers"][0]) if entry["workers"] else {}


def test_a_split_restarts_with_the_rotated_rpc_key(mesh: Mesh, split_model: Path, solo: str) -> None:
    """The split's RPC key derives from the mesh secret: after a rotation the workers demand the new key
    (an old-token holder can no longer drive a --rpc-direct worker) and the split serves as before."""
    vram = cap(split_model, 0.8)
    a = mesh.start("a", "127.0.0.2", "--rpc-direct", "--max-vram", vram, models=(str(split_model),))
    old = InviteToken.decode(a.token()).credentials
    b = mesh.start("b", "127.0.0.3", "--standby", "--rpc-direct", "--max-vram", vram, "--join", a.token())
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=90, what="the split to be ready")
    expected = split_greedy(solo)
    assert split_greedy(a.api) == expected
    old_pids = split_pids(a)
    assert [rpc_key_of(pid) for pid in old_pids] == [rpc_key(old.secret)] * 2

    done = b.cli("rotate-key")
    assert done.returncode == 0, done.stderr
    new = InviteToken.decode(done.stdout.strip()).credentials

    def restarted() -> bool:
        pids = split_pids(a)
        return (condition(a).get("phase") == "Ready" and split_worker(a).get("phase") == "ready"
                and all(pids) and not set(pids) & set(old_pids))

    took = wait_for(restarted, timeout=90, what="the split to be ready again on restarted processes")
    print(f"\nsplit ready again {took:.1f}s after the rotation")
    assert [rpc_key_of(pid) for pid in split_pids(a)] == [rpc_key(new.secret)] * 2  # the old key opens nothing
    assert split_greedy(a.api) == split_greedy(b.api) == expected


def split_greedy(base_url: str) -> str:
    response = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                                                              "max_tokens": 24, "temperature": 0}, timeout=60)
    response.raise_for_status()
    text: str = response.json()["choices"][0]["text"]
    return text
