"""Where a request for a model goes: a ready server, a wait (503), or nowhere (404).

The table is derived from the state document (desired models, observed servers, live nodes) and
rebuilt only when the document changes, so the per-request cost is a dictionary lookup. A server on
this node is preferred; otherwise the request goes to the remote node with the fewest requests in
flight from here. Every request holds a ``Lease`` on its route while it runs: the router counts
requests in flight here and nowhere else, and a lease is released exactly once however the request
ends. A model also answers to the other names of its file (``engine.models.canonical_name``).

An expert-sharded model (its leases have ``shards``) is routed by the request's session key instead
(``api.sessions``): rendezvous hashing over the nodes with a ready shard, so a conversation stays on one
node's KV cache, and a dead node's sessions move to the others as soon as its servers leave the table.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from meshllm.api.sessions import rendezvous
from meshllm.engine.models import canonical_name
from meshllm.state.document import MeshState
from meshllm.state.schema import ServerPhase, ServerStatus

__all__ = ["Lease", "Route", "Router", "Unavailable"]


@dataclass(frozen=True)
class Route:
    """A ready llama-server for the model: on this node at 127.0.0.1:``port``, or on a remote ``node``."""

    model: str
    node: str
    port: int = 0

    @property
    def local(self) -> bool:
        return self.port > 0


@dataclass(frozen=True)
class Unavailable:
    """The model is wanted but no server is ready for it yet."""

    model: str
    reason: str
    retry_after: float = 2.0


class Lease:
    """A request's hold on its route; ``release`` (or leaving the ``with`` block) ends it, once."""

    def __init__(self, router: Router, route: Route) -> None:
        self.router = router
        self.route = route
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.router._release(self.route)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass
class _Table:
    routes: dict[str, list[Route]] = field(default_factory=dict)
    waiting: dict[str, Unavailable] = field(default_factory=dict)
    sharded: set[str] = field(default_factory=set)  # models split by experts: routed by session


class Router:
    """Resolves a model name against this node's view of the mesh."""

    def __init__(self, state: MeshState, *, node_id: str) -> None:
        self.state = state
        self.node_id = node_id
        self._table: _Table | None = None
        self._subs = state.observe(self._invalidate)
        self.in_flight: dict[str, int] = {}

    def _invalidate(self) -> None:
        self._table = None

    def close(self) -> None:
        self.state.unobserve(self._subs)

    def _build(self) -> _Table:
        table = _Table()
        alive = self.state.alive_nodes()
        servers = [s for s in self.state.servers().values() if s.node in alive or s.node == self.node_id]
        for server in servers:
            if server.phase is not ServerPhase.READY:
                continue
            local = server.node == self.node_id
            route = Route(server.model, server.node, server.port if local else 0)
            table.routes.setdefault(server.model, []).append(route)
        for routes in table.routes.values():
            routes.sort(key=lambda r: (not r.local, r.node))
        table.sharded = {lease.model for lease in self.state.leases().values() if lease.shards}
        wanted = set(self.state.models()) | {s.model for s in servers}
        for model in wanted - set(table.routes):
            table.waiting[model] = Unavailable(model, _why_waiting(model, servers))
        return table

    def table(self) -> _Table:
        if self._table is None:
            self._table = self._build()
        return self._table

    def sharded(self, model: str) -> bool:
        """Whether ``model`` is split by experts (its requests are routed by session key)."""
        table = self.table()
        return model in table.sharded or canonical_name(model) in table.sharded

    def resolve(self, model: str, *, local_only: bool = False, session: str | None = None) -> Route | Unavailable | None:
        """Where to send a request for ``model``: local first, then the least busy remote; for an
        expert-sharded model with a ``session`` key, the shard that key hashes to."""
        table = self.table()
        if model not in table.routes and model not in table.waiting:
            model = canonical_name(model)
        routes = table.routes.get(model)
        if routes and session is not None and not local_only and model in table.sharded:
            chosen = rendezvous(session, (r.node for r in routes))
            return next(r for r in routes if r.node == chosen)
        if routes:
            if routes[0].local:
                return routes[0]
            if not local_only:
                return min(routes, key=lambda r: self.in_flight.get(r.node, 0))
            return Unavailable(model, f"model {model!r} is not served on this node")
        return table.waiting.get(model)

    def ready_models(self) -> list[str]:
        return sorted(self.table().routes)

    def lease(self, model: str, *, local_only: bool = False, session: str | None = None) -> Lease | Unavailable | None:
        """A lease on the route for ``model`` (counted in flight until released), the reason it must
        wait, or None when the mesh does not know the model."""
        target = self.resolve(model, local_only=local_only, session=session)
        if not isinstance(target, Route):
            return target
        self.in_flight[target.node] = self.in_flight.get(target.node, 0) + 1
        return Lease(self, target)

    def _release(self, route: Route) -> None:
        self.in_flight[route.node] = max(0, self.in_flight.get(route.node, 0) - 1)

    def unready_reason(self) -> str | None:
        """Why this node cannot serve any request now, or None when some model is ready."""
        table = self.table()
        if table.routes:
            return None
        if table.waiting:
            return "no model is ready yet: " + "; ".join(w.reason for w in sorted(
                table.waiting.values(), key=lambda w: w.model))
        return "no model is served on this node or anywhere in its mesh"


def _why_waiting(model: str, servers: Collection[ServerStatus]) -> str:
    mine = [s for s in servers if s.model == model]
    fetching = [s for s in mine if s.phase is ServerPhase.DOWNLOADING]
    if fetching:
        return f"model {model!r} is downloading ({fetching[0].message})"
    loading = [s for s in mine if s.phase is ServerPhase.LOADING]
    if loading:
        return f"model {model!r} is loading" + (f" ({loading[0].message})" if loading[0].message else "")
    failed = [s for s in mine if s.phase is ServerPhase.FAILED]
    if failed:
        return f"model {model!r} is not available: {failed[0].message}"
    return f"model {model!r} is waiting for a server"
