"""``/api/events`` and ``/metrics`` of a real node process serving a real llama-server.

What a user notices: every open console hears of a change; one that lost its connection resumes
where it was (the changes it missed, not a new snapshot); ``/metrics`` scraped during a load counts
exactly the requests, errors and tokens the clients got.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.nodes import Mesh, NodeProcess

pytestmark = pytest.mark.engine


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of each event of a stream, comments skipped."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "event" in fields:
                yield fields["id"], fields["event"], json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":") and ": " in line:
            key, value = line.split(": ", 1)
            fields[key] = value


def next_change_naming(events: Iterator[tuple[str, str, dict[str, Any]]], model: str) -> tuple[str, str]:
    for ident, name, data in events:
        names = [m["name"] for m in (data.get("put") or {}).get("models", [])]
        if name == "snapshot":
            names = [m["name"] for m in data["models"]]
        if model in names:
            return ident, name
    raise AssertionError("stream ended")


def apply_copy(node: NodeProcess, source: Path, name: str, folder: Path) -> None:
    manifest = folder / f"{name}.yaml"
    manifest.write_text(f"apiVersion: meshllm/v1\nkind: Model\nmetadata:\n  name: {name}\nspec:\n  source: {source}\n")
    done = node.cli("apply", "-f", str(manifest))
    assert done.returncode == 0, done.stderr


def test_many_consoles_hear_a_change_and_one_resumes_after_a_disconnect(mesh: Mesh, tiny_dense: Path,
                                                                         tmp_path: Path) -> None:
    node = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    node.wait_ready("tiny-dense")
    url = f"http://127.0.0.1:{node.console}/api/events"
    timeout = httpx.Timeout(5.0, read=60.0)
    with httpx.Client(timeout=timeout) as first:
        with first.stream("GET", url) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            last, name, _ = next(sse_events(response))
            assert name == "snapshot"
        # disconnected; meanwhile ten other consoles watch a manifest being applied
        heard: list[str] = []
        ready = threading.Barrier(11)

        def watch() -> None:
            with httpx.Client(timeout=timeout) as client, client.stream("GET", url) as stream:
                events = sse_events(stream)
                assert next(events)[1] == "snapshot"
                ready.wait(30)
                heard.append(next_change_naming(events, "copy")[1])

        with ThreadPoolExecutor(10) as pool:
            watchers = [pool.submit(watch) for _ in range(10)]
            ready.wait(30)
            apply_copy(node, tiny_dense, "copy", tmp_path)
            for watcher in watchers:
                watcher.result(timeout=60)
        assert heard == ["change"] * 10
        # the first console comes back with its last id: it gets the changes, not a snapshot
        with first.stream("GET", url, headers={"Last-Event-ID": last}) as response:
            events = sse_events(response)
            first_event = next(events)
            assert first_event[1] == "change"
            assert next_change_naming(itertools.chain([first_event], events), "copy")[1] == "change"


def scrape(node: NodeProcess) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{node.console}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        if match := re.match(r'^(meshllm_\w+)\{model="tiny-dense"\} ([0-9.e+-]+)$', line):
            values[match[1]] = float(match[2])
    return values


def test_metrics_scraped_during_a_load_count_what_the_clients_got(mesh: Mesh, tiny_dense: Path) -> None:
    node = mesh.start("a", "127.0.0.2", models=(str(tiny_dense),))
    node.wait_ready("tiny-dense")
    api = f"{node.api}/v1/chat/completions"
    body = {"model": "tiny-dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}

    def plain(_: int) -> tuple[int, int, bool]:
        answer = httpx.post(api, json=body, timeout=60).json()
        return answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"], False

    def streamed(_: int) -> tuple[int, int, bool]:
        usage: dict[str, int] = {}
        request = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", api, json=request, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage") or usage
        return usage["prompt_tokens"], usage["completion_tokens"], True

    scrapes: list[dict[str, float]] = []
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            scrapes.append(scrape(node))

    with ThreadPoolExecutor(5) as pool:
        watcher = pool.submit(scraper)
        results = list(pool.map(lambda i: (plain if i % 2 else streamed)(i), range(16)))
        bad = httpx.post(api, json={"model": "tiny-dense", "messages": "not a list"}, timeout=30)
        done.set()
        watcher.result(timeout=30)
    assert bad.status_code >= 400
    final = scrape(node)
    assert final["meshllm_requests_total"] == 17
    assert final["meshllm_request_errors_total"] == 1
    assert final["meshllm_prompt_tokens_total"] == sum(r[0] for r in results)
    assert final["meshllm_completion_tokens_total"] == sum(r[1] for r in results)
    assert final["meshllm_time_to_first_token_seconds_count"] == 8  # the streamed answers
    assert final["meshllm_requests_in_flight"] == 0
    # scraped while the load ran: counters only ever went up (whether a scrape caught a request in
    # flight depends on timing, so it is not asserted)
    counts = [s.get("meshllm_requests_total", 0.0) for s in scrapes]
    assert len(counts) > 1 and counts == sorted(counts) and counts[-1] <= 17
