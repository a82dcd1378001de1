"""One node's controllers on a fake clock and a fake supervisor, for the controller tests: what a test
changes is the document and the fake processes; what it checks is the document and the fake processes."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from meshllm.engine.models import file_fingerprint
from meshllm.reconcile.runtime import Controller, Runner
from meshllm.reconcile.served import ServedModelController
from meshllm.reconcile.supervisor import ProcessView
from meshllm.reconcile.timing import Backoff
from meshllm.reconcile.workers import WorkerController
from meshllm.state.document import MeshState
from meshllm.state.schema import (
    ModelSpec, NodeStatus, PlacementLease, ServerStatus, WorkerStatus, server_key,
)
from meshllm.testing.fakes import FakeClock, FakeSupervisor

ME = "n1"


def gguf(path: Path, *, content: bytes = b"") -> Path:
    """A file that passes for a model: a GGUF header with no tensors and no metadata (version 3, two
    zero counts), then anything (the fakes never load it)."""
    path.write_bytes(b"GGUF\x03" + b"\0" * 19 + content.ljust(64, b"\0"))
    return path


class FakeRpc:
    """The split host's way to its workers (``served.RpcConnector``), answering as a test says."""

    key = "rpc-key"
    clear = False

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}  # worker node -> why it does not answer

    async def endpoint(self, node_id: str, target: str) -> str:
        return f"127.0.0.1:{50000 + sum(node_id.encode()) % 1000}"

    async def probe(self, node_id: str, target: str) -> str | None:
        return self.problems.get(node_id)

    def tunnelled(self, endpoint: str) -> bool:
        return False


class World:
    """A node's document, clock, supervisor and model files."""

    def __init__(self, tmp: Path, *, clock: FakeClock | None = None, slow_stops: bool = False) -> None:
        self.tmp = tmp
        self.clock = clock or FakeClock()
        self.supervisor = FakeSupervisor(clock=self.clock, slow_stops=slow_stops)
        self.state = MeshState()
        self.backoff = Backoff(rng=random.Random(11))
        self.rpc = FakeRpc()
        self.state.put_node(NodeStatus(id=ME, capacity_bytes=10**9, incarnation=1.0))

    # -- the document -----------------------------------------------------------------------
    def model(self, name: str = "m", **fields: Any) -> ModelSpec:
        path = self.tmp / f"{name}.gguf"
        if not path.exists():
            gguf(path)
        spec = ModelSpec(name=name, source=str(path), node=ME, **fields)
        self.state.put_model(spec)
        return spec

    def lease(self, model: str = "m", *, node: str = ME, workers: Sequence[str] = (),
              shares: Sequence[float] = ()) -> None:
        self.state.put_lease(PlacementLease(model=model, slot=0, node=node, incarnation=1.0, workers=list(workers),
                                            tensor_split=list(shares)))

    def serve(self, name: str = "m", **fields: Any) -> ModelSpec:
        """``name`` wanted, and placed on this node (what placement would write)."""
        spec = self.model(name, **fields)
        self.lease(name)
        return spec

    def server(self, model: str = "m") -> ServerStatus | None:
        return self.state.servers().get(server_key(ME, model))

    def worker(self, model: str = "m") -> WorkerStatus | None:
        return self.state.workers().get(server_key(ME, model))

    def fingerprint(self, name: str = "m") -> str:
        return file_fingerprint(self.tmp / f"{name}.gguf")

    # -- controllers ------------------------------------------------------------------------
    def served(self, *, threads: int = 0, gpu_layers: int = 0, device: str = "") -> ServedModelController:
        return ServedModelController(self.state, node_id=ME, supervisor=self.supervisor, engine_dir=Path("/engine"),
                                     log_dir=self.tmp / "logs", gpu_layers=gpu_layers, threads=threads, rpc=self.rpc,
                                     device=device,
                                     clock=self.clock, backoff=self.backoff)

    def workers(self, *, direct_host: str = "") -> WorkerController:
        return WorkerController(self.state, node_id=ME, supervisor=self.supervisor, engine_dir=Path("/engine"),
                                log_dir=self.tmp / "logs", key="rpc-key", threads=1, backoff=self.backoff,
                                direct_host=direct_host)

    @asynccontextmanager
    async def running(self, *controllers: Controller[Any, Any, Any]) -> AsyncIterator[Runner]:
        runner = Runner(self.state, controllers, supervisor=self.supervisor, clock=self.clock, backoff=self.backoff)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await runner.idle()
            self._runner = runner
            yield runner
            await runner.stop()
            tg.cancel_scope.cancel()

    async def settle(self) -> None:
        """Let everything the last change or clock step set off play out."""
        await self.clock.woken()
        await self._runner.idle()

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, in steps no longer than the shortest wait anyone sleeps on."""
        target = self.clock.monotonic() + seconds
        while (step := min(target, self.clock.next_wakeup) - self.clock.monotonic()) > 0:
            self.clock.advance(step)
            await self.settle()
        if self.clock.monotonic() < target:
            self.clock.advance(target - self.clock.monotonic())
        await self.settle()

    def process(self, key: str) -> ProcessView:
        """The fake's view of the process of ``key`` (which must exist)."""
        view = self.supervisor.get(key)
        assert view is not None, f"no process for {key}"
        return view

    def pids(self) -> dict[str, int]:
        """What runs: key -> pid (stopping ones included)."""
        return {key: view.pid for key, view in self.supervisor.running().items()}
