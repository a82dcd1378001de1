"""The expert-shard controller: write the GGUF of each expert shard this node holds a lease of.

A new resource kind beside served models and split workers. Desired: every placement lease of this node
with ``shards`` set (``placement`` rule 7) gives a ``ShardTarget``: this node's copy of the model (checked
against the mesh's ``ModelSpec.fingerprint``), the experts the shard keeps in each MoE layer
(``moe.plan.shard_experts`` in the model's expert order, ``moe.order``) and the file to write, named by the
digest of both; or ``ShardWaiting`` while the order waits for the file's routing statistics
(``reconcile.importance`` computes them on one node). Actual: what this controller knows of the file
(waiting, writing, ready, failed). ``plan_shard`` decides, purely: a ready file on disk is reused
(``moe.shard.shard_ready``), a missing one is written (in a worker thread, so the reconcile of other keys
goes on), a failed one is tried again after ``FAILED_RETRY``.
Once a shard is ready, the node's shards of the model's earlier layouts are deleted (a disk holds one
shard per model).

The served-model controller runs llama-server on the file once ready (``shard_for``); until then the
model's status on this node says the shard is being written, or why it cannot be (a damaged or truncated
model file, a copy that is not the mesh's): a clear reason, and no crash loop (nothing is launched).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio

from meshllm.engine.models import file_fingerprint, resolve_model
from meshllm.engine.process import safe_name
from meshllm.errors import ModelError
from meshllm.moe.detect import MoeInfo, detect_moe
from meshllm.moe.importance import read_stats
from meshllm.moe.order import Waiting, expert_order, mass_line
from meshllm.moe.plan import composition_digest, shard_experts
from meshllm.moe.quality import read_quality
from meshllm.moe.shard import ShardCancelled, shard_ready, write_shard
from meshllm.reconcile.timing import Clock, SystemClock
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import ModelName, ModelSpec, NodeId, PlacementLease, lease_model
from meshllm.store.db import NodeStore

__all__ = ["ExpertShardController", "ShardFile", "ShardTarget", "ShardUnavailable", "ShardWaiting", "plan_shard"]

log = logging.getLogger(__name__)

FAILED_RETRY = 60.0  # seconds before a shard that failed to be written is tried again


@dataclass(frozen=True)
class ShardTarget:
    """Shard ``index`` (0-based) of ``shards`` of ``model``: ``experts[j]`` kept in MoE layer ``layers[j]``."""

    model: ModelName
    index: int
    shards: int
    source: Path
    source_fingerprint: str
    layers: tuple[int, ...]
    experts: tuple[tuple[int, ...], ...]
    out: Path
    mass: str = ""  # the shard's routing-mass figure (``moe.order.mass_line``)

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.shards}"


@dataclass(frozen=True)
class ShardUnavailable:
    model: ModelName
    message: str


@dataclass(frozen=True)
class ShardWaiting:
    """No shard can be dealt yet: the model's expert order waits for its routing statistics."""

    model: ModelName
    message: str


@dataclass(frozen=True)
class ShardFile:
    """What the controller knows of a model's shard file on this node."""

    target: ShardTarget | None = None
    phase: str = ""  # "waiting", "writing", "ready", "failed"
    message: str = ""
    size: int = 0
    quality: str = ""
    at: float = 0.0


@dataclass(frozen=True)
class Write:
    target: ShardTarget


@dataclass(frozen=True)
class Reuse:
    target: ShardTarget


@dataclass(frozen=True)
class Fail:
    model: ModelName
    message: str


@dataclass(frozen=True)
class Wait:
    model: ModelName
    message: str


@dataclass(frozen=True)
class Drop:
    model: ModelName


@dataclass(frozen=True)
class Retry:
    model: ModelName
    at: float


ShardAction = Write | Reuse | Fail | Wait | Drop | Retry
ShardDesired = ShardTarget | ShardUnavailable | ShardWaiting | None


@dataclass(frozen=True)
class ShardActual:
    model: ModelName
    file: ShardFile
    on_disk: bool = False  # the desired target's file is whole on disk already


