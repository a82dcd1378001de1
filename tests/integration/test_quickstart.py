"""The README's quick start, for real: a node serving the embedded gemma-3-270m, used with the
official ``openai`` client; and a client that hangs up mid-stream stops the generation upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.nodes import NodeProcess

pytestmark = [pytest.mark.engine, pytest.mark.gemma]

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma_node(tmp_path_factory: pytest.TempPathFactory, engine_dir: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(models=[MODEL], state_dir=tmp_path_factory.mktemp("gemma"), engine_dir=engine_dir).start()
    try:
        node.wait_ready(MODEL, timeout=300)
        yield node
    finally:
        node.kill_everything()


def test_openai_client_lists_chats_and_streams(gemma_node: NodeProcess) -> None:
    with openai.OpenAI(base_url=f"{gemma_node.api}/v1", api_key="unused") as client:
        assert [m.id for m in client.models.list()] == [MODEL]

        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0)
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0

        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0,
            stream=True) if chunk.choices]
        assert "".join(pieces) == reply.choices[0].message.content

        completion = client.completions.create(model=MODEL, prompt="The Eiffel Tower is in the city of", max_tokens=8,
                                               temperature=0)
        assert "Paris" in completion.choices[0].text


def _busy_slots(port: int) -> int:
    slots = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
    return sum(1 for slot in slots if slot.get("is_processing"))


def test_client_disconnect_stops_generation_upstream(gemma_node: NodeProcess) -> None:
    port = gemma_node.server(MODEL)["port"]
    body = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 4000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gemma_node.api}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert _busy_slots(port) == 1
    deadline = time.monotonic() + 5
    while _busy_slots(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _busy_slots(port) == 0, "llama-server kept generating after the client hung up"


def test_the_readme_chat_without_max_tokens_answers_briefly(gemma_node: NodeProcess) -> None:
    """The README's curl, as written: no max_tokens, the node's chat format for a GGUF without one."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    start = time.monotonic()
    reply = httpx.post(f"{gemma_node.api}/v1/chat/completions", json=body, timeout=60).json()
    assert time.monotonic() - start < 10
    content = reply["choices"][0]["message"]["content"]
    assert content.strip() and reply["usage"]["completion_tokens"] <= 512
    assert "<|im_end|>" not in content and "Question:" not in content
