"""The expert-importance controller: routing statistics of an MoE file, computed once for the whole mesh.

Expert shards keep each layer's most used experts in every shard (``moe.plan``), so the shards of a model
wait for its routing statistics (``moe.importance``): how often calibration text routes to each expert. One
node computes them per model file and writes them into the document (``ExpertImportance``, keyed by the
file's fingerprint), where every node reads them:

- *who*: the node holding expert-shard slot 0 of the model, or once that node is dead the lowest slot's live
  node (every node agrees on it from the leases; it holds the whole file, since it writes a shard from it).
  Nobody starts before slot 0 is taken: the nodes of the other slots may take theirs first. A model whose
  spec carries an expert order already (``ModelSpec.expert_ranks``) needs nothing.
- *how*: this node's cache first (``moe.importance.read_stats``: computed here before, by any model name);
  else ``llama-imatrix`` over the calibration text in a worker thread (seconds for a small model, minutes
  for a large one on CPU); the entry says ``computing`` meanwhile, then ``ready`` with the counts, or
  ``failed`` with why. A failed computation is not retried by itself (its shards use expert id order,
  ``reconcile.shards``); delete the model and apply it again to retry.
- *takeover*: an entry left ``computing`` by a node that died (or by this node before it restarted) is
  computed again by the node whose turn it now is.

``plan_importance`` decides, purely; ``apply`` writes the document.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from meshllm.engine.models import file_fingerprint, resolve_model
from meshllm.errors import ModelError
from meshllm.moe.importance import (
    ImatrixCancelled, ImatrixRun, RoutingStats, compute_routing_stats, encode_counts, model_key, read_stats,
)
from meshllm.reconcile.timing import Clock, SystemClock
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import ExpertImportance, ImportancePhase, ModelName, ModelSpec, NodeId
from meshllm.store.db import NodeStore

__all__ = ["Compute", "ExpertImportanceController", "ImportanceActual", "ImportanceWanted", "Publish",
           "RoutingCounter", "computing_node", "plan_importance"]

log = logging.getLogger(__name__)


class RoutingCounter(Protocol):
    """Counts routing selections of a model file (real: ``llama-imatrix``). Blocking; polls ``cancelled``."""

    def __call__(self, path: Path, *, key: str, cancelled: threading.Event) -> RoutingStats: ...


@dataclass(frozen=True)
class ImatrixCounter:
    """The real ``RoutingCounter``: llama-imatrix of ``engine_dir``, cached in this node's cache."""

    engine_dir: Path
    run: ImatrixRun = ImatrixRun()

    def __call__(self, path: Path, *, key: str, cancelled: threading.Event) -> RoutingStats:
        return compute_routing_stats(path, engine_dir=self.engine_dir, run=self.run, fingerprint=key,
                                     cancelled=cancelled.is_set)


@dataclass(frozen=True)
class ImportanceWanted:
    """This node computes the statistics of ``model``'s file (``fingerprint``) at ``path``."""

    model: ModelName
    fingerprint: str
    path: Path
    key: str  # moe.importance.model_key: what the local cache is keyed by


@dataclass(frozen=True)
class ImportanceActual:
    entry: ExpertImportance | None  # the document's, for the file
    entry_node_alive: bool
    running: bool  # a computation of this node is under way
    cached: RoutingStats | None  # this node's cache has them


@dataclass(frozen=True)
class Publish:
    wanted: ImportanceWanted
    stats: RoutingStats


@dataclass(frozen=True)
class Compute:
    wanted: ImportanceWanted


ImportanceAction = Publish | Compute


def computing_node(state: MeshState, model: ModelName) -> NodeId | None:
    """The node whose turn it is to compute ``model``'s statistics: the node of expert-shard slot 0; once that
    node is dead, the lowest slot's live node. None before slot 0 is taken (the other slots' nodes may take
    theirs first, and must not start a second computation meanwhile)."""
    leases = {lease.slot: lease.node for lease in state.leases().values() if lease.model == model and lease.shards}
    if 0 not in leases:
        return None
    alive = state.alive_nodes()
    return min(((slot, node) for slot, node in leases.items() if node in alive), default=(0, None))[1]


def plan_importance(desired: ImportanceWanted | None, actual: ImportanceActual, *, me: NodeId) -> list[ImportanceAction]:
    """What this node does for one model's statistics (see the module docstring). Pure."""
    if desired is None or actual.running:
        return []
    entry = actual.entry
    if entry is not None and entry.phase is not ImportancePhase.COMPUTING:
        return []  # ready, or failed (not retried by itself)
    if entry is not None and entry.node != me and actual.entry_node_alive:
        return []  # another live node is at it (the slots moved meanwhile): its answer will do
    if actual.cached is not None:
        return [Publish(desired, actual.cached)]
    return [Compute(desired)]


