"""Why the handshake refused a peer, as both sides learn it: wrong mesh, wrong secret, retired key."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import key_id
from meshllm.transport import AuthError, FrameDecoder, Refusal, encode_frame
from meshllm.transport.auth import Handshake, Role

SECRET, OLD = b"s" * 32, b"o" * 32
BINDING = b"b" * 32


def handshake(role: Role, *, secret: bytes = SECRET, mesh: str = "mesh",
              retired: frozenset[str] = frozenset()) -> Handshake:
    return Handshake(identity=NodeIdentity(Ed25519PrivateKey.generate()), mesh_id=mesh, secret=secret, role=role,
                     channel_binding=BINDING, retired=retired.__contains__)


def refusal_of(client: Handshake, server: Handshake) -> AuthError:
    """Run the handshake until the server refuses the client; return the server's error."""
    with pytest.raises(AuthError) as caught:
        server_hello = server.receive(client.start())
        server.receive(client.receive(server_hello))
    return caught.value


def test_the_hello_names_the_key_it_proves() -> None:
    client = handshake(Role.CLIENT)
    [payload] = FrameDecoder().decode(client.start())
    assert json.loads(payload)["kid"] == key_id(SECRET)
    assert SECRET.hex() not in payload.decode()


@pytest.mark.parametrize(("client", "refusal"), [
    ({"mesh": "other"}, Refusal.WRONG_MESH),
    ({"secret": b"x" * 32}, Refusal.WRONG_SECRET),
    ({"secret": OLD}, Refusal.RETIRED_KEY),
], ids=["wrong-mesh", "wrong-secret", "retired-key"])
def test_the_server_names_the_category_it_refused(client: dict[str, object], refusal: Refusal) -> None:
    server = handshake(Role.SERVER, retired=frozenset({key_id(OLD)}))
    error = refusal_of(handshake(Role.CLIENT, **client), server)  # type: ignore[arg-type]
    assert error.refusal is refusal
    assert error.peer_reason == f"authentication failed: {refusal}"
    assert Refusal.from_reason(error.peer_reason) is refusal
    assert not server.done


def test_a_retired_key_is_refused_before_its_proof_is_checked() -> None:
    server = handshake(Role.SERVER, secret=SECRET, retired=frozenset({key_id(OLD)}))
    with pytest.raises(AuthError) as caught:
        server.receive(handshake(Role.CLIENT, secret=OLD).start())  # the hello alone
    assert caught.value.refusal is Refusal.RETIRED_KEY


def test_a_hello_without_key_id_from_an_older_node_still_authenticates() -> None:
    client, server = handshake(Role.CLIENT), handshake(Role.SERVER, retired=frozenset({key_id(OLD)}))
    [payload] = FrameDecoder().decode(client.start())
    message = json.loads(payload)
    del message["kid"]
    wire = server.receive(encode_frame(json.dumps(message).encode()))
    assert wire  # the server answered with its hello: no refusal
    assert server.peer_hello is not None and server.peer_hello.key_id == ""


def test_a_server_keeps_accepting_its_own_key_even_if_listed_as_retired() -> None:
    client, server = handshake(Role.CLIENT), handshake(Role.SERVER, retired=frozenset({key_id(SECRET)}))
    wire, turn = client.start(), server
    while wire:
        wire = turn.receive(wire)
        turn = client if turn is server else server
    assert client.done and server.done


@pytest.mark.parametrize("reason", ["authentication failed", "authentication failed: same node", "closed",
                                    "authentication failed: wrong secrets"])
def test_other_close_reasons_name_no_refusal(reason: str) -> None:
    assert Refusal.from_reason(reason) is None
