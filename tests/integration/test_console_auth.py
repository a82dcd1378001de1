"""The management API (:3131) as an attacker meets it: real node processes, requests from other addresses.

A node started with ``--listen-all`` answers nothing on its console without the admin token; with it,
status, apply, diff and drop work. Whatever the token, a request whose ``Host`` does not name the node
(DNS rebinding) and a change sent as ``text/plain`` (a cross-site form) are refused, and each refused
request leaves the mesh's models exactly as they were. No answer carries the admin token, the invite
token or the mesh secret, and a manifest source outside the allowed folders gets one message whether the
file exists or not.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshllm.store.mesh import InviteToken
from tests.integration.nodes import NodeProcess

ATTACKER = "127.0.0.5"  # another host on the "network"


def start(tmp_path: Path, name: str, *extra: str, allow: Path) -> NodeProcess:
    # --client: no engine, no model; the console is the whole subject here
    return NodeProcess(models=[], state_dir=tmp_path / name, engine_dir=tmp_path / "no-engine",
                       extra=["--client", "--bind-host", "127.0.0.2", *extra], allow_models=[allow]).start()


@pytest.fixture
def exposed(tmp_path: Path, tiny_dense: Path) -> Iterator[NodeProcess]:
    node = start(tmp_path, "exposed", "--listen-all", allow=tiny_dense.parent)
    try:
        node.token()  # up
        yield node
    finally:
        node.kill_everything()


def remote(node: NodeProcess) -> httpx.Client:
    """A client on another address of the machine, reaching the node's console by its address."""
    return httpx.Client(base_url=f"http://127.0.0.1:{node.console}", timeout=10,
                        transport=httpx.HTTPTransport(local_address=ATTACKER))


def manifest(source: Path | str, name: str = "tiny") -> list[dict[str, object]]:
    return [{"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": name}, "spec": {"source": str(source)}}]


def models(node: NodeProcess) -> list[dict[str, object]]:
    status = httpx.get(f"http://127.0.0.1:{node.console}/api/status", headers=node.admin_headers(), timeout=5)
    return [{k: m[k] for k in ("name", "source", "replicas")} for m in status.json()["models"]]


def secrets_of(node: NodeProcess) -> list[str]:
    """Every form in which a credential of this node could leak."""
    invite = node.token()
    secret = InviteToken.decode(invite).credentials.secret
    admin = node.admin_headers()["Authorization"].removeprefix("Bearer ")
    return [invite, admin, secret.hex(), base64.urlsafe_b64encode(secret).decode().rstrip("="),
            base64.b64encode(secret).decode()]


def test_without_the_token_a_listen_all_console_answers_nothing_and_changes_nothing(
        exposed: NodeProcess, tiny_dense: Path) -> None:
    admin = exposed.admin_headers()
    with remote(exposed) as attacker:
        before = models(exposed)
        refused = [attacker.get("/api/status"), attacker.get("/api/token"), attacker.get("/api/demand"),
                   attacker.post("/api/apply", json=manifest(tiny_dense)),
                   attacker.post("/api/diff", json=manifest(tiny_dense)),
                   attacker.post("/api/drop", json={"model": "tiny"}),
                   attacker.post("/api/apply", json=[{"apiVersion": "meshllm/v1", "kind": "Mesh",
                                                      "metadata": {"name": "m"}, "spec": {"models": []}}])]
        assert [r.status_code for r in refused] == [401] * len(refused)
        assert all(r.json()["error"]["code"] == "admin_token_required" for r in refused)
        assert models(exposed) == before == []

        # the operator, from anywhere, with the token
        assert attacker.get("/api/status", headers=admin).status_code == 200
        diff = attacker.post("/api/diff", json=manifest(tiny_dense), headers=admin)
        assert diff.status_code == 200 and diff.json()["changes"][0]["action"] == "created"
        assert models(exposed) == []
        assert attacker.post("/api/apply", json=manifest(tiny_dense), headers=admin).status_code == 200
        assert models(exposed) == [{"name": "tiny", "source": str(tiny_dense), "replicas": 1}]

        # a rebinding Host and a cross-site form change nothing, token or not
        for headers in ({"Host": "attacker.example"}, {"Host": "attacker.example", **admin}):
            assert attacker.post("/api/drop", json={"model": "tiny"}, headers=headers).status_code == 403
            assert attacker.get("/api/status", headers=headers).status_code == 403
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "text/plain", **admin}):
            answer = attacker.post("/api/drop", content=json.dumps({"model": "tiny"}), headers=headers)
            assert answer.status_code == 415
        assert models(exposed) == [{"name": "tiny", "source": str(tiny_dense), "replicas": 1}]

        dropped = attacker.post("/api/drop", json={"model": "tiny"}, headers=admin)
        assert dropped.status_code == 200 and models(exposed) == []


