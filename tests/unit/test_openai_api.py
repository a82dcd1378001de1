"""The :9337 app's answers that need no upstream: model list, routing errors, body checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, ServerPhase, ServerStatus

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
    with TestClient(create_openai_app(router, max_body_bytes=1024)) as client:
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
