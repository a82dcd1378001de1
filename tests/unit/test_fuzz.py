"""A seeded fuzz run in CI (``meshllm.testing.fuzz``; ``bench/fuzz.py`` runs ten thousand cases against a
real node): every parser of outside input raises only its documented errors, the OpenAI API (Anthropic's
``/v1/messages`` included) and the management API answer every body well-formed and never with a 500,
and a peer's tunnel stream of garbage is dropped without an exception escaping."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from meshllm.api.admin import ConsoleAccess
from meshllm.api.backends import DataPlane, FixedResponse
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app
from meshllm.engine.sources import SourcePolicy
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeStatus, ServerPhase, ServerStatus
from meshllm.testing.fuzz import (PARSERS, answer_problem, chat_bodies, completion_bodies, manifest_values,
                                  message_bodies, raw_bodies, raw_frames)
from meshllm.transport import StreamReset
from meshllm.tunnels.http import serve_tunnel
from tests.unit.dataplane_fakes import memory_stream_pair

ADMIN = "mladm-fuzz"
FAST = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parsers_raise_only_their_own_errors(name: str) -> None:
    parse, inputs, allowed = PARSERS[name]

    @seed(22)
    @FAST
    @given(inputs)
    def run(value: Any) -> None:
        try:
            parse(value)
        except allowed:
            pass

    run()


@pytest.fixture(scope="module")
def openai_api() -> Iterator[TestClient]:
    state = MeshState()
    state.put_model(ModelSpec(name="m", source="m.gguf", node="n1"))
    state.put_server(ServerStatus(node="n1", model="m", phase=ServerPhase.READY, port=1))  # nothing listens
    router = Router(state, node_id="n1")
    with TestClient(create_openai_app(DataPlane(router), max_body_bytes=1 << 20),
                    raise_server_exceptions=False) as client:
        yield client
    router.close()


BODIES = st.one_of(chat_bodies("m").map(lambda b: ("/v1/chat/completions", b)),
                   completion_bodies("m").map(lambda b: ("/v1/completions", b)),
                   message_bodies("m").map(lambda b: ("/v1/messages", b)))


def check(response: Any) -> None:
    assert response.status_code != 500, response.text[:300]
    problem = answer_problem(response.status_code, response.headers.get("content-type", ""), response.content)
    assert problem is None, problem


def test_the_openai_api_answers_every_body_well_formed(openai_api: TestClient) -> None:
    @seed(22)
    @FAST
    @given(st.one_of(BODIES.map(lambda pb: (pb[0], json.dumps(pb[1]).encode())),
                     raw_bodies().map(lambda b: ("/v1/chat/completions", b))))
    def run(case: tuple[str, bytes]) -> None:
        path, body = case
        check(openai_api.post(path, content=body, headers={"content-type": "application/json"}))

    run()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder: Path = tmp_path_factory.mktemp("models")
    state = MeshState()
    state.put_node(NodeStatus(id="n1", incarnation=1))
    app = create_status_app(state, node_id="n1", access=ConsoleAccess(token=ADMIN), sources=SourcePolicy((folder,)))
    with TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {ADMIN}"},
                    raise_server_exceptions=False) as client:
        yield client


def test_the_management_api_answers_every_manifest_well_formed(console: TestClient) -> None:
    @seed(22)
    @FAST
    @given(st.sampled_from(["/api/apply", "/api/diff", "/api/delete", "/api/drop"]),
           st.one_of(st.lists(manifest_values(), max_size=3).map(lambda v: json.dumps(v).encode()), raw_bodies()))
    def run(path: str, body: bytes) -> None:
        check(console.post(path, content=body, headers={"content-type": "application/json"}))

    run()


def test_a_tunnel_stream_of_garbage_is_dropped_quietly() -> None:
    async def forward(request: Any) -> FixedResponse:
        return FixedResponse(200, [("content-type", "application/json")], b"{}")

    @seed(22)
    @FAST
    @given(raw_frames())
    def run(data: bytes) -> None:
        async def one() -> None:
            mine, theirs = memory_stream_pair()
            try:
                with anyio.fail_after(5):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(serve_tunnel, theirs, forward)
                        await mine.send(data)
                        await mine.send_eof()
                        try:
                            while await mine.receive():
                                pass
                        except StreamReset:  # the garbage was refused
                            pass
            finally:
                await mine.aclose()
                await theirs.aclose()
        anyio.run(one)  # an exception escaping serve_tunnel fails the test here

    run()
