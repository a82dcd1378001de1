"""Key rotation entries: sealed for holders of the old secret only, chained, and converging when two
nodes rotate at once; a node follows the mesh's rotations and adopts each new secret once."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from starlette.testclient import TestClient

from meshllm.api.admin import ConsoleAccess
from meshllm.api.rotation import Rotated, rotation_routes
from meshllm.api.status import create_status_app
from meshllm.engine.sources import SourcePolicy
from meshllm.node.rotation import KeyRotation
from meshllm.state.document import MeshState
from meshllm.state.schema import KeyRotation as RotationEntry, NodeStatus
from meshllm.store.mesh import InviteToken, MeshCredentials
from meshllm.store.rotation import follow, seal, unseal


def rotated(old: MeshCredentials) -> MeshCredentials:
    return MeshCredentials(mesh_id=old.mesh_id, secret=MeshCredentials.create().secret)


def test_a_sealed_secret_opens_with_the_old_one_only() -> None:
    old = MeshCredentials.create()
    new = rotated(old)
    entry = seal(old, new, by="node-a", at=1.0)
    assert (entry.old, entry.new) == (old.key_id, new.key_id)
    assert new.secret not in base64.b64decode(entry.sealed) and new.secret.hex() not in entry.model_dump_json()
    assert unseal(old, entry) == new
    stranger = MeshCredentials(mesh_id=old.mesh_id, secret=MeshCredentials.create().secret)
    with pytest.raises(ValueError, match="retires key"):
        unseal(stranger, entry)
    with pytest.raises(ValueError, match="does not open"):  # same key id claimed, another secret
        unseal(MeshCredentials(mesh_id="other", secret=old.secret), entry)


@pytest.mark.parametrize("change", [
    lambda e: e.model_copy(update={"new": "deadbeef"}),  # bound by the associated data
    lambda e: e.model_copy(update={"nonce": base64.b64encode(b"\0" * 12).decode()}),
    lambda e: e.model_copy(update={"sealed": base64.b64encode(b"\1" * 48).decode()}),
    lambda e: e.model_copy(update={"sealed": "not base64!"}),
], ids=["new-key-id", "nonce", "ciphertext", "garbage"])
def test_a_tampered_entry_does_not_open(change: Callable[[RotationEntry], RotationEntry]) -> None:
    old = MeshCredentials.create()
    with pytest.raises(ValueError):
        unseal(old, change(seal(old, rotated(old))))


def test_a_rotation_keeps_the_mesh_id() -> None:
    with pytest.raises(ValueError, match="mesh id"):
        seal(MeshCredentials.create(), MeshCredentials.create())


def test_follow_walks_a_chain_from_any_link() -> None:
    k0 = MeshCredentials.create()
    k1, chain = rotated(k0), {}
    k2 = rotated(k1)
    k3 = rotated(k2)
    for old, new in ((k0, k1), (k1, k2), (k2, k3)):
        chain[old.key_id] = seal(old, new)
    assert follow(k0, chain) == follow(k1, chain) == follow(k3, chain) == k3
    assert follow(k0, {}) == k0
    broken = {**chain, k1.key_id: seal(k1, k2).model_copy(update={"sealed": chain[k0.key_id].sealed})}
    assert follow(k0, broken) == k1  # stops at an entry that does not open
    loop = {k0.key_id: seal(k0, k1), k1.key_id: seal(k1, k0)}
    assert follow(k0, loop) == k1


def sync_docs(a: MeshState, b: MeshState) -> None:
    update_a, update_b = a.doc.get_update(), b.doc.get_update()
    a.doc.apply_update(update_b)
    b.doc.apply_update(update_a)


class Adopted:
    def __init__(self) -> None:
        self.keys: list[MeshCredentials] = []

    async def __call__(self, creds: MeshCredentials, /) -> None:
        self.keys.append(creds)


def member(state: MeshState, creds: MeshCredentials, name: str) -> tuple[KeyRotation, Adopted]:
    adopted = Adopted()
    return KeyRotation(state, node_id=name, creds=creds, adopt=adopted, clock=lambda: 1.0), adopted


async def test_a_member_adopts_a_rotation_made_elsewhere_once() -> None:
    creds = MeshCredentials.create()
    a_state, b_state = MeshState(), MeshState()
    (a, a_adopted), (b, b_adopted) = member(a_state, creds, "a"), member(b_state, creds, "b")
    new = await a.rotate()
    assert new.mesh_id == creds.mesh_id and new.key_id != creds.key_id
    assert a_adopted.keys == [new] and a.current == new
    assert set(a_state.rotations()) == {creds.key_id}
    sync_docs(a_state, b_state)
    async with anyio.create_task_group() as tg:
        await tg.start(b.run)
        assert b.current == new and b_adopted.keys == [new]
        newer = await a.rotate()  # a second rotation, while b runs: it follows by itself
        sync_docs(a_state, b_state)
        with anyio.fail_after(3):
            while b.current != newer:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    a_state.put_node(NodeStatus(id="x"))
    sync_docs(a_state, b_state)  # an unrelated change: nothing adopted again
    assert await b.sync() == newer
    assert b_adopted.keys == [new, newer]


async def test_two_rotations_at_once_converge_on_one_secret() -> None:
    creds = MeshCredentials.create()
    a_state, b_state = MeshState(), MeshState()
    (a, _), (b, _) = member(a_state, creds, "a"), member(b_state, creds, "b")
    mine, theirs = await a.rotate(), await b.rotate()  # concurrently: neither saw the other's
    assert mine != theirs
    sync_docs(a_state, b_state)
    assert a_state.rotations() == b_state.rotations()  # the document kept one entry for the old key
    assert await a.sync() == await b.sync()
    assert a.current in (mine, theirs)


# -- the console route --------------------------------------------------------------------------------
ADMIN = "admin-token"


def test_the_rotate_route_needs_the_admin_token_and_json(tmp_path: Path) -> None:
    creds, state = MeshCredentials.create(), MeshState()
    rotation, adopted = member(state, creds, "n1")

    async def rotate() -> Rotated:
        after = await rotation.rotate()
        token = InviteToken(after, ("127.0.0.2:7000",)).encode()
        return Rotated(token=token, mesh_id=after.mesh_id, key_id=after.key_id, previous_key_id=creds.key_id)

    app = create_status_app(state, node_id="n1", access=ConsoleAccess(token=ADMIN), sources=SourcePolicy((tmp_path,)),
                            routes=rotation_routes(rotate))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        refused = [client.post("/api/rotate-key", json={}),
                   client.post("/api/rotate-key", json={}, headers={"Authorization": "Bearer wrong"}),
                   client.post("/api/rotate-key", content="{}",  # a cross-site form could send this
                               headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "text/plain"})]
        assert [r.status_code for r in refused] == [401, 401, 415]
        assert state.rotations() == {} and adopted.keys == []  # nothing rotated
        done = client.post("/api/rotate-key", headers={"Authorization": f"Bearer {ADMIN}"}, json={})
    assert done.status_code == 200, done.text
    answer = done.json()
    new = InviteToken.decode(answer["token"]).credentials
    assert adopted.keys == [new] and set(state.rotations()) == {creds.key_id}
    assert (answer["mesh_id"], answer["key_id"], answer["previous_key_id"]) == (creds.mesh_id, new.key_id,
                                                                                creds.key_id)
