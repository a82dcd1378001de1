"""Download throughput: meshllm's fetch against plain huggingface_hub and plain httpx, side by side.

One local hub server (``meshllm.testing.hubserver``) serves one file of random bytes; each round fetches
it with the three clients in turn, the order rotating every round, each into a fresh folder:

- ``meshllm``: ``engine.download.fetch`` (file lock, HEAD, free-disk check, huggingface_hub download,
  sha256 of the whole file, atomic rename): what a node and ``meshllm download`` run;
- ``hf_hub``: ``huggingface_hub.hf_hub_download(local_dir=...)`` alone (no checksum);
- ``httpx``: one streamed GET written to disk in 1 MiB pieces (no resume, no checksum);
- ``ranges``: ``engine.ranges.HubRanges``, the client split participants fetch their tensors with (``Range``
  requests, the file's ETag pinned, retries that resume), here fetching the whole file in 64 MiB pieces
  written in place with ``pwrite`` and hashed (sha256) as they arrive, as ``engine.sparse`` does.

It prints MB/s per client (median of the rounds) and meshllm / each other, ranges / hf_hub (median of the
per-round ratios).
Usage: python bench/download.py [--size-mb 256] [--rounds 5] [--out results/download-....txt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from meshllm.engine.download import fetch, parse_reference
from meshllm.testing.hubserver import HubServer

REPO, FILE = "bench/bench-GGUF", "bench.gguf"


def write_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.write(b"GGUF")
        left = size - 4
        while left > 0:
            piece = os.urandom(min(left, 8 << 20))
            f.write(piece)
            left -= len(piece)
    return path


def via_meshllm(url: str, folder: Path) -> Path:
    ref = parse_reference(f"{url}/{REPO}/resolve/main/{FILE}")
    assert ref is not None
    return fetch(ref, folder)


def via_hf_hub(url: str, folder: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(REPO, FILE, local_dir=folder, endpoint=url))


def via_httpx(url: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FILE
    with httpx.stream("GET", f"{url}/{REPO}/resolve/main/{FILE}", timeout=60) as answer, target.open("wb") as f:
        answer.raise_for_status()
        for chunk in answer.iter_bytes(1 << 20):
            f.write(chunk)
    return target


def via_ranges(url: str, folder: Path) -> Path:
    import hashlib

    import anyio

    from meshllm.engine.download import HubFile
    from meshllm.engine.ranges import HubRanges

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FILE
    size = int(httpx.head(f"{url}/{REPO}/resolve/main/{FILE}", timeout=10).headers["content-length"])

    async def run() -> None:
        source = HubRanges(HubFile(REPO, FILE, endpoint=url))
        digest = hashlib.sha256()
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
            for start in range(0, size, 64 << 20):
                pos = start
                async for chunk in source.stream(start, min(64 << 20, size - start)):
                    os.pwrite(fd, chunk, pos)
                    digest.update(chunk)
                    pos += len(chunk)
        finally:
            os.close(fd)
            await source.aclose()

    anyio.run(run)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()
    clients: dict[str, Callable[[str, Path], Path]] = {"meshllm": via_meshllm, "hf_hub": via_hf_hub,
                                                       "httpx": via_httpx, "ranges": via_ranges}
    size = args.size_mb << 20
    rates: dict[str, list[float]] = {name: [] for name in clients}
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-dl-") as tmp, HubServer() as hub:
        root = Path(tmp)
        hub.add(REPO, FILE, write_file(root / "source.gguf", size))
        names = list(clients)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                folder = root / f"{name}-{round_}"
                start = time.perf_counter()
                got = clients[name](hub.url, folder)
                took = time.perf_counter() - start
                assert got.stat().st_size == size
                rates[name].append(size / took / 1e6)
                shutil.rmtree(folder)
    lines = [f"download throughput, {args.size_mb} MiB file, {args.rounds} rounds, local hub server "
             f"(meshllm.testing.hubserver), {os.cpu_count()} cores",
             f"{'client':<10}{'MB/s p50':>10}{'min':>8}{'max':>8}"]
    for name, values in rates.items():
        lines.append(f"{name:<10}{statistics.median(values):>10.1f}{min(values):>8.1f}{max(values):>8.1f}")
    for other in ("hf_hub", "httpx"):
        ratio = statistics.median(m / o for m, o in zip(rates["meshllm"], rates[other], strict=True))
        lines.append(f"meshllm / {other}: {ratio:.2f}x (median of per-round ratios)")
    ratio = statistics.median(r / o for r, o in zip(rates["ranges"], rates["hf_hub"], strict=True))
    lines.append(f"ranges / hf_hub: {ratio:.2f}x (median of per-round ratios)")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