def test_no_answer_carries_a_credential_and_sources_are_confined(
        exposed: NodeProcess, tiny_dense: Path, tmp_path: Path) -> None:
    admin = exposed.admin_headers()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "real.gguf"
    real.write_bytes(tiny_dense.read_bytes())
    with remote(exposed) as client:
        answers = [client.get("/api/status", headers=admin), client.get("/api/status"),
                   client.get("/api/models/none", headers=admin), client.post("/api/apply", json=[{"kind": "Nope"}],
                                                                               headers=admin)]
        outside = {}
        for source in (real, elsewhere / "missing.gguf", Path("/etc/passwd"), Path("/etc/shadow-not-here")):
            answer = client.post("/api/diff", json=manifest(source), headers=admin)
            answers.append(answer)
            assert answer.status_code == 422, answer.text
            outside[str(source)] = answer.json()["error"]["message"].replace(str(source), "SOURCE")
        assert len(set(outside.values())) == 1, outside
        assert "--allow-models" in next(iter(outside.values()))
    assert "token" not in answers[0].json() and answers[0].json()["models"] == []
    for secret in secrets_of(exposed):
        for answer in answers:
            assert secret not in answer.text, (answer.request.url, answer.text)


def test_a_loopback_console_refuses_rebinding_and_form_posts(tmp_path: Path, tiny_dense: Path) -> None:
    node = start(tmp_path, "local", allow=tiny_dense.parent)
    try:
        node.token()
        admin = node.admin_headers()
        base = f"http://127.0.0.1:{node.console}"
        assert httpx.post(f"{base}/api/apply", json=manifest(tiny_dense), headers=admin).status_code == 200
        rebound = httpx.get(f"{base}/api/status", headers={"Host": "rebound.example:80"})
        assert rebound.status_code == 403
        form = httpx.post(f"{base}/api/drop", content="model=tiny",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415
        assert httpx.post(f"{base}/api/drop", json={"model": "tiny"}).status_code == 401
        assert [m["name"] for m in models(node)] == ["tiny"]
        # public reads stay open on loopback, and carry no credential
        status = httpx.get(f"{base}/api/status")
        assert status.status_code == 200 and "token" not in status.json()
    finally:
        node.kill_everything()


def test_the_cli_acts_as_the_nodes_operator_and_no_one_else(exposed: NodeProcess, tmp_path: Path) -> None:
    done = exposed.cli("token")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == exposed.token()
    assert exposed.cli("get", "models").returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("MESHLLM_STATE_DIR", "MESHLLM_ADMIN_TOKEN")}
    stranger = subprocess.run([sys.executable, "-m", "meshllm", "token", "--console", str(exposed.console),
                               "--state-dir", str(tmp_path / "not-the-node")],
                              capture_output=True, text=True, timeout=60, env=env)
    assert stranger.returncode == 1 and len(stranger.stderr.strip().splitlines()) == 1, stranger.stderr
    assert "admin token" in stranger.stderr and "meshllm1." not in stranger.stdout + stranger.stderr
