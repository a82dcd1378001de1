"""The front door without an engine: which requests the proxy takes and for which model, the error shapes,
CORS, and the llama-server flags a model's spec carries (manifest, CLI, command line)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from meshllm.api.backends import DataPlane
from meshllm.api.cors import CorsGate, CorsPolicy
from meshllm.api.endpoints import ENDPOINTS, BadRequest, endpoint_for, requested_model
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Route as MeshRoute
from meshllm.api.routing import Router
from meshllm.engine.process import LlamaServerConfig, ServingOptions
from meshllm.node import desired_models
from meshllm.node.config import NodeConfig
from meshllm.state.document import MeshState
from meshllm.state.manifest import load_manifests, manifest_models, model_manifest
from meshllm.state.schema import ModelSpec, ServerPhase, ServerStatus

NODE = "n1"


def serve(state: MeshState, name: str, source: str, *, port: int = 1) -> None:
    state.put_model(ModelSpec(name=name, source=source, node=NODE))
    state.put_server(ServerStatus(node=NODE, model=name, phase=ServerPhase.READY, port=port))


@pytest.fixture
def state() -> MeshState:
    state = MeshState()
    serve(state, "chat", "/models/tiny-chat.gguf")
    return state


@pytest.fixture
def router(state: MeshState) -> Iterator[Router]:
    router = Router(state, node_id=NODE)
    yield router
    router.close()


# -- the route table and the model a request names ----------------------------------------------------

def test_the_table_holds_llama_server_routes_with_and_without_v1() -> None:
    posts = {e.path for e in ENDPOINTS if e.method == "POST"}
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/responses", "/tokenize",
                 "/detokenize", "/apply-template", "/v1/rerank", "/rerank", "/infill", "/completion",
                 "/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings"):
        assert path in posts
    assert endpoint_for("GET", "/props") is not None and endpoint_for("GET", "/slots") is not None
    assert endpoint_for("POST", "/props") is None  # changes the server: not through the mesh
    assert endpoint_for("POST", "/v1/messages").anthropic and not endpoint_for("POST", "/tokenize").anthropic  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "query", "named"), [
    (b'{"model": "m", "messages": []}', "", "m"),
    (b'{"model": "m"}', "model=q", "m"),
    (b'{"content": "hi"}', "model=q", "q"),
    (b"", "model=q&x=1", "q"),
    (b"", "", None),
    (b'{"content": "hi", "model": ""}', "", None),
    (b'{"model": null}', "", None),
    (b'{"model": 42}', "", BadRequest("model must be a model name (a string; see /v1/models)", "missing_model", "model")),
])
def test_a_request_names_its_model_in_the_body_else_the_query(body: bytes, query: str,
                                                              named: str | BadRequest | None) -> None:
    assert requested_model(body, query) == named


def test_a_body_that_is_not_a_json_object_is_a_bad_request() -> None:
    assert isinstance(requested_model(b"{nope", ""), BadRequest)
    assert isinstance(requested_model(b"[1]", ""), BadRequest)


# -- names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("asked", ["chat", "tiny-chat.gguf", "tiny-chat", "gpt-4o-mini", None])
def test_the_only_model_answers_to_its_names_to_any_name_and_to_none(router: Router, asked: str | None) -> None:
    assert router.resolve(asked) == MeshRoute("chat", NODE, 1)


def test_with_two_models_only_their_own_names_reach_them(state: MeshState, router: Router) -> None:
    serve(state, "embed", "/models/tiny-embed.gguf", port=2)
    assert router.resolve("tiny-embed.gguf") == MeshRoute("embed", NODE, 2)
    assert router.resolve("tiny-chat") == MeshRoute("chat", NODE, 1)
    assert router.resolve("gpt-4o-mini") is None and router.resolve(None) is None
    assert router.known_models() == ["chat", "embed"]


def test_a_file_name_never_shadows_another_model(state: MeshState, router: Router) -> None:
    serve(state, "tiny-chat", "/other/file.gguf", port=2)  # a model whose own name is chat's file's stem
    assert router.resolve("tiny-chat") == MeshRoute("tiny-chat", NODE, 2)
    assert router.resolve("tiny-chat.gguf") == MeshRoute("chat", NODE, 1)


# -- the proxy's own answers -----------------------------------------------------------------------------

@pytest.fixture
def client(router: Router) -> Iterator[TestClient]:
    with TestClient(create_openai_app(DataPlane(router), max_body_bytes=1024)) as client:
        yield client


def test_errors_on_anthropic_routes_come_in_anthropic_s_shape(state: MeshState, client: TestClient) -> None:
    serve(state, "embed", "/models/tiny-embed.gguf", port=2)
    unknown = client.post("/v1/messages", json={"model": "claude-x", "max_tokens": 4, "messages": []})
    assert unknown.status_code == 404
    assert unknown.json() == {"type": "error", "error": {"type": "not_found_error", "message": unknown.json()[
        "error"]["message"]}} and "claude-x" in unknown.json()["error"]["message"]
    assert client.post("/v1/messages/nope", json={}).json()["error"]["type"] == "not_found_error"
    too_big = client.post("/v1/messages", content=b"x" * 2000)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "request_too_large"


def test_a_request_naming_no_model_with_two_served_is_a_400_naming_them(state: MeshState,
                                                                        client: TestClient) -> None:
    serve(state, "embed", "/models/tiny-embed.gguf", port=2)
    answer = client.post("/tokenize", json={"content": "hi"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "missing_model" and error["param"] == "model" and "chat, embed" in error["message"]
    assert client.get("/props").status_code == 400


def test_a_mesh_without_models_says_so_with_a_503() -> None:
    router = Router(MeshState(), node_id=NODE)
    with TestClient(create_openai_app(DataPlane(router))) as client:
        answer = client.post("/tokenize", json={"content": "hi"})
    router.close()
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_model_ready"


def test_a_wrong_method_is_an_openai_405(client: TestClient) -> None:
    answer = client.get("/v1/chat/completions")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in answer.headers["allow"]
    assert client.head("/props").status_code == 405  # no body to relay: never sent upstream


def test_models_and_health_also_answer_where_llama_server_has_them(client: TestClient) -> None:
    assert [m["id"] for m in client.get("/models").json()["data"]] == ["chat"]
    assert client.get("/v1/health").json()["status"] == "ok"


# -- CORS -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("origins", "origin", "allowed"), [
    ("*", "http://app.example", "http://app.example"),
    ("localhost", "http://localhost:5173", "http://localhost:5173"),
    ("localhost", "http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("localhost", "http://evil.example", None),
    ("http://a.example, http://b.example", "http://b.example", "http://b.example"),
    ("http://a.example", "http://b.example", None),
])
def test_allowed_origins_follow_llama_server_s_rules(origins: str, origin: str, allowed: str | None) -> None:
    assert CorsPolicy(origins=origins).allowed_origin(origin) == allowed


def _echo_app() -> Starlette:
    async def echo(request: object) -> JSONResponse:
        return JSONResponse({"ok": True}, headers={"Access-Control-Allow-Origin": "*"})  # llama-server's own
    return Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"])])


def test_a_preflight_is_answered_before_the_app_and_the_app_s_answer_is_stamped() -> None:
    client = TestClient(CorsGate(_echo_app(), CorsPolicy()))
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.content == b""
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answer = client.post("/v1/chat/completions", headers={"Origin": "http://app.example"})
    assert answer.headers.get_list("access-control-allow-origin") == ["http://app.example"]
    plain = client.post("/v1/chat/completions")  # not from a browser: untouched
    assert plain.headers.get_list("access-control-allow-origin") == ["*"]


def test_an_origin_not_allowed_gets_no_allow_origin() -> None:
    client = TestClient(CorsGate(_echo_app(), CorsPolicy(origins="localhost")))
    answer = client.post("/v1/chat/completions", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in answer.headers


# -- the model spec's llama-server flags --------------------------------------------------------------

def test_serving_options_become_llama_server_flags_and_a_spec_template_replaces_the_automatic_one() -> None:
    assert ServingOptions(embeddings=True, pooling="mean").argv() == ["--embeddings", "--pooling", "mean"]
    assert ServingOptions(rerank=True).argv() == ["--rerank"]
    assert ServingOptions(chat_template="chatml").argv() == ["--chat-template", "chatml", "--no-jinja"]
    jinja = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ServingOptions(chat_template=jinja).argv() == ["--chat-template", jinja]
    auto = ("--chat-template", "gemma", "--no-jinja")
    config = LlamaServerConfig(binary=Path("llama-server"), model_path=Path("m.gguf"), alias="m", port=1, chat=auto,
                               serving=ServingOptions(chat_template="chatml"))
    argv = config.argv()
    assert argv.count("--chat-template") == 1 and argv[argv.index("--chat-template") + 1] == "chatml"


def test_a_manifest_carries_the_flags_to_the_spec_and_back() -> None:
    text = ("apiVersion: meshllm/v1\nkind: Model\nmetadata: {name: embed}\n"
            "spec: {source: e.gguf, ctxSize: 512, embeddings: true, pooling: mean, chatTemplate: chatml}\n")
    spec = manifest_models(load_manifests(text, source_name="m.yaml"))[0].spec
    assert (spec.embeddings, spec.pooling, spec.ctx_size, spec.chat_template, spec.rerank) == (
        True, "mean", 512, "chatml", False)
    again = manifest_models(load_manifests(model_manifest(spec).model_dump_json(), source_name="x.json"))[0].spec
    assert again == spec


def test_a_manifest_with_an_unknown_pooling_is_refused() -> None:
    from meshllm.errors import ManifestError

    text = "apiVersion: meshllm/v1\nkind: Model\nmetadata: {name: e}\nspec: {source: e.gguf, pooling: avg}\n"
    with pytest.raises(ManifestError, match="spec.pooling"):
        load_manifests(text, source_name="m.yaml")


def test_command_line_options_shape_the_node_s_models(tmp_path: Path) -> None:
    from meshllm.engine.tinygguf import write_dense
    from meshllm.errors import MeshError

    model = write_dense(tmp_path / "tiny-embed.gguf")
    config = NodeConfig(models=(str(model),), state_dir=tmp_path, alias="embed", ctx_size=256, embeddings=True,
                        pooling="last", chat_template="chatml")
    [spec] = desired_models(config, NODE, 1.0)
    assert (spec.name, spec.ctx_size, spec.embeddings, spec.pooling, spec.chat_template) == (
        "embed", 256, True, "last", "chatml")
    with pytest.raises(MeshError, match="--alias"):
        desired_models(NodeConfig(models=(str(model), str(model)), state_dir=tmp_path, alias="x"), NODE, 1.0)
