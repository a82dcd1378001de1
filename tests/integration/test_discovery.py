"""Discovery end to end: a real Nostr relay process (the PyPI ``nostr-relay``), real node processes.

Two meshes publish and ``meshllm discover`` lists both; ``--client --auto --model X`` joins the one serving
X; ``--max-clients 1`` delists that mesh while the client is connected and lists it again when it
leaves; two nodes with the same ``--mesh-name`` find each other (one also given a dead relay, which
costs a warning only); a mesh killed outright expires from the directory; forged listings, which this
relay is configured to store unchecked, are never shown.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from meshllm.discovery import nostr
from meshllm.discovery.listing import ListingContent, make_event
from meshllm.store.mesh import InviteToken, MeshCredentials
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, wait_for

TTL = "5"


def discover(relay: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "meshllm", "discover", "--relay", relay, "--no-mdns", "-o", "json"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


def by_name(relay: str) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in discover(relay)}


def mesh_id(node: NodeProcess) -> str:
    node.token()  # waits until the console serves
    return str(node.status()["mesh_id"])


def directory(relay: str, *extra: str) -> list[str]:
    return ["--relay", relay, "--no-mdns", "--listing-ttl", TTL, *extra]


def test_publish_discover_auto_join_and_max_clients(mesh: Mesh, relay: str, tiny_dense: Path) -> None:
    serving = mesh.start("serving", "127.0.0.2", *directory(relay, "--mesh-name", "alpha", "--max-clients", "1"),
                         models=(str(tiny_dense),))
    other = mesh.start("other", "127.0.0.3", *directory(relay, "--mesh-name", "beta", "--client"))
    serving.wait_ready("tiny-dense")
    wait_for(lambda: by_name(relay).get("alpha", {}).get("served") == ["tiny-dense"] and "beta" in by_name(relay),
             timeout=30, what="both meshes listed, alpha serving tiny-dense")
    listed = by_name(relay)
    assert listed["alpha"]["mesh"] == mesh_id(serving) and listed["beta"]["mesh"] == mesh_id(other)
    assert "token" not in listed["alpha"]  # the table shows no credentials

    joiner = mesh.start("joiner", "127.0.0.4", *directory(relay, "--client", "--auto", "--model", "tiny-dense"))
    assert mesh_id(joiner) == mesh_id(serving)
    wait_for(lambda: "tiny-dense" in {m["id"] for m in httpx.get(f"{joiner.api}/v1/models", timeout=5).json()["data"]},
             timeout=30, what="the joiner to see the mesh's model")
    wait_for(lambda: "alpha" not in by_name(relay), timeout=30, what="alpha delisted at --max-clients 1")
    joiner.stop()
    wait_for(lambda: "alpha" in by_name(relay), timeout=30, what="alpha listed again once the client left")

    other.stop(signal.SIGKILL)  # no chance to withdraw: its listing must expire by itself
    wait_for(lambda: "beta" not in by_name(relay), timeout=float(TTL) + 15, what="beta's listing to expire")


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
