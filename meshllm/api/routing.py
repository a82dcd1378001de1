"""Where a request for a model goes: a ready server, a wait (503), or nowhere (404).

The table is derived from the state document (desired models, observed servers, live nodes) and
rebuilt only when the document changes, so the per-request cost is a dictionary lookup. A server on
this node is preferred; otherwise the request goes to the remote node with the fewest requests in
flight from here. Every request holds a ``Lease`` on its route while it runs: the router counts
requests in flight here and nowhere else, and a lease is released exactly once however the request
ends. A model also answers to the other names of its file (``engine.models.canonical_name``), to the
name of the file it is served from (``--alias chat --model /m/foo.gguf`` answers to ``chat``,
``foo.gguf`` and ``foo``), and, when the mesh knows exactly one model, to any name at all: clients
written for another provider ask for ``gpt-4o-mini``, and there is nothing else they could mean.

An expert-sharded model (its leases have ``shards``) is routed by the request's session key instead
(``api.sessions``): rendezvous hashing over the nodes with a ready shard, so a conversation stays on one
node's KV cache, and a dead node's sessions move to the others as soon as its servers leave the table.

A dead node stays in the document until the failure detector's verdict, seconds after its connection
went silent; meanwhile its servers still look ready. The router hears sooner: the mesh connection to a
node closing (``peer_down``) or a request failing to reach it (``unreachable``) takes that node's
routes out of the choice at once, until its connection is back (``peer_up``) or, for a failed
request, ``UNREACHABLE_FOR`` seconds pass. Where every route of a model is out, they are all used
anyway: a request that might succeed beats a certain 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from meshllm.api.sessions import rendezvous
from meshllm.engine.models import canonical_name, looks_like_path
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelName, NodeId, ServerPhase, ServerStatus

__all__ = ["UNREACHABLE_FOR", "Lease", "Route", "Router", "Unavailable"]

UNREACHABLE_FOR = 10.0  # seconds a node that failed a request is left out of routing (its connection up)


@dataclass(frozen=True)
class Route:
    """A ready llama-server for the model: on this node at 127.0.0.1:``port``, or on a remote ``node``."""

    model: ModelName
    node: NodeId
    port: int = 0

    @property
    def local(self) -> bool:
        return self.port > 0


@dataclass(frozen=True)
class Unavailable:
    """The model is wanted but no server is ready for it yet."""

    model: ModelName
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
    routes: dict[ModelName, list[Route]] = field(default_factory=dict)
    waiting: dict[ModelName, Unavailable] = field(default_factory=dict)
    aliases: dict[str, ModelName] = field(default_factory=dict)  # another name -> the model's name
    sharded: set[ModelName] = field(default_factory=set)  # models split by experts: routed by session

    def name_of(self, asked: str) -> ModelName | None:
        """The model ``asked`` (what a client wrote) means: itself, another name of it, or the only
        model known. Here a client's string becomes a model's name."""
        for name in (asked, self.aliases.get(asked), canonical_name(asked)):
            if name is not None and (name in self.routes or name in self.waiting):
                return ModelName(name)
        known = self.routes.keys() | self.waiting.keys()
        return next(iter(known)) if len(known) == 1 else None


class Router:
    """Resolves a model name against this node's view of the mesh."""

    def __init__(self, state: MeshState, *, node_id: NodeId, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.node_id = node_id
        self.clock = clock
        self._table: _Table | None = None
        self._subs = state.observe(self._invalidate)
        self.in_flight: dict[NodeId, int] = {}
        self._down: set[NodeId] = set()  # nodes whose mesh connection closed and has not come back
        self._failed: dict[NodeId, float] = {}  # node -> until when: a request could not reach it

    # -- reachability ---------------------------------------------------------------------------
    def peer_down(self, node: NodeId) -> None:
        """The mesh connection to ``node`` closed: leave its routes out until it is back."""
        self._down.add(node)

    def peer_up(self, node: NodeId) -> None:
        self._down.discard(node)
        self._failed.pop(node, None)

    def unreachable(self, node: NodeId) -> None:
        """A request could not reach ``node`` (no connection, no answer): leave it out for a while."""
        self._failed[node] = self.clock() + UNREACHABLE_FOR

    def _reachable(self, routes: list[Route]) -> list[Route]:
        if not self._down and not self._failed:
            return routes
        now = self.clock()
        for node, until in list(self._failed.items()):
            if until <= now:
                del self._failed[node]
        good = [r for r in routes if r.local or (r.node not in self._down and r.node not in self._failed)]
        return good or routes

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
        specs = self.state.models()
        table.sharded = {lease.model for lease in self.state.leases().values() if lease.shards}
        wanted = set(specs) | {s.model for s in servers}
        for model in wanted - set(table.routes):
            table.waiting[model] = Unavailable(model, _why_waiting(model, servers))
        for spec in specs.values():  # a model served from a file also answers to the file's name
            if looks_like_path(spec.source):
                file_name = spec.source.replace("\\", "/").rsplit("/", 1)[-1]
                for alias in (file_name, canonical_name(file_name)):
                    if alias not in wanted:
                        table.aliases.setdefault(alias, spec.name)
        return table

    def table(self) -> _Table:
        if self._table is None:
            self._table = self._build()
        return self._table

    def sharded(self, model: str | None) -> bool:
        """Whether ``model`` is split by experts (its requests are routed by session key)."""
        table = self.table()
        name = table.name_of(model) if model is not None else self.only_model()
        return name is not None and name in table.sharded

    def routes(self, model: str) -> list[Route]:
        """The ready servers of ``model`` (local first)."""
        table = self.table()
        name = table.name_of(model)
        return list(table.routes.get(name, ())) if name is not None else []

    def resolve(self, model: str | None, *, local_only: bool = False, avoid: Collection[Route] = (),
                session: str | None = None) -> Route | Unavailable | None:
        """Where to send a request for ``model`` (local first, then the least busy remote), not to
        any route in ``avoid`` (servers that failed it); for an expert-sharded model with a
        ``session`` key, the shard that key hashes to. A request that names no model (None) goes to
        the only model known, if there is exactly one."""
        table = self.table()
        name = table.name_of(model) if model is not None else self.only_model()
        if name is None:
            return None
        routes = table.routes.get(name)
        if routes and avoid:
            routes = [r for r in routes if r not in avoid]
            if not routes:
                return Unavailable(name, f"no other server of model {name!r} is ready")
        if routes:
            routes = self._reachable(routes)
            if session is not None and not local_only and name in table.sharded:
                chosen = rendezvous(session, (r.node for r in routes))
                return next(r for r in routes if r.node == chosen)
            if routes[0].local:
                return routes[0]
            if not local_only:
                return min(routes, key=lambda r: self.in_flight.get(r.node, 0))
            return Unavailable(name, f"model {name!r} is not served on this node")
        return table.waiting.get(name)

    def ready_models(self) -> list[ModelName]:
        return sorted(self.table().routes)

    def known_models(self) -> list[ModelName]:
        """Every model the mesh serves or waits for."""
        table = self.table()
        return sorted(table.routes.keys() | table.waiting.keys())

    def only_model(self) -> ModelName | None:
        """The model a request naming none goes to: the only one known, if there is exactly one."""
        known = self.known_models()
        return known[0] if len(known) == 1 else None

    def lease(self, model: str | None, *, local_only: bool = False, avoid: Collection[Route] = (),
              session: str | None = None) -> Lease | Unavailable | None:
        """A lease on the route for ``model`` (counted in flight until released), the reason it must
        wait, or None when the mesh does not know the model."""
        target = self.resolve(model, local_only=local_only, avoid=avoid, session=session)
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


def _why_waiting(model: ModelName, servers: Collection[ServerStatus]) -> str:
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
