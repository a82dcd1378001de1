"""Split participants without the model file: fetch only the tensors this node holds, beside the controllers.

A split worker (``reconcile.workers``) or host (``reconcile.served``) that has no copy of the model asks
``want(share)`` at each reconcile; the first ask starts the fetch, every ask says where it stands
(``ShareState``). The fetch (``engine.sparse``) reads the GGUF header, works out the tensors llama.cpp
will give this node for the lease's shares (``share_tensors``: the host's ``--n-gpu-layers`` and
``--tensor-split`` from ``served.split_layout``, then ``engine.tensors.layer_devices``), and fetches
them into a sparse copy in ``<models folder>/.split/<fingerprint>/``, checking each against the
mesh's tensor hashes (``ModelSpec.tensor_hashes``). Sources, in order: the hub when the model's
source is a hub reference (a hub usually serves faster than a pure-Python QUIC tunnel carries), then
the node holding the whole file (``ModelSpec.copy_on``) over the mesh. A failed fetch is tried again
``RETRY_FAILED`` seconds later; a corrupt piece is never kept, so the next try fetches it again.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import anyio

from meshllm.engine.download import parse_reference, progress_line
from meshllm.engine.ranges import HubRanges
from meshllm.engine.sparse import RangeSource, SparseCopy, read_table
from meshllm.engine.tensors import CPU, TensorInfo, TensorTable, device_tensors, layer_devices
from meshllm.errors import MeshError
from meshllm.reconcile.split import host_keeps_head, split_layout
from meshllm.reconcile.background import BackgroundWork
from meshllm.reconcile.timing import Clock, SystemClock
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelName, ModelSpec, NodeId, PlacementLease
from meshllm.tunnels.http import HttpTunnelClient
from meshllm.tunnels.models import PeerRanges

__all__ = ["HOST", "Share", "ShareFetcher", "ShareFetches", "ShareState", "share_of", "share_tensors", "workers_gpu"]

log = logging.getLogger(__name__)

HOST = -1  # ``Share.worker`` of the split's host
RETRY_FAILED = 30.0
DISK_MARGIN = 64 << 20  # bytes kept free beyond the share
ShareKey = tuple[ModelName, str, tuple[float, ...], int, bool, tuple[bool, ...]]


@dataclass(frozen=True)
class Share:
    """What one participant of a split holds: ``worker`` is its index in the lease's workers (``HOST``
    for the host); ``host_gpu``: the host runs on a GPU (its layers go last, not first)."""

    model: ModelName
    source: str
    size: int
    fingerprint: str
    tensor_split: tuple[float, ...]  # the lease's: workers first, host last
    worker: int
    host_gpu: bool
    workers_gpu: tuple[bool, ...] = ()  # whether each of the lease's workers computes on a GPU
    copy_on: NodeId = NodeId("")  # a node with the whole file
    hashes: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)  # the mesh's, by tensor

    @property
    def key(self) -> ShareKey:
        return self.model, self.fingerprint, self.tensor_split, self.worker, self.host_gpu, self.workers_gpu


def share_of(spec: ModelSpec, lease: PlacementLease, node_id: NodeId, *, host_gpu: bool,
             workers_gpu: tuple[bool, ...] = ()) -> Share:
    worker = HOST if lease.node == node_id else lease.workers.index(node_id)
    return Share(model=spec.name, source=spec.source, size=spec.size_bytes, fingerprint=spec.fingerprint,
                 tensor_split=tuple(lease.tensor_split), worker=worker, host_gpu=host_gpu, workers_gpu=workers_gpu,
                 copy_on=spec.copy_on, hashes=spec.tensor_hashes)


def workers_gpu(state: MeshState, lease: PlacementLease) -> tuple[bool, ...]:
    """Whether each of ``lease``'s workers computes on a GPU (its node offers GPU memory), as the
    document says: the host and every worker read the same answer (``split.host_keeps_head``)."""
    nodes = state.nodes()
    return tuple(bool(nodes[w].gpus) if w in nodes else False for w in lease.workers)


def share_tensors(table: TensorTable, share: Share) -> list[TensorInfo]:
    """The tensors llama.cpp gives ``share``'s participant (the host reads the token embeddings too; a
    CPU host keeps the output head, ``split.head_args``)."""
    gpu_layers, splits = split_layout(table.n_layer, share.tensor_split, gpu=share.host_gpu)
    devices = layer_devices(table.n_layer, gpu_layers, splits)
    keep = host_keeps_head(table.n_layer, share.tensor_split, host_gpu=share.host_gpu, workers_gpu=share.workers_gpu)
    head = CPU if keep and not share.host_gpu else None
    if share.worker != HOST:
        return device_tensors(table, devices, {share.worker}, head=head)
    mine = {CPU, len(splits) - 1} if share.host_gpu else {CPU}
    return device_tensors(table, devices, mine, input_layer=True, head=head)


@dataclass(frozen=True)
class ShareState:
    done: int = 0  # bytes fetched
    total: int = 0  # bytes of the share
    path: Path | None = None  # the sparse copy, once it holds the share
    error: str = ""
    at: float = 0.0

    @property
    def message(self) -> str:
        return progress_line(self.done, self.total, 0.0).replace("downloading", "fetching its layers:", 1)


class ShareFetcher(Protocol):
    """What the split controllers need of share fetches (``ShareFetches``, or a fake in unit tests)."""

    def want(self, share: Share) -> ShareState:
        """Start fetching ``share`` unless under way (or failed lately); where it stands."""
        ...


class ShareFetches(BackgroundWork):
    """Runs this node's share fetches in its own task group (``run``)."""

    def __init__(self, *, folder: Path, node_id: NodeId, tunnels: HttpTunnelClient | None = None,
                 clock: Clock | None = None) -> None:
        self.folder, self.node_id, self.tunnels = folder, node_id, tunnels
        self.clock = clock or SystemClock()
        self.states: dict[ShareKey, ShareState] = {}
        super().__init__()

    def want(self, share: Share) -> ShareState:
        state = self.states.get(share.key)
        now = self.clock.monotonic()
        if state is None or (state.error and now - state.at >= RETRY_FAILED):
            if not self.running:
                return ShareState(error="this node is stopping; nothing fetched")
            state = self.states[share.key] = ShareState(at=now)
            self.start(self._fetch, share)
        return state

    def _sources(self, share: Share) -> list[RangeSource]:
        sources: list[RangeSource] = []
        reference = parse_reference(share.source) if not Path(share.source).expanduser().exists() else None
        if reference is not None and len(reference.files) == 1:
            sources.append(HubRanges(reference.files[0]))
        if share.copy_on and share.copy_on != self.node_id and self.tunnels is not None:
            sources.append(PeerRanges(self.tunnels, share.copy_on, share.model, share.fingerprint))
        return sources

    def _path(self, share: Share) -> Path:
        name = Path(share.source).name if share.source.endswith(".gguf") else f"{share.model}.gguf"
        return self.folder / ".split" / share.fingerprint.replace(":", "-") / name

    def _check_disk(self, missing: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if missing + DISK_MARGIN > free:
            raise MeshError(f"not enough disk space in {self.folder}: {missing / 1e6:.1f} MB to fetch, "
                            f"{free / 1e6:.1f} MB free")

    async def _fetch(self, share: Share) -> None:
        sources = self._sources(share)
        try:
            if not sources:
                raise MeshError("no source to fetch it from: not a hub model, and no node holds the whole file")
            if not share.size or not share.fingerprint:
                raise MeshError("the mesh knows neither its size nor its fingerprint yet")
            table, header = await read_table(sources, share.size)
            if table.fingerprint != share.fingerprint:
                raise MeshError(f"its header is not the mesh's (fingerprint {table.fingerprint}, mesh "
                                f"{share.fingerprint})")
            tensors = share_tensors(table, share)
            copy = SparseCopy(self._path(share), table)
            total = sum(t.nbytes for t in tensors if t.name not in copy.held())
            self.states[share.key] = replace(self.states[share.key], total=total)
            self._check_disk(total)
            log.info("%s: fetching %d tensors (%s) of its share from %s", share.model, len(tensors),
                     progress_line(total, 0, 0).removeprefix("downloading "), ", ".join(s.name for s in sources))

            def progress(done: int) -> None:
                self.states[share.key] = replace(self.states[share.key], done=done)

            await copy.fill(header, tensors, sources, hashes=share.hashes, progress=progress,
                            only_these=share.worker != HOST)
        except (MeshError, OSError) as exc:  # OSError: the models folder (a full disk, permissions)
            log.warning("%s: fetching its share failed: %s", share.model, exc)
            self.states[share.key] = replace(self.states[share.key], error=str(exc), at=self.clock.monotonic())
            return
        finally:
            with anyio.CancelScope(shield=True):
                for source in sources:
                    if isinstance(source, HubRanges):
                        await source.aclose()
        log.info("%s: its share is in %s", share.model, copy.path)
        self.states[share.key] = replace(self.states[share.key], path=copy.path)
