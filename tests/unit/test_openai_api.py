"""The :9337 app's answers that need no upstream: model list, health, routing errors, body checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from meshllm.api.backends import DataPlane
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeStatus, ServerPhase, ServerStatus

NODE = "n1"


@pytest.fixture
def state() -> MeshState:
    state = MeshState()
    for name in ("ready-model", "loading-model"):
        state.put_model(ModelSpec(name=name, source=name, node=NODE))
    state.put_server(ServerStatus(node=NODE, model="ready-model", phase=ServerPhase.READY, port=1))
    state.put_server(ServerStatus(node=NODE, model="loading-model", phase=ServerPhase.LOADING, port=2))
    return state


@pytest.fixture
def client(state: MeshState) -> Iterator[TestClient]:
    router = Router(state, node_id=NODE)
    with TestClient(create_openai_app(DataPlane(router), max_body_bytes=1024)) as client:
        yield client
    router.close()


def test_models_lists_only_ready_models_in_openai_shape(client: TestClient, state: MeshState) -> None:
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["object"]) for m in listed["data"]] == [("ready-model", "model")]
    state.put_server(ServerStatus(node=NODE, model="loading-model", phase=ServerPhase.READY, port=2))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["loading-model", "ready-model"]


def test_loading_model_is_503_with_retry_after(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"model": "loading-model", "messages": []})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "model_not_ready"
    assert "loading" in response.json()["error"]["message"]


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"model": "ready-model"', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    (b'{"prompt": "hi"}', 400, "missing_model"),
    (b'{"model": 42}', 400, "missing_model"),
    (b'{"model": "gpt-17"}', 404, "model_not_found"),
    (b'{"model": "ready-model", "prompt": "' + b"x" * 2000 + b'"}', 413, "request_too_large"),
])
def test_bad_requests_get_openai_errors(client: TestClient, body: bytes, status: int, code: str) -> None:
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["type"]


def test_unknown_path_is_an_openai_404(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_unreachable_upstream_is_503(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "ready-model", "prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_health_is_503_with_the_reason_until_a_model_is_ready(state: MeshState) -> None:
    state.put_server(ServerStatus(node=NODE, model="ready-model", phase=ServerPhase.LOADING, port=1))
    router = Router(state, node_id=NODE)
    with TestClient(create_openai_app(DataPlane(router))) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and int(loading.headers["retry-after"]) >= 1
        assert loading.json()["error"]["code"] == "no_model_ready"
        assert "'ready-model' is loading" in loading.json()["error"]["message"]
        state.put_server(ServerStatus(node=NODE, model="ready-model", phase=ServerPhase.READY, port=1))
        ready = client.get("/health")
        assert ready.status_code == 200 and ready.json() == {"status": "ok", "models": ["ready-model"]}
    router.close()


def test_a_client_node_is_healthy_while_the_mesh_serves_a_model_elsewhere() -> None:
    state = MeshState()
    router = Router(state, node_id=NODE)
    with TestClient(create_openai_app(DataPlane(router))) as client:
        alone = client.get("/health")
        assert alone.status_code == 503 and "no model is served" in alone.json()["error"]["message"]
        state.put_node(NodeStatus(id="n2", incarnation=1))
        state.put_model(ModelSpec(name="remote-model", source="x", node="n2"))
        state.put_server(ServerStatus(node="n2", model="remote-model", phase=ServerPhase.READY, port=7))
        assert client.get("/health").json() == {"status": "ok", "models": ["remote-model"]}
    router.close()


@pytest.mark.parametrize(("asked", "status"), [
    ("gemma-3-270m", 503), ("gemma-3-270m-q4_k_m", 503), ("gemma-3-270m-q4_k_m.gguf", 503), ("gemma3-270m", 503),
    ("gpt-4o-mini", 404),  # with a second model served, a name of neither reaches neither
])
def test_the_embedded_model_started_from_its_file_answers_to_its_names(asked: str, status: int) -> None:
    state = MeshState()
    state.put_model(ModelSpec(name="gemma-3-270m", source="/m/gemma-3-270m-q4_k_m.gguf", node=NODE))
    state.put_server(ServerStatus(node=NODE, model="gemma-3-270m", phase=ServerPhase.LOADING, port=1))
    state.put_model(ModelSpec(name="other", source="/m/other.gguf", node=NODE))  # no "only model" fallback
    state.put_server(ServerStatus(node=NODE, model="other", phase=ServerPhase.LOADING, port=2))
    router = Router(state, node_id=NODE)
    with TestClient(create_openai_app(DataPlane(router))) as client:
        response = client.post("/v1/completions", json={"model": asked, "prompt": "x"})
    router.close()
    assert response.status_code == status, response.text
    if status == 503:  # gemma's own answer: it is loading
        assert response.json()["error"]["code"] == "model_not_ready" and "gemma-3-270m" in response.text