class ExpertImportanceController:
    """Computes and publishes the routing statistics of the MoE files this node's turn it is to count."""

    name = "expert-importance"

    def __init__(self, state: MeshState, *, node_id: NodeId, counter: RoutingCounter, store: NodeStore | None = None,
                 clock: Clock | None = None) -> None:
        self.state = state
        self.node_id = node_id
        self.counter = counter
        self.store = store
        self.clock = clock or SystemClock()
        self._running: set[str] = set()  # fingerprints being computed here
        self._stop = threading.Event()
        self._files: dict[tuple[str, str], tuple[Path, str, str]] = {}  # (source, name) -> path, fingerprint, key

    # -- keys ---------------------------------------------------------------------------------
    def keys(self) -> set[ModelName]:
        return {name for name, spec in self.state.models().items() if spec.experts}

    def keys_for(self, change: Changed) -> set[ModelName]:
        table, key = change
        if table in ("leases", "models", "importance", "deaths"):
            return self.keys()
        return set()

    # -- desired and actual -------------------------------------------------------------------
    async def desired(self, model: ModelName) -> ImportanceWanted | None:
        spec = self.state.models().get(model)
        if spec is None or not spec.experts or spec.moe_problem or spec.expert_ranks \
                or computing_node(self.state, model) != self.node_id:
            return None
        try:
            path, fingerprint, key = await self._file(spec)
        except (ModelError, OSError) as exc:
            log.debug("%s: no statistics from this node: %s", model, exc)
            return None  # the shard controller says why this node's copy is unusable
        if spec.fingerprint and fingerprint != spec.fingerprint:
            return None
        return ImportanceWanted(model, spec.fingerprint or fingerprint, path, key)

    async def _file(self, spec: ModelSpec) -> tuple[Path, str, str]:
        source = (spec.source, spec.name)
        if source not in self._files:
            def read() -> tuple[Path, str, str]:
                path = resolve_model(spec.source, name=spec.name).path
                return path, file_fingerprint(path), model_key(path)
            self._files[source] = await anyio.to_thread.run_sync(read)
        return self._files[source]

    async def actual(self, model: ModelName, desired: ImportanceWanted | None, now: float) -> ImportanceActual:
        if desired is None:
            return ImportanceActual(None, False, False, None)
        entry = self.state.importance().get(desired.fingerprint)
        alive = entry is not None and entry.node in self.state.alive_nodes()
        if entry is not None and entry.phase is not ImportancePhase.COMPUTING:
            return ImportanceActual(entry, alive, desired.fingerprint in self._running, None)  # settled
        cached = await anyio.to_thread.run_sync(lambda: read_stats(desired.path, fingerprint=desired.key))
        return ImportanceActual(entry, alive, desired.fingerprint in self._running, cached)

    def plan(self, desired: ImportanceWanted | None, actual: ImportanceActual, now: float) -> list[ImportanceAction]:
        return plan_importance(desired, actual, me=self.node_id)

    # -- apply --------------------------------------------------------------------------------
    async def apply(self, model: ModelName, action: ImportanceAction, now: float) -> float | None:
        match action:
            case Publish(wanted, stats):
                self._publish(wanted, stats, how="from this node's cache")
            case Compute(wanted):
                await self._compute(wanted)
        return None

    def _entry(self, wanted: ImportanceWanted, phase: ImportancePhase, **fields: object) -> ExpertImportance:
        return ExpertImportance(fingerprint=wanted.fingerprint, model=wanted.model, node=self.node_id, phase=phase,
                                at=self.clock.now(), **fields)

    def _publish(self, wanted: ImportanceWanted, stats: RoutingStats, *, how: str) -> None:
        tokens = max((sum(row) for row in stats.counts.values()), default=0)
        self.state.put_importance(self._entry(wanted, ImportancePhase.READY, counts=encode_counts(stats.counts),
                                              tokens=tokens, message=how))
        log.info("%s: expert routing statistics ready (%s, %d selections per layer)", wanted.model, how, tokens)

    async def _compute(self, wanted: ImportanceWanted) -> None:
        self._running.add(wanted.fingerprint)
        self.state.put_importance(self._entry(wanted, ImportancePhase.COMPUTING, message="counting expert "
                                              "selections on calibration text (llama-imatrix)"))
        await self._event(wanted.model, "ComputingImportance", "counting expert selections on calibration text")
        started = self.clock.now()
        try:
            stats = await anyio.to_thread.run_sync(
                lambda: self.counter(wanted.path, key=wanted.key, cancelled=self._stop), abandon_on_cancel=True)
        except ImatrixCancelled:
            return
        except (ModelError, OSError, ValueError) as exc:
            self.state.put_importance(self._entry(wanted, ImportancePhase.FAILED, message=str(exc)))
            log.warning("%s: expert routing statistics failed: %s", wanted.model, exc)
            await self._event(wanted.model, "ImportanceFailed", f"{exc}; expert shards use expert id order",
                              level="error")
            return
        finally:
            self._running.discard(wanted.fingerprint)
        self._publish(wanted, stats, how=f"computed by llama-imatrix in {self.clock.now() - started:.1f} s")
        await self._event(wanted.model, "ImportanceReady", "expert routing statistics computed")

    async def _event(self, model: ModelName, reason: str, message: str, *, level: str = "info") -> None:
        if self.store is not None:
            await self.store.record_event(model, reason, message, level=level)

    async def shutdown(self) -> None:
        """Stop a computation under way (llama-imatrix is killed); its entry is taken over or redone at start."""
        self._stop.set()
