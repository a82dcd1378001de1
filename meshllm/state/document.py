"""The replicated state document: desired models and observed nodes and servers.

``MeshState`` wraps a pycrdt ``Doc`` with typed reads and writes (see ``schema`` for the layout).
It does no I/O: gossip replicates the ``Doc``, reconcilers and the API read it through this class.
Observers learn *which* entries changed (``Changed``: a table and a key) and re-read the state they
care about: a change's payload is never acted on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar, cast

from pycrdt import Doc, Map
from pydantic import BaseModel, ValidationError

from meshllm.state.schema import (
    ApiKey, DemandEntry, ExpertImportance, KeyRotation, ModelName, ModelSpec, NodeDeath, NodeId, NodeStatus,
    PlacementLease, ServerStatus, WorkerStatus,
)

__all__ = ["Changed", "MeshState", "check_storable"]

E = TypeVar("E", bound=BaseModel)
_KINDS = ("models", "nodes", "servers", "deaths", "demand", "leases", "workers", "apikeys", "rotations", "importance")


_INT64 = range(-(1 << 63), 1 << 63)


def check_storable(entity: BaseModel) -> dict[str, Any]:
    """``entity``'s JSON values, or ``ValueError`` naming a field the document cannot hold: pycrdt
    panics (an uncatchable-looking ``PanicException``) on an integer beyond 64 bits, and a write that
    fails half way leaves half an entity behind."""
    values = entity.model_dump(mode="json")
    for field, value in values.items():
        _check_value(f"{type(entity).__name__}.{field}", value)
    return values


def _check_value(where: str, value: object) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        raise ValueError(f"{where}: {value} does not fit in 64 bits")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_value(f"{where}.{key}", item)
    elif isinstance(value, list):
        for item in value:
            _check_value(where, item)


class Changed(NamedTuple):
    """One entry that changed: ``table`` (``models``, ``leases``, ...) and its ``key`` there, or
    ``key`` None when the whole table may have changed (an update whose shape says no more)."""

    table: str
    key: str | None


ChangeListener = Callable[[list[Changed]], None]


class MeshState:
    """Typed access to one replica of the mesh's state document."""

    def __init__(self, doc: Doc[Any] | None = None) -> None:
        self.doc = doc if doc is not None else Doc()
        self._maps: dict[str, Map[Any]] = {kind: self.doc.get(kind, type=Map) for kind in _KINDS}
        # Decoded entries, per table and key, re-decoded only once their entry changed (here or
        # by a peer's update): membership, router and reconcilers read whole tables many times a
        # second, and decoding every entry each time was most of a 50-node mesh's CPU.
        self._decoded: dict[str, dict[str, BaseModel | None]] = {kind: {} for kind in _KINDS}
        self._stale: dict[str, set[str] | None] = {kind: None for kind in _KINDS}  # None: all of it
        # One pycrdt observer per table, which drops the changed entries and only then tells the
        # listeners: pycrdt calls a table's observers in no fixed order, so a listener observing the
        # table itself could read entries decoded before the change.
        self._listeners: dict[int, ChangeListener] = {}
        self._next_listener = 0
        self._subs = [table.observe_deep(self._on_change(kind)) for kind, table in self._maps.items()]

    def _on_change(self, kind: str) -> Callable[[list[Any]], None]:
        def on_change(events: list[Any]) -> None:
            keys = _changed_keys(events)
            self._invalidate(kind, keys)
            changes = [Changed(kind, None)] if keys is None else [Changed(kind, key) for key in sorted(keys)]
            for listener in list(self._listeners.values()):
                listener(changes)
        return on_change

    def _invalidate(self, kind: str, keys: set[str] | None) -> None:
        stale = self._stale[kind]
        if stale is None:
            return
        if keys is None:
            self._stale[kind] = None
        else:
            stale.update(keys)

    @contextmanager
    def transaction(self, origin: object = None) -> Iterator[None]:
        with self.doc.transaction(origin=origin):
            yield

    # -- writes -----------------------------------------------------------------------------
    def _put(self, kind: str, key: str, entity: BaseModel) -> None:
        values = check_storable(entity)
        table = self._maps[kind]
        self._touch(kind, key)
        with self.doc.transaction():
            current = table.get(key)
            if not isinstance(current, Map):
                table[key] = Map(values)
                return
            for field, value in values.items():
                if current.get(field) != value:
                    current[field] = value

    def _put_whole(self, kind: str, key: str, entity: BaseModel) -> None:
        """Write ``entity`` as one plain value: concurrent writers do not mix fields, one wins."""
        values = check_storable(entity)
        self._touch(kind, key)
        self._maps[kind][key] = values

    def put_model(self, spec: ModelSpec) -> None:
        self._put("models", spec.name, spec)

    def put_node(self, node: NodeStatus) -> None:
        self._put("nodes", node.id, node)

    def put_server(self, server: ServerStatus) -> None:
        self._put("servers", server.key, server)

    def put_worker(self, worker: WorkerStatus) -> None:
        self._put("workers", worker.key, worker)

    def remove_worker(self, key: str) -> bool:
        return self._remove("workers", key)

    def put_death(self, death: NodeDeath) -> None:
        self._put("deaths", death.node, death)

    def put_demand(self, entry: DemandEntry) -> None:
        self._put("demand", entry.key, entry)

    def put_lease(self, lease: PlacementLease) -> None:
        self._put_whole("leases", lease.key, lease)

    def put_api_key(self, key: ApiKey) -> None:
        self._put("apikeys", key.id, key)

    def remove_api_key(self, key_id: str) -> bool:
        return self._remove("apikeys", key_id)

    def put_rotation(self, rotation: KeyRotation) -> None:
        self._put_whole("rotations", rotation.old, rotation)

    def put_importance(self, entry: ExpertImportance) -> None:
        self._put("importance", entry.fingerprint, entry)

    def remove_importance(self, fingerprint: str) -> bool:
        return self._remove("importance", fingerprint)

    def remove_demand(self, key: str) -> bool:
        return self._remove("demand", key)

    def remove_lease(self, key: str) -> bool:
        return self._remove("leases", key)

    def remove_model(self, name: ModelName) -> bool:
        return self._remove("models", name)

    def remove_server(self, key: str) -> bool:
        return self._remove("servers", key)

    def _remove(self, kind: str, key: str) -> bool:
        table = self._maps[kind]
        if key not in table:
            return False
        self._touch(kind, key)
        del table[key]
        return True

    # -- reads ------------------------------------------------------------------------------
    def _touch(self, kind: str, key: str) -> None:
        stale = self._stale[kind]
        if stale is not None:
            stale.add(key)

    def _read(self, kind: str, model: type[E]) -> dict[str, E]:
        """The table decoded (a fresh dict each call; the entries are shared, treat them as frozen)."""
        table, decoded, stale = self._maps[kind], self._decoded[kind], self._stale[kind]
        if stale is None:
            decoded.clear()
            keys: Iterable[str] = list(table.keys())
        else:
            keys = stale
        for key in keys:
            value = table.get(key)
            if value is None:
                decoded.pop(key, None)
                continue
            try:
                decoded[key] = model.model_validate(value.to_py() if isinstance(value, Map) else value)
            except ValidationError:
                decoded[key] = None  # a malformed entry from a peer is ignored, never fatal
        self._stale[kind] = set()
        return {key: entity for key, entity in decoded.items() if entity is not None}  # type: ignore[misc]

    # models, nodes and deaths are keyed by the entity's name or node id (``put_*``): their keys are
    # ids from here on
    def models(self) -> dict[ModelName, ModelSpec]:
        return cast(dict[ModelName, ModelSpec], self._read("models", ModelSpec))

    def nodes(self) -> dict[NodeId, NodeStatus]:
        return cast(dict[NodeId, NodeStatus], self._read("nodes", NodeStatus))

    def servers(self) -> dict[str, ServerStatus]:
        return self._read("servers", ServerStatus)

    def deaths(self) -> dict[NodeId, NodeDeath]:
        return cast(dict[NodeId, NodeDeath], self._read("deaths", NodeDeath))

    def demand(self) -> dict[str, DemandEntry]:
        return self._read("demand", DemandEntry)

    def leases(self) -> dict[str, PlacementLease]:
        return self._read("leases", PlacementLease)

    def workers(self) -> dict[str, WorkerStatus]:
        return self._read("workers", WorkerStatus)

    def api_keys(self) -> dict[str, ApiKey]:
        """Every API key of the mesh, revoked ones (tombstones) included."""
        return self._read("apikeys", ApiKey)

    def rotations(self) -> dict[str, KeyRotation]:
        return self._read("rotations", KeyRotation)

    def importance(self) -> dict[str, ExpertImportance]:
        """Routing statistics of MoE files, by file fingerprint."""
        return self._read("importance", ExpertImportance)

    def alive_nodes(self) -> dict[NodeId, NodeStatus]:
        """Nodes not declared dead in their current incarnation."""
        deaths = self.deaths()
        return {nid: node for nid, node in self.nodes().items()
                if nid not in deaths or deaths[nid].incarnation < node.incarnation}

    def servers_for(self, model: ModelName) -> list[ServerStatus]:
        return [s for s in self.servers().values() if s.model == model]

    # -- change notification ----------------------------------------------------------------
    def observe(self, callback: Callable[[], None]) -> int:
        """Call ``callback()`` after any change (reads in it see the change); it must not raise and
        should only enqueue work. Returns a handle for ``unobserve``."""
        return self.observe_changes(lambda _changes: callback())

    def observe_changes(self, callback: ChangeListener) -> int:
        """Call ``callback(changes)`` after any change with the entries it touched, one call per table
        a transaction changed (reads in it see the change); it must not raise and should only enqueue
        work. Returns a handle for ``unobserve``."""
        self._next_listener += 1
        self._listeners[self._next_listener] = callback
        return self._next_listener

    def unobserve(self, handle: int) -> None:
        self._listeners.pop(handle, None)


def _changed_keys(events: list[Any]) -> set[str] | None:
    """The table keys a batch of pycrdt events touched; None when an event does not say."""
    keys: set[str] = set()
    for event in events:
        path, changed = getattr(event, "path", None), getattr(event, "keys", None)
        if path:
            keys.add(str(path[0]))  # a field of one entry
        elif path == [] and isinstance(changed, dict):
            keys.update(str(key) for key in changed)  # entries added, replaced or removed
        else:
            return None
    return keys
