"""Nothing lost when a server dies: the proxy moves a request to another server of its model.

A request the router leased to a server goes through ``Failover.serve``, which relays it (the
proxy's one response path, with the helpers of ``api.proxy``) and moves it when its server fails:

- **Before the response began** (the server cannot be reached, answered 502/503, or the path to
  it broke before the response head, as when a node dies with a non-streamed answer unfinished),
  the request goes, unchanged, to another ready server of the model: the client never hears of
  it. Only within ``FailoverPolicy.deadline`` seconds of the request's arrival. A request waiting
  on a node that has gone silent (``Silence``: nothing heard from it for ``silent_after`` s, where a
  live node is heard every second) moves then, without waiting for the transport to declare the
  node gone (seconds later, more on a loaded machine).
- **Mid-stream** (the server or its node dies after tokens were streamed), a tracker (``api.resume``;
  ``api.resume_messages`` for Anthropic's ``/v1/messages``) that followed the stream builds the
  request that carries the answer on, with what was produced appended, and the new server's events
  continue the client's stream. The tracker is used only
  where a second server exists when the request arrives; a request on a model's only server is
  relayed untouched, and ends with an error event (``api.proxy``) if that server dies.

A request for a model split by experts carries its session key (``api.sessions``): it moves to the
shard that key ranks next by rendezvous hashing, where its conversation goes once the dead node is
declared dead, so its KV cache builds up on one node.

Each request fails over at most ``max_failovers`` times and never back to a server that failed it;
a server that failed any request is avoided by the next ones for ``suspect_for`` seconds while
another is ready (a dead node stays in the router's table until membership declares it dead).
Every failover is logged and counted (``FailoverEvents``: ``/metrics`` on the node).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from starlette.types import Receive, Send

from meshllm.api.backends import Backend, BackendResponse, DataPlane, ProxyRequest, forwardable
from meshllm.api.errors import BackendUnavailable
from meshllm.api.endpoints import is_anthropic
from meshllm.api.proxy import cancel_on_disconnect, end_broken, send_error
from meshllm.api.resume import Tracker, tracker_for
from meshllm.api.routing import Lease, Route, Unavailable
from meshllm.state.schema import ModelName, NodeId

__all__ = ["Failover", "FailoverEvents", "FailoverPolicy", "Silence"]

log = logging.getLogger(__name__)

BEFORE_START = "before_start"
MID_STREAM = "mid_stream"


@dataclass(frozen=True, kw_only=True)
class FailoverPolicy:
    max_failovers: int = 3  # per request
    deadline: float = 120.0  # s after arrival within which a request not yet answered is re-sent
    suspect_for: float = 10.0  # s a server that failed a request is avoided while another is ready
    silent_after: float = 2.0  # s without a datagram from a serving node before its unanswered request moves


class FailoverEvents(Protocol):
    """Hears of failovers (``MeshMetrics`` counts them)."""

    def failed_over(self, model: ModelName, *, stage: str) -> None: ...

    def gave_up(self, model: ModelName, *, stage: str) -> None: ...


class Silence(Protocol):
    """Seconds since anything was heard from a node (None: no connection to it)."""

    def __call__(self, node: NodeId, /) -> float | None: ...


class _Suspects:
    """Servers that failed a request lately."""

    def __init__(self, hold: float, clock: Callable[[], float]) -> None:
        self.hold, self.clock = hold, clock
        self._until: dict[Route, float] = {}

    def note(self, route: Route) -> None:
        self._until[route] = self.clock() + self.hold

    def current(self) -> set[Route]:
        now = self.clock()
        for route in [r for r, until in self._until.items() if until <= now]:
            del self._until[route]
        return set(self._until)


class Failover:
    """Serves proxied requests with failover (one per OpenAI app, living as long as it)."""

    def __init__(self, plane: DataPlane, *, policy: FailoverPolicy | None = None,
                 events: FailoverEvents | None = None, silence: Silence | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plane = plane
        self.silence = silence
        self.policy = policy or FailoverPolicy()
        self.events = events
        self.clock = clock
        self.suspects = _Suspects(self.policy.suspect_for, clock)

    def lease(self, model: str | None, *, session: str | None = None) -> Lease | Unavailable | None:
        """The router's lease for a new request, away from suspect servers while another is ready
        (``session``: the request's key, for a model split by experts)."""
        suspects = self.suspects.current()
        if suspects:
            lease = self.plane.router.lease(model, avoid=suspects, session=session)
            if isinstance(lease, Lease):
                return lease
        return self.plane.router.lease(model, session=session)

    async def serve(self, lease: Lease, request: ProxyRequest, receive: Receive, send: Send, *, what: str,
                    session: str | None = None) -> None:
        """Relay ``request`` from the server ``lease`` holds, moving it when that server fails (``session``:
        the request's key for a model split by experts; it moves to the shard that key ranks next)."""
        exchange = _Exchange(self, lease, request, send, what, session)
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                await exchange.run()
            finally:
                tg.cancel_scope.cancel()
                exchange.lease.release()


class _Broke(Exception):
    """The response broke after it began (``cause`` says how)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Exchange:
    """One request across the servers that answer it."""

    def __init__(self, owner: Failover, lease: Lease, request: ProxyRequest, send: Send, what: str,
                 session: str | None) -> None:
        self.owner, self.lease, self.request, self.send, self.what = owner, lease, request, send, what
        self.session = session
        self.model = lease.route.model
        self.started = owner.clock()
        self.tried: set[Route] = set()
        self.failovers = 0
        self.head_sent = False
        self.streaming = False
        self.last = b"\n\n"
        self.anthropic = is_anthropic(request.path)
        several = len(owner.plane.router.routes(self.model)) > 1
        self.tracker: Tracker | None = tracker_for(request.path, request.body) if several else None
        self.body = self.tracker.first_body() if self.tracker is not None else request.body

    async def run(self) -> None:
        while True:
            try:
                await self._attempt()
                return
            except BackendUnavailable as exc:
                if await self._move(exc, BEFORE_START):
                    continue
                if self.head_sent:  # a continuation found no server: the stream ends with an error event
                    await self._end_broken(exc)
                else:
                    await send_error(self.send, exc.status, str(exc), code=exc.code, retry_after=exc.retry_after,
                                     anthropic=is_anthropic(self.request.path))
                return
            except _Broke as broke:
                if not await self._move(broke.cause, MID_STREAM):
                    await self._end_broken(broke.cause)
                    return

    async def _attempt(self) -> None:
        backend = self.owner.plane.backend(self.lease.route)
        headers = self.request.headers
        request = ProxyRequest(self.request.method, self.request.path, self.request.query, headers, self.body)
        response = await self._send(backend, request)
        try:
            if response.status_code in (502, 503) and self._has_another():
                raise BackendUnavailable(f"{self.what}: the server answered {response.status_code}",
                                         status=response.status_code)
            if self.head_sent and response.status_code != 200:
                raise _Broke(BackendUnavailable(f"the continuation was answered {response.status_code}: "
                                                f"{(await _read_some(response))!r}"))
            await self._relay(response)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _send(self, backend: Backend, request: ProxyRequest) -> BackendResponse:
        """``backend.send``; given up (``BackendUnavailable``) when the serving node falls silent
        before it answers, which a dead node does seconds before the transport declares it gone."""
        silence, node = self.owner.silence, self.lease.route.node
        if silence is None or self.lease.route.local:
            return await backend.send(request)
        limit, silent = self.owner.policy.silent_after, False
        response: BackendResponse | None = None

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal silent
            while True:
                await anyio.sleep(limit / 8)
                quiet = silence(node)
                if quiet is not None and quiet > limit:
                    silent = True
                    scope.cancel()

        failure: BackendUnavailable | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            try:
                response = await backend.send(request)
            except BackendUnavailable as exc:  # raised out of the task group it would come wrapped in a group
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None and not silent:
            raise failure
        if silent or response is None:
            if response is not None:
                await response.aclose()
            raise BackendUnavailable(f"node {node} has been silent for over {limit:.1f}s")
        return response

    async def _relay(self, response: BackendResponse) -> None:
        if not self.head_sent:
            await self._send_head(response)
        tracker = self.tracker
        if tracker is not None:
            tracker.begin_segment()
        chunks = aiter(response)
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except Exception as exc:  # whatever broke the upstream, the client must not take this for a whole answer
                raise _Broke(exc) from exc
            out = tracker.feed(chunk) if tracker is not None else chunk
            if out:
                await self.send({"type": "http.response.body", "body": out, "more_body": True})
                self.last = out
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_head(self, response: BackendResponse) -> None:
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in forwardable(response.headers)]
        if self.tracker is None:
            headers += [(b"content-length", v.encode("latin-1")) for k, v in response.headers
                        if k.lower() == "content-length"]
        await self.send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        self.head_sent = True
        self.streaming = any(k.lower() == "content-type" and v.startswith("text/event-stream")
                             for k, v in response.headers)

    def _has_another(self) -> bool:
        route = self.owner.plane.router.resolve(self.model, avoid=self.tried | {self.lease.route})
        return isinstance(route, Route) and self.failovers < self.owner.policy.max_failovers

    def _another(self) -> Lease | None:
        """A lease on another server of the model (not one that failed this request)."""
        avoid = self.tried | {self.lease.route}
        suspects = self.owner.suspects.current() - avoid
        for extra in ((suspects,) if suspects else ()) + (set(),):
            lease = self.owner.plane.router.lease(self.model, avoid=avoid | extra, session=self.session)
            if isinstance(lease, Lease):
                return lease
        return None

    async def _move(self, cause: Exception, stage: str) -> bool:
        """Move the request to another server; False when it cannot be moved (the caller answers)."""
        policy, events = self.owner.policy, self.owner.events
        failed = self.lease.route
        self.owner.suspects.note(failed)
        if stage == BEFORE_START and self.head_sent:
            stage = MID_STREAM
        body = self._next_body(stage)
        late = stage == BEFORE_START and self.owner.clock() - self.started > policy.deadline
        lease = None if body is None or late or self.failovers >= policy.max_failovers else self._another()
        if lease is None or body is None:
            log.warning("%s: %s; no failover (%d done, %s)", self.what, cause, self.failovers,
                        "no other server ready" if body is not None and not late else "cannot continue")
            if events is not None:
                events.gave_up(self.model, stage=stage)
            return False
        self.failovers += 1
        self.tried.add(failed)
        self.lease.release()
        self.lease = lease
        self.body = body
        where = "this node" if lease.route.local else f"node {lease.route.node}"
        log.warning("%s: %s; failover %d/%d (%s) to %s", self.what, cause, self.failovers, policy.max_failovers,
                    stage, where)
        self.what = f"{self.request.path} {self.model} via {where}"
        if events is not None:
            events.failed_over(self.model, stage=stage)
        return True

    def _next_body(self, stage: str) -> bytes | None:
        if stage == BEFORE_START:
            return self.body
        if self.tracker is None:
            return None
        return self.tracker.resume_body()

    async def _end_broken(self, cause: Exception) -> None:
        tracker = self.tracker
        if tracker is not None and tracker.done:  # the answer was whole: only its tail ([DONE]) was missing
            await self.send({"type": "http.response.body", "body": tracker.done_tail, "more_body": False})
            return
        await end_broken(self.send, self.what, cause, self.last, event_stream=self.streaming,
                         anthropic=self.anthropic)


async def _read_some(response: BackendResponse) -> bytes:
    out = b""
    async for chunk in response:
        out += chunk
        if len(out) > 512:
            break
    try:
        return json.dumps(json.loads(out)).encode()[:512]
    except ValueError:
        return out[:512]
