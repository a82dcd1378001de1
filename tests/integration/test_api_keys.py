"""API keys on :9337 with real node processes, a real llama-server and the official clients.

What a user notices: the openai and anthropic SDKs work with a right key, on the serving node and
routed through a ``--client`` node, with the same greedy output as llama-server itself; no key or a
wrong one is a 401 the SDKs report as an authentication error, and the node carries on; a key made
with ``meshllm keys add`` on one node works on every node, and revoking it on another node stops it
everywhere within seconds; a node open beyond loopback says so at start.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.integration.nodes import Mesh, NodeProcess, wait_for

pytestmark = pytest.mark.engine

MODEL = "tiny-dense"
KEY_A = "key-of-node-a-0123456789"
KEY_C = "key-of-node-c-9876543210"


def answer(node: NodeProcess, key: str | None, path: str = "/v1/models") -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{node.api}{path}", headers=headers, timeout=5).status_code


def wait_serving(node: NodeProcess, key: str | None, *, timeout: float = 120) -> None:
    """Until ``node`` lists the model to a client holding ``key``."""
    def listed() -> bool:
        assert node.proc is not None and node.proc.poll() is None, node.log_text()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{node.api}/v1/models", headers=headers, timeout=5)
        return response.status_code == 200 and MODEL in {m["id"] for m in response.json()["data"]}
    wait_for(listed, timeout=timeout, what=f"{MODEL} listed by {node.api}")


def completion(base_url: str, key: str, **options: object) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, **options)  # type: ignore[arg-type]
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    return text.choices[0].text or ""


def message(base_url: str, key: str, *, stream: bool = False) -> str:
    greedy = {"temperature": 0.0}  # the SDK has no temperature argument any more; llama-server honours it
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say hello"}]
    with anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0) as client:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=16, messages=messages, extra_body=greedy) as events:
                return "".join(events.text_stream)
        reply = client.messages.create(model=MODEL, max_tokens=16, messages=messages, extra_body=greedy)
    return "".join(block.text for block in reply.content if block.type == "text")


def refused_by_sdks(base_url: str, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as denied:
        completion(base_url, key)
    assert denied.value.code == "invalid_api_key" and "meshllm keys add" in denied.value.message
    with pytest.raises(anthropic.AuthenticationError) as refused:
        message(base_url, key)
    assert refused.value.status_code == 401 and "meshllm keys add" in str(refused.value)


def test_node_keys_with_openai_and_anthropic_clients_locally_and_routed(
        mesh: Mesh, tiny_dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_API_KEY", KEY_A)  # node A's key stays off its command line
    a = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    monkeypatch.delenv("MESHLLM_API_KEY")
    wait_serving(a, KEY_A)
    assert KEY_A.encode() not in Path(f"/proc/{a.proc.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
    c = mesh.start("c", "127.0.0.3", "--client", "--join", a.token(), "--api-key", KEY_C)
    wait_serving(c, KEY_C, timeout=30)
    direct = f"http://127.0.0.1:{a.server(MODEL)['port']}"
    expected_text, expected_message = completion(direct, "unused"), message(direct, "unused")
    assert expected_text and expected_message

    for node, key, other in ((a, KEY_A, KEY_C), (c, KEY_C, KEY_A)):
        assert answer(node, None) == answer(node, "wrong") == answer(node, other) == 401
        refused_by_sdks(node.api, "wrong")
        refused_by_sdks(node.api, other)  # --api-key keys are that node's own
        assert answer(node, None, "/health") == 200
        # after the refusals the node serves as before, with unchanged greedy output
        assert completion(node.api, key) == expected_text
        assert completion(node.api, "unused", default_headers={"x-api-key": key}) == expected_text
        assert message(node.api, key) == expected_message
        assert message(node.api, key, stream=True) == expected_message


def keys_cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``meshllm keys ARGS`` as the node's operator (its console, its admin token)."""
    done = node.cli("keys", *args)
    assert done.returncode == 0, done.stderr
    return done


def test_a_mesh_key_added_on_one_node_works_everywhere_and_a_revocation_anywhere_stops_it(
        mesh: Mesh, tiny_dense: Path) -> None:
    a = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    wait_serving(a, None)
    c = mesh.start("c", "127.0.0.3", "--client", "--join", a.token())
    wait_serving(c, None, timeout=30)  # no key anywhere: open (on loopback)
    ci = keys_cli(a, "add", "--name", "ci").stdout.strip()
    spare = keys_cli(a, "add", "--name", "spare").stdout.strip()
    assert ci.startswith("mllm-") and spare.startswith("mllm-") and ci != spare
    took = wait_for(lambda: answer(c, None) == 401 and answer(c, ci) == 200, timeout=10,
                    what="the key added on A to be required and accepted on C")
    print(f"a key added on A was in force on C after {took:.2f}s")
    assert answer(a, None) == 401
    expected = completion(a.api, ci)
    assert completion(c.api, ci) == completion(c.api, spare) == expected  # routed C -> A

    listing = keys_cli(c, "list")
    assert "ci" in listing.stdout and "spare" in listing.stdout
    assert ci not in listing.stdout + listing.stderr and spare not in listing.stdout + listing.stderr

    keys_cli(c, "revoke", "ci")  # revoked on C, the node that did not create it
    took = wait_for(lambda: answer(a, ci) == answer(c, ci) == 401, timeout=10,
                    what="the key revoked on C to be refused on A and C")
    print(f"a key revoked on C was refused on both nodes after {took:.2f}s")
    refused_by_sdks(a.api, ci)
    assert completion(c.api, spare) == expected and answer(a, None) == 401

    last = keys_cli(a, "revoke", "spare")  # the last key: every node refuses everything, nobody is let in
    assert "no active mesh key" in last.stderr
    wait_for(lambda: answer(c, spare) == 401 and answer(a, spare) == 401, timeout=10, what="spare refused")
    assert answer(c, None) == answer(a, None) == 401
    keys_cli(c, "purge")  # the operator opens the mesh again on purpose
    wait_for(lambda: answer(a, None) == answer(c, None) == 200, timeout=10, what="the mesh open again")


def started(node: NodeProcess) -> bool:
    assert node.proc is not None and node.proc.poll() is None, node.log_text()
    return "invite token" in node.log_text()


def test_an_open_api_beyond_loopback_is_announced(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    # API-only nodes need no engine; each binds the APIs beyond loopback (--listen-all)
    open_node = mesh.start("open", "127.0.0.2", "--client", "--listen-all")
    monkeypatch.setenv("MESHLLM_API_KEY", KEY_A)
    keyed = mesh.start("keyed", "127.0.0.3", "--client", "--listen-all")
    for node in (open_node, keyed):
        wait_for(partial(started, node), timeout=30, what="the node to start")
    assert "answers ANYONE" in open_node.log_text() and "meshllm keys add" in open_node.log_text()
    assert "answers ANYONE" not in keyed.log_text()
    assert answer(keyed, None) == 401 and answer(keyed, KEY_A) == 200
