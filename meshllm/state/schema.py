"""Typed views of the entities in the replicated state document.

The document (a pycrdt ``Doc``) has one top-level ``Map`` per entity kind; each entity is a nested
``Map`` keyed as below so that its fields merge independently when replicas meet.

=========  ======================  ==========================  ==================================
map        key                     writer                      meaning
=========  ======================  ==========================  ==================================
models     model name              anyone (CLI, manifests)     desired: this model should be
                                                               served (``ModelSpec``)
nodes      node id                 that node                   the node: name, capacity, role,
                                                               addresses (``NodeStatus``)
servers    ``<node id>/<model>``   the node running it         observed: a llama-server for the
                                                               model on that node (``ServerStatus``)
deaths     node id                 any node that saw it die    the node's incarnation that was
                                                               declared dead (``NodeDeath``)
=========  ======================  ==========================  ==================================

A node is alive while its ``NodeStatus.incarnation`` is newer than its ``NodeDeath`` (if any). A
node that learns it was declared dead while it is alive (a false suspicion, a healed partition)
refutes it by writing a newer incarnation.

Times are absolute UNIX seconds (float). pycrdt hands numbers back as floats, so every read goes
through these models, which coerce and validate. Values never hold nested plain dicts (a plain dict
is last-writer-wins as a whole); lists are short and written whole by their single writer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NewType

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ModelName",
    "ModelSpec",
    "NodeDeath",
    "NodeId",
    "NodeRole",
    "NodeStatus",
    "ServerPhase",
    "ServerStatus",
    "json_schemas",
    "server_key",
]

NodeId = NewType("NodeId", str)
ModelName = NewType("ModelName", str)


class _Entity(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelSpec(_Entity):
    """Desired: serve ``name`` from ``source`` (a catalog name or a path on the serving node).

    ``node`` pins the model to one node (``--model`` on a node's command line pins it there);
    empty means any node the placement reconciler picks.
    """

    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    node: str = ""
    ctx_size: int = Field(default=0, ge=0, description="context length; 0 takes the model's default")
    created_at: float = 0.0


class NodeRole(StrEnum):
    SERVER = "server"
    CLIENT = "client"


class NodeStatus(_Entity):
    """A node as it reports itself."""

    id: str
    name: str = ""
    role: NodeRole = NodeRole.SERVER
    capacity_bytes: int = Field(default=0, ge=0, description="VRAM (RAM on CPU nodes) offered to the mesh")
    api_url: str = ""
    addrs: list[str] = Field(default_factory=list, description="QUIC addresses (host:port) to dial it at")
    version: str = ""
    started_at: float = 0.0
    incarnation: float = Field(default=0.0, description="bumped at each start and to refute a death")
    rtt_ms: dict[str, float] = Field(default_factory=dict, description="measured RTT to peers, by node id")


class NodeDeath(_Entity):
    """A node's incarnation declared dead by a peer that lost it."""

    node: str
    incarnation: float
    by: str = ""
    at: float = 0.0


class ServerPhase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ServerStatus(_Entity):
    """Observed: a llama-server a node runs (or failed to run) for one model."""

    node: str
    model: str
    phase: ServerPhase
    port: int = Field(ge=0, le=65535)
    pid: int = 0
    restarts: int = Field(default=0, ge=0)
    message: str = ""
    since: float = 0.0

    @property
    def key(self) -> str:
        return server_key(self.node, self.model)


def server_key(node: str, model: str) -> str:
    return f"{node}/{model}"


def json_schemas() -> dict[str, dict[str, object]]:
    """JSON Schemas of the document's entities, as checked in under ``schemas/``."""
    return {f"state.{model.__name__}": model.model_json_schema()
            for model in (ModelSpec, NodeStatus, ServerStatus, NodeDeath)}
