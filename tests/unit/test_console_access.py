"""Who the console (:3131) answers: the admin token, the Host header, JSON-only changes, allowed sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from meshllm.api.admin import ConsoleAccess
from meshllm.api.status import create_status_app
from meshllm.engine.sources import SourcePolicy
from meshllm.errors import ModelError
from meshllm.state.document import MeshState
from meshllm.store.admin import load_or_create_admin_token, read_admin_token

TOKEN = "mladm-secret-value"
INVITE = "meshllm1.invite-with-the-mesh-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


def console(state: MeshState, access: ConsoleAccess, folder: Path) -> TestClient:
    app = create_status_app(state, node_id="n1", access=access, sources=SourcePolicy((folder,)),
                            invite=lambda: INVITE, extra={"mesh_id": "m1"})
    return TestClient(app, base_url="http://127.0.0.1:3131")


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[TestClient]:
    with console(MeshState(), ConsoleAccess(token=TOKEN), tmp_path) as client:
        yield client


@pytest.fixture
def exposed(tmp_path: Path) -> Iterator[TestClient]:
    access = ConsoleAccess.for_bind(TOKEN, listen_all=True, names=["10.1.2.3", "Box.lan"])
    with console(MeshState(), access, tmp_path) as client:
        yield client


def manifest(source: str) -> list[dict[str, object]]:
    return [{"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": "m"}, "spec": {"source": source}}]


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", "/api/status", {}, 200),                       # public read, no secret in it
    ("GET", "/api/demand", {}, 200),
    ("GET", "/api/token", {}, 401),                        # the invite token holds the mesh secret
    ("GET", "/api/token", AUTH, 200),
    ("GET", "/api/keys", {}, 401),                         # a route not listed as public is private
    ("POST", "/api/drop", JSON, 401),                      # changes need the token ...
    ("POST", "/api/drop", {**AUTH, "Content-Type": "text/plain"}, 415),  # ... and JSON (no blind form posts)
    ("POST", "/api/drop", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("POST", "/api/drop", {**AUTH, **JSON}, 404),          # through: the model is unknown
    ("POST", "/api/drop", {"Authorization": "Bearer wrong", **JSON}, 401),
    ("POST", "/api/drop", {"Authorization": TOKEN, **JSON}, 401),  # no scheme
])
def test_a_loopback_console_opens_public_reads_and_nothing_else(
        loopback: TestClient, method: str, path: str, headers: dict[str, str], status: int) -> None:
    response = loopback.request(method, path, headers=headers, content=b'{"model": "x"}' if method == "POST" else None)
    assert response.status_code == status, response.text
    if status >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("host", ["evil.example", "evil.example:3131", "127.0.0.1.nip.io:3131", "10.9.9.9"])
def test_a_host_that_does_not_name_the_node_is_refused_even_with_the_token(loopback: TestClient, host: str) -> None:
    for headers in ({"Host": host}, {"Host": host, **AUTH}):
        response = loopback.get("/api/status", headers=headers)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost:3131", "LOCALHOST", "127.0.0.1", "[::1]:3131"])
def test_loopback_names_are_this_node(loopback: TestClient, host: str) -> None:
    assert loopback.get("/api/status", headers={"Host": host}).status_code == 200


def test_a_console_beyond_loopback_answers_nothing_without_the_token(exposed: TestClient) -> None:
    for path in ("/api/status", "/api/demand", "/api/models/m", "/api/token"):
        assert exposed.get(path).status_code == 401
    assert exposed.post("/api/apply", json=manifest("m")).status_code == 401
    for host in ("10.1.2.3:3131", "box.lan", "127.0.0.1"):
        assert exposed.get("/api/status", headers={"Host": host, **AUTH}).status_code == 200
    assert exposed.get("/api/status", headers={"Host": "other.lan", **AUTH}).status_code == 403


def test_no_answer_carries_a_secret(loopback: TestClient, tmp_path: Path) -> None:
    answers = [loopback.get("/api/status"), loopback.get("/api/token"), loopback.get("/api/nope", headers=AUTH),
               loopback.post("/api/apply", json=manifest("/etc/passwd")),
               loopback.post("/api/apply", json=manifest("/etc/passwd"), headers=AUTH),
               loopback.get("/api/status", headers={"Host": "evil.example"})]
    assert [a.status_code for a in answers] == [200, 401, 404, 401, 422, 403]
    for answer in answers:
        assert TOKEN not in answer.text and INVITE not in answer.text
    assert "token" not in answers[0].json()


def test_a_source_outside_the_allowed_folders_is_refused_alike_whether_it_exists_or_not(
        loopback: TestClient, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    real = outside / "real.gguf"
    real.write_bytes(b"GGUF\x03" + b"\0" * 59)  # version 3, no tensors, no metadata
    messages = []
    for source in (str(real), str(outside / "missing.gguf"), "/etc/passwd", "/etc/no-such-file"):
        response = loopback.post("/api/diff", json=manifest(source), headers=AUTH)
        assert response.status_code == 422, response.text
        messages.append(response.json()["error"]["message"].replace(source, "SOURCE"))
    assert len(set(messages)) == 1, messages
    assert "--allow-models" in messages[0]
    inside = tmp_path / "inside.gguf"
    inside.write_bytes(b"GGUF\x03" + b"\0" * 59)  # version 3, no tensors, no metadata
    assert loopback.post("/api/apply", json=manifest(str(inside)), headers=AUTH).status_code == 200


def test_the_policy_follows_links_and_admits_names_and_the_nodes_own_files(tmp_path: Path) -> None:
    allowed, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    mine = elsewhere / "mine.gguf"
    mine.write_bytes(b"GGUF")
    (allowed / "escape.gguf").symlink_to(elsewhere / "other.gguf")
    policy = SourcePolicy((allowed,), (mine,))
    for ok in ("gemma-3-270m", "some-catalog-name", str(allowed / "a.gguf"), str(allowed / "sub" / "b.gguf"), str(mine)):
        policy.check(ok)
    for refused in (str(allowed / "escape.gguf"), str(allowed / ".." / "elsewhere" / "other.gguf"),
                    "relative/model.gguf", "./model.gguf", "model.gguf"):
        with pytest.raises(ModelError, match="--allow-models"):
            policy.check(refused)


def test_the_admin_token_file_is_private_and_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLLM_ADMIN_TOKEN", raising=False)
    assert read_admin_token(tmp_path) is None
    token = load_or_create_admin_token(tmp_path)
    assert (tmp_path / "admin.token").stat().st_mode & 0o777 == 0o600
    assert load_or_create_admin_token(tmp_path) == token == read_admin_token(tmp_path)
    monkeypatch.setenv("MESHLLM_ADMIN_TOKEN", "from-env")
    assert read_admin_token(tmp_path) == "from-env"