def plan_shard(desired: ShardDesired, actual: ShardActual, now: float) -> list[ShardAction]:
    """What to do for one model's shard on this node (see the module docstring). Pure."""
    known = actual.file
    if desired is None:
        return [Drop(actual.model)] if known != ShardFile() else []
    if isinstance(desired, ShardUnavailable):
        same = known.phase == "failed" and known.message == desired.message
        return [] if same else [Fail(desired.model, desired.message)]
    if isinstance(desired, ShardWaiting):
        same = known.phase == "waiting" and known.message == desired.message
        return [] if same else [Wait(desired.model, desired.message)]
    if known.target == desired:
        if known.phase == "failed":
            retry_at = known.at + FAILED_RETRY
            return [Write(desired)] if now >= retry_at else [Retry(desired.model, retry_at)]
        return []
    return [Reuse(desired)] if actual.on_disk else [Write(desired)]


class ExpertShardController:
    """Writes this node's expert shard files; ``shard_for`` tells the served-model controller about them."""

    name = "expert-shard"

    def __init__(self, state: MeshState, *, node_id: NodeId, folder: Path, store: NodeStore | None = None,
                 clock: Clock | None = None) -> None:
        self.state = state
        self.node_id = node_id
        self.folder = folder
        self.store = store
        self.clock = clock or SystemClock()
        self.files: dict[ModelName, ShardFile] = {}
        self._stop = threading.Event()
        self._sources: dict[tuple[str, str], tuple[Path, str, MoeInfo]] = {}
        self._counts: dict[Path, dict[int, tuple[int, ...]] | None] = {}

    def shard_for(self, model: ModelName) -> ShardFile | None:
        return self.files.get(model)

    # -- keys ---------------------------------------------------------------------------------
    def _mine(self) -> dict[ModelName, PlacementLease]:
        return {lease.model: lease for lease in self.state.leases().values()
                if lease.node == self.node_id and lease.shards}

    def keys(self) -> set[ModelName]:
        return set(self._mine()) | set(self.files)

    def keys_for(self, change: Changed) -> set[ModelName]:
        table, key = change
        if key is None and table in ("leases", "models"):
            return self.keys()
        if table == "models" and key is not None:
            return {ModelName(key)}
        if table == "leases" and key is not None:
            return {lease_model(key)}
        if table == "importance":
            return self.keys()
        return set()

    # -- desired and actual -------------------------------------------------------------------
    async def desired(self, model: ModelName) -> ShardDesired:
        lease, spec = self._mine().get(model), self.state.models().get(model)
        if lease is None or spec is None:
            return None
        try:
            source, fingerprint, info = await self._source(spec)
        except ModelError as exc:
            return ShardUnavailable(model, f"expert shard {lease.slot + 1}/{lease.shards}: {exc}")
        if spec.fingerprint and fingerprint != spec.fingerprint:
            return ShardUnavailable(model, f"this node's {source} is not the mesh's {model} (file {fingerprint}, "
                                           f"mesh {spec.fingerprint}): put the same GGUF here")
        order = expert_order(spec, self.state.importance().get(spec.fingerprint or fingerprint),
                             moe_layers=info.moe_layers, n_expert=info.n_expert,
                             local_counts=await self._local_counts(source) if spec.expert_ranks else None)
        if isinstance(order, Waiting):
            return ShardWaiting(model, f"expert shard {lease.slot + 1}/{lease.shards}: {order.message}")
        experts = shard_experts(order.ranks, core=lease.expert_core, shards=lease.shards,
                                copies=lease.expert_copies, index=lease.slot)
        digest = hashlib.sha256(f"{fingerprint}|{composition_digest(experts)}".encode()).hexdigest()[:12]
        out = self.folder / f"{safe_name(model)}-{digest}-{lease.slot + 1}of{lease.shards}.gguf"
        mass = mass_line(order.counts, dict(zip(info.moe_layers, experts, strict=True)))
        return ShardTarget(model, lease.slot, lease.shards, source, fingerprint, info.moe_layers, experts, out, mass)

    async def _local_counts(self, source: Path) -> dict[int, tuple[int, ...]] | None:
        """This node's cached statistics of the file (for the figure of an order the spec carries)."""
        if source not in self._counts:
            def read() -> dict[int, tuple[int, ...]] | None:
                try:
                    stats = read_stats(source)
                except (OSError, ModelError):
                    return None
                return dict(stats.counts) if stats is not None else None
            self._counts[source] = await anyio.to_thread.run_sync(read)
        return self._counts[source]

    async def _source(self, spec: ModelSpec) -> tuple[Path, str, MoeInfo]:
        key = (spec.source, spec.name)
        if key not in self._sources:
            def read() -> tuple[Path, str, MoeInfo]:
                path = resolve_model(spec.source, name=spec.name).path
                info = detect_moe(path)
                if info is None:
                    raise ModelError(f"{path} has no experts (a dense model)")
                return path, file_fingerprint(path), info
            self._sources[key] = await anyio.to_thread.run_sync(read)
        return self._sources[key]

    async def actual(self, model: ModelName, desired: ShardDesired, now: float) -> ShardActual:
        known = self.files.get(model, ShardFile())
        if not isinstance(desired, ShardTarget) or known.target == desired:
            return ShardActual(model, known)
        ready = await anyio.to_thread.run_sync(lambda: shard_ready(
            desired.out, source_fingerprint=desired.source_fingerprint, experts=desired.experts))
        return ShardActual(model, known, on_disk=ready)

    def plan(self, desired: ShardDesired, actual: ShardActual, now: float) -> list[ShardAction]:
        return plan_shard(desired, actual, now)

    # -- apply --------------------------------------------------------------------------------
    async def apply(self, model: ModelName, action: ShardAction, now: float) -> float | None:
        match action:
            case Reuse(target):
                self._ready(target, "reused")
            case Write(target):
                await self._write(target)
            case Fail(_, message):
                self.files[model] = ShardFile(phase="failed", message=message, at=now)
                log.warning("%s: %s", model, message)
                await self._event(model, "ShardFailed", message, level="error")
            case Wait(_, message):
                self.files[model] = ShardFile(phase="waiting", message=message, at=now)
            case Drop():
                self.files.pop(model, None)
            case Retry(_, at):
                return at - now
        return None

    async def _write(self, target: ShardTarget) -> None:
        model = target.model
        kept = len(target.experts[0]) if target.experts else 0
        self.files[model] = ShardFile(target, "writing", f"writing expert shard {target.label} ({kept} experts per "
                                                         "layer)", at=self.clock.now())
        await self._event(model, "WritingShard", f"expert shard {target.label}: writing {target.out.name}")
        try:
            await anyio.to_thread.run_sync(lambda: write_shard(
                target.source, target.out, dict(zip(target.layers, target.experts, strict=True)),
                source_fingerprint=target.source_fingerprint, cancelled=self._stop.is_set), abandon_on_cancel=True)
        except ShardCancelled:
            return
        except (ModelError, OSError, ValueError) as exc:
            message = f"expert shard {target.label} could not be written: {exc}"
            self.files[model] = ShardFile(target, "failed", message, at=self.clock.now())
            log.warning("%s: %s", model, message)
            await self._event(model, "ShardFailed", message, level="error")
            return
        self._ready(target, "written")
        await self._event(model, "ShardReady", f"expert shard {target.label}: {target.out.name} "
                                               f"({self.files[model].size} bytes)")

    def _ready(self, target: ShardTarget, how: str) -> None:
        for old in self.folder.glob(f"{safe_name(target.model)}-*of*.gguf*"):  # earlier layouts' shards
            if old.name.startswith(target.out.name):
                continue
            old.unlink(missing_ok=True)
        size = target.out.stat().st_size
        measured = read_quality(target.out)
        quality = f"{target.mass}; measured: {measured}" if measured else target.mass
        self.files[target.model] = ShardFile(target, "ready", f"expert shard {target.label} {how}", size=size,
                                             quality=quality, at=self.clock.now())
        log.info("%s: expert shard %s %s: %s", target.model, target.label, how, target.out)

    async def _event(self, model: ModelName, reason: str, message: str, *, level: str = "info") -> None:
        if self.store is not None:
            await self.store.record_event(model, reason, message, level=level)

    async def shutdown(self) -> None:
        """Stop any write under way (its partial file is removed); written shards stay for the next start."""
        self._stop.set()

