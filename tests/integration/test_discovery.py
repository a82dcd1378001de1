"""Discovery end to end: a real Nostr relay process (the PyPI ``nostr-relay``), real node processes.

Two meshes publish (``--mesh-name`` and ``--publish``; a private one beside them never does) and ``meshllm discover`` lists both, with
what a listing says; ``--client --auto --model X`` joins the one serving X (though the other is in the
region asked for), and gets membership, not the serving node's management API; ``--max-clients 1`` delists that mesh while the client is connected and lists it again when it
leaves; two nodes with the same ``--mesh-name`` find each other (one also given a dead relay, which
costs a warning only); a mesh killed outright expires from the directory; forged listings, which this
relay is configured to store unchecked, are never shown; ``discover --auto`` with no fitting mesh founds one;
a relay that sends garbage, forged and malformed listings and never acknowledges costs the node a warning,
not its start.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

from meshllm.discovery import nostr
from meshllm import __version__
from meshllm.discovery.listing import ListingContent, listing_filter, make_event
from meshllm.store.mesh import InviteToken, MeshCredentials
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, wait_for

TTL = "5"


def discover(relay: str, *extra: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "meshllm", "discover", "--relay", relay, "--no-mdns", "-o", "json",
                           *extra], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


def by_name(relay: str) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in discover(relay)}


def raw_listings(relay: str) -> list[dict[str, Any]]:
    """Every listing event the relay holds, unverified: what anyone reading the relay sees."""
    return anyio.run(lambda: nostr.query(relay, [listing_filter()], timeout=5))


def mesh_id(node: NodeProcess) -> str:
    node.token()  # waits until the console serves
    return str(node.status()["mesh_id"])


def directory(relay: str, *extra: str) -> list[str]:
    return ["--relay", relay, "--no-mdns", "--listing-ttl", TTL, *extra]


def test_publish_discover_auto_join_and_max_clients(mesh: Mesh, relay: str, tiny_dense: Path) -> None:
    private = mesh.start("private", "127.0.0.8", "--client", "--relay", relay, "--no-mdns")  # no --publish
    serving = mesh.start("serving", "127.0.0.2", *directory(relay, "--mesh-name", "alpha", "--max-clients", "1"),
                         models=(str(tiny_dense),))
    # beta serves nothing but is in the region the joiner asks for: only the model makes alpha the better mesh
    other = mesh.start("other", "127.0.0.3", *directory(relay, "--publish", "--client", "--region", "EU"))
    beta = f"mesh-{mesh_id(other)[:6]}"  # --publish with no --mesh-name: named after the mesh id
    serving.wait_ready("tiny-dense")
    wait_for(lambda: by_name(relay).get("alpha", {}).get("served") == ["tiny-dense"] and beta in by_name(relay),
             timeout=30, what="both meshes listed, alpha serving tiny-dense")
    beta_listed = time.monotonic()
    listed = by_name(relay)
    assert listed["alpha"]["mesh"] == mesh_id(serving) and listed[beta]["mesh"] == mesh_id(other)
    assert (listed["alpha"]["nodes"], listed["alpha"]["clients"], listed["alpha"]["wanted"]) == (1, 0, [])
    assert listed["alpha"]["free_bytes"] > 0 and listed["alpha"]["version"] == __version__
    assert (listed[beta]["region"], listed[beta]["nodes"], listed[beta]["clients"]) == ("EU", 0, 1)
    assert "token" not in listed["alpha"]  # the table shows no credentials
    assert [e["name"] for e in discover(relay, "--model", "tiny-dense")] == ["alpha"]
    assert [e["name"] for e in discover(relay, "--region", "eu")][0] == beta
    # the listing's token is the mesh's invite, no more: the same credentials `meshllm token` gives, and no admin token
    events = raw_listings(relay)
    alpha_token = next(json.loads(e["content"])["token"] for e in events if mesh_id(serving) in e["content"])
    assert InviteToken.decode(alpha_token).credentials == InviteToken.decode(serving.token()).credentials
    assert all((n.state_dir / "admin.token").read_text().strip() not in e["content"] for e in events
               for n in (serving, other))
    assert not any(mesh_id(private) in e["content"] for e in events)  # a private mesh is never published

    joiner = mesh.start("joiner", "127.0.0.4",
                        *directory(relay, "--client", "--auto", "--model", "tiny-dense", "--region", "EU"))
    assert mesh_id(joiner) == mesh_id(serving)
    assert "discovery: joining mesh 'alpha'" in joiner.log_text()
    wait_for(lambda: "tiny-dense" in {m["id"] for m in httpx.get(f"{joiner.api}/v1/models", timeout=5).json()["data"]},
             timeout=30, what="the joiner to see the mesh's model")
    # joined by a public listing, the joiner holds membership, not the serving node's management API
    refused = httpx.post(f"http://127.0.0.1:{serving.console}/api/apply", headers=joiner.admin_headers(), json={},
                         timeout=5)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "admin_token_required"
    wait_for(lambda: "alpha" not in by_name(relay), timeout=30, what="alpha delisted at --max-clients 1")
    joiner.stop()
    wait_for(lambda: "alpha" in by_name(relay), timeout=30, what="alpha listed again once the client left")

    # re-published while the mesh lives: still listed more than two TTLs after it was first listed
    wait_for(lambda: time.monotonic() - beta_listed > 2 * float(TTL), timeout=3 * float(TTL), what="two TTLs")
    assert beta in by_name(relay)
    other.stop(signal.SIGKILL)  # no chance to withdraw: its listing must expire by itself
    wait_for(lambda: beta not in by_name(relay), timeout=float(TTL) + 15, what="the other mesh's listing to expire")


def test_same_mesh_name_finds_each_other_despite_a_dead_relay(mesh: Mesh, relay: str) -> None:
    first = mesh.start("first", "127.0.0.5", *directory(relay, "--mesh-name", "poker", "--client"))
    wait_for(lambda: "poker" in by_name(relay), timeout=30, what="poker listed")
    dead = f"ws://127.0.0.1:{free_port()}"
    second = mesh.start("second", "127.0.0.6", *directory(relay, "--relay", dead, "--mesh-name", "poker", "--client"))
    assert mesh_id(second) == mesh_id(first)
    wait_for(lambda: len(first.status()["nodes"]) == 2, timeout=30, what="the first node to see the second")
    assert "unreachable" in second.log_text() and dead.removeprefix("ws://") in second.log_text()
    wait_for(lambda: by_name(relay)["poker"]["clients"] == 2, timeout=30, what="the listing to count both")

    # `meshllm discover --auto` picks the same mesh and runs a node joining it, with the options after --
    third = NodeProcess(models=[], state_dir=mesh.root / "third", engine_dir=mesh.engine_dir)
    third.state_dir.mkdir()
    with third.log_path.open("wb") as log:
        third.proc = subprocess.Popen(
            [sys.executable, "-m", "meshllm", "discover", "--auto", "--client", "--relay", relay, "--no-mdns", "--",
             "--port", str(third.port), "--console", str(third.console), "--state-dir", str(third.state_dir),
             "--bind-host", "127.0.0.7"], stdout=log, stderr=subprocess.STDOUT)
    mesh.nodes.append(third)
    assert mesh_id(third) == mesh_id(first)

    # `meshllm discover --auto` for a model no listed mesh serves: a node founding a mesh of its own
    fourth = NodeProcess(models=[], state_dir=mesh.root / "fourth", engine_dir=mesh.engine_dir)
    fourth.state_dir.mkdir()
    with fourth.log_path.open("wb") as log:
        fourth.proc = subprocess.Popen(
            [sys.executable, "-m", "meshllm", "discover", "--auto", "--client", "--model", "no-such-model", "--relay",
             relay, "--no-mdns", "--", "--port", str(fourth.port), "--console", str(fourth.console), "--state-dir",
             str(fourth.state_dir), "--bind-host", "127.0.0.9"], stdout=log, stderr=subprocess.STDOUT)
    mesh.nodes.append(fourth)
    assert mesh_id(fourth) != mesh_id(first) and len(fourth.status()["nodes"]) == 1
    assert "no published mesh fits; starting a new mesh" in fourth.log_text()


@pytest.fixture
def garbage_relay() -> Iterator[str]:
    """A websocket server that answers every message with garbage, then (to a REQ) a forged and a malformed
    listing, and never acknowledges a published one."""
    creds, other = MeshCredentials.create(), MeshCredentials.create()
    token = InviteToken(creds, ("127.0.0.1:9",)).encode()
    good = make_event(creds, ListingContent(mesh=creds.mesh_id, name="garbage-mesh", token=token), now=time.time(),
                      ttl=600)
    forged = {**make_event(other, ListingContent(mesh=creds.mesh_id, name="garbage-mesh", token=token),
                           now=time.time(), ttl=600)}
    malformed = {**good, "content": "{not json", "sig": "00" * 64}

    def handler(ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            for raw in ws:
                msg = json.loads(raw) if raw.startswith("[") else [""]
                ws.send("\x00not json")
                ws.send(json.dumps({"not": "an array"}))
                if msg[0] == "REQ":
                    for event in (forged, malformed, {"id": "x"}):
                        ws.send(json.dumps(["EVENT", msg[1], event]))
                    ws.send(json.dumps(["EOSE", msg[1]]))

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()
            thread.join(timeout=5)


def test_a_node_starts_despite_a_garbage_relay(mesh: Mesh, garbage_relay: str) -> None:
    node = mesh.start("g", "127.0.0.10", "--client", "--mesh-name", "garbage-mesh", "--relay", garbage_relay,
                      "--no-mdns")
    node.token()  # the console serves: the node started
    assert alive_count(node) == 1  # it founded its own mesh: the forged listing did not send it anywhere
    log = " ".join(node.log_text().split())  # the console log wraps long lines
    assert f"WARNING discovery: ignored 3 listing(s) from {garbage_relay} that were forged or malformed" in log
    assert "starting a new mesh 'garbage-mesh'" in log
    wait_for(lambda: f"relay {garbage_relay} did not answer within" in " ".join(node.log_text().split()),
             timeout=30, what="a warning naming the relay that never acknowledged the listing")
    assert node.status()["mesh_id"] and node.proc is not None and node.proc.poll() is None


def alive_count(node: NodeProcess) -> int:
    return sum(1 for n in node.status()["nodes"] if n["state"] == "alive")


def test_forged_listings_are_ignored(relay: str) -> None:
    real, other = MeshCredentials.create(), MeshCredentials.create()
    token = InviteToken(real, ("127.0.0.1:9",)).encode()
    now = time.time()
    good = make_event(real, ListingContent(mesh=real.mesh_id, name="genuine", token=token), now=now, ttl=60)
    bad_sig = {**make_event(real, ListingContent(mesh=real.mesh_id, name="tampered", token=token), now=now, ttl=60)}
    bad_sig["sig"] = good["sig"]  # a signature, but not of this event
    # a listing for mesh ``other`` pointing at the real mesh's token, signed with other's key: misdirection
    lure = make_event(other, ListingContent(mesh=other.mesh_id, name="lure", token=token), now=now, ttl=60)

    async def put_all() -> None:
        for event in (good, bad_sig, lure):
            await nostr.publish(relay, event)

    anyio.run(put_all)
    assert set(by_name(relay)) == {"genuine"}
