"""The auth handshake without sockets: success, and each forgery refused by the checking side."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.store.identity import NodeIdentity
from meshllm.transport import AuthError, FrameDecoder, encode_frame
from meshllm.transport.auth import Handshake, Role

SECRET = b"s" * 32
BINDING = b"b" * 32
Tamper = Callable[[dict[str, object]], None]


def identity() -> NodeIdentity:
    return NodeIdentity(Ed25519PrivateKey.generate())


def handshake(who: NodeIdentity, role: Role, *, secret: bytes = SECRET, mesh: str = "mesh",
              binding: bytes = BINDING) -> Handshake:
    return Handshake(identity=who, mesh_id=mesh, secret=secret, role=role, channel_binding=binding)


def rewrite(wire: bytes, change: Tamper) -> bytes:
    """Decode the frames in ``wire``, let ``change`` edit each JSON message, re-encode."""
    out = b""
    for payload in FrameDecoder().decode(wire):
        message = json.loads(payload)
        change(message)
        changed = message != json.loads(payload)
        out += encode_frame(json.dumps(message).encode() if changed else payload)
    return out


def pump(client: Handshake, server: Handshake, *, to_server: Tamper | None = None,
         to_client: Tamper | None = None) -> None:
    """Shuttle bytes between the two sides until both finish (or one raises)."""
    wire, turn = client.start(), server
    while wire:
        change = to_server if turn is server else to_client
        if change is not None:
            wire = rewrite(wire, change)
        wire = turn.receive(wire)
        turn = client if turn is server else server
    assert client.done and server.done


def test_honest_nodes_learn_each_others_ids() -> None:
    a, b = identity(), identity()
    client, server = handshake(a, Role.CLIENT), handshake(b, Role.SERVER)
    pump(client, server)
    assert client.result.node_id == b.node_id and server.result.node_id == a.node_id
    assert client.result.public_key == b.public_bytes
    assert client.result.dialed_at == server.result.dialed_at


def test_wrong_secret_is_refused_by_the_server_before_it_proves_anything() -> None:
    client, server = handshake(identity(), Role.CLIENT, secret=b"x" * 32), handshake(identity(),
                                                                                   Role.SERVER)
    server_hello = server.receive(client.start())
    proof = client.receive(server_hello)
    with pytest.raises(AuthError, match="mesh secret"):
        server.receive(proof)
    assert not server.done and not client.done


def test_wrong_mesh_is_refused_on_the_hello() -> None:
    client, server = handshake(identity(), Role.CLIENT, mesh="other"), handshake(identity(),
                                                                                Role.SERVER)
    with pytest.raises(AuthError, match="mesh") as caught:
        server.receive(client.start())
    assert caught.value.peer_reason.endswith("wrong mesh")


def _claim_other_node(message: dict[str, object]) -> None:
    if message["t"] == "hello":
        message["node"] = identity().node_id


def _flip_mac(message: dict[str, object]) -> None:
    if message["t"] == "proof":
        mac = str(message["mac"])
        message["mac"] = ("A" if mac[0] != "A" else "B") + mac[1:]


def _flip_sig(message: dict[str, object]) -> None:
    if message["t"] == "proof":
        sig = str(message["sig"])
        message["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]


def _garble_nonce(message: dict[str, object]) -> None:
    if message["t"] == "hello":
        message["nonce"] = "not base64!"


def _drop_version(message: dict[str, object]) -> None:
    if message["t"] == "hello":
        del message["v"]


@pytest.mark.parametrize(("tamper", "match"), [
    (_claim_other_node, "not the id of the key"),
    (_flip_mac, "mesh secret"),
    (_flip_sig, "signature"),
    (_garble_nonce, "base64"),
    (_drop_version, "version"),
])
def test_a_tampered_client_is_refused_by_the_server(tamper: Tamper, match: str) -> None:
    client, server = handshake(identity(), Role.CLIENT), handshake(identity(), Role.SERVER)
    with pytest.raises(AuthError, match=match):
        pump(client, server, to_server=tamper)
    assert not server.done


@pytest.mark.parametrize(("tamper", "match"), [
    (_claim_other_node, "not the id of the key"),
    (_flip_mac, "mesh secret"),
    (_flip_sig, "signature"),
])
def test_a_tampered_server_is_refused_by_the_client(tamper: Tamper, match: str) -> None:
    client, server = handshake(identity(), Role.CLIENT), handshake(identity(), Role.SERVER)
    with pytest.raises(AuthError, match=match):
        pump(client, server, to_client=tamper)
    assert not client.done


@dataclass(frozen=True)
class Impostor:
    """Knows the mesh secret and claims ``victim``'s node id and key, but holds another key."""

    victim: NodeIdentity
    private_key: Ed25519PrivateKey

    @property
    def node_id(self) -> str:
        return self.victim.node_id

    @property
    def public_bytes(self) -> bytes:
        return self.victim.public_bytes


def test_a_member_impersonating_another_node_id_is_refused() -> None:
    impostor = Impostor(identity(), Ed25519PrivateKey.generate())
    client = handshake(impostor, Role.CLIENT)  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="signature"):
        pump(client, handshake(identity(), Role.SERVER))
    server = handshake(impostor, Role.SERVER)  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="signature"):
        pump(handshake(identity(), Role.CLIENT), server)


def test_a_relay_with_its_own_tls_certificate_cannot_splice_two_nodes() -> None:
    client = handshake(identity(), Role.CLIENT, binding=b"relay certificate hash".ljust(32))
    server = handshake(identity(), Role.SERVER)
    with pytest.raises(AuthError, match="mesh secret"):
        pump(client, server)


def test_a_recorded_proof_does_not_work_on_a_new_connection() -> None:
    a, b = identity(), identity()
    first_client = Handshake(identity=a, mesh_id="mesh", secret=SECRET, role=Role.CLIENT,
                             channel_binding=BINDING, nonce=os.urandom(32), dialed_at=1)
    server = handshake(b, Role.SERVER)
    hello = first_client.start()
    recorded_proof = first_client.receive(server.receive(hello))

    replay_server = handshake(b, Role.SERVER)
    replay_server.receive(hello)  # the same hello, but the server's nonce is fresh
    with pytest.raises(AuthError):
        replay_server.receive(recorded_proof)


@pytest.mark.parametrize("wire", [
    b"\xff" * 64,  # an oversize length
    encode_frame(b"not json at all"),
    encode_frame(b'{"t": "proof", "mac": "", "sig": ""}'),  # a proof before any hello
])
def test_garbage_on_the_auth_stream_is_refused(wire: bytes) -> None:
    with pytest.raises(AuthError):
        handshake(identity(), Role.SERVER).receive(wire)


def test_connecting_to_itself_is_refused() -> None:
    me = identity()
    client, server = handshake(me, Role.CLIENT), handshake(me, Role.SERVER)
    with pytest.raises(AuthError, match="itself"):
        server.receive(client.start())


def test_data_after_completion_is_refused() -> None:
    client, server = handshake(identity(), Role.CLIENT), handshake(identity(), Role.SERVER)
    pump(client, server)
    with pytest.raises(AuthError, match="after authentication"):
        server.receive(encode_frame(b"{}"))
