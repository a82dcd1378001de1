"""A sparse copy of a GGUF file: its header and only the tensors one split participant holds.

ggml-rpc-server with ``--gguf`` (patch 0003) indexes the tensors from the header and reads each one
it is offered at the header's offset; llama-server reads its own layers from its file the same way.
Neither reads a tensor nobody asks for, so a file of the full size with the header and those tensors
written in place, holes elsewhere (``ftruncate``; a hole takes no disk), serves as well as the whole
file. ``SparseCopy.fill`` fetches what is missing from ``RangeSource``s (HTTP ``Range`` from the hub,
or a peer's copy over the mesh), tried in order, one request per run of neighbouring tensors, and
checks each tensor as its bytes stream in against the mesh's table of hashes (``engine.tensors``):
a tensor that differs fails the fill with its name, and is never recorded as held.

Held tensors are recorded beside the file (``FILE.tensors.json``, with the header's fingerprint), so
an interrupted fill resumes where it stopped and a later, larger share fetches only what it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import anyio

from meshllm.engine.tensors import HASH_DIGITS, NeedMore, TensorInfo, TensorTable, masked_header, parse_table, runs
from meshllm.errors import ModelError

__all__ = ["RangeSource", "RangeSourceError", "SparseCopy", "allocated_bytes", "read_table"]


FIRST_READ = 256 << 10  # bytes asked first for a header; more when it is longer (a big vocabulary)


class RangeSourceError(ModelError):
    """A source could not deliver a range (unreachable, refused, cut short): the next one is tried."""


class RangeSource(Protocol):
    """Where bytes of the model file come from."""

    name: str  # for messages: "the hub", "node abc123"

    def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """The bytes ``[offset, offset + length)`` in order; ``RangeSourceError`` when it cannot."""
        ...


async def _read(source: RangeSource, offset: int, length: int) -> bytes:
    return b"".join([chunk async for chunk in source.stream(offset, length)])


async def read_table(sources: Sequence[RangeSource], size: int) -> tuple[TensorTable, bytes]:
    """The tensor table and header bytes of the file, from the first source that answers."""
    problems = []
    for source in sources:
        want = min(size, FIRST_READ)
        try:
            while True:
                head = await _read(source, 0, want)
                try:
                    table = parse_table(head, size)
                    return table, head[:table.data_offset]
                except NeedMore as more:
                    if want >= size:
                        raise ModelError("the GGUF header runs past the end of the file") from None
                    want = min(size, max(more.size, 2 * want))
        except RangeSourceError as exc:
            problems.append(f"{source.name}: {exc}")
    raise RangeSourceError("no source gave the GGUF header: " + ("; ".join(problems) or "no source"))


def allocated_bytes(path: Path) -> int:
    """Disk a file takes (its allocated blocks), not its apparent size."""
    return path.stat().st_blocks * 512


class SparseCopy:
    """``path``: the copy; ``table``: the file's tensors (from its header)."""

    def __init__(self, path: Path, table: TensorTable) -> None:
        self.path = path
        self.table = table
        self.record = path.with_name(path.name + ".tensors.json")
        self.fetched = 0  # bytes received by this fill
        self.fetched_before = 0  # by earlier fills of this copy (from the record)

    def held(self) -> set[str]:
        """Tensors written and checked, as recorded (none when the record is of another file)."""
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return set()
        if not isinstance(data, dict) or data.get("fingerprint") != self.table.fingerprint or not self.path.is_file():
            return set()
        self.fetched_before = int(data.get("fetched", 0))
        return {str(name) for name in data.get("tensors", [])}

    def _save(self, held: set[str]) -> None:
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.table.fingerprint, "tensors": sorted(held),
                                   "fetched": self.fetched_before + self.fetched}))
        os.replace(tmp, self.record)

    async def fill(self, header: bytes, tensors: Sequence[TensorInfo], sources: Sequence[RangeSource], *,
                   hashes: Mapping[str, str], progress: Callable[[int], None] | None = None,
                   only_these: bool = False) -> None:
        """Make the copy hold ``header`` and ``tensors``, fetching the missing ones from ``sources``;
        each is checked against ``hashes`` (when the mesh has them: else the source vouches for it).
        ``only_these``: the header names no other tensor (``masked_header``: for a worker, whose
        ggml-rpc-server then refuses an offer of a tensor it lacks rather than read a hole)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        held = self.held()
        if not held:
            self.record.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self.table.size)
            keep = {t.name for t in tensors}
            os.pwrite(fd, masked_header(header, self.table, keep) if only_these else header, 0)
            order = list(sources)  # a source that failed goes last for the next runs
            for start, length, inside in runs(t for t in tensors if t.name not in held):
                await self._run(fd, start, length, inside, order, hashes, progress)
                held |= {t.name for t in inside}
                self._save(held)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def _run(self, fd: int, start: int, length: int, tensors: list[TensorInfo], sources: list[RangeSource],
                   hashes: Mapping[str, str], progress: Callable[[int], None] | None) -> None:
        problems = []
        for source in list(sources):
            check = _Checker(tensors, hashes, where=source.name)
            pos = start
            try:
                async for chunk in source.stream(start, length):
                    await anyio.to_thread.run_sync(_absorb, fd, chunk, pos, check)
                    pos += len(chunk)
                    self.fetched += len(chunk)
                    if progress is not None:
                        progress(self.fetched)
                if pos != start + length:
                    raise RangeSourceError(f"sent {pos - start} of {length} bytes")
                check.finish()
                return
            except RangeSourceError as exc:
                problems.append(f"{source.name}: {exc}")
                sources.remove(source)
                sources.append(source)
        raise RangeSourceError(f"bytes {start}-{start + length - 1} ({tensors[0].name}...): " + "; ".join(problems))


def _absorb(fd: int, chunk: bytes, pos: int, check: _Checker) -> None:
    os.pwrite(fd, chunk, pos)
    check.update(chunk, pos)


class _Checker:
    """Hashes the tensors of a run as its bytes go by; a tensor that differs from ``hashes`` raises."""

    def __init__(self, tensors: list[TensorInfo], hashes: Mapping[str, str], *, where: str) -> None:
        self.tensors, self.hashes, self.where = tensors, hashes, where
        self.index = 0
        self.digest = hashlib.sha256()

    def update(self, chunk: bytes, pos: int) -> None:
        view, end = memoryview(chunk), pos + len(chunk)
        while self.index < len(self.tensors) and self.tensors[self.index].offset <= end:
            t = self.tensors[self.index]
            lo, hi = max(t.offset, pos), min(t.end, end)
            if hi > lo:
                self.digest.update(view[lo - pos:hi - pos])
            if t.end > end:
                return
            self._check(t, self.digest.hexdigest()[:HASH_DIGITS])
            self.index += 1
            self.digest = hashlib.sha256()

    def _check(self, t: TensorInfo, digest: str) -> None:
        if not self.hashes:
            return  # no node has held the whole file: the hub vouches for its bytes (its ETag is pinned)
        expected = self.hashes.get(t.name)
        if expected is None:
            raise ModelError(f"tensor {t.name} is not in the mesh's tensor table")
        if digest != expected:
            raise ModelError(f"tensor {t.name} from {self.where} differs from the mesh's copy (sha256 "
                             f"{digest[:12]}..., expected {expected[:12]}...); it is not used")

    def finish(self) -> None:
        if self.index < len(self.tensors):
            raise RangeSourceError(f"the range ended inside tensor {self.tensors[self.index].name}")
