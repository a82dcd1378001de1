"""The controller runtime: every reconciler of a node is a ``Controller`` run by one ``Runner``.

A controller is level-triggered and keyed (a model name, for every controller here). For a key it
reads the *desired* state and the *actual* state, asks its pure ``plan(desired, actual, now)`` what to
do, and ``apply``s each action in order (stops come before starts in every plan). It never acts on an
event's payload: events only say which keys to look at again.

The runner owns everything around that:
- one ``WorkQueue`` of ``(controller, key)`` pairs: one reconcile per key at a time, adds coalesced;
- the watches: each document change carries the ``(table, key)`` pairs it touched (``Changed``), and
  each change of a process the ``Supervisor`` runs arrives as ``Changed("processes", key)``; every
  controller maps them to its own keys (``keys_for``). A slow periodic resync (``RESYNC``) enqueues every
  key of every controller, for what time alone changes (TTLs) and anything an event missed;
- one ``Backoff`` with jitter for failed reconciles; ``TerminalError`` is logged and not retried
  (until the next change or resync of the key);
- shutdown: ``stop()`` (or cancelling ``run``) stops the queue, then calls every controller's
  ``shutdown`` in the order given (the served models' llama-servers before the split workers they use).

A reconcile's requeue time is the earliest of the delays its actions' ``apply`` returned (a crashed
server's backoff, a load timeout to check, ...); None from all: nothing until an event.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from meshllm.reconcile.queue import Result, WorkQueue
from meshllm.reconcile.supervisor import PROCESSES, Supervisor
from meshllm.reconcile.timing import Backoff, Clock, SystemClock
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import ModelName

__all__ = ["RESYNC", "Controller", "Runner"]

log = logging.getLogger(__name__)

RESYNC = 5.0  # seconds between two reconciles of every key with no event between

D = TypeVar("D")
A = TypeVar("A")
X = TypeVar("X")


class Controller(Protocol[D, A, X]):
    """One kind of resource made to match the document, key by key."""

    name: str

    def keys(self) -> Iterable[ModelName]:
        """Every key the controller has an interest in now (at start and at each resync)."""
        ...

    def keys_for(self, change: Changed) -> Iterable[ModelName]:
        """The keys a change of the document (or of a process: table ``processes``) touches."""
        ...

    async def desired(self, key: ModelName) -> D:
        """What the document wants for ``key``."""
        ...

    async def actual(self, key: ModelName, desired: D, now: float) -> A:
        """What is, for ``key`` (read after ``desired``, which says what is worth looking at)."""
        ...

    def plan(self, desired: D, actual: A, now: float) -> Sequence[X]:
        """What to do, stops before starts. Pure."""
        ...

    async def apply(self, key: ModelName, action: X, now: float) -> float | None:
        """Carry out one action; a delay in seconds after which the key wants another look, or None."""
        ...

    async def shutdown(self) -> None:
        """Stop what the controller runs and withdraw what it published (the node is stopping)."""
        ...


class Runner:
    """Runs controllers on one work queue (see the module docstring)."""

    def __init__(self, state: MeshState, controllers: Sequence[Controller[Any, Any, Any]], *,
                 supervisor: Supervisor | None = None, clock: Clock | None = None, backoff: Backoff | None = None,
                 resync: float = RESYNC) -> None:
        self.state = state
        self.controllers = list(controllers)
        self._by_name = {controller.name: controller for controller in self.controllers}
        if len(self._by_name) != len(self.controllers):
            raise ValueError("controllers need distinct names")
        self.supervisor = supervisor
        self.clock = clock or SystemClock()
        self.resync = resync
        self.queue: WorkQueue[tuple[str, ModelName]] = WorkQueue(self._reconcile, name="runner", backoff=backoff,
                                                           clock=self.clock)
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        watch = self.state.observe_changes(self._on_changes)
        processes = self.supervisor.subscribe(self._on_process) if self.supervisor is not None else None
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as tg:
                    await tg.start(self.queue.run)
                    self._enqueue_all()
                    tg.start_soon(self._resync)
                    task_status.started()
        finally:
            self.state.unobserve(watch)
            if processes is not None and self.supervisor is not None:
                self.supervisor.unsubscribe(processes)
            with anyio.CancelScope(shield=True):
                await self._shutdown()

    async def stop(self) -> None:
        """Stop reconciling, shut every controller down, and return when that is done."""
        if self._scope is None:
            return
        self._scope.cancel()
        await self._stopped.wait()

    async def idle(self) -> None:
        """Return once nothing is due now (tests: let a fake clock's step play out)."""
        await self.queue.idle()

    async def _shutdown(self) -> None:
        for controller in self.controllers:
            try:
                await controller.shutdown()
            except Exception:
                log.exception("%s: shutdown failed", controller.name)
        self._stopped.set()

    # -- events -------------------------------------------------------------------------------
    def _enqueue_all(self) -> None:
        for controller in self.controllers:
            for key in controller.keys():
                self.queue.add((controller.name, key))

    def _on_changes(self, changes: list[Changed]) -> None:
        for controller in self.controllers:
            try:
                keys = {key for change in changes for key in controller.keys_for(change)}
            except Exception:  # an observer must not raise: look at everything instead
                log.exception("%s: keys_for failed", controller.name)
                keys = set(controller.keys())
            for key in keys:
                self.queue.add((controller.name, key))

    def _on_process(self, key: str) -> None:
        self._on_changes([Changed(PROCESSES, key)])

    async def _resync(self) -> None:
        while True:
            await self.clock.sleep(self.resync)
            self._enqueue_all()

    # -- one reconcile ------------------------------------------------------------------------
    async def _reconcile(self, item: tuple[str, ModelName]) -> Result:
        name, key = item
        controller = self._by_name[name]
        now = self.clock.now()
        desired = await controller.desired(key)
        actual = await controller.actual(key, desired, now)
        actions = controller.plan(desired, actual, now)
        delays = []
        for action in actions:
            log.debug("%s: %s: %s", controller.name, key, action)
            delay = await controller.apply(key, action, now)
            if delay is not None:
                delays.append(max(0.0, delay))
        return Result(requeue_after=min(delays) if delays else None)
