"""The front door with the clients people use: the openai, anthropic and langchain-openai SDKs, raw HTTP
to llama-server's own endpoints, and a real browser, against node A (serving a tiny model under the alias
``chat``, "local") and a ``--client`` node B that reaches it through the mesh ("routed").

What a user notices: every endpoint answers through the mesh exactly as llama-server answers directly
(greedy output, token counts, templates; its errors too), with or without ``/v1`` where llama-server
takes both; a request for any model name, or none, reaches the mesh's only model; a browser page on
another origin can call the API (CORS preflight, then the request); an embedding model applied with
``embeddings: true`` answers /v1/embeddings; bad requests get errors in the client's own shape and the
node goes on serving.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from playwright.sync_api import sync_playwright

from tests.conftest import free_port
from tests.integration.nodes import Mesh, listed, wait_for

pytestmark = pytest.mark.engine

MODEL = "chat"  # the alias of tiny-front.gguf
TARGETS = ["local", "routed"]
CHROMIUM = Path("/usr/bin/chromium")
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, engine_dir: Path) -> Iterator[dict[str, Any]]:
    from meshllm.engine.tinygguf import write_dense

    model = write_dense(tmp_path_factory.mktemp("models") / "tiny-front.gguf", seed=3)
    mesh = Mesh(tmp_path_factory.mktemp("front"), engine_dir, allow_models=(tmp_path_factory.getbasetemp(),))
    try:
        a = mesh.start("a", "127.0.0.2", "--name", "front-a", "--alias", MODEL, models=(str(model),))
        a.wait_ready(MODEL)
        b = mesh.start("b", "127.0.0.3", "--client", "--join", a.token())
        wait_for(lambda: listed(b) == {MODEL}, timeout=60, what="B to list the model")
        urls = {"local": a.api, "routed": b.api, "direct": f"http://127.0.0.1:{a.server(MODEL)['port']}"}
        with contextlib.ExitStack() as clients:
            yield {"local": a, "routed": b, "model": model, "url": urls,
                   "openai": {t: clients.enter_context(openai.OpenAI(base_url=u + "/v1", api_key="unused",
                                                                     max_retries=0)) for t, u in urls.items()},
                   "anthropic": {t: clients.enter_context(anthropic.Anthropic(base_url=u, api_key="unused",
                                                                              max_retries=0))
                                 for t, u in urls.items()}}
    finally:
        mesh.close()


def base(front: dict[str, Any], target: str) -> str:
    return str(front["url"][target])


def oai(front: dict[str, Any], target: str) -> openai.OpenAI:
    client: openai.OpenAI = front["openai"][target]
    return client


def claude(front: dict[str, Any], target: str) -> anthropic.Anthropic:
    client: anthropic.Anthropic = front["anthropic"][target]
    return client


# -- the openai SDK -------------------------------------------------------------------------------------

def _chat(c: openai.OpenAI, model: str = MODEL) -> object:
    return c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0).choices[0].message.content


def _chat_stream_usage(c: openai.OpenAI) -> object:
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    return text, usage.prompt_tokens, usage.completion_tokens


def _tools(c: openai.OpenAI) -> object:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
    message = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[tool], max_tokens=24,
                                        temperature=0).choices[0].message  # type: ignore[list-item]
    return message.content, [(t.function.name, t.function.arguments) for t in message.tool_calls or []]  # type: ignore[union-attr]


def _json_schema(c: openai.OpenAI) -> object:
    """The tiny model's ChatML markers are control tokens, which llama-server cannot put in a chat grammar:
    it refuses a chat with a schema (directly too). A completion with one writes the schema's JSON."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    with pytest.raises(openai.BadRequestError) as refused:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    text = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0,
                                extra_body={"json_schema": schema}).choices[0].text
    assert text.replace(" ", "").startswith('{"answer":"')
    return refused.value.message, text


def _logprobs(c: openai.OpenAI) -> object:
    choice = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2).choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    return [(t.token, round(t.logprob, 3), [a.token for a in t.top_logprobs]) for t in choice.logprobs.content]


