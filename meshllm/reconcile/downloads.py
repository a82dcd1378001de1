"""Model downloads of one node, run beside the controllers so a download never blocks a reconcile.

The served-model controller asks ``want(source)`` at each reconcile of a model whose files are missing
(``ModelNotFetched``); the first ask starts the download, every ask returns where it stands
(``FetchState``: bytes on disk, total, rate, or the error). A download is a child process,
``meshllm download --quiet SOURCE`` (``engine.download.fetch``: locked, resumable, checked), so a node that
stops kills it and a second node on the machine waits on the same file lock instead of fetching again.
Progress is read from the files on disk, whichever process writes them. A failed download is tried
again ``RETRY_FAILED`` seconds later (at the first ask after that), so a network outage heals by itself.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import anyio

from meshllm.engine.download import ModelReference, check_remote, local_bytes, progress_line
from meshllm.errors import MeshError
from meshllm.reconcile.background import BackgroundWork
from meshllm.reconcile.timing import Clock, SystemClock

__all__ = ["Downloads", "FetchState", "Fetcher"]

log = logging.getLogger(__name__)

RETRY_FAILED = 60.0  # seconds before a failed download is started again


@dataclass(frozen=True)
class FetchState:
    done: int = 0  # bytes on disk
    total: int = 0  # bytes of every file (0 until the hub answered)
    rate: float = 0.0  # bytes a second, lately
    finished: bool = False
    error: str = ""
    sampled_at: float = 0.0

    @property
    def message(self) -> str:
        return progress_line(self.done, self.total, self.rate)


class Fetcher(Protocol):
    """What the served-model controller needs of downloads (``Downloads``, or a fake in unit tests)."""

    def want(self, source: str, reference: ModelReference, *, retry: bool = True) -> FetchState:
        """Start fetching ``reference`` (``source`` as the user wrote it) unless under way; where it stands.
        ``retry``: start a failed download again after a while (else its error stays)."""
        ...


class Downloads(BackgroundWork):
    """Runs this node's downloads as child processes in its own task group (``run``)."""

    def __init__(self, *, folder: Path, clock: Clock | None = None) -> None:
        self.folder = folder
        self.clock = clock or SystemClock()
        self.states: dict[str, FetchState] = {}
        self._refs: dict[str, ModelReference] = {}
        super().__init__()

    def want(self, source: str, reference: ModelReference, *, retry: bool = True) -> FetchState:
        state = self.states.get(source)
        now = self.clock.monotonic()
        retry = retry and state is not None and state.error != "" and now - state.sampled_at >= RETRY_FAILED
        if state is None or retry or (state.finished and not state.error and not reference.present(self.folder)):
            if not self.running:
                return FetchState(error="this node is stopping; no download started")
            state = self.states[source] = FetchState(sampled_at=now, done=local_bytes(reference, self.folder))
            self._refs[source] = reference
            self.start(self._fetch, source, reference)
            return state
        if state.finished:
            return state
        done = local_bytes(reference, self.folder)
        if now - state.sampled_at >= 0.5:
            rate = max(0.0, (done - state.done) / (now - state.sampled_at))
            state = self.states[source] = replace(state, done=done, rate=rate, sampled_at=now)
        return state

    async def _fetch(self, source: str, reference: ModelReference) -> None:
        try:
            remote = await anyio.to_thread.run_sync(check_remote, reference)
            self.states[source] = replace(self.states[source], total=sum(r.size for r in remote))
            log.info("%s: downloading %s into %s", reference.name, source, self.folder)
            done = await anyio.run_process([sys.executable, "-m", "meshllm", "download", "--quiet", source],
                                           check=False)
            if done.returncode != 0:
                lines = done.stderr.decode(errors="replace").strip().splitlines() or ["the download failed"]
                raise MeshError(lines[-1].removeprefix("error: "))
        except MeshError as exc:
            log.warning("%s: download failed: %s", reference.name, exc)
            self.states[source] = replace(self.states[source], finished=True, error=str(exc),
                                          sampled_at=self.clock.monotonic())
            return
        log.info("%s: downloaded", reference.name)
        self.states[source] = replace(self.states[source], finished=True, done=self.states[source].total)
