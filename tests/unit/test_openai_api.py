"""The :9337 app's answers that need no upstream: model list, routing errors, body checks."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from starlette.testclient import TestClient

from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeStatus, ServerPhase, ServerStatus
from meshllm.transport.errors import ConnectionLost, ErrorCode

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


class _FakeTunnel:
    """One tunnel stream: answers 200 with ``chunks``, or fails the request with ``error``."""

    def __init__(self, *, error: Exception | None = None, chunks: tuple[bytes, ...] = ()) -> None:
        self.error = error
        self.replies = [b'{"status": 200, "headers": [["content-type", "application/json"]]}', *chunks]

    async def send(self, message: bytes) -> None:
        if self.error is not None:
            raise self.error

    async def send_eof(self) -> None:
        pass

    async def receive(self) -> bytes:
        if not self.replies:
            raise anyio.EndOfStream
        return self.replies.pop(0)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("duplicate", "status"), [(True, 200), (False, 503)])
def test_a_request_on_a_connection_lost_to_a_duplicate_is_sent_again(duplicate: bool, status: int) -> None:
    state = MeshState()
    state.put_model(ModelSpec(name="remote-model", source="x", node="n2"))
    state.put_node(NodeStatus(id="n2", incarnation=1))
    state.put_server(ServerStatus(node="n2", model="remote-model", phase=ServerPhase.READY, port=7))
    lost = ConnectionLost("connection to n2 closed here: replaced by another connection",
                          code=ErrorCode.DUPLICATE if duplicate else None)
    opened = [_FakeTunnel(error=lost), _FakeTunnel(chunks=(b'{"ok": true}',))]

    async def tunnels(node_id: str) -> _FakeTunnel:
        return opened.pop(0)

    router = Router(state, node_id=NODE)
    with TestClient(create_openai_app(router, tunnels=tunnels)) as client:  # type: ignore[arg-type]
        response = client.post("/v1/completions", json={"model": "remote-model", "prompt": "hi"})
    router.close()
    assert response.status_code == status
    if status == 200:
        assert response.json() == {"ok": True} and not opened
