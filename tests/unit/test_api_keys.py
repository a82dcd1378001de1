"""API keys on :9337: hashing, the replicated key entity, the gate in front of the OpenAI app, and the
console routes behind ``meshllm keys``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycrdt import Map
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from meshllm.api.admin import ConsoleAccess
from meshllm.api.backends import DataPlane
from meshllm.api.keys import (
    KEY_PREFIX, ApiKeyGate, KeyRing, check_local_key, exposure_warning, hash_key, key_routes, new_key,
)
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app
from meshllm.cli.keys import local_keys
from meshllm.engine.sources import SourcePolicy
from meshllm.errors import MeshError
from meshllm.state.document import MeshState
from meshllm.state.schema import ApiKey
from tests.conftest import free_port

LOCAL = "local-key-0123456789"
NOW = 1_000_000.0


def mesh_key(key: str, *, name: str = "", revoked: bool = False) -> ApiKey:
    digest = hash_key(key)
    return ApiKey(id=digest[:12], hash=digest, name=name, hint=key[:9], created_at=NOW, created_by="n1",
                  revoked_at=NOW + 1 if revoked else 0.0)


def echo_app() -> Starlette:
    """What the gate lets through: the path and the headers the app was given."""
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"path": request.url.path, "headers": dict(request.headers)})

    return Starlette(routes=[Route(path, echo, methods=["GET", "POST"])
                             for path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/messages")])


@pytest.fixture
def state() -> MeshState:
    return MeshState()


def gated(state: MeshState, *local: str) -> TestClient:
    return TestClient(ApiKeyGate(echo_app(), KeyRing(state, local=local)))


# -- hashing and local keys ---------------------------------------------------------------------------
def test_keys_are_random_prefixed_and_hashed_with_a_domain_label() -> None:
    first, second = new_key(), new_key()
    assert first != second and first.startswith(KEY_PREFIX) and len(first) >= len(KEY_PREFIX) + 40
    assert hash_key(first) == hash_key(first) != hash_key(second)
    assert hash_key(first) != hashlib.sha256(first.encode()).hexdigest()  # labelled: no plain-sha256 reuse
    assert len(hash_key(first)) == 64


@pytest.mark.parametrize("bad", ["", "two words", "tab\tkey", "clé-non-ascii", "line\nbreak"])
def test_a_local_key_that_no_header_can_carry_is_refused_with_a_clear_error(bad: str) -> None:
    with pytest.raises(MeshError, match="--api-key"):
        check_local_key(bad)


def test_a_bad_api_key_flag_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "meshllm", "--client", "--api-key", "two words", "--state-dir",
                           str(tmp_path), "--port", str(free_port()), "--console", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "--api-key" in done.stderr


def test_flag_and_environment_keys_are_merged_once() -> None:
    assert local_keys(["a-key", "b-key", "a-key"], "c-key") == ("a-key", "b-key", "c-key")
    assert local_keys([], None) == ()
    assert local_keys([], "") == ()


# -- the replicated entity ----------------------------------------------------------------------------
def test_mesh_keys_replicate_and_a_revocation_merges_into_the_entry(state: MeshState) -> None:
    other = MeshState()
    key = mesh_key("mllm-abc")
    state.put_api_key(key)
    other.doc.apply_update(state.doc.get_update())
    assert other.api_keys() == {key.id: key}
    other.put_api_key(key.model_copy(update={"revoked_at": NOW + 5, "revoked_by": "n2"}))
    state.put_api_key(key.model_copy(update={"name": "renamed"}))  # a concurrent edit of another field
    state.doc.apply_update(other.doc.get_update(state.doc.get_state()))
    other.doc.apply_update(state.doc.get_update(other.doc.get_state()))
    assert state.api_keys() == other.api_keys()
    merged = state.api_keys()[key.id]
    assert merged.revoked and merged.revoked_by == "n2" and merged.name == "renamed"


def test_a_malformed_key_entry_from_a_peer_is_ignored_and_opens_nothing(state: MeshState) -> None:
    state.doc.get("apikeys", type=Map)["bad"] = Map({"id": "bad", "hash": "not-hex"})
    state.put_api_key(mesh_key("mllm-good"))
    assert list(state.api_keys()) == [hash_key("mllm-good")[:12]]


# -- the gate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "path", "status"), [
    ({"Authorization": f"Bearer {LOCAL}"}, "/v1/chat/completions", 200),
    ({"authorization": f"bearer {LOCAL}"}, "/v1/chat/completions", 200),
    ({"x-api-key": LOCAL}, "/v1/messages", 200),
    ({"x-api-key": LOCAL}, "/v1/models", 200),
    ({"Authorization": "Bearer unused", "x-api-key": LOCAL}, "/v1/chat/completions", 200),
    ({}, "/health", 200),
    ({}, "/v1/chat/completions", 401),
    ({}, "/v1/models", 401),
    ({"Authorization": "Bearer wrong"}, "/v1/chat/completions", 401),
    ({"Authorization": f"Basic {LOCAL}"}, "/v1/chat/completions", 401),
    ({"Authorization": "Bearer "}, "/v1/chat/completions", 401),
    ({"x-api-key": LOCAL[:-1]}, "/v1/messages", 401),
    ({"x-api-key": f"{LOCAL}x"}, "/nope", 401),
])
def test_the_gate_lets_through_only_requests_with_a_key(state: MeshState, headers: dict[str, str], path: str,
                                                        status: int) -> None:
    with gated(state, LOCAL) as client:
        assert client.post(path, headers=headers).status_code == status


def test_401_is_the_openai_error_shape_and_says_how_to_get_a_key(state: MeshState) -> None:
    with gated(state, LOCAL) as client:
        missing = client.post("/v1/chat/completions", json={"model": "m"})
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
        assert "meshllm keys add" in error["message"] and "x-api-key" in error["message"]
    assert "requires an API key" in missing.json()["error"]["message"]
    assert "not valid" in wrong.json()["error"]["message"]
    assert "nope" not in wrong.text


def test_401_on_the_anthropic_route_is_the_anthropic_error_shape(state: MeshState) -> None:
    with gated(state, LOCAL) as client:
        body = client.post("/v1/messages", headers={"x-api-key": "nope"}).json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "meshllm keys add" in body["error"]["message"]


def test_the_keys_never_reach_the_app_other_headers_do(state: MeshState) -> None:
    headers = {"Authorization": f"Bearer {LOCAL}", "x-api-key": LOCAL, "x-request-id": "r1"}
    with gated(state, LOCAL) as client:
        seen = client.post("/v1/chat/completions", headers=headers).json()["headers"]
    with gated(state) as client:  # open, and still stripped: the key is nobody else's business
        seen_open = client.post("/v1/chat/completions", headers=headers).json()["headers"]
    for got in (seen, seen_open):
        assert got["x-request-id"] == "r1"
        assert "authorization" not in got and "x-api-key" not in got


def test_no_keys_anywhere_is_open(state: MeshState) -> None:
    with gated(state) as client:
        assert client.post("/v1/chat/completions").status_code == 200
        assert client.post("/v1/chat/completions", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_the_real_openai_app_behind_the_gate(state: MeshState) -> None:
    router = Router(state, node_id="n1")
    try:
        with TestClient(ApiKeyGate(create_openai_app(DataPlane(router)), KeyRing(state, local=[LOCAL]))) as client:
            assert client.get("/v1/models").status_code == 401
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {LOCAL}"}).json()["object"] == "list"
            health = client.get("/health")  # open without a key; 503: no model is ready here
            assert health.status_code == 503 and health.json()["error"]["code"] == "no_model_ready"
            unknown = client.post("/v1/chat/completions", headers={"x-api-key": LOCAL}, json={"model": "nope"})
            assert unknown.status_code == 404  # past the gate, the proxy answers as before
    finally:
        router.close()


# -- the ring follows the document --------------------------------------------------------------------
def test_mesh_keys_are_accepted_revoked_and_purged_as_the_document_changes(state: MeshState) -> None:
    ring = KeyRing(state)
    assert ring.open
    state.put_api_key(mesh_key("mllm-one", name="one"))
    peer = MeshState()  # a key added on another node arrives by replication
    peer.put_api_key(mesh_key("mllm-two", name="two"))
    state.doc.apply_update(peer.doc.get_update())
    assert not ring.open and ring.accepts("mllm-one") and ring.accepts("mllm-two")
    assert not ring.accepts("mllm-three")
    state.put_api_key(mesh_key("mllm-one", name="one", revoked=True))
    state.put_api_key(mesh_key("mllm-two", name="two", revoked=True))
    assert not ring.accepts("mllm-one") and not ring.accepts("mllm-two")
    assert not ring.open  # the last key revoked: closed, not open to all
    with state.transaction():
        for key_id in list(state.api_keys()):
            state.remove_api_key(key_id)
    assert ring.open
    ring.close()


def test_local_keys_work_beside_mesh_keys_and_keep_the_node_closed(state: MeshState) -> None:
    ring = KeyRing(state, local=[LOCAL])
    state.put_api_key(mesh_key("mllm-one"))
    assert ring.accepts(LOCAL) and ring.accepts("mllm-one") and not ring.open
    state.remove_api_key(hash_key("mllm-one")[:12])
    assert ring.accepts(LOCAL) and not ring.accepts("mllm-one") and not ring.open


@pytest.mark.parametrize(("host", "keys", "warns"), [
    ("0.0.0.0", (), True), ("127.0.0.1", (), False), ("0.0.0.0", (LOCAL,), False),
])
def test_listening_beyond_loopback_without_keys_is_announced(state: MeshState, host: str,
                                                             keys: tuple[str, ...], warns: bool) -> None:
    warning = exposure_warning(KeyRing(state, local=keys), host=host, url=f"http://{host}:9337/v1")
    assert (warning is not None) == warns
    if warning:
        assert "meshllm keys add" in warning and "--api-key" in warning


# -- the console routes -------------------------------------------------------------------------------
ADMIN = "admin-token"


@pytest.fixture
def console(state: MeshState, tmp_path: Path) -> Iterator[TestClient]:
    ring = KeyRing(state)
    app = create_status_app(state, node_id="n1", access=ConsoleAccess(token=ADMIN), sources=SourcePolicy((tmp_path,)),
                            clock=lambda: NOW, routes=key_routes(state, node_id="n1", ring=ring, clock=lambda: NOW))
    with TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        yield client
    ring.close()


def test_the_key_routes_need_the_admin_token(console: TestClient, state: MeshState) -> None:
    for method, path in (("GET", "/api/keys"), ("POST", "/api/keys"), ("POST", "/api/keys/revoke"),
                         ("POST", "/api/keys/purge")):
        refused = console.request(method, path, json={}, headers={"Authorization": "Bearer not-the-admin"})
        assert refused.status_code == 401, (method, path)
    assert state.api_keys() == {}


def test_add_shows_the_key_once_and_list_never_shows_it(console: TestClient, state: MeshState) -> None:
    added = console.post("/api/keys", json={"name": "alice"})
    assert added.status_code == 201
    key = added.json()["key"]
    assert key.startswith(KEY_PREFIX) and added.json()["name"] == "alice" and added.json()["created_by"] == "n1"
    stored = state.api_keys()[added.json()["id"]]
    assert stored.hash == hash_key(key) and key not in str(state.doc.get_update())
    listing = console.get("/api/keys")
    assert key not in listing.text and stored.hash not in listing.text
    assert [(k["id"], k["name"], k["hint"]) for k in listing.json()["keys"]] == [(stored.id, "alice", key[:9])]
    assert listing.json()["open"] is False
    assert console.post("/api/keys", json={}).json()["key"] != key  # unnamed keys are fine


@pytest.mark.parametrize("ref", ["alice", "id", "key"])
def test_revoke_by_name_id_or_the_key_itself(console: TestClient, state: MeshState, ref: str) -> None:
    added = console.post("/api/keys", json={"name": "alice"}).json()
    console.post("/api/keys", json={"name": "bob"})
    answer = console.post("/api/keys/revoke", json={"key": {"alice": "alice", "id": added["id"],
                                                            "key": added["key"]}[ref]}).json()
    assert answer["revoked"]["id"] == added["id"] and not answer["already"] and answer["active"] == 1
    assert state.api_keys()[added["id"]].revoked_by == "n1"
    again = console.post("/api/keys/revoke", json={"key": added["id"]}).json()
    assert again["already"] is True


def test_key_route_errors_are_clear(console: TestClient) -> None:
    console.post("/api/keys", json={"name": "alice"})
    taken = console.post("/api/keys", json={"name": "alice"})
    assert taken.status_code == 400 and "exists" in taken.json()["error"]["message"]
    missing = console.post("/api/keys/revoke", json={"key": "carol"})
    assert missing.status_code == 404 and "meshllm keys list" in missing.json()["error"]["message"]
    for path, body in (("/api/keys", {"name": 5}), ("/api/keys", {"nom": "x"}), ("/api/keys/revoke", {}),
                       ("/api/keys/revoke", [1])):
        bad = console.post(path, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


def test_two_active_keys_of_one_name_need_the_id(console: TestClient, state: MeshState) -> None:
    state.put_api_key(mesh_key("mllm-a", name="ci"))
    state.put_api_key(mesh_key("mllm-b", name="ci"))
    ambiguous = console.post("/api/keys/revoke", json={"key": "ci"})
    assert ambiguous.status_code == 400 and hash_key("mllm-a")[:12] in ambiguous.json()["error"]["message"]


def test_purge_forgets_revoked_keys_and_reopens_a_keyless_mesh(console: TestClient, state: MeshState) -> None:
    added = console.post("/api/keys", json={"name": "alice"}).json()
    console.post("/api/keys/revoke", json={"key": "alice"})
    assert console.get("/api/keys").json()["open"] is False
    assert console.post("/api/keys/purge", json={}).json() == {"purged": [added["id"]], "open": True}
    assert state.api_keys() == {}
