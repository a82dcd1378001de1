"""One real node process serving a tiny GGUF through a real llama-server.

What a user notices: answers through :9337 are exactly llama-server's; a crashed llama-server comes
back by itself; bad requests get OpenAI-shaped errors and the node keeps serving; stopping the node
leaves no llama process behind.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.nodes import NodeProcess, engine_pids, wait_for

pytestmark = pytest.mark.engine

PROMPT = "Once upon a time"


@pytest.fixture
def node(tmp_path: Path, engine_dir: Path, tiny_dense: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(models=[str(tiny_dense)], state_dir=tmp_path / "node", engine_dir=engine_dir,
                       extra=["--max-body", "64KiB"]).start()
    try:
        node.wait_ready("tiny-dense")
        yield node
    finally:
        node.kill_everything()


def _completion(base: str, **extra: object) -> httpx.Response:
    body = {"model": "tiny-dense", "prompt": PROMPT, "max_tokens": 48, "temperature": 0, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def _stream_text(base: str, path: str, body: dict[str, object]) -> tuple[str, int]:
    """Concatenated streamed text and the number of SSE data events."""
    text, events = [], 0
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            choice = json.loads(line[6:])["choices"]
            if choice:
                text.append(choice[0].get("text") or (choice[0].get("delta") or {}).get("content") or "")
    return "".join(text), events


def test_greedy_output_through_proxy_is_identical_to_llama_server(node: NodeProcess) -> None:
    direct = f"http://127.0.0.1:{node.server('tiny-dense')['port']}"
    via_proxy, straight = _completion(node.api), _completion(direct)
    assert via_proxy.status_code == straight.status_code == 200
    proxied_text = via_proxy.json()["choices"][0]["text"]
    assert proxied_text == straight.json()["choices"][0]["text"]
    assert len(proxied_text) > 0

    body = {"model": "tiny-dense", "prompt": PROMPT, "max_tokens": 48, "temperature": 0}
    assert _stream_text(node.api, "/v1/completions", body) == _stream_text(direct, "/v1/completions", body)
    assert _stream_text(node.api, "/v1/completions", body)[0] == proxied_text

    chat = {"model": "tiny-dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
            "temperature": 0}
    assert _stream_text(node.api, "/v1/chat/completions", chat) == _stream_text(direct, "/v1/chat/completions", chat)


def _server_or_none(node: NodeProcess, model: str) -> dict[str, Any] | None:
    try:
        return node.server(model)
    except KeyError:  # between the old status and the new one
        return None


def test_killed_llama_server_is_restarted(node: NodeProcess) -> None:
    before = node.server("tiny-dense")
    os.kill(before["pid"], signal.SIGKILL)

    def restarted() -> bool:
        now = _server_or_none(node, "tiny-dense")
        return now is not None and now["pid"] != before["pid"] and now["phase"] == "ready"

    wait_for(restarted, timeout=60, what="a new llama-server to be ready")
    after = node.server("tiny-dense")
    assert after["restarts"] == 1
    response = _completion(node.api)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_node_leaves_no_llama_process(tmp_path: Path, engine_dir: Path, tiny_dense: Path,
                                                   sig: signal.Signals) -> None:
    node = NodeProcess(models=[str(tiny_dense)], state_dir=tmp_path / "node", engine_dir=engine_dir).start()
    try:
        pid = node.wait_ready("tiny-dense")["pid"]
        assert engine_pids(node.state_dir) == [pid]
        assert node.stop(sig) == 0
        assert engine_pids(node.state_dir) == []
    finally:
        node.kill_everything()


def _error(response: httpx.Response) -> dict[str, object]:
    error: dict[str, object] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


def test_bad_requests_get_openai_errors_and_the_node_keeps_serving(node: NodeProcess) -> None:
    url = f"{node.api}/v1/chat/completions"
    malformed = httpx.post(url, content=b'{"model": "tiny-dense", ', headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and _error(malformed)["code"] == "invalid_json"

    not_a_name = httpx.post(url, json={"model": 42, "messages": []})
    assert not_a_name.status_code == 400 and _error(not_a_name)["param"] == "model"

    unknown = httpx.post(f"{node.api}/v1/nothing-here", json={"model": "tiny-dense"})
    assert unknown.status_code == 404 and _error(unknown)["code"] == "not_found"

    huge = httpx.post(url, json={"model": "tiny-dense", "prompt": "x" * 100_000})
    assert huge.status_code == 413 and _error(huge)["code"] == "request_too_large"

    assert _completion(node.api).status_code == 200


def test_a_broken_model_file_is_refused_at_start_with_one_line(tmp_path: Path, engine_dir: Path,
                                                               tiny_dense: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_dense.read_bytes()[:4096])  # a GGUF header, then nothing
    node = NodeProcess(models=[str(tiny_dense), str(broken)], state_dir=tmp_path / "node",
                       engine_dir=engine_dir).start()
    try:
        assert node.proc is not None and node.proc.wait(timeout=60) == 1
        lines = node.log_text().strip().splitlines()
        assert len(lines) == 1 and "broken.gguf is not a valid GGUF model" in lines[0], lines
        assert not engine_pids(node.state_dir)  # nothing was started, nothing restarts in a loop
    finally:
        node.kill_everything()
