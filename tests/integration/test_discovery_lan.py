"""Discovery on a LAN by mDNS, with no relay at all: two nodes with the same ``--mesh-name`` in a network
namespace of their own (its loopback with multicast on, so nothing leaks to the machine's networks)
find each other, and ``meshllm discover`` run there lists the mesh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.nodes import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"meshllm-mdns-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"]):
            subprocess.run(["ip", "netns", "exec", name, "ip", *args], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "meshllm", *args]


def lan_discover(ns: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(in_ns(ns, "discover", "--relay", "none", "--wait", "1", "-o", "json"),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return {entry["name"]: entry for entry in json.loads(done.stdout)}


def test_same_mesh_name_on_the_lan_by_mdns(netns: str, tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        for log in logs:
            args = in_ns(netns, "--client", "--mesh-name", "lan-party", "--relay", "none", "--port", str(free_port()),
                         "--console", str(free_port()), "--state-dir", str(tmp_path / log.stem))
            with log.open("wb") as out:
                procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))
            if log == logs[0]:
                wait_for(lambda: "lan-party" in lan_discover(netns), timeout=30, what="the mesh listed on the LAN")
        wait_for(lambda: "discovery: joining mesh" in logs[1].read_text(), timeout=30, what="the second to join")
        wait_for(lambda: lan_discover(netns).get("lan-party", {}).get("clients") == 2, timeout=30,
                 what="the LAN listing to count both nodes")
        assert "starting a new mesh 'lan-party'" in logs[0].read_text()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs
                                                     if log.exists())) from None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
