"""Discovery without a network: BIP-340 signatures, listing checks (forged, stale, malformed, another mesh),
the --auto score, the state summary a listing carries, and the publisher's list/delist/withdraw cycle."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from meshllm.discovery.listing import (Listing, ListingContent, choose, make_event, mesh_summary, newest,
                                       parse_listing, publishing_key)
from meshllm.discovery.mdns import event_from_txt, event_to_txt
from meshllm.discovery.nostr import NostrKey, event_id, sign_event, verify_event
from meshllm.discovery.publisher import Publisher, PublishSettings
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelSpec, NodeDeath, NodeRole, NodeStatus, ServerPhase, ServerStatus
from meshllm.store.mesh import InviteToken, MeshCredentials

NOW = 1_800_000_000.0

# BIP-340 test vectors 0 and 1 (secret key, public key, aux rand, message, signature)
VECTORS = [
    ("00" * 31 + "03", "F9308A019258C31049344F85F89D5229B531C845836F99B08601F113BCE036F9", "00" * 32, "00" * 32,
     "E907831F80848D1069A5371B402410364BDF1C5F8307B0084C55F1CE2DCA821525F66A4A85EA8B71E482A74F382D2CE5EBEEE8FDB2172F"
     "477DF4900D310536C0"),
    ("B7E151628AED2A6ABF7158809CF4F3C762E7160F38B4DA56A784D9045190CFEF",
     "DFF1D77F2A671C5F36183726DB2341BE58FEAE1DA2DECED843240F7B502BA659", "00" * 31 + "01",
     "243F6A8885A308D313198A2E03707344A4093822299F31D0082EFA98EC4E6C89",
     "6896BD60EEAE296DB48A229FF71DFE071BDE413E6D43F917DC8DCF8C78DE33418906D11AC976ABCCB20B091292BFF4EA897EFCB639EA871"
     "CFA95F6DE339E4B0A"),
]


@pytest.mark.parametrize(("secret", "pubkey", "aux", "msg", "sig"), VECTORS)
def test_bip340_vectors(secret: str, pubkey: str, aux: str, msg: str, sig: str) -> None:
    key = NostrKey(bytes.fromhex(secret))
    assert key.pubkey == pubkey.lower()
    assert key.sign(bytes.fromhex(msg), aux=bytes.fromhex(aux)).hex() == sig.lower()


def _event(key: NostrKey, content: str = "hi") -> dict[str, Any]:
    return sign_event(key, kind=1, tags=[["t", "x"]], content=content, created_at=int(NOW))


def test_event_roundtrip_and_tampering() -> None:
    key = NostrKey(bytes.fromhex(VECTORS[1][0]))
    event = _event(key)
    assert event["id"] == event_id(event) and verify_event(event)
    assert not verify_event({**event, "content": "changed"})  # id no longer the digest
    changed = {**event, "content": "changed"}
    changed["id"] = event_id(changed)
    assert not verify_event(changed)  # id recomputed, signature is for the old id
    other = NostrKey(bytes.fromhex(VECTORS[0][0]))
    assert not verify_event({**event, "pubkey": other.pubkey})  # someone else's key
    for broken in (None, [], {"id": "x"}, {**event, "tags": "t"}, {**event, "sig": "zz"}, {**event, "created_at": "1"}):
        assert not verify_event(broken)


def _creds(n: int = 1) -> MeshCredentials:
    return MeshCredentials(mesh_id=f"{n:016x}", secret=bytes([n]) * 32)


def _content(creds: MeshCredentials, **fields: Any) -> ListingContent:
    token = InviteToken(creds, ("127.0.0.1:4000",)).encode()
    return ListingContent(mesh=creds.mesh_id, token=token, **fields)


def test_a_listing_parses_and_is_bound_to_its_mesh() -> None:
    creds = _creds()
    event = make_event(creds, _content(creds, name="poker", served=["m"]), now=NOW, ttl=60)
    listing = parse_listing(event, now=NOW + 1, source="relay")
    assert listing is not None and listing.content.name == "poker" and listing.pubkey == publishing_key(creds).pubkey


def _resigned(event: dict[str, Any], key: NostrKey, **changes: Any) -> dict[str, Any]:
    body = {**event, **changes}
    return sign_event(key, kind=body["kind"], tags=body["tags"], content=body["content"], created_at=body["created_at"])


def test_forged_stale_malformed_and_misdirected_listings_are_ignored() -> None:
    mine, other = _creds(1), _creds(2)
    good = make_event(mine, _content(mine), now=NOW, ttl=60)
    assert parse_listing(good, now=NOW) is not None
    forged = {**good, "sig": good["sig"][:-2] + ("00" if not good["sig"].endswith("00") else "11")}
    assert parse_listing(forged, now=NOW) is None  # bad signature
    assert parse_listing(good, now=NOW + 61) is None  # expired
    assert parse_listing(make_event(mine, _content(mine), now=NOW + 3600, ttl=60), now=NOW) is None  # from the future
    # signed by someone who does not hold the mesh secret: a key of their own, the mesh's token
    assert parse_listing(_resigned(good, NostrKey(b"\x07" * 32)), now=NOW) is None
    # a listing naming mesh 1 that carries mesh 2's token, signed with mesh 2's key: it cannot send a node elsewhere
    lying = _content(mine).model_copy(update={"token": InviteToken(other, ("1.2.3.4:1",)).encode()})
    event = make_event(mine, lying, now=NOW, ttl=60)
    assert parse_listing(_resigned(event, publishing_key(other)), now=NOW) is None
    for content in ("not json", json.dumps({"mesh": mine.mesh_id, "nodes": -1}), json.dumps([1]),
                    json.dumps({"mesh": mine.mesh_id, "token": "meshllm1.garbage"})):
        assert parse_listing(_resigned(good, publishing_key(mine), content=content), now=NOW) is None
    no_expiry = _resigned(good, publishing_key(mine), tags=[t for t in good["tags"] if t[0] != "expiration"])
    assert parse_listing(no_expiry, now=NOW) is None


def _listing(n: int, *, age: float = 0, **fields: Any) -> Listing:
    creds = _creds(n)
    return Listing(_content(creds, **fields), pubkey=publishing_key(creds).pubkey, created_at=int(NOW - age),
                   expires_at=int(NOW + 300), source="test")


@pytest.mark.parametrize(("ask", "listings", "chosen"), [
    ({"model": "qwen"}, [_listing(1, served=["llama"], free_bytes=10**11), _listing(2, served=["qwen"])], 2),
    ({"model": "qwen"}, [_listing(1, wanted=["qwen"]), _listing(2, served=["qwen"], clients=4, nodes=1)], 2),
    ({"model": "qwen"}, [_listing(1, served=["llama"])], None),  # none fits: the node starts its own mesh
    ({"region": "EU"}, [_listing(1, region="US"), _listing(2, region="eu")], 2),
    ({}, [_listing(1, free_bytes=8 * 10**9), _listing(2, free_bytes=10**9)], 1),
    ({}, [_listing(1, nodes=1, clients=3), _listing(2, nodes=2, clients=1)], 2),  # fewer clients per node
    ({}, [_listing(1, age=290), _listing(2, age=5)], 2),  # fresher
    ({"name": "poker"}, [_listing(1, name="chess", free_bytes=10**11), _listing(2, name="poker")], 2),
    ({"name": "poker"}, [_listing(1, name="chess")], None),
    ({}, [_listing(1, delisted=True)], None),
    ({}, [_listing(3), _listing(4)], 4),  # a tie: the highest mesh id, the same on every node
])
def test_choose(ask: dict[str, str], listings: list[Listing], chosen: int | None) -> None:
    best = choose(listings, now=NOW, ttl=300, **ask)
    assert (best.mesh_id if best else None) == (_creds(chosen).mesh_id if chosen else None)


def test_newest_keeps_one_per_mesh_and_drops_delisted() -> None:
    old, new = _listing(1, age=50, name="a"), _listing(1, age=1, name="b")
    assert [entry.content.name for entry in newest([new, old, _listing(2, name="c")])] == ["b", "c"]
    assert newest([old, _listing(1, age=1, delisted=True)]) == []


def _state(*, clients: int) -> MeshState:
    state = MeshState()
    state.put_node(NodeStatus(id="a", capacity_bytes=8 * 10**9))
    state.put_node(NodeStatus(id="b", capacity_bytes=4 * 10**9))
    for i in range(clients):
        state.put_node(NodeStatus(id=f"c{i}", role=NodeRole.CLIENT))
    state.put_model(ModelSpec(name="m", source="m.gguf", size_bytes=3 * 10**9))
    state.put_model(ModelSpec(name="w", source="w.gguf", size_bytes=10**9))
    state.put_server(ServerStatus(node="a", model="m", phase=ServerPhase.READY, port=1))
    return state


def test_mesh_summary_counts_nodes_clients_models_and_free_capacity() -> None:
    c = mesh_summary(_state(clients=2), mesh_id="x", name="n", region="EU", version="1", token="t")
    assert (c.served, c.wanted, c.nodes, c.clients, c.free_bytes) == (["m"], ["w"], 2, 2, 9 * 10**9)


class FakeDirectory:
    timeout = 1.0

    def __init__(self) -> None:
        self.events: list[dict[str, Any] | None] = []

    async def put(self, event: dict[str, Any] | None) -> int:
        self.events.append(event)
        return 1

    def contents(self) -> list[ListingContent | None]:
        return [None if e is None else ListingContent.model_validate_json(e["content"]) for e in self.events]


async def test_publisher_lists_refreshes_delists_at_max_clients_and_withdraws() -> None:
    clock = [NOW]
    state, creds, sink = _state(clients=0), _creds(5), FakeDirectory()
    publisher = Publisher(state, sink, settings=PublishSettings(name="poker", max_clients=1, ttl=30),
                          creds=lambda: creds, token=lambda: InviteToken(creds, ("127.0.0.1:1",)).encode(),
                          version="1", clock=lambda: clock[0])
    await publisher.step()
    await publisher.step()  # nothing changed, not due: not sent again
    assert [c.delisted if c else None for c in sink.contents()] == [False]
    clock[0] += 10  # a third of the TTL: re-published before it expires
    await publisher.step()
    assert len(sink.events) == 2 and all(parse_listing(e, now=clock[0]) for e in sink.events)
    state.put_node(NodeStatus(id="c0", role=NodeRole.CLIENT))  # one client: --max-clients 1 reached
    await publisher.step()
    assert sink.contents()[-1].delisted  # type: ignore[union-attr]
    state.put_death(NodeDeath(node="c0", incarnation=0.0))  # the client left
    await publisher.step()
    last = sink.contents()[-1]
    assert last is not None and not last.delisted and last.clients == 0
    created = [e["created_at"] for e in sink.events if e is not None]
    assert created == sorted(set(created))  # strictly increasing: a relay keeps the newest

    rotated = MeshCredentials(mesh_id=creds.mesh_id, secret=b"\x55" * 32)
    creds = rotated  # rotate-key: the listing under the old key is withdrawn, the new one listed
    await publisher.step()
    withdrawn, listed = sink.events[-2], sink.events[-1]
    assert withdrawn is not None and listed is not None
    assert withdrawn["pubkey"] == publishing_key(_creds(5)).pubkey and sink.contents()[-2].delisted  # type: ignore[union-attr]
    fresh = parse_listing(listed, now=clock[0])
    assert fresh is not None and fresh.pubkey == publishing_key(rotated).pubkey and not fresh.content.delisted

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(publisher.run)
            scope.cancel()
    assert sink.contents()[-2].delisted and sink.events[-1] is None  # type: ignore[union-attr]


def test_mdns_txt_roundtrip() -> None:
    creds = _creds(6)
    event = make_event(creds, _content(creds, name="lan"), now=time.time(), ttl=60)
    txt = event_to_txt(event)
    assert all(len(v) <= 255 for v in txt.values()) and len(txt) > 1
    raw = {k.encode(): v.encode() for k, v in txt.items()}
    assert event_from_txt(raw) == event
    assert event_from_txt({b"e0": b"{broken"}) is None


async def _garbage_relay(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """A websocket server that answers every message with garbage, then a forged and a malformed listing."""
    from websockets.asyncio.server import serve

    creds = _creds(8)
    good = make_event(creds, _content(creds, name="real"), now=time.time(), ttl=60)
    forged = _resigned(good, NostrKey(b"\x09" * 32))

    async def handler(ws: Any) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            await ws.send("\x00not json")
            await ws.send(json.dumps({"not": "an array"}))
            if msg[0] == "REQ":
                for event in (forged, {"id": "x"}, good):
                    await ws.send(json.dumps(["EVENT", msg[1], event]))
                await ws.send(json.dumps(["EOSE", msg[1]]))

    async with serve(handler, "127.0.0.1", 0) as server:
        task_status.started(server.sockets[0].getsockname()[1])
        await anyio.sleep_forever()


async def test_directory_survives_unreachable_and_garbage_relays(caplog: pytest.LogCaptureFixture) -> None:
    from meshllm.discovery.directory import Directory
    from tests.conftest import free_port

    async with anyio.create_task_group() as tg:
        port = await tg.start(_garbage_relay)
        dead = f"ws://127.0.0.1:{free_port()}"
        directory = Directory(relays=(dead, f"ws://127.0.0.1:{port}", "not a url"), timeout=2)
        found = await directory.find(wait=0)
        assert [entry.content.name for entry in found] == ["real"]  # the forged and the malformed skipped
        assert [entry.content.name for entry in await directory.find(wait=0)] == ["real"]  # asked again
        creds = _creds(8)
        assert await directory.put(make_event(creds, _content(creds), now=time.time(), ttl=60)) == 0  # no OK
        tg.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(dead.removeprefix("ws://") in w and "unreachable" in w for w in warnings)
    assert sum("127.0.0.1:" + str(port) in w and "did not answer" in w for w in warnings) == 1  # once, not at every try
    bad = [w for w in warnings if "forged or malformed" in w]
    assert bad == [f"discovery: ignored 2 listing(s) from ws://127.0.0.1:{port} that were forged or malformed"]


async def test_auto_with_no_reachable_relay_starts_its_own_mesh(tmp_path: Any) -> None:
    from meshllm.node.config import NodeConfig
    from meshllm.node.discovery import resolve_join
    from tests.conftest import free_port

    said: list[str] = []
    config = NodeConfig(auto=True, mesh_name="poker", relays=(f"ws://127.0.0.1:{free_port()}",), mdns=False,
                        state_dir=tmp_path, relay_timeout=1)
    assert await resolve_join(config, announce=said.append) == config
    assert "starting a new mesh 'poker'" in said[-1]


async def test_a_failing_directory_costs_the_publisher_a_log_line_not_the_node(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeDirectory):
        async def put(self, event: dict[str, Any] | None) -> int:
            await super().put(event)
            if len(self.events) < 3:
                raise RuntimeError("boom")
            return 1

    state, creds, sink = _state(clients=0), _creds(7), Broken()
    publisher = Publisher(state, sink, settings=PublishSettings(name="x", ttl=30, poll=0.01), creds=lambda: creds,
                          token=lambda: InviteToken(creds, ("127.0.0.1:1",)).encode(), version="1")
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        with anyio.fail_after(5):
            while publisher.published is None:  # it kept trying until a put succeeded
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert "publishing the listing failed" in caplog.text and len(sink.events) >= 3
