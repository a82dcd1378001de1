"""``/api/events``: the console's live feed, a server-sent event stream of what ``/api/status`` says.

A client first gets a ``snapshot`` event (the whole status), then ``change`` events that say what
differs from the previous state, then more of them as the mesh changes, with a ``: keepalive`` comment
when nothing happened for a while (proxies and browsers drop silent streams). Every event has an id
``EPOCH-SEQ``; a client that reconnects with ``Last-Event-ID`` gets the changes it missed, from a
history of the last few hundred, or a fresh snapshot when they are gone (or the node restarted: a new
epoch).

Cost: one ``EventHub`` per node computes the status at most every ``interval`` seconds after the
state document changed (and every ``tick`` seconds, for throughput figures), diffs it against the last
one and encodes the event once, whatever the number of clients; with no client for ``linger``
seconds it does nothing at all. Each client has a bounded queue; a
client that does not read (a stalled tab, a slow link) overflows it, loses its queue and is sent a
fresh snapshot when it reads again: the node never waits for a client and holds at most
``client_buffer`` events per client.

A change event's data: ``{"set": {key: value}, "put": {"nodes"|"models": [entry]}, "removed":
{"nodes"|"models": [id or name]}}``; ``nodes`` entries are keyed by ``id``, ``models`` by ``name``, and
every other top-level key of the status is replaced whole.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

__all__ = ["EventHub", "SseEvent", "diff_status"]

_KEYED = {"nodes": "id", "models": "name"}


def diff_status(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What changed from ``old`` to ``new`` (both ``/api/status`` bodies); empty when nothing did."""
    change: dict[str, Any] = {}
    for key in sorted(old.keys() | new.keys()):
        if key in _KEYED:
            ident = _KEYED[key]
            before = {e[ident]: e for e in old.get(key, [])}
            after = {e[ident]: e for e in new.get(key, [])}
            put = [entry for name, entry in after.items() if before.get(name) != entry]
            gone = sorted(set(before) - set(after))
            if put:
                change.setdefault("put", {})[key] = put
            if gone:
                change.setdefault("removed", {})[key] = gone
        elif old.get(key) != new.get(key):
            change.setdefault("set", {})[key] = new.get(key)
    return change


@dataclass(frozen=True)
class SseEvent:
    """One event as sent: its id, its name and its data encoded once for every client."""

    id: str
    name: str
    data: dict[str, Any]
    wire: bytes = field(repr=False)

    @classmethod
    def make(cls, ident: str, name: str, data: dict[str, Any]) -> SseEvent:
        body = json.dumps(data, separators=(",", ":"))
        return cls(ident, name, data, f"id: {ident}\nevent: {name}\ndata: {body}\n\n".encode())


@dataclass(eq=False)
class _Client:
    queue: deque[SseEvent]
    wake: anyio.Event
    resync: bool = False


class EventHub:
    """The node's event feed: turns state changes into snapshot and change events for SSE clients."""

    def __init__(self, status: Callable[[], dict[str, Any]], *, history: int = 256, client_buffer: int = 64,
                 interval: float = 0.25, tick: float = 2.0, keepalive: float = 15.0, linger: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.status = status
        self.linger, self.clock = linger, clock
        self._last_client = clock()
        self.epoch = secrets.token_hex(4)
        self.interval, self.tick, self.keepalive = interval, tick, keepalive
        self.client_buffer = client_buffer
        self.history: deque[SseEvent] = deque(maxlen=history)
        self.seq = 0
        self.current: dict[str, Any] | None = None
        self._snapshot: SseEvent | None = None
        self._clients: set[_Client] = set()
        self._dirty = anyio.Event()
        self.closed = False
        self.published = 0  # events made (not counting snapshots); the bench reads it

    # -- producing ------------------------------------------------------------------------------
    def notify(self) -> None:
        """Something changed (a state document observer); the next refresh happens soon. Never raises."""
        self._dirty.set()

    def refresh(self) -> SseEvent | None:
        """Compute the status now; publish a change event when it differs from the last one.
        With no client for ``linger`` seconds it computes nothing and forgets its history (a client
        that comes back later gets a snapshot): a node nobody watches pays nothing for the feed."""
        if self._clients:
            self._last_client = self.clock()
        elif self.clock() - self._last_client > self.linger:
            if self.current is not None:
                self.current = None
                self.history.clear()
                self.seq += 1  # ids from before the gap name changes nobody kept
            return None
        new = self.status()
        old, self.current = self.current, new
        if old is None:
            return None
        change = diff_status(old, new)
        if not change:
            return None
        self.seq += 1
        self.published += 1
        event = SseEvent.make(f"{self.epoch}-{self.seq}", "change", change)
        self.history.append(event)
        for client in self._clients:
            if client.resync:
                continue
            if len(client.queue) >= self.client_buffer:
                client.queue.clear()  # it does not keep up: drop what it missed, send a snapshot instead
                client.resync = True
            else:
                client.queue.append(event)
            client.wake.set()
        return event

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refresh after each change (coalesced over ``interval``) and every ``tick`` seconds."""
        self.refresh()
        task_status.started()
        while True:
            with anyio.move_on_after(self.tick):
                await self._dirty.wait()
            self._dirty = anyio.Event()
            self.refresh()
            await anyio.sleep(self.interval)

    def snapshot(self) -> SseEvent:
        """The whole status as an event (its id is the last change's: changes after it follow)."""
        if self.current is None:
            self.current = self.status()
        ident = f"{self.epoch}-{self.seq}"
        if self._snapshot is None or self._snapshot.id != ident:
            self._snapshot = SseEvent.make(ident, "snapshot", self.current)
        return self._snapshot

    def close(self) -> None:
        """End every client's stream now (the node stops: its HTTP server need not wait for them)."""
        self.closed = True
        for client in self._clients:
            client.wake.set()

    # -- consuming ------------------------------------------------------------------------------
    def missed(self, last_id: str) -> list[SseEvent] | None:
        """The events after ``last_id``, or None when they are not all in the history any more."""
        epoch, _, seq = last_id.partition("-")
        if epoch != self.epoch or not seq.isdigit() or int(seq) > self.seq:
            return None
        after = [e for e in self.history if int(e.id.partition("-")[2]) > int(seq)]
        if len(after) != self.seq - int(seq):
            return None
        return after

    async def events(self, last_id: str = "") -> AsyncIterator[bytes]:
        """One client's stream: a snapshot (or what it missed), then changes and keepalives."""
        client = _Client(deque(), anyio.Event())
        self._clients.add(client)
        self._last_client = self.clock()
        try:
            yield f"retry: 2000\n: meshllm events, {len(self._clients)} clients\n\n".encode()
            missed = self.missed(last_id) if last_id else None
            for event in missed if missed is not None else [self.snapshot()]:
                yield event.wire
            while not self.closed:
                with anyio.move_on_after(self.keepalive):
                    await client.wake.wait()
                client.wake = anyio.Event()
                if self.closed:
                    return
                if client.resync:
                    client.resync = False
                    yield self.snapshot().wire
                    continue
                if not client.queue:
                    yield b": keepalive\n\n"
                while client.queue:
                    yield client.queue.popleft().wire
        finally:
            self._clients.discard(client)
            self._last_client = self.clock()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def routes(self) -> list[Route]:
        async def stream(request: Request) -> StreamingResponse:
            last = request.headers.get("last-event-id") or request.query_params.get("last_event_id", "")
            return StreamingResponse(self.events(last), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

        return [Route("/api/events", stream, methods=["GET"])]