def _completions(c: openai.OpenAI) -> object:
    return c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0).choices[0].text


def _completions_stream(c: openai.OpenAI) -> object:
    return "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True) if ch.choices)


def _responses(c: openai.OpenAI) -> object:
    return c.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=12, temperature=0).output_text


def _responses_stream(c: openai.OpenAI) -> object:
    events = list(c.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=12, temperature=0,
                                     stream=True))
    assert events[-1].type == "response.completed"
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def _another_name(c: openai.OpenAI) -> object:
    return _chat(c, "gpt-4o-mini"), _chat(c, "tiny-front.gguf"), _chat(c, "tiny-front")


OPENAI_CALLS: dict[str, Callable[[openai.OpenAI], object]] = {
    "chat": _chat, "chat-stream-usage": _chat_stream_usage, "tools": _tools, "json-schema": _json_schema,
    "logprobs": _logprobs, "completions": _completions, "completions-stream": _completions_stream,
    "responses": _responses, "responses-stream": _responses_stream,
}


@pytest.mark.parametrize("call", sorted(OPENAI_CALLS))
@pytest.mark.parametrize("target", TARGETS)
def test_the_openai_sdk_gets_what_llama_server_answers(front: dict[str, Any], target: str, call: str) -> None:
    through_mesh = OPENAI_CALLS[call](oai(front, target))
    assert through_mesh == OPENAI_CALLS[call](oai(front, "direct"))
    assert through_mesh


@pytest.mark.parametrize("target", TARGETS)
def test_any_name_reaches_the_only_model(front: dict[str, Any], target: str) -> None:
    direct = _chat(oai(front, "direct"))
    assert _another_name(oai(front, target)) == (direct, direct, direct)


# -- the anthropic SDK ----------------------------------------------------------------------------------

def _messages(c: anthropic.Anthropic) -> object:
    reply = c.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,  # type: ignore[arg-type]
                              extra_body={"temperature": 0})
    return [block.text for block in reply.content if block.type == "text"], reply.usage.output_tokens


def _messages_stream(c: anthropic.Anthropic) -> object:
    with c.messages.stream(model=MODEL, max_tokens=12, messages=MESSAGES,  # type: ignore[arg-type]
                           extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return text, final.stop_reason


def _count_tokens(c: anthropic.Anthropic) -> object:
    return c.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens  # type: ignore[arg-type]


ANTHROPIC_CALLS: dict[str, Callable[[anthropic.Anthropic], object]] = {
    "messages": _messages, "messages-stream": _messages_stream, "count-tokens": _count_tokens}


@pytest.mark.parametrize("call", sorted(ANTHROPIC_CALLS))
@pytest.mark.parametrize("target", TARGETS)
def test_the_anthropic_sdk_gets_what_llama_server_answers(front: dict[str, Any], target: str, call: str) -> None:
    through_mesh = ANTHROPIC_CALLS[call](claude(front, target))
    assert through_mesh == ANTHROPIC_CALLS[call](claude(front, "direct"))
    assert through_mesh


# -- langchain-openai -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_langchain_gets_what_llama_server_answers(front: dict[str, Any], target: str) -> None:
    def answers(url: str) -> tuple[object, str]:
        llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=12,  # type: ignore[arg-type]
                         max_retries=0)
        return llm.invoke("Tell me a story").content, "".join(str(c.content) for c in llm.stream("Once upon a time"))

    through_mesh = answers(base(front, target))
    assert through_mesh == answers(base(front, "direct"))
    assert through_mesh[0] and through_mesh[1]


# -- llama-server's own endpoints -----------------------------------------------------------------------

