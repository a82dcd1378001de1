"""Helpers the benchmarks share: percentiles, polling a node's JSON API, spotting stale connections,
timing one streamed completion, and a process's CPU time."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["cpu_seconds", "get_json", "percentile", "retryable", "stream_once"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def get_json(url: str, *, headers: dict[str, str] | None = None) -> Any:
    """The JSON at ``url``, or None while the node is not answering yet."""
    try:
        response = httpx.get(url, timeout=2, trust_env=False, headers=headers)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def retryable(exc: httpx.HTTPError) -> bool:
    """A stale kept-alive connection: llama-server closed it (direct), or a proxy answered 503 for that."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 503
    return isinstance(exc, httpx.RemoteProtocolError)


def _content(event: bytes) -> str | None:
    """The generated text one SSE event carries (None for the final usage event and ``[DONE]``)."""
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return None
    choices = json.loads(event[6:]).get("choices") or [{}]
    return choices[0].get("text") or None


def stream_once(client: httpx.Client, body: dict[str, Any], *, headers: dict[str, str],
                timings: dict[str, Any] | None = None) -> tuple[float, float, int, float, str]:
    """One streamed ``/v1/completions``: (wall s, time to first content chunk s, content chunks,
    decode tok/s, text). ``timings`` receives llama-server's own, from its last event (``prompt_n``:
    prompt tokens it evaluated, i.e. not found in its prompt cache)."""
    stamps: list[float] = []
    texts: list[str] = []
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=headers) as response:
        response.raise_for_status()
        pending = b""
        for raw in response.iter_raw():
            now = time.perf_counter()
            pending += raw
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if timings is not None and b'"timings"' in event and event.startswith(b"data: {"):
                    timings.update(json.loads(event[6:]).get("timings") or {})
                if (text := _content(event.strip())) is not None:
                    stamps.append(now)
                    texts.append(text)
    wall = time.perf_counter() - start
    if len(stamps) < 2:
        raise RuntimeError(f"expected a stream of content chunks, got {len(stamps)}")
    spread = max(stamps[-1] - stamps[0], 1e-6)  # all in one read: a burst, not a decode rate (see README)
    return wall, stamps[0] - start, len(stamps), (len(stamps) - 1) / spread, "".join(texts)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, its live threads together, from ``/proc/<pid>/task/*/schedstat`` (nanoseconds:
    ``utime + stime`` in ``/proc/<pid>/stat`` count 10 ms ticks, too coarse to charge one request)."""
    total = 0
    for path in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(path.read_text().split()[0])
    return total / 1e9
