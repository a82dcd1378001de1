"""One meshllm node: the state document, the mesh, the controllers and the two HTTP APIs, run together.

``run_node`` does what must happen before the node's parts exist: it loads the node's identity,
checks the ``--model`` arguments, finds (or builds) the engine, and opens the node's database. Then
it builds a ``Node`` (``node.node``), which joins (or founds) a mesh, writes the ``--model`` models
into the replicated document as desired state, runs the controllers that make llama-server and
rpc-server match it, and serves the OpenAI API (``--port``) and the management API (``--console``)
until SIGINT or SIGTERM; then it stops them in the reverse order and leaves the mesh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from meshllm.engine.build import require_engine
from meshllm.engine.catalog import catalog
from meshllm.engine.download import HubFile, ModelReference, check_remote, parse_reference
from meshllm.engine.ggufcheck import check_gguf
from meshllm.engine.ggufinfo import embedding_length
from meshllm.engine.models import file_fingerprint, file_hashes, models_dir, resolve_model
from meshllm.engine.ranges import remote_fingerprint
from meshllm.errors import MeshError, ModelError, ModelNotFetched
from meshllm.moe.spec import moe_spec_fields
from meshllm.node.config import NodeConfig
from meshllm.node.discovery import resolve_join
from meshllm.node.http import bind_socket
from meshllm.node.node import Node
from meshllm.state.schema import ModelOrigin, ModelSpec, NodeId
from meshllm.store.db import NodeStore
from meshllm.store.identity import load_identity
from meshllm.store.lock import hold_state_dir

__all__ = ["Node", "NodeConfig", "bind_socket", "check_model", "desired_models", "draft_for", "run_node"]

log = logging.getLogger(__name__)

DRAFT_SHARE = 0.1  # a catalog draft not on disk yet is fetched when it is at most this share of its model


def check_model(source: str) -> int:
    """Fail now (``ModelError``, one line) on a ``--model`` or ``--draft`` that cannot be had: a bad path,
    an unknown name, a hub file that is missing or gated. The bytes it takes (a hub model: to fetch)."""
    try:
        return resolve_model(source).size_bytes
    except ModelNotFetched as exc:
        if not isinstance(exc.reference, ModelReference):
            raise
        return sum(r.size for r in check_remote(exc.reference))


def draft_for(config: NodeConfig, source: str) -> str:
    """The draft of the ``--model`` ``source``: ``--draft``, none with ``--no-draft``, else the catalog's
    pairing (of a catalog name, or of a catalog model's file given by path) when its draft is on disk or
    small beside the model (at most ``DRAFT_SHARE`` of it)."""
    if config.no_draft:
        return ""
    if config.draft:
        return config.draft
    local = Path(source).expanduser()
    reference = parse_reference(source) if not local.exists() else None
    entry = reference.entry if reference is not None else next(  # a catalog model's file, fetched before
        (e for e in catalog() if e.files[0].rsplit("/", 1)[-1] == local.name), None)
    paired = parse_reference(entry.draft) if entry is not None and entry.draft else None
    if entry is None or paired is None or paired.entry is None:
        return ""
    if paired.present(models_dir()) or paired.entry.size_bytes <= DRAFT_SHARE * entry.size_bytes:
        return paired.name
    return ""


def _header_fingerprint(file: HubFile, size: int) -> str:
    """A hub file's fingerprint from its header, or "" when the hub would not give it (the node still
    serves the model; only a split without the file waits for it)."""
    try:
        return remote_fingerprint(file, size)
    except ModelError as exc:
        log.warning("%s/%s: %s", file.repo, file.path, exc)
        return ""


def desired_models(config: NodeConfig, node_id: NodeId, now: float) -> list[ModelSpec]:
    """The ``--model`` arguments as desired state pinned to this node; fails fast on a bad one."""
    if config.client and config.models:
        raise MeshError("--client nodes serve no models; drop --client or --model")
    if config.alias and len(config.models) != 1:
        raise MeshError("--alias names one model: give exactly one --model with it")
    options = {"ctx_size": config.ctx_size, "embeddings": config.embeddings, "pooling": config.pooling,
               "rerank": config.rerank, "chat_template": config.chat_template}
    specs = []
    for source in config.models:
        draft = draft_for(config, source)
        try:
            resolved = resolve_model(source)
        except ModelNotFetched as exc:  # a hub model: the served-model controller fetches it
            reference = exc.reference
            name = getattr(reference, "name", source)
            size = check_model(source)
            files = reference.files if isinstance(reference, ModelReference) else ()
            # one file: known by its header, and fetched in pieces where it is split
            fingerprint = _header_fingerprint(files[0], size) if len(files) == 1 else ""
            specs.append(ModelSpec(name=config.alias or name, source=source, node=node_id, created_at=now,
                                   origin=ModelOrigin.NODE, owner=node_id, size_bytes=size, fingerprint=fingerprint,
                                   split=config.split, draft=draft, **options))
            continue
        check_gguf(resolved.path)  # a truncated or corrupt file fails here, not in llama-server's restarts
        kept = source if not Path(source).expanduser().exists() else str(resolved.path)
        specs.append(ModelSpec(name=config.alias or resolved.name, source=kept, node=node_id, created_at=now,
                               origin=ModelOrigin.NODE, owner=node_id, size_bytes=resolved.size_bytes,
                               fingerprint=file_fingerprint(resolved.path), tensor_hashes=file_hashes(resolved.path),
                               copy_on=node_id, split=config.split, draft=draft,
                               embedding_length=embedding_length(resolved.path), **options).model_copy(update=moe_spec_fields(resolved.path)))
    return specs


async def run_node(config: NodeConfig, *, announce: Callable[[str], None] = print,
                   task_status: TaskStatus[dict[str, str]] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the node ``config`` describes until SIGINT, SIGTERM or cancellation; reports its id, API
    URL and invite token once it serves."""
    with hold_state_dir(config.state_dir):  # a second agent on this folder stops here, with one line
        await _run_locked(config, announce=announce, task_status=task_status)


async def _run_locked(config: NodeConfig, *, announce: Callable[[str], None],
                      task_status: TaskStatus[dict[str, str]]) -> None:
    config = await resolve_join(config, announce=announce)  # --auto / --mesh-name: the mesh to join, if any
    identity = load_identity(config.state_dir)
    node_id, now = identity.node_id, time.time()
    specs = await anyio.to_thread.run_sync(desired_models, config, node_id, now)
    engine_dir = None if config.client else await anyio.to_thread.run_sync(
        lambda: require_engine(announce=announce))
    store = await NodeStore.open(config.state_dir)
    try:
        await store.record_identity(node_id, identity.public_bytes)
        node = Node(config, identity, store, specs=specs, engine_dir=engine_dir, announce=announce)
        await node.run(task_status=task_status)
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
