"""The control API (console port) against a real state document: apply, diff, delete, drop, describe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from meshllm.api.admin import ConsoleAccess
from meshllm.api.status import create_status_app
from meshllm.cli.get import describe_model
from meshllm.engine.sources import SourcePolicy
from meshllm.state.document import MeshState
from meshllm.state.manifest import Manifest
from meshllm.state.schema import (
    DemandEntry, ModelOrigin, ModelSpec, NodeStatus, PlacementLease, ServerPhase, ServerStatus,
)

NOW = 1_000_000.0
ADMIN = "mladm-test"


def gguf(path: Path, size: int = 64) -> Path:
    path.write_bytes(b"GGUF\x03" + b"\0" * (size - 5))  # a whole GGUF: version 3, no tensors, no metadata
    return path


def model(name: str, source: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": name},
            "spec": {"source": source, **spec}}


def mesh(*models: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "meshllm/v1", "kind": "Mesh", "metadata": {"name": "prod"},
            "spec": {"models": list(models)}}


@pytest.fixture
def state() -> MeshState:
    return MeshState()


@pytest.fixture
def applied() -> list[list[Manifest]]:
    return []


@pytest.fixture
def client(state: MeshState, applied: list[list[Manifest]], tmp_path: Path) -> Iterator[TestClient]:
    async def on_applied(manifests: list[Manifest]) -> None:
        applied.append(manifests)

    async def events(name: str) -> list[dict[str, Any]]:
        return [{"at": NOW - 5, "type": "Normal", "reason": "Applied", "message": f"{name} applied"}]

    app = create_status_app(state, node_id="n1", access=ConsoleAccess(token=ADMIN), sources=SourcePolicy((tmp_path,)),
                            on_applied=on_applied, events=events, clock=lambda: NOW)
    with TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        yield client


def actions(response: Any) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {c["name"]: c["action"] for c in response.json()["changes"]}


def assert_error(response: Any, status: int, *, code: str, says: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert says in error["message"], error["message"]


def test_apply_creates_manifest_specs_then_reports_unchanged_and_configured(
        client: TestClient, state: MeshState, tmp_path: Path, applied: list[list[Manifest]]) -> None:
    a, b = gguf(tmp_path / "a.gguf", 100), gguf(tmp_path / "b.gguf", 200)
    body = [model("a", str(a), replicas=2, ctxSize=4096), model("b", str(b), draft=str(a))]
    assert actions(client.post("/api/apply", json=body)) == {"a": "created", "b": "created"}
    spec = state.models()["a"]
    assert (spec.source, spec.replicas, spec.ctx_size, spec.size_bytes) == (str(a), 2, 4096, 100)
    assert (spec.origin, spec.created_at, spec.node) == (ModelOrigin.MANIFEST, NOW, "")
    assert state.models()["b"].draft == str(a)
    assert len(applied) == 1 and [m.metadata.name for m in applied[0]] == ["a", "b"]

    assert actions(client.post("/api/apply", json=body)) == {"a": "unchanged", "b": "unchanged"}
    body[0]["spec"]["replicas"] = 3
    response = client.post("/api/apply", json=body)
    assert actions(response) == {"a": "configured", "b": "unchanged"}
    assert response.json()["changes"][0]["fields"] == {"replicas": {"from": 2, "to": 3}}
    assert state.models()["a"].replicas == 3


def test_mesh_apply_prunes_manifest_models_it_no_longer_lists_but_not_node_models(
        client: TestClient, state: MeshState, tmp_path: Path) -> None:
    a, b = gguf(tmp_path / "a.gguf"), gguf(tmp_path / "b.gguf")
    state.put_model(ModelSpec(name="cli", source="x", node="n1", origin=ModelOrigin.NODE, owner="n1"))
    first = mesh({"name": "a", "source": str(a)}, {"name": "b", "source": str(b)})
    assert actions(client.post("/api/apply", json=[first])) == {"a": "created", "b": "created"}
    second = mesh({"name": "b", "source": str(b)})
    assert actions(client.post("/api/apply", json=[second])) == {"b": "unchanged", "a": "pruned"}
    assert sorted(state.models()) == ["b", "cli"]


def test_diff_reports_the_changes_and_changes_nothing(client: TestClient, state: MeshState, tmp_path: Path) -> None:
    a = gguf(tmp_path / "a.gguf")
    state.put_model(ModelSpec(name="old", source=str(a)))
    before = state.models()
    response = client.post("/api/diff", json=[mesh({"name": "a", "source": str(a), "replicas": 2})])
    assert actions(response) == {"a": "created", "old": "pruned"}
    assert state.models() == before


@pytest.mark.parametrize(("body", "code", "says"), [
    (b"{not json", "invalid_json", "not JSON"),
    (b'{"kind": "Model"}', "invalid_request", "JSON list"),
])
def test_a_body_that_is_not_a_list_of_manifests_is_a_400(client: TestClient, body: bytes, code: str, says: str) -> None:
    for path in ("/api/apply", "/api/diff", "/api/delete"):
        assert_error(client.post(path, content=body, headers={"Content-Type": "application/json"}), 400,
                         code=code, says=says)


@pytest.mark.parametrize(("after", "says"), [
    ([{"apiVersion": "meshllm/v1", "kind": "Pod"}], "request: document 2: kind: unknown kind 'Pod'"),
    ([None, model("m", "x.gguf", replicas="2")], "request: document 3: spec.replicas: Input should be a valid integer"),
    ([model("m", "x.gguf", replica=2)], "request: document 2: spec.replica: unknown field (did you mean replicas?)"),
    ([model("good", "x.gguf")], "request: document 2: metadata.name: model 'good' is defined twice"),
])
def test_an_invalid_manifest_is_a_422_naming_its_place_and_nothing_is_applied(
        client: TestClient, state: MeshState, tmp_path: Path, after: list[Any], says: str) -> None:
    body = [model("good", str(gguf(tmp_path / "good.gguf"))), *after]  # valid, but in the same request
    for path in ("/api/apply", "/api/diff", "/api/delete"):
        assert_error(client.post(path, json=body), 422, code="invalid_manifest", says=says)
        assert state.models() == {}


def test_a_missing_file_is_a_422_naming_its_place_and_nothing_is_applied(
        client: TestClient, state: MeshState, tmp_path: Path) -> None:
    good = gguf(tmp_path / "good.gguf")
    body = [model("good", str(good)), mesh({"name": "x", "source": str(good)},
                                           {"name": "y", "source": str(tmp_path / "missing.gguf")})]
    response = client.post("/api/apply?source=mesh.yaml", json=body)
    assert_error(response, 422, code="invalid_manifest", says="mesh.yaml: document 2: spec.models[1].source: model file")
    assert "does not exist" in response.json()["error"]["message"]
    response = client.post("/api/apply", json=[model("d", str(good), draft=str(tmp_path / "nodraft.gguf"))])
    assert_error(response, 422, code="invalid_manifest", says="request: document 1: spec.draft: ")
    assert state.models() == {}


def test_placement_by_node_name_is_written_as_the_node_id(client: TestClient, state: MeshState, tmp_path: Path) -> None:
    a = gguf(tmp_path / "a.gguf")
    state.put_node(NodeStatus(id="id-gpu", name="gpu-box"))
    response = client.post("/api/apply", json=[model("a", str(a), placement={"node": "gpu-box"}),
                                               model("b", str(a), placement={"node": "elsewhere"})])
    assert actions(response) == {"a": "created", "b": "created"}
    assert state.models()["a"].node == "id-gpu"
    assert state.models()["b"].node == "elsewhere"
    assert "elsewhere" in response.json()["warnings"][0]
    state.put_node(NodeStatus(id="id-other", name="gpu-box"))
    response = client.post("/api/apply", json=[model("c", str(a), placement={"node": "gpu-box"})])
    assert_error(response, 422, code="invalid_manifest", says="spec.placement.node: node name 'gpu-box' matches 2")


def test_delete_removes_manifest_models_only(client: TestClient, state: MeshState, tmp_path: Path) -> None:
    a = gguf(tmp_path / "a.gguf")
    client.post("/api/apply", json=[model("a", str(a))])
    state.put_model(ModelSpec(name="cli", source="x", node="n1", origin=ModelOrigin.NODE, owner="n1"))
    body = [model("a", "gone.gguf"), model("cli", "x"), model("never", "x")]  # sources are not checked
    response = client.post("/api/delete", json=body)
    assert actions(response) == {"a": "deleted", "cli": "not found", "never": "not found"}
    assert "meshllm drop cli" in response.json()["changes"][1]["message"]
    assert list(state.models()) == ["cli"]


def test_drop_removes_the_model_its_demand_and_leases(client: TestClient, state: MeshState) -> None:
    state.put_model(ModelSpec(name="m", source="x", origin=ModelOrigin.NODE, owner="n1"))
    state.put_model(ModelSpec(name="other", source="y"))
    for node in ("n1", "n2"):
        state.put_demand(DemandEntry(model="m", node=node, count=3, expires_at=NOW + 60))
    state.put_demand(DemandEntry(model="other", node="n1", count=1))
    state.put_lease(PlacementLease(model="m", slot=0, node="n1", incarnation=1.0))
    state.put_lease(PlacementLease(model="other", slot=0, node="n1", incarnation=1.0))
    response = client.post("/api/drop", json={"model": "m"})
    assert response.status_code == 200, response.text
    assert response.json()["removed"] == {"model": True, "demand": 2, "leases": 1}
    assert list(state.models()) == ["other"]
    assert [e.model for e in state.demand().values()] == ["other"]
    assert [lease.model for lease in state.leases().values()] == ["other"]
    assert_error(client.post("/api/drop", json={"model": "m"}), 404, code="model_not_found", says="'m' not found")
    assert_error(client.post("/api/drop", json={"name": "m"}), 400, code="invalid_request", says='{"model": NAME}')


def test_demand_lists_entries_with_liveness(client: TestClient, state: MeshState) -> None:
    state.put_demand(DemandEntry(model="m", node="n1", count=3, rate=1.5, expires_at=NOW + 60))
    state.put_demand(DemandEntry(model="m", node="n2", count=1, expires_at=NOW - 1))
    listed = client.get("/api/demand").json()["demand"]
    assert [(e["node"], e["count"], e["live"]) for e in listed] == [("n1", 3, True), ("n2", 1, False)]


def test_describe_and_status_show_the_condition(client: TestClient, state: MeshState) -> None:
    state.put_node(NodeStatus(id="n1", capacity_bytes=10**9, incarnation=1.0))
    state.put_model(ModelSpec(name="m", source="x", replicas=2))
    state.put_server(ServerStatus(node="n1", model="m", phase=ServerPhase.READY, port=4000))
    state.put_lease(PlacementLease(model="m", slot=0, node="n1", incarnation=1.0))
    state.put_demand(DemandEntry(model="m", node="n1", count=7, expires_at=NOW + 10))
    described = client.get("/api/models/m").json()
    assert described["model"]["replicas"] == 2
    assert (described["condition"]["phase"], described["condition"]["ready"], described["condition"]["wanted"]) \
        == ("Degraded", 1, 2)
    assert [s["port"] for s in described["servers"]] == [4000]
    assert [lease["slot"] for lease in described["leases"]] == [0]
    assert [e["count"] for e in described["demand"]] == [7]
    assert described["events"][0]["message"] == "m applied"
    status = client.get("/api/status").json()
    assert {k: status["models"][0]["condition"][k] for k in ("phase", "reason", "ready", "wanted")} \
        == {"phase": "Degraded", "reason": "TooFewNodes", "ready": 1, "wanted": 2}
    assert_error(client.get("/api/models/nope"), 404, code="model_not_found", says="'nope' not found")


def test_describe_says_what_a_split_costs(client: TestClient, state: MeshState) -> None:
    # 100 MB that no node holds: a hosts, b (1.5 ms away) works; gemma-3-270m's width
    state.put_node(NodeStatus(id="a", capacity_bytes=80 * 10**6, incarnation=1.0, rtt_ms={"b": 1.5}))
    state.put_node(NodeStatus(id="b", capacity_bytes=60 * 10**6, incarnation=1.0))
    state.put_model(ModelSpec(name="x", source="/m/x.gguf", size_bytes=100 * 10**6, embedding_length=640))
    state.put_lease(PlacementLease(model="x", slot=0, node="a", incarnation=1.0, workers=["b"],
                                   tensor_split=[0.4286, 0.5714]))
    state.put_server(ServerStatus(node="a", model="x", phase=ServerPhase.READY, port=4000, workers=["b"]))
    described = client.get("/api/models/x").json()
    cost = described["condition"]["split_cost"]
    assert cost.startswith("~2.6 ms/token added (1 worker: 1.5 ms of round trips, 1 x 1 ms engine, 12.1 KB/token")
    assert "workers load 42.9 MB" in cost  # b's 60 of the 140 MB offered
    assert "a quantization of at most 72.7 MB fits one node and, served solo, decodes faster" in cost
    text = describe_model(described, names={"a": "alpha", "b": "beta"}, now=NOW)
    assert "  Workers:     beta\n" in text and f"  Split cost:  {cost}\n" in text
    assert client.get("/api/status").json()["models"][0]["condition"]["split_cost"] == cost
