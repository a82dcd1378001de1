"""A fake clock and a fake process supervisor, so that controllers run in unit tests without processes
or waiting.

``FakeClock`` only moves when a test calls ``advance``: sleepers whose time has come then wake.
``FakeSupervisor`` implements ``reconcile.supervisor.Supervisor`` with processes that exist only as
views: a test makes them ready (``ready``), crash (``crash``), or finds one left running by a previous
run of the node (``left_running``), and reads what runs (``running``). Stops end at once unless
``slow_stops`` is set (then ``finish_stop`` ends them), so a test can watch a stop come before a start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import anyio

from meshllm.reconcile.supervisor import (
    LaunchSpec, ProcessPhase, ProcessView, ReadyCheck, exit_message,
)

__all__ = ["FakeClock", "FakeSupervisor"]

EPOCH = 1_700_000_000.0  # what the fake clock's now() reads at monotonic 0


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, *, start: float = 0.0) -> None:
        self._t = start
        self._sleepers: list[tuple[float, anyio.Event]] = []
        self._woken = 0  # sleepers woken by ``advance`` that have not run on yet

    def now(self) -> float:
        return EPOCH + self._t

    def monotonic(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        entry = (self._t + seconds, anyio.Event())
        self._sleepers.append(entry)
        try:
            await entry[1].wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)  # cancelled before its time
            else:
                self._woken -= 1

    def advance(self, seconds: float) -> None:
        """Move the time on by ``seconds`` and wake every sleeper whose time has come."""
        self._t += seconds
        for entry in list(self._sleepers):
            if entry[0] <= self._t:
                self._sleepers.remove(entry)
                self._woken += 1
                entry[1].set()

    async def woken(self) -> None:
        """Return once every sleeper ``advance`` woke has run on to its next wait."""
        while self._woken:
            await anyio.sleep(0)

    @property
    def next_wakeup(self) -> float:
        """The monotonic time the earliest sleeper waits for (inf: none sleeps)."""
        return min((deadline for deadline, _ in self._sleepers), default=math.inf)


class FakeSupervisor:
    """Processes as views only; see the module docstring."""

    def __init__(self, *, clock: FakeClock, slow_stops: bool = False) -> None:
        self.clock = clock
        self.slow_stops = slow_stops
        self._views: dict[str, ProcessView] = {}
        self._listeners: dict[int, Callable[[str], None]] = {}
        self._next_listener = 0
        self._next_pid = 1000
        self.launched: list[LaunchSpec] = []  # every launch, oldest first (for reading argv, not counting)

    # -- what tests do ----------------------------------------------------------------------
    def running(self) -> dict[str, ProcessView]:
        """The processes that run now (starting, ready or stopping), by key."""
        return {key: view for key, view in self._views.items() if view.phase is not ProcessPhase.EXITED}

    def ready(self, key: str) -> None:
        """The process of ``key`` passes its readiness check."""
        view = self._views[key]
        assert view.phase is ProcessPhase.STARTING and view.claimed, view
        self._set(replace(view, phase=ProcessPhase.READY, ready_at=self.clock.now()))

    def crash(self, key: str, *, code: int = 1) -> None:
        """The process of ``key`` ends on its own."""
        view = self._views[key]
        assert view.phase is not ProcessPhase.EXITED, view
        self._exit(view, code)

    def finish_stop(self, key: str) -> None:
        """A stopping process (``slow_stops``) ends."""
        view = self._views[key]
        assert view.phase is ProcessPhase.STOPPING, view
        self._exit(view, -15)

    def left_running(self, key: str, argv: Sequence[str], *, port: int, argv_hash: str, pid: int = 0,
                     started_at: float | None = None) -> ProcessView:
        """A process a previous run of the node started and recorded, found running at start."""
        view = ProcessView(key=key, pid=pid or self._pid(), port=port, argv=tuple(argv), argv_hash=argv_hash,
                           log_path=Path(f"/fake/{key}.log"), started_at=started_at or self.clock.now(),
                           seen_at=self.clock.now(), phase=ProcessPhase.STARTING, adopted=True, claimed=False)
        self._views[key] = view
        return view

    # -- the Supervisor protocol ------------------------------------------------------------
    def get(self, key: str) -> ProcessView | None:
        return self._views.get(key)

    def keys(self) -> set[str]:
        return set(self._views)

    def pick_port(self, seed: str, *, host: str = "127.0.0.1") -> int:
        taken = {v.port for v in self._views.values() if v.phase is not ProcessPhase.EXITED}
        port = 41000 + sum(seed.encode()) % 1000
        while port in taken:
            port += 1
        return port

    async def launch(self, spec: LaunchSpec) -> ProcessView:
        current = self._views.get(spec.key)
        assert current is None or current.phase is ProcessPhase.EXITED, f"{spec.key} runs already: {current}"
        self.launched.append(spec)
        view = ProcessView(key=spec.key, pid=self._pid(), port=spec.port, argv=spec.argv,
                           argv_hash=spec.argv_hash, log_path=spec.log_path, started_at=self.clock.now(),
                           seen_at=self.clock.now(), phase=ProcessPhase.STARTING)
        self._set(view)
        return view

    def claim(self, key: str, ready: ReadyCheck) -> None:
        view = self._views.get(key)
        if view is not None and view.running and not view.claimed:
            self._set(replace(view, claimed=True))

    def stop(self, key: str, *, reason: str) -> None:
        view = self._views.get(key)
        if view is None or not view.running:
            return
        self._set(replace(view, phase=ProcessPhase.STOPPING, stop_reason=reason))
        if not self.slow_stops:
            self.finish_stop(key)

    async def halt(self, key: str, *, reason: str) -> ProcessView | None:
        view = self._views.get(key)
        if view is not None and view.running:
            self._set(replace(view, phase=ProcessPhase.STOPPING, stop_reason=reason))
        view = self._views.get(key)
        if view is not None and view.phase is ProcessPhase.STOPPING:
            self._exit(view, -15)
        return self._views.get(key)

    async def forget(self, key: str) -> None:
        view = self._views.get(key)
        if view is not None and view.phase is ProcessPhase.EXITED:
            del self._views[key]

    def subscribe(self, listener: Callable[[str], None]) -> int:
        self._next_listener += 1
        self._listeners[self._next_listener] = listener
        return self._next_listener

    def unsubscribe(self, handle: int) -> None:
        self._listeners.pop(handle, None)

    # -- inside -----------------------------------------------------------------------------
    def _pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def _exit(self, view: ProcessView, code: int) -> None:
        self._set(replace(view, phase=ProcessPhase.EXITED, exit_code=code, exited_at=self.clock.now(),
                          message=exit_message(view, code)))

    def _set(self, view: ProcessView) -> None:
        self._views[view.key] = view
        for listener in list(self._listeners.values()):
            listener(view.key)
