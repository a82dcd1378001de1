"""The state document: typed reads and writes, replication between replicas, bad entries."""

from __future__ import annotations

from pycrdt import Map

from meshllm.state.document import MeshState
from meshllm.state.schema import (
    ModelName, ModelSpec, NodeId, NodeStatus, ServerPhase, ServerStatus, demand_key, lease_key, lease_model,
    parse_demand_key, parse_server_key, server_key,
)


def test_entities_round_trip_through_the_document() -> None:
    state = MeshState()
    state.put_model(ModelSpec(name="m", source="/x/m.gguf", node="n1"))
    state.put_server(ServerStatus(node="n1", model="m", phase=ServerPhase.READY, port=41000, pid=7))
    assert state.models()["m"].source == "/x/m.gguf"
    server = state.servers()["n1/m"]
    assert (server.phase, server.port, server.pid) == (ServerPhase.READY, 41000, 7)
    assert isinstance(server.port, int)
    assert state.remove_model("m") and not state.remove_model("m")
    assert state.models() == {}


def test_replicas_converge_and_fields_merge_independently() -> None:
    a, b = MeshState(), MeshState()
    a.put_server(ServerStatus(node="n1", model="m", phase=ServerPhase.LOADING, port=41000))
    b.doc.apply_update(a.doc.get_update())
    # concurrent edits of different fields of the same entity
    a.put_server(ServerStatus(node="n1", model="m", phase=ServerPhase.READY, port=41000))
    b.put_model(ModelSpec(name="m", source="m"))
    a_update, b_update = a.doc.get_update(b.doc.get_state()), b.doc.get_update(a.doc.get_state())
    a.doc.apply_update(b_update)
    b.doc.apply_update(a_update)
    assert a.servers() == b.servers()
    assert a.models() == b.models()
    assert b.servers()["n1/m"].phase is ServerPhase.READY


def test_malformed_entries_from_peers_are_ignored() -> None:
    state = MeshState()
    state.doc.get("servers", type=Map)["bad"] = Map({"node": "n1", "phase": "exploded", "port": -5})
    state.put_server(ServerStatus(node="n1", model="ok", phase=ServerPhase.READY, port=41000))
    assert list(state.servers()) == ["n1/ok"]


def test_observers_hear_about_changes() -> None:
    state = MeshState()
    heard: list[int] = []
    subs = state.observe(lambda: heard.append(1))
    state.put_model(ModelSpec(name="m", source="m"))
    assert heard
    state.unobserve(subs)
    heard.clear()
    state.put_model(ModelSpec(name="n", source="n"))
    assert heard == []


def test_reads_follow_every_change_a_peer_makes() -> None:
    """Reads are served from decoded entries; each change, local or replicated, must show."""
    a, b = MeshState(), MeshState()
    node = NodeStatus(id="n1", name="one", capacity_bytes=1, rtt_ms={"n2": 1.0})
    a.put_node(node)
    a.put_node(node.model_copy(update={"id": "n2", "name": "two"}))
    b.doc.apply_update(a.doc.get_update())
    assert set(b.nodes()) == {"n1", "n2"}
    before = b.doc.get_state()
    a.put_node(node.model_copy(update={"rtt_ms": {"n2": 30.0}, "capacity_bytes": 5}))
    b.doc.apply_update(a.doc.get_update(before))
    assert b.nodes()["n1"].rtt_ms == {"n2": 30.0} and b.nodes()["n1"].capacity_bytes == 5
    assert b.nodes()["n2"].name == "two"
    before = b.doc.get_state()
    a.doc.get("nodes", type=Map)["n2"] = Map({"id": 5})  # a peer writes garbage over an entry
    b.doc.apply_update(a.doc.get_update(before))
    assert set(b.nodes()) == {"n1"}
    before = b.doc.get_state()
    del a.doc.get("nodes", type=Map)["n1"]
    b.doc.apply_update(a.doc.get_update(before))
    assert b.nodes() == {}


def test_document_keys_parse_back_into_the_ids_they_were_made_of() -> None:
    # model names may hold what node ids never do ('/', ':', '.'); the parse splits where the key was joined
    node, model = NodeId("3f9a0c1d2e4b5a6f"), ModelName("org/qwen2.5:Q4_K_M")
    assert parse_server_key(server_key(node, model)) == (node, model)
    assert parse_demand_key(demand_key(model, node)) == (model, node)
    assert lease_model(lease_key(model, 12)) == model
