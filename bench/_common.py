"""Helpers the benchmarks share: percentiles, polling a node's JSON API, spotting stale connections."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["get_json", "percentile", "retryable"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def get_json(url: str) -> Any:
    """The JSON at ``url``, or None while the node is not answering yet."""
    try:
        response = httpx.get(url, timeout=2, trust_env=False)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def retryable(exc: httpx.HTTPError) -> bool:
    """A stale kept-alive connection: llama-server closed it (direct), or a proxy answered 503 for that."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 503
    return isinstance(exc, httpx.RemoteProtocolError)
