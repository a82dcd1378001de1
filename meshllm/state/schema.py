"""Typed views of the entities in the replicated state document.

The document (a pycrdt ``Doc``) has one top-level ``Map`` per entity kind; each entity is a nested
``Map`` keyed as below so that its fields merge independently when replicas meet.

==========  ======================  ==========================  ==================================
map         key                     writer                      meaning
==========  ======================  ==========================  ==================================
models      model name              anyone (CLI, manifests)     desired: this model should be
                                                                served (``ModelSpec``)
demand      ``<model>/<node id>``   the node whose proxy saw    requests for the model through that
                                    the requests                node's API, expiring by TTL
                                                                (``DemandEntry``)
leases      ``<model>#<slot>``      the node taking the slot    placement: which node serves replica
                                                                ``slot`` of the model
                                                                (``PlacementLease``; a plain value,
                                                                last writer wins as a whole)
nodes       node id                 that node                   the node: name, capacity, role,
                                                                addresses (``NodeStatus``)
servers     ``<node id>/<model>``   the node running it         observed: a llama-server for the
                                                                model on that node (``ServerStatus``)
workers     ``<node id>/<model>``   the node running it         observed: a ggml-rpc-server holding
                                                                layers of a split model for its host
                                                                (``WorkerStatus``)
deaths      node id                 any node that saw it die    the node's incarnation that was
                                                                declared dead (``NodeDeath``)
apikeys     key id (12 hex digits   the node whose console      a key every node's OpenAI API
            of the key's hash)      created it; any node        accepts, as its salted hash only;
                                    revokes it                  revoked: kept as a tombstone
                                                                (``ApiKey``)
rotations   retired key id          the node that ran           the mesh secret that replaced that
                                    ``rotate-key``              key, sealed under it (``KeyRotation``;
                                                                a plain value, written once)
importance  model file fingerprint  the node computing them     routing statistics of an MoE file:
            (``ModelSpec.           (expert-shard slot 0's      selections per expert per layer on
            fingerprint``)          node)                       calibration text (``ExpertImportance``)
==========  ======================  ==========================  ==================================

The blackboard's posts live in a document of their own, with its own gossip: see ``state.board``.

A model is *wanted* while it was applied from a manifest (``origin`` manifest), while the node whose
``--model`` named it lives (``origin`` node), or while any live demand for it remains. A lease is
valid while its node is alive: a dead node's slots are vacant at once, with no renewal traffic, and a
node that restarts keeps the slots nobody took meanwhile.

A node is alive while its ``NodeStatus.incarnation`` is newer than its ``NodeDeath`` (if any). A
node that learns it was declared dead while it is alive (a false suspicion, a healed partition)
refutes it by writing a newer incarnation.

An API key is never in the document, only ``sha256(API_KEY_HASH_LABEL + key)``: any member can read
the document, so it must not hold anything that opens :9337. A revoked key stays, with ``revoked_at``
set, so that a mesh which once had keys keeps requiring one after its last key is revoked (revoking
the only key must not open every node's API); ``meshllm keys purge`` removes the tombstones.

Times are absolute UNIX seconds (float). pycrdt hands numbers back as floats, so every read goes
through these models, which coerce and validate. Values never hold nested plain dicts (a plain dict
is last-writer-wins as a whole); lists are short and written whole by their single writer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NewType

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API_KEY_HASH_LABEL",
    "ApiKey",
    "DemandEntry",
    "ExpertImportance",
    "GpuShare",
    "ImportancePhase",
    "KeyRotation",
    "ModelName",
    "ModelOrigin",
    "ModelSpec",
    "NodeDeath",
    "NodeId",
    "NodeRole",
    "NodeStatus",
    "PlacementLease",
    "ServerPhase",
    "ServerStatus",
    "WorkerStatus",
    "demand_key",
    "json_schemas",
    "lease_key",
    "lease_model",
    "parse_demand_key",
    "parse_server_key",
    "server_key",
]

NodeId = NewType("NodeId", str)
ModelName = NewType("ModelName", str)


class _Entity(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelOrigin(StrEnum):
    """Who asked for a model, which decides how long it stays wanted."""

    MANIFEST = "manifest"  # meshllm apply: until deleted or dropped
    NODE = "node"  # a node's --model: while that node lives, then only while demand lasts


class ModelSpec(_Entity):
    """Desired: serve ``name`` from ``source`` (a catalog name or a path on the serving node).

    ``node`` pins the model to one node (``--model`` on a node's command line pins it there, and a
    manifest's ``spec.placement.node``); empty means any node the placement reconciler picks.
    """

    name: ModelName = Field(min_length=1)
    source: str = Field(min_length=1)
    node: NodeId = NodeId("")
    ctx_size: int = Field(default=0, ge=0, description="context length; 0 takes the model's default")
    created_at: float = 0.0
    origin: ModelOrigin = ModelOrigin.MANIFEST
    owner: NodeId = Field(default=NodeId(""), description="origin node: the node whose --model named it")
    replicas: int = Field(default=1, ge=1, description="servers wanted at least (more when the model is hot)")
    size_bytes: int = Field(default=0, ge=0, description="bytes of the GGUF file, for placement")
    draft: str = Field(default="", description="draft model for speculative decoding (a name or a path)")
    split: bool = Field(default=False, description="split it across nodes even when one node could hold it")
    fingerprint: str = Field(default="", description="identity of the GGUF file: its size and a hash of its "
                             "header (every tensor's name, type, shape and offset)")
    tensor_hashes: dict[str, str] = Field(default_factory=dict, description="sha256 (32 hex digits) of every "
                                          "tensor's bytes, by name: a split worker checks each piece it holds "
                                          "against it; empty while no node has held the whole file")
    copy_on: NodeId = Field(default=NodeId(""), description="a node holding the whole file (it computed "
                            "tensor_hashes): split participants without the file may fetch their pieces from it "
                            "over the mesh")
    embedding_length: int = Field(default=0, ge=0, description="the model's hidden width (n_embd): what a split "
                                  "sends between nodes per token scales with it; 0: unknown")
    embeddings: bool = Field(default=False, description="serve embeddings (llama-server --embeddings): an "
                             "embedding model")
    pooling: str = Field(default="", description="pooling of embeddings (none, mean, cls, last, rank); "
                         "empty: the model's own")
    rerank: bool = Field(default=False, description="serve reranking (llama-server --rerank): a reranker model")
    chat_template: str = Field(default="", description="chat template: a llama.cpp built-in name (chatml, "
                               "gemma, ...) or a jinja template; empty: the model's own")
    # a mixture-of-experts file (``moe.detect``), for expert sharding when no node holds it (or ``split``)
    experts: int = Field(default=0, ge=0, description="routed experts per MoE layer; 0: a dense model")
    experts_used: int = Field(default=0, ge=0, description="experts each token is routed to")
    expert_bytes: int = Field(default=0, ge=0, description="bytes of one expert over every MoE layer")
    expert_core: float = Field(default=0.5, ge=0, le=1, description="share of each layer's experts, by importance, "
                               "that every expert shard keeps")
    expert_ranks: list[str] = Field(default_factory=list, description="per MoE layer, expert ids most important "
                                    "first, comma-separated; empty: id order (moe.importance)")
    moe_problem: str = Field(default="", description="why this MoE file cannot be split by experts: "
                             "'Reason: message'")


class DemandEntry(_Entity):
    """Requests for ``model`` seen by ``node``'s API. Summed over nodes, it is the model's demand."""

    model: ModelName
    node: NodeId
    count: int = Field(default=0, ge=0, description="requests seen since the node started")
    rate: float = Field(default=0.0, ge=0, description="requests per minute over the last minute")
    last_active: float = 0.0
    expires_at: float = Field(default=0.0, description="last_active + TTL: the entry means nothing after")

    @property
    def key(self) -> str:
        return demand_key(self.model, self.node)


class PlacementLease(_Entity):
    """``node`` (in its ``incarnation``) serves replica ``slot`` of ``model``; ``hot``: a replica
    added because the model is much busier than the others, released when it cools down.

    A split model's lease names its host in ``node`` and the nodes holding the rest of its layers in
    ``workers`` (nearest first), with ``tensor_split`` the layer shares, workers first, host last."""

    model: ModelName
    slot: int = Field(ge=0)
    node: NodeId
    incarnation: float
    at: float = 0.0
    hot: bool = False
    workers: list[NodeId] = Field(default_factory=list, description="split: the nodes running ggml-rpc-server")
    tensor_split: list[float] = Field(default_factory=list, description="split: layer shares, workers then host")
    shards: int = Field(default=0, ge=0, description="expert sharding: the shard count (slot = shard index); 0: none")
    expert_core: int = Field(default=0, ge=0, description="expert sharding: experts per layer every shard keeps")
    expert_copies: int = Field(default=0, ge=0, description="expert sharding: shards holding each other expert")

    @property
    def key(self) -> str:
        return lease_key(self.model, self.slot)


class NodeRole(StrEnum):
    SERVER = "server"
    CLIENT = "client"


class GpuShare(_Entity):
    """One GPU a node offers, and how much of it (``--max-vram`` takes from each in proportion)."""

    name: str
    bytes: int = Field(ge=0)


class NodeStatus(_Entity):
    """A node as it reports itself."""

    id: NodeId
    name: str = ""
    role: NodeRole = NodeRole.SERVER
    capacity_bytes: int = Field(default=0, ge=0, description="VRAM (RAM on CPU nodes) offered to the mesh")
    gpus: list[GpuShare] = Field(default_factory=list, description="the GPUs behind capacity_bytes (none: RAM)")
    api_url: str = ""
    addrs: list[str] = Field(default_factory=list, description="QUIC addresses (host:port) to dial it at")
    version: str = ""
    started_at: float = 0.0
    incarnation: float = Field(default=0.0, description="bumped at each start and to refute a death")
    rtt_ms: dict[NodeId, float] = Field(default_factory=dict, description="measured RTT to peers, by node id")


class NodeDeath(_Entity):
    """A node's incarnation declared dead by a peer that lost it."""

    node: NodeId
    incarnation: float
    by: NodeId = NodeId("")
    at: float = 0.0


class ServerPhase(StrEnum):
    DOWNLOADING = "downloading"  # fetching the model's files; ``message`` has the progress
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ServerStatus(_Entity):
    """Observed: a llama-server a node runs (or failed to run) for one model."""

    node: NodeId
    model: ModelName
    phase: ServerPhase
    port: int = Field(ge=0, le=65535)
    pid: int = 0
    restarts: int = Field(default=0, ge=0)
    message: str = ""
    since: float = 0.0
    recovering: bool = Field(default=False, description="started again after the previous server failed")
    workers: list[NodeId] = Field(default_factory=list, description="split: the workers this server runs with")
    shard: str = Field(default="", description="expert shard it serves, 'index/count' (1-based); empty: the model")
    experts: int = Field(default=0, ge=0, description="expert shard: experts per layer it keeps")
    file_bytes: int = Field(default=0, ge=0, description="expert shard: bytes of its GGUF (its memory, about)")
    quality: str = Field(default="", description="expert shard: measured agreement with the whole model, if any")

    @property
    def key(self) -> str:
        return server_key(self.node, self.model)


class WorkerStatus(_Entity):
    """Observed: a ggml-rpc-server on ``node`` holding layers of ``model`` for the split's ``host``,
    loaded from the node's own copy of the model file, serving only clients with the mesh's RPC key."""

    node: NodeId
    model: ModelName
    host: NodeId
    phase: ServerPhase
    port: int = Field(default=0, ge=0, le=65535, description="its port on the worker node")
    direct: str = Field(default="", description="host:port a host with --rpc-direct connects to straight; "
                                                "empty: reached only through the QUIC tunnel")
    pid: int = 0
    message: str = ""
    since: float = 0.0

    @property
    def key(self) -> str:
        return server_key(self.node, self.model)


class ImportancePhase(StrEnum):
    COMPUTING = "computing"
    READY = "ready"
    FAILED = "failed"


class ExpertImportance(_Entity):
    """How often each expert of an MoE file was chosen on calibration text (``moe.importance``), computed
    once per file by one node and read by every node that plans or writes expert shards of it. ``counts``
    has one entry per MoE layer, ``"<layer>:<c0>,<c1>,..."`` (selections per expert, expert id order)."""

    fingerprint: str = Field(min_length=1, description="the model file's fingerprint (ModelSpec.fingerprint)")
    model: ModelName = Field(default=ModelName(""), description="the model it was computed for")
    node: NodeId = Field(default=NodeId(""), description="the node computing (or that computed) them")
    phase: ImportancePhase = ImportancePhase.COMPUTING
    counts: list[str] = Field(default_factory=list, description="per MoE layer: '<layer>:<count>,<count>,...'")
    tokens: int = Field(default=0, ge=0, description="calibration tokens routed (per layer)")
    message: str = Field(default="", description="failed: why (shards then use expert id order)")
    at: float = Field(default=0.0, description="when the phase began")


API_KEY_HASH_LABEL = b"meshllm api key v1\0"  # domain separation: this hash is for nothing else


class ApiKey(_Entity):
    """An API key of the mesh, as its hash: every node's OpenAI API (:9337) accepts the key it hashes
    from, until ``revoked_at`` is set. ``id`` is the first 12 hex digits of ``hash``."""

    id: str = Field(pattern=r"^[0-9a-f]{12}$")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of API_KEY_HASH_LABEL and the key, hex")
    name: str = Field(default="", max_length=64)
    hint: str = Field(default="", max_length=16, description="the key's first characters, to recognise it")
    created_at: float = 0.0
    created_by: NodeId = Field(default=NodeId(""), description="the node whose console created it")
    revoked_at: float = Field(default=0.0, description="when it was revoked; 0: valid")
    revoked_by: NodeId = Field(default=NodeId(""), description="the node whose console revoked it")

    @property
    def revoked(self) -> bool:
        return self.revoked_at > 0


class KeyRotation(_Entity):
    """The mesh key ``old`` was retired for the key ``new``: the new secret, sealed (AES-GCM) under a
    key derived from the old one, so only nodes that held the old secret can open it (see
    ``store.rotation``). Members refuse hellos proven with ``old`` from then on."""

    old: str = Field(min_length=1, description="key id of the retired mesh secret")
    new: str = Field(min_length=1, description="key id of the secret that replaced it")
    nonce: str = Field(description="AES-GCM nonce, base64")
    sealed: str = Field(description="the new secret sealed under the old one, base64")
    by: NodeId = Field(default=NodeId(""), description="the node that rotated the key")
    at: float = 0.0


def server_key(node: NodeId, model: ModelName) -> str:
    return f"{node}/{model}"


def demand_key(model: ModelName, node: NodeId) -> str:
    return f"{model}/{node}"


def lease_key(model: ModelName, slot: int) -> str:
    return f"{model}#{slot}"


# A document key read back (a change's key) names its node and model again: these are the one place
# where those strings become ids.
def parse_server_key(key: str) -> tuple[NodeId, ModelName]:
    """The node and model of a ``servers`` or ``workers`` key."""
    node, _, model = key.partition("/")
    return NodeId(node), ModelName(model)


def parse_demand_key(key: str) -> tuple[ModelName, NodeId]:
    """The model and node of a ``demand`` key."""
    model, _, node = key.rpartition("/")
    return ModelName(model), NodeId(node)


def lease_model(key: str) -> ModelName:
    """The model of a ``leases`` key."""
    return ModelName(key.rpartition("#")[0])


def json_schemas() -> dict[str, dict[str, object]]:
    """JSON Schemas of the document's entities, as checked in under ``schemas/``."""
    return {f"state.{model.__name__}": model.model_json_schema()
            for model in (ModelSpec, NodeStatus, ServerStatus, NodeDeath, DemandEntry, PlacementLease,
                          WorkerStatus, ApiKey, KeyRotation, ExpertImportance)}
