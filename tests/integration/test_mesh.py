"""Several real node processes on 127.0.0.x joined into one mesh over QUIC.

What a user notices: any node's :9337 reaches every model in the mesh with unchanged output; a
wrong token gets nowhere; a dead node's models vanish everywhere within seconds and come back when
it restarts; a partition heals into one consistent view.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from meshllm.store.mesh import InviteToken, MeshCredentials
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, engine_pids, listed, wait_for

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def second_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshllm.engine.tinygguf import write_dense

    return write_dense(tmp_path_factory.mktemp("models") / "second-dense.gguf", n_layer=3, seed=7)


def node_states(node: NodeProcess) -> dict[str, str]:
    return {n["id"]: n["state"] for n in node.status()["nodes"]}


def start_three(mesh: Mesh, dense: Path, moe: Path, *more: Path) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    a = mesh.start("a", "127.0.0.2", models=(str(dense), *map(str, more)))
    for model in ("tiny-dense", *(p.stem for p in more)):
        a.wait_ready(model)
    token = a.token()
    b = mesh.start("b", "127.0.0.3", "--join", token, models=(str(moe),))
    c = mesh.start("c", "127.0.0.4", "--client", "--join", token)
    b.wait_ready("tiny-moe")
    everything = {"tiny-dense", "tiny-moe", *(p.stem for p in more)}
    wait_for(lambda: listed(c) == everything, timeout=30, what="C to see every model")
    return a, b, c


def greedy(base_url: str, model: str) -> tuple[str, str]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        text = client.completions.create(model=model, prompt="Once upon a time", max_tokens=32,
                                         temperature=0).choices[0].text
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=24, temperature=0, stream=True)
            if chunk.choices)
    return text, streamed


def test_a_client_node_reaches_every_model_with_unchanged_output(mesh: Mesh, tiny_dense: Path, tiny_moe: Path,
                                                                 second_dense: Path) -> None:
    a, b, c = start_three(mesh, tiny_dense, tiny_moe, second_dense)
    with openai.OpenAI(base_url=f"{c.api}/v1", api_key="unused") as client:
        assert sorted(m.id for m in client.models.list()) == ["second-dense", "tiny-dense", "tiny-moe"]
    assert listed(a) == listed(b) == listed(c)
    assert greedy(c.api, "second-dense") != greedy(c.api, "tiny-dense")
    for model, owner in (("tiny-dense", a), ("second-dense", a), ("tiny-moe", b)):
        direct = f"http://127.0.0.1:{owner.server(model)['port']}"
        through_c = greedy(c.api, model)
        assert through_c == greedy(direct, model)
        assert through_c[0] and through_c[1]
    roles = {n["id"]: n["role"] for n in c.status()["nodes"]}
    assert sorted(roles.values()) == ["client", "server", "server"]


def forged(token: str) -> str:
    real = InviteToken.decode(token)
    other = MeshCredentials(mesh_id=real.credentials.mesh_id, secret=os.urandom(32))
    return InviteToken(other, real.addrs).encode()


def test_a_wrong_token_is_refused(mesh: Mesh, tiny_dense: Path) -> None:
    a = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    a.wait_ready("tiny-dense")
    token = a.token()
    intruder = mesh.start("x", "127.0.0.5", "--client", "--join", forged(token))
    assert intruder.proc is not None and intruder.proc.wait(timeout=30) == 1  # refused: it says why and ends
    assert "refused this token: wrong secret" in intruder.log_text()
    assert len(a.status()["nodes"]) == 1

    damaged = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for bad in ("not-a-token", damaged):
        done = subprocess.run([sys.executable, "-m", "meshllm", "--client", "--join", bad,  # ports of its own:
                               "--port", str(free_port()), "--console", str(free_port()),  # 3131 may be taken
                               "--state-dir", str(mesh.root / "y")], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MESHLLM_ENGINE_DIR": str(mesh.engine_dir)})
        assert done.returncode == 1, done.stderr
        assert "--join" in done.stderr and "token" in done.stderr


def test_a_killed_node_is_dropped_everywhere_and_rejoins_with_its_id(mesh: Mesh, tiny_dense: Path,
                                                                      tiny_moe: Path) -> None:
    a, b, c = start_three(mesh, tiny_dense, tiny_moe)
    a_id = a.status()["node"]["id"]
    assert a.proc is not None
    a.proc.kill()
    took = max(wait_for(lambda: "tiny-dense" not in listed(n), timeout=15, what="tiny-dense to vanish")
               for n in (b, c))
    print(f"\nkill -9 of A: its model left every /v1/models within {took:.2f}s")
    for n in (b, c):
        assert node_states(n)[a_id] == "dead"
    # the dead node's server statuses are withdrawn by the next membership round after the verdict
    wait_for(lambda: all(s["node"] != a_id for m in c.status()["models"] for s in m["servers"]),
             timeout=5, what="A's servers to leave C's status")
    for pid in engine_pids(a.state_dir):
        os.killpg(pid, signal.SIGKILL)

    again = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    again.wait_ready("tiny-dense")
    assert again.status()["node"]["id"] == a_id
    wait_for(lambda: listed(c) == {"tiny-dense", "tiny-moe"} and node_states(c)[a_id] == "alive",
             timeout=30, what="A to rejoin")
    assert greedy(c.api, "tiny-dense")[0]


def _iptables(action: str, src: str, dst: str) -> None:
    subprocess.run(["iptables", action, "INPUT", "-s", src, "-d", dst, "-p", "udp", "-j", "DROP",
                    "-m", "comment", "--comment", "meshllm-test"], check=True, capture_output=True)


@pytest.fixture
def partition() -> Iterator[Callable[[str, str], Callable[[], None]]]:
    if shutil.which("iptables") is None or os.geteuid() != 0:
        pytest.fail("the partition test needs root and iptables (apt-get install iptables)")
    rules: list[tuple[str, str]] = []

    def cut(x: str, y: str) -> Callable[[], None]:
        for src, dst in ((x, y), (y, x)):
            _iptables("-I", src, dst)
            rules.append((src, dst))

        def heal() -> None:
            while rules:
                _iptables("-D", *rules.pop())

        return heal

    try:
        yield cut
    finally:
        while rules:
            _iptables("-D", *rules.pop())


def _server_of(node: NodeProcess, model: str) -> dict[str, Any]:
    for entry in node.status()["models"]:
        if entry["name"] == model:
            return entry["servers"][0] if entry["servers"] else {}
    return {}


def test_a_partition_heals_and_the_state_converges(mesh: Mesh, tiny_dense: Path, tiny_moe: Path,
                                                   partition: Callable[[str, str], Callable[[], None]]) -> None:
    a = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    a.wait_ready("tiny-dense")
    b = mesh.start("b", "127.0.0.3", "--join", a.token(), models=(str(tiny_moe),))
    b.wait_ready("tiny-moe")
    wait_for(lambda: listed(a) == listed(b) == {"tiny-dense", "tiny-moe"}, timeout=30, what="both models")

    heal = partition("127.0.0.2", "127.0.0.3")
    wait_for(lambda: listed(a) == {"tiny-dense"} and listed(b) == {"tiny-moe"}, timeout=20,
             what="each side to drop the other's model")
    os.kill(b.server("tiny-moe")["pid"], signal.SIGKILL)  # a change on one side during the partition
    wait_for(lambda: _server_of(b, "tiny-moe").get("restarts") == 1 and "tiny-moe" in listed(b), timeout=30,
             what="B to restart its llama-server")
    heal()

    def converged() -> bool:
        sa, sb = a.status(), b.status()
        return (listed(a) == listed(b) == {"tiny-dense", "tiny-moe"}
                and set(node_states(a).values()) == {"alive"} and set(node_states(b).values()) == {"alive"}
                and sa["models"] == sb["models"])

    took = wait_for(converged, timeout=30, what="the two sides to converge")
    print(f"\npartition healed: converged in {took:.2f}s")
    assert _server_of(a, "tiny-moe")["restarts"] == 1
    assert greedy(a.api, "tiny-moe") == greedy(b.api, "tiny-moe")
