"""The blackboard's keeper: removes expired posts and those beyond the newest 500 on this replica,
and keeps a snapshot of the board for restarts.

Every node runs one. It wakes when the board changes and when its oldest post is due to expire,
waits a random moment (so the nodes of a mesh do not all delete the same post at once: the first
deletion reaches the others before their own is due, and theirs then finds nothing to do), plans
with ``state.board.plan_gc`` and removes. Removal is idempotent, so two nodes removing the same post
is harmless. The snapshot (``save``) is written at most every ``save_every`` seconds after a change.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from meshllm.state.board import MAX_ITEMS, Board, plan_gc

__all__ = ["BoardKeeper"]

log = logging.getLogger(__name__)


class BoardKeeper:
    def __init__(self, board: Board, *, clock: Callable[[], float] = time.time, cap: int = MAX_ITEMS,
                 jitter: float = 2.0, idle_check: float = 60.0, save: Callable[[bytes], None] | None = None,
                 save_every: float = 2.0, rng: random.Random | None = None) -> None:
        self.board = board
        self.clock = clock
        self.cap = cap
        self.jitter = jitter
        self.idle_check = idle_check
        self.save = save
        self.save_every = save_every
        self.rng = rng or random.Random()
        self.removed = 0
        self._changed = anyio.Event()
        self._dirty = save is not None  # write a first snapshot once started

    def collect(self) -> int:
        """Remove what ``plan_gc`` says is due now; returns how many posts went."""
        now = self.clock()
        ids = plan_gc(self.board.items(), now=now, cap=self.cap)
        removed = self.board.remove(ids, expired_before=now)
        self.removed += removed
        return removed

    def next_due(self) -> float:
        """Seconds until the next thing to do: an expiry, or a board over its cap (now)."""
        items = self.board.items()
        if len(items) > self.cap:
            return 0.0
        soonest = min((i.expires_at for i in items), default=None)
        if soonest is None:
            return self.idle_check
        return min(self.idle_check, max(0.0, soonest - self.clock()))

    def _on_change(self) -> None:
        self._dirty = self.save is not None
        self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        handle = self.board.observe(self._on_change)
        try:
            async with anyio.create_task_group() as tg:
                if self.save is not None:
                    tg.start_soon(self._save_loop)
                task_status.started()
                while True:
                    with anyio.move_on_after(self.next_due()):
                        await self._changed.wait()
                    self._changed = anyio.Event()
                    if self.next_due() > 0:
                        continue
                    await anyio.sleep(self.rng.uniform(0, self.jitter))
                    if removed := self.collect():
                        log.info("blackboard: removed %d expired or surplus posts", removed)
        finally:
            self.board.unobserve(handle)
            self._write_snapshot()

    async def _save_loop(self) -> None:
        while True:
            await anyio.sleep(self.save_every)
            if self._dirty and self.save is not None:
                self._dirty = False
                update = self.board.doc.get_update()  # here: the document belongs to the event loop's thread
                await anyio.to_thread.run_sync(self._save, self.save, update)

    def _write_snapshot(self) -> None:
        if self.save is not None and self._dirty:
            self._dirty = False
            self._save(self.save, self.board.doc.get_update())

    @staticmethod
    def _save(save: Callable[[bytes], None], update: bytes) -> None:
        try:
            save(update)
        except OSError as exc:
            log.warning("could not save the blackboard snapshot: %s", exc)
