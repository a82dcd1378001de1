"""Bad or hostile input, each as it was seen (issue 22 item 5), against the real parts it hit: the
control API and the state document, the OpenAI proxy, the GGUF check, the state-folder lock, the
router when a replica's node goes away, and a --model whose name the mesh already holds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from meshllm.api.admin import ConsoleAccess
from meshllm.api.backends import DataPlane
from meshllm.api.openai import create_openai_app
from meshllm.api.routing import UNREACHABLE_FOR, Route, Router
from meshllm.api.status import CONSOLE_MAX_BODY, create_status_app
from meshllm.engine.ggufcheck import check_gguf
from meshllm.engine.sources import SourcePolicy
from meshllm.engine.tinygguf import write_dense
from meshllm.errors import MeshError, ModelError
from meshllm.node.names import NameWatch
from meshllm.state.document import MeshState
from meshllm.state.manifest import MAX_MODELS
from meshllm.state.schema import ModelOrigin, ModelSpec, NodeStatus, ServerPhase, ServerStatus
from meshllm.store.lock import hold_state_dir
from tests.unit.controllers import World
from tests.unit.test_control_api import ADMIN, gguf, model

HUGE = 2**64  # pycrdt panicked on it (PanicException, a 500) after earlier models had been written


@pytest.fixture
def state() -> MeshState:
    state = MeshState()
    state.put_node(NodeStatus(id="n1", incarnation=1))
    return state


@pytest.fixture
def console(state: MeshState, tmp_path: Path) -> Iterator[TestClient]:
    app = create_status_app(state, node_id="n1", access=ConsoleAccess(token=ADMIN), sources=SourcePolicy((tmp_path,)))
    with TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        yield client


def error_of(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return str(error["message"])


# -- apply: all or nothing, bounded --------------------------------------------------------------
@pytest.mark.parametrize("field", ["replicas", "ctxSize"])
def test_an_apply_with_one_huge_number_writes_nothing(console: TestClient, state: MeshState, tmp_path: Path,
                                                      field: str) -> None:
    a = gguf(tmp_path / "a.gguf")
    body = [model("a", str(a)), model("b", str(a), **{field: HUGE})]
    message = error_of(console.post("/api/apply", json=body), 422, "invalid_manifest")
    assert "document 2" in message and field in message
    assert state.models() == {}  # not model a, not half of model b


def test_the_document_refuses_a_number_beyond_64_bits_and_keeps_what_it_had(state: MeshState) -> None:
    state.put_model(ModelSpec(name="m", source="m.gguf", ctx_size=4096))
    with pytest.raises(ValueError, match="ctx_size"):
        state.put_model(ModelSpec(name="m", source="m.gguf", ctx_size=HUGE, replicas=3))
    kept = state.models()["m"]
    assert (kept.ctx_size, kept.replicas) == (4096, 1)


def test_replicas_are_bounded_by_the_nodes_the_mesh_knows(console: TestClient, state: MeshState,
                                                          tmp_path: Path) -> None:
    a = gguf(tmp_path / "a.gguf")
    message = error_of(console.post("/api/apply", json=[model("a", str(a), replicas=5)]), 422, "invalid_manifest")
    assert "spec.replicas" in message and "4 x the 1 serving node" in message
    assert state.models() == {}
    assert console.post("/api/apply", json=[model("a", str(a), replicas=4)]).status_code == 200


def test_context_is_bounded_by_what_the_model_was_trained_for(console: TestClient, state: MeshState,
                                                              tmp_path: Path) -> None:
    path = write_dense(tmp_path / "tiny.gguf", n_ctx=2048)
    message = error_of(console.post("/api/apply", json=[model("t", str(path), ctxSize=4096)]), 422, "invalid_manifest")
    assert "spec.ctxSize" in message and "2048" in message
    assert console.post("/api/apply", json=[model("t", str(path), ctxSize=2048)]).status_code == 200


def test_a_manifest_of_too_many_models_is_refused_before_anything_is_resolved(console: TestClient, state: MeshState,
                                                                              tmp_path: Path) -> None:
    mesh = {"apiVersion": "meshllm/v1", "kind": "Mesh",
            "spec": {"models": [{"name": f"m{i}", "source": "gemma-3-270m"} for i in range(MAX_MODELS + 1)]}}
    message = error_of(console.post("/api/apply", json=[mesh]), 422, "invalid_manifest")
    assert f"at most {MAX_MODELS}" in message
    assert state.models() == {}


def test_a_body_over_the_console_limit_is_a_413_and_nothing_is_read_past_it(console: TestClient) -> None:
    body = b"[" + b" " * CONSOLE_MAX_BODY + b"]"  # 100 MB used to be accepted
    message = error_of(console.post("/api/apply", content=body, headers={"content-type": "application/json"}),
                       413, "request_too_large")
    assert str(CONSOLE_MAX_BODY) in message


# -- JSON nested ~1,000 deep: a 400, not a plain-text 500 -----------------------------------------
DEEP = [b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000,
        b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"]


@pytest.mark.parametrize("body", DEEP, ids=["arrays", "objects", "inside-a-request"])
def test_deeply_nested_json_is_a_400_on_both_apis(console: TestClient, body: bytes) -> None:
    headers = {"content-type": "application/json"}
    assert "nested" in error_of(console.post("/api/apply", content=body, headers=headers), 400, "invalid_json")
    state = MeshState()
    router = Router(state, node_id="n1")
    with TestClient(create_openai_app(DataPlane(router)), raise_server_exceptions=False) as api:
        assert "nested" in error_of(api.post("/v1/chat/completions", content=body, headers=headers), 400,
                                    "invalid_json")
        anthropic = api.post("/v1/messages", content=body, headers=headers)  # Anthropic's error shape there
        assert anthropic.status_code == 400 and "nested" in anthropic.json()["error"]["message"]
    router.close()


# -- a truncated or corrupt GGUF -----------------------------------------------------------------
def cut(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0002])
def test_a_truncated_gguf_is_refused_with_what_is_wrong(tmp_path: Path, keep: float) -> None:
    whole = write_dense(tmp_path / "whole.gguf")
    check_gguf(whole)
    broken = cut(whole, tmp_path / "cut.gguf", int(whole.stat().st_size * keep))
    with pytest.raises(ModelError, match="truncated"):
        check_gguf(broken)


def test_a_corrupt_tensor_table_is_refused(tmp_path: Path) -> None:
    data = bytearray(write_dense(tmp_path / "whole.gguf").read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    data[at:at + 4] = (9).to_bytes(4, "little")  # nine dimensions
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="9 dimensions"):
        check_gguf(tmp_path / "bad.gguf")


def test_apply_of_a_truncated_gguf_is_a_422(console: TestClient, state: MeshState, tmp_path: Path) -> None:
    whole = write_dense(tmp_path / "whole.gguf")
    broken = cut(whole, tmp_path / "cut.gguf", whole.stat().st_size - 100)
    message = error_of(console.post("/api/apply", json=[model("c", str(broken))]), 422, "invalid_manifest")
    assert "spec.source" in message and "truncated" in message


async def test_a_model_file_truncated_on_disk_fails_with_its_reason_and_is_not_restarted(tmp_path: Path) -> None:
    world = World(tmp_path)
    whole = write_dense(tmp_path / "m.gguf")
    cut(whole, whole, whole.stat().st_size // 2)
    world.serve("m")
    async with world.running(world.served()):
        await world.settle()
        for _ in range(5):
            await world.advance(60.0)
        status = world.server("m")
        assert status is not None and status.phase is ServerPhase.FAILED and "truncated" in status.message
    assert world.supervisor.launched == []  # llama-server never started, so never restarted


# -- two agents on one state folder --------------------------------------------------------------
def test_a_second_agent_on_one_state_folder_stops_with_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from meshllm.store.lock import hold_state_dir; "
                               "cm = hold_state_dir(Path(sys.argv[1])); cm.__enter__(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(MeshError, match=f"pid {holder.pid}") as refused:
            with hold_state_dir(tmp_path):
                pass
        assert "\n" not in str(refused.value) and "--state-dir" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with hold_state_dir(tmp_path):  # the kernel let go of the dead holder's lock: no stale lock file
        pass


# -- routing around a replica whose node went away -----------------------------------------------
def two_replicas(clock: list[float]) -> Router:
    state = MeshState()
    state.put_model(ModelSpec(name="m", source="m.gguf", replicas=2))
    for node in ("a", "b"):
        state.put_node(NodeStatus(id=node, incarnation=1))
        state.put_server(ServerStatus(node=node, model="m", phase=ServerPhase.READY, port=1))
    return Router(state, node_id="client", clock=lambda: clock[0])


def routed_nodes(router: Router, count: int = 6) -> set[str]:
    nodes = set()
    for _ in range(count):
        route = router.resolve("m")
        assert isinstance(route, Route)
        nodes.add(route.node)
    return nodes


def test_a_node_whose_connection_closed_gets_no_new_requests_until_it_is_back() -> None:
    router = two_replicas([0.0])
    assert routed_nodes(router) == {"a"}  # the document still says both are ready, a first
    router.peer_down("a")
    assert routed_nodes(router) == {"b"}
    router.peer_up("a")
    assert routed_nodes(router) == {"a"}


def test_a_node_a_request_could_not_reach_is_left_out_for_a_while() -> None:
    clock = [100.0]
    router = two_replicas(clock)
    router.unreachable("a")
    assert routed_nodes(router) == {"b"}
    clock[0] += UNREACHABLE_FOR + 0.1
    assert routed_nodes(router) == {"a"}


def test_when_every_replica_looks_unreachable_they_are_tried_anyway() -> None:
    router = two_replicas([0.0])
    router.peer_down("a")
    router.peer_down("b")
    assert routed_nodes(router) <= {"a", "b"} and routed_nodes(router)


# -- a --model whose name is taken --------------------------------------------------------------
async def test_a_model_name_held_by_another_node_is_reported_once() -> None:
    state = MeshState()
    mine = ModelSpec(name="m", source="/b/m.gguf", node="b", origin=ModelOrigin.NODE, owner="b")
    state.put_model(ModelSpec(name="m", source="/a/m.gguf", node="a", origin=ModelOrigin.NODE, owner="a"))
    said: list[str] = []
    recorded: list[tuple[str, str, str]] = []

    async def record(model: str, reason: str, message: str) -> None:
        recorded.append((model, reason, message))

    watch = NameWatch(state, node_id="b", specs=[mine], announce=said.append, record=record)
    conflicts = watch.conflicts()
    assert list(conflicts) == ["m"] and "node a's --model (/a/m.gguf)" in conflicts["m"]
    state.put_model(mine)
    assert watch.conflicts() == {}  # its own entry: nothing to say
    json.dumps(conflicts)  # plain text, fit for an event
