"""The reconcile layer: the controllers that make this node match the state document (placement, served
models, split workers, expert shards, the demand janitor) on one runner, and the one process supervisor.
The names other layers use."""

from meshllm.reconcile.board import BoardKeeper
from meshllm.reconcile.demand import DemandRecorder, GarbageCollector
from meshllm.reconcile.downloads import Downloads
from meshllm.reconcile.leases import PlacementController
from meshllm.reconcile.placement import conditions
from meshllm.reconcile.runtime import Runner
from meshllm.reconcile.served import ServedModelController
from meshllm.reconcile.importance import ExpertImportanceController
from meshllm.reconcile.shards import ExpertShardController
from meshllm.reconcile.shares import ShareFetches
from meshllm.reconcile.supervisor import (
    LaunchSpec,
    ProcessPhase,
    ProcessSupervisor,
    ProcessView,
    ReadyCheck,
    Supervisor,
)
from meshllm.reconcile.timing import Backoff
from meshllm.reconcile.workers import RPC_RECORD_PREFIX, WorkerController

__all__ = [
    "Backoff",
    "BoardKeeper",
    "DemandRecorder",
    "Downloads",
    "ExpertImportanceController",
    "ExpertShardController",
    "GarbageCollector",
    "LaunchSpec",
    "PlacementController",
    "ProcessPhase",
    "ProcessSupervisor",
    "ProcessView",
    "RPC_RECORD_PREFIX",
    "ReadyCheck",
    "Runner",
    "ServedModelController",
    "ShareFetches",
    "Supervisor",
    "WorkerController",
    "conditions",
]