RAW_POSTS = [
    ("/tokenize", {"content": "Once upon a time"}),
    ("/detokenize", {"tokens": [300, 301, 302]}),
    ("/apply-template", {"messages": MESSAGES}),
    ("/completion", {"prompt": "Once upon a time", "n_predict": 8, "temperature": 0}),
    ("/completions", {"prompt": "Once upon a time", "n_predict": 8, "temperature": 0}),
    ("/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}),
    ("/v1/chat/completions/input_tokens", {"messages": MESSAGES}),
    ("/infill", {"input_prefix": "def f(", "input_suffix": "return x", "n_predict": 4, "temperature": 0}),
    ("/v1/rerank", {"query": "story", "documents": ["a tale", "a table"]}),
    ("/rerank", {"query": "story", "documents": ["a tale", "a table"]}),
    ("/v1/embeddings", {"input": "hello"}),  # not an embedding model: llama-server's own 501
]

VARYING = {"id", "created", "timings", "system_fingerprint", "t_ms", "created_at", "id_slot"}


def _stable(value: object) -> object:
    """A JSON answer without the fields that differ between two identical requests."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


@pytest.mark.parametrize(("path", "body"), RAW_POSTS, ids=[p for p, _ in RAW_POSTS])
@pytest.mark.parametrize("target", TARGETS)
def test_llama_server_endpoints_answer_through_the_mesh_as_directly(front: dict[str, Any], target: str, path: str,
                                                                      body: dict[str, Any]) -> None:
    """These bodies name no model: the mesh's only model answers."""
    through_mesh = httpx.post(base(front, target) + path, json=body, timeout=30)
    direct = httpx.post(base(front, "direct") + path, json=body, timeout=30)
    assert (through_mesh.status_code, _stable(through_mesh.json())) == (direct.status_code, _stable(direct.json()))


@pytest.mark.parametrize("target", TARGETS)
def test_props_and_slots_of_the_model(front: dict[str, Any], target: str) -> None:
    for query in ("?model=" + MODEL, ""):
        props = httpx.get(f"{base(front, target)}/props{query}", timeout=10)
        direct = httpx.get(f"{base(front, 'direct')}/props", timeout=10).json()
        assert props.status_code == 200
        assert {k: props.json()[k] for k in ("model_path", "chat_template", "total_slots")} == {
            k: direct[k] for k in ("model_path", "chat_template", "total_slots")}
    slots = httpx.get(f"{base(front, target)}/slots?model={MODEL}", timeout=10)
    assert slots.status_code == 200 and [s["id"] for s in slots.json()] == [
        s["id"] for s in httpx.get(f"{base(front, 'direct')}/slots", timeout=10).json()]


# -- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_bad_requests_get_clear_errors_in_the_clients_shape_and_the_node_serves_on(front: dict[str, Any],
                                                                                   target: str) -> None:
    url = base(front, target)
    unknown = httpx.post(url + "/v1/nothing-here", json={"model": MODEL}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    anthropic_unknown = httpx.post(url + "/v1/messages/nothing", json={"model": MODEL}, timeout=10)
    assert anthropic_unknown.status_code == 404 and anthropic_unknown.json()["type"] == "error"
    assert anthropic_unknown.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(url + "/v1/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    not_json = httpx.post(url + "/v1/messages", content=b"{nope", timeout=10)
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in not_json.json()["error"]["message"]

    # a body for another endpoint: llama-server's own error, as it answers directly, except that its
    # 500s for a client's mistake (a missing field) are the 400s they are
    for path, body in (("/v1/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}),
                       ("/v1/chat/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4}),
                       ("/v1/messages", {"model": MODEL, "prompt": "x", "max_tokens": 4})):
        through_mesh = httpx.post(url + path, json=body, timeout=10)
        direct = httpx.post(base(front, "direct") + path, json=body, timeout=10)
        assert 400 <= through_mesh.status_code < 500 and through_mesh.json()["error"]["message"]
        expected = 400 if direct.status_code == 500 else direct.status_code
        assert through_mesh.status_code == expected
        assert through_mesh.json()["error"]["message"] == direct.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai(front, target).chat.completions.create(model=MODEL, messages=[], max_tokens=4,
                                                   extra_body={"messages": None})
    assert _chat(oai(front, target)) == _chat(oai(front, "direct"))  # the node serves on


# -- browsers -------------------------------------------------------------------------------------------

def test_a_cors_preflight_is_answered_as_llama_server_answers_it(front: dict[str, Any]) -> None:
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    for target in TARGETS:
        answer = httpx.options(base(front, target) + "/v1/chat/completions", headers=headers, timeout=10)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert "authorization" in answer.headers["access-control-allow-headers"]
    direct = httpx.options(base(front, "direct") + "/v1/chat/completions", headers=headers, timeout=10)
    assert direct.status_code == 200 and direct.headers["access-control-allow-origin"] == "http://app.example"


class _Page(http.server.BaseHTTPRequestHandler):
    """The page of a front-end on another origin (another port)."""

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        body = b"<!doctype html><title>front-end</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_browser_page_on_another_origin_chats_through_the_mesh(front: dict[str, Any]) -> None:
    """Chromium sends the preflight itself (a JSON body and an Authorization header need one)."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    fetch = """async ([url, model]) => {
        const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json",
            "Authorization": "Bearer unused"}, body: JSON.stringify({model, max_tokens: 12, temperature: 0,
            messages: [{role: "user", content: "Tell me a story"}]})});
        return [r.status, (await r.json()).choices[0].message.content];
    }"""
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
                answers = [page.evaluate(fetch, [f"{front[t].api}/v1/chat/completions", MODEL]) for t in TARGETS]
            finally:
                browser.close()
    finally:
        site.shutdown()
        site.server_close()
    expected = _chat(oai(front, "direct"))
    assert answers == [[200, expected], [200, expected]]


# -- an embedding model beside the chat model -----------------------------------------------------------

def test_an_embedding_model_applied_with_embeddings_answers_embeddings(front: dict[str, Any], tmp_path: Path) -> None:
    a, b = front["local"], front["routed"]
    manifest = tmp_path / "embed.yaml"
    manifest.write_text(f"""apiVersion: meshllm/v1
kind: Model
metadata: {{name: embed}}
spec: {{source: {front['model']}, embeddings: true, pooling: mean, placement: {{node: front-a}}}}
""")
    done = a.cli("apply", "-f", str(manifest))
    assert done.returncode == 0, done.stderr
    try:
        a.wait_ready("embed")
        wait_for(lambda: listed(b) == {MODEL, "embed"}, timeout=60, what="B to list both models")
        with openai.OpenAI(base_url=f"http://127.0.0.1:{a.server('embed')['port']}/v1", api_key="unused") as direct:
            expected = [round(x, 5) for x in direct.embeddings.create(model="embed", input="hello").data[0].embedding]
        for target in TARGETS:
            got = oai(front, target).embeddings.create(model="embed", input="hello").data[0].embedding
            assert [round(x, 5) for x in got] == expected and len(expected) == 64
            lc = OpenAIEmbeddings(base_url=base(front, target) + "/v1", api_key="unused", model="embed",  # type: ignore[arg-type]
                                  check_embedding_ctx_length=False)
            assert [round(x, 5) for x in lc.embed_query("hello")] == expected

            # two models now: a request must name one
            unnamed = httpx.post(base(front, target) + "/tokenize", json={"content": "hi"}, timeout=10)
            assert unnamed.status_code == 400 and unnamed.json()["error"]["code"] == "missing_model"
            assert "chat" in unnamed.json()["error"]["message"] and "embed" in unnamed.json()["error"]["message"]
            named = httpx.post(base(front, target) + "/tokenize?model=embed", json={"content": "hi"}, timeout=10)
            assert named.status_code == 200 and named.json()["tokens"]
            with pytest.raises(openai.NotFoundError):
                _chat(oai(front, target), "gpt-4o-mini")
            with pytest.raises(anthropic.NotFoundError):
                claude(front, target).messages.create(model="gpt-4o-mini", max_tokens=4,
                                                      messages=MESSAGES)  # type: ignore[arg-type]
    finally:
        a.cli("delete", "-f", str(manifest))
    wait_for(lambda: listed(b) == {MODEL}, timeout=60, what="the embedding model to go")
