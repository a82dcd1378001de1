"""The control API on the console port: apply, diff and delete manifests, drop a model, read demand,
describe a model. ``meshllm apply|diff|delete|drop|describe|get`` are thin clients of these routes.

Only holders of the admin token reach these routes (``admin.AdminGate``), and they may still be a
script or another machine, so the server validates manifests again (the CLI did too), admits only the
sources this node's operator allows (``SourcePolicy``), resolves each on this node (a missing file is a
422 naming its place in the manifest), and writes every change in one document transaction, or none
when anything is invalid. What apply writes is ``plan_apply``'s
plan, so ``diff`` reports exactly what ``apply`` would do.

Apply is all or nothing: every model is validated, resolved and bounded before the first write, and
every spec is checked to fit the document (``check_storable``) before the transaction opens. Bounds
beyond the manifest's own (``state.manifest``: at most ``MAX_MODELS`` models, ``MAX_REPLICAS``,
``MAX_CTX``): ``replicas`` at most ``REPLICA_HEADROOM`` times the serving nodes the mesh knows (a node
serves one replica of a model; some headroom lets a manifest run ahead of nodes still joining), and
``ctxSize`` at most the context the model was trained for (its GGUF's ``context_length``).

Persistence lives elsewhere: the store of applied manifests and the model events are injected
callables (``on_applied``, ``events``), optional, so this module and its tests need no database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Protocol

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshllm.api.bodies import loads
from meshllm.api.errors import openai_error
from meshllm.engine.ggufcheck import check_gguf
from meshllm.engine.ggufinfo import context_length, embedding_length
from meshllm.engine.models import ResolvedModel, file_fingerprint, file_hashes, looks_like_path, resolve_model
from meshllm.engine.sources import SourcePolicy
from meshllm.errors import ManifestError, ModelError
from meshllm.moe.spec import moe_spec_fields
from meshllm.reconcile.placement import conditions
from meshllm.state.changes import ChangeAction, ModelChange, plan_apply, plan_delete
from meshllm.state.document import MeshState, check_storable
from meshllm.state.manifest import LoadedManifest, Manifest, ManifestModel, MeshManifest, manifest_models, validate_documents
from meshllm.state.schema import ModelName, ModelSpec, NodeId, NodeRole, NodeStatus

__all__ = ["AppliedHook", "ControlAPI", "EventSource", "Resolver", "no_events"]

log = logging.getLogger(__name__)

Resolver = Callable[[str], ResolvedModel]
REPLICA_HEADROOM = 4  # replicas may be at most this many times the serving nodes the mesh knows (at least 1)


class EventSource(Protocol):
    """Recent events of a model, newest last (the store implements it); each a dict such as
    ``{"at": 1.7e9, "type": "Normal", "reason": "Started", "message": "...", "node": "..."}``."""

    async def __call__(self, model: ModelName, /) -> list[dict[str, Any]]: ...


class AppliedHook(Protocol):
    """Told the manifests of each successful apply (the store keeps them)."""

    async def __call__(self, manifests: list[Manifest], /) -> None: ...


async def no_events(model: ModelName, /) -> list[dict[str, Any]]:
    return []


class _RequestError(Exception):
    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class _DropRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelName


Handler = Callable[[Request], Awaitable[Response]]


def _errors(handler: Handler) -> Handler:
    """Errors as OpenAI-shaped responses: bad requests 400, invalid manifests 422."""
    @wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except _RequestError as exc:
            return openai_error(exc.status, str(exc), code=exc.code)
        except ManifestError as exc:
            return openai_error(422, str(exc), code="invalid_manifest")
    return wrapped


@dataclass(frozen=True, kw_only=True)
class ControlAPI:
    """The routes, over one replica of the state document."""

    state: MeshState
    sources: SourcePolicy
    resolve: Resolver = resolve_model
    events: EventSource = no_events
    on_applied: AppliedHook | None = None
    clock: Callable[[], float] = time.time

    def routes(self) -> list[Route]:
        return [
            Route("/api/apply", _errors(self.apply), methods=["POST"]),
            Route("/api/diff", _errors(self.diff), methods=["POST"]),
            Route("/api/delete", _errors(self.delete), methods=["POST"]),
            Route("/api/drop", _errors(self.drop), methods=["POST"]),
            Route("/api/demand", _errors(self.demand), methods=["GET"]),
            Route("/api/models/{name}", _errors(self.describe), methods=["GET"]),
        ]

    # -- apply, diff, delete ------------------------------------------------------------------------
    async def apply(self, request: Request) -> Response:
        loaded = await _manifests(request)
        changes, warnings = await self._plan(loaded)
        self._write(changes)
        if self.on_applied is not None:
            try:
                await self.on_applied([item.manifest for item in loaded])
            except Exception as exc:  # applied already: say so rather than fail the request
                log.exception("saving the applied manifests failed")
                warnings.append(f"applied, but the manifests were not saved on this node: {exc}")
        return _result(changes, warnings)

    async def diff(self, request: Request) -> Response:
        changes, warnings = await self._plan(await _manifests(request))
        return _result(changes, warnings)

    async def delete(self, request: Request) -> Response:
        names = [model.spec.name for model in manifest_models(await _manifests(request))]
        changes = plan_delete(self.state.models(), names)
        self._write(changes)
        return _result(changes, [])

    async def _plan(self, loaded: list[LoadedManifest]) -> tuple[list[ModelChange], list[str]]:
        models = manifest_models(loaded, now=self.clock())
        checked: dict[Path, int] = {}  # each file once per apply: many models may share one
        resolved = await anyio.to_thread.run_sync(lambda: [self._resolved(model, checked) for model in models])
        nodes, warnings, specs = self.state.nodes(), [], []
        serving = max(1, sum(1 for node in nodes.values() if node.role is not NodeRole.CLIENT))
        for model, spec in zip(models, resolved, strict=True):
            if spec.replicas > REPLICA_HEADROOM * serving:
                raise ManifestError(f"{model.where('replicas')}: {spec.replicas} replicas is more than "
                                    f"{REPLICA_HEADROOM} x the {serving} serving node(s) this mesh knows "
                                    "(a node serves one replica of a model)")
            node, warning = _pin(model, nodes)
            specs.append(spec.model_copy(update={"node": node}))
            if warning:
                warnings.append(warning)
        prune = any(isinstance(item.manifest, MeshManifest) for item in loaded)
        return plan_apply(self.state.models(), specs, prune=prune), warnings

    def _resolved(self, model: ManifestModel, checked: dict[Path, int]) -> ModelSpec:
        """The spec with its source (and draft) checked on this node, and the file's size."""
        source, resolved = self._check_source(model.spec.source, where=model.where("source"))
        draft = self._check_source(model.spec.draft, where=model.where("draft"))[0] if model.spec.draft else ""
        if resolved.path not in checked:
            try:
                check_gguf(resolved.path)
            except ModelError as exc:
                raise ManifestError(f"{model.where('source')}: {exc}") from None
            checked[resolved.path] = _trained_context(resolved)
        trained = checked[resolved.path]
        if trained and model.spec.ctx_size > trained:
            raise ManifestError(f"{model.where('ctxSize')}: {model.spec.ctx_size} is more than the "
                                f"{trained} tokens of context the model was trained for")
        return model.spec.model_copy(update={"source": source, "size_bytes": resolved.size_bytes, "draft": draft,
                                             "fingerprint": file_fingerprint(resolved.path),
                                             "tensor_hashes": file_hashes(resolved.path),
                                             "embedding_length": embedding_length(resolved.path),
                                             **moe_spec_fields(resolved.path)})

    def _check_source(self, source: str, *, where: str) -> tuple[str, ResolvedModel]:
        try:
            self.sources.check(source)  # before the disk is touched: errors say nothing of other files
            resolved = self.resolve(source)
        except ModelError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        kept = str(resolved.path) if looks_like_path(source) else source  # as --model keeps it
        return kept, resolved

    def _write(self, changes: list[ModelChange]) -> None:
        for change in changes:  # a write that fails half way would leave half an apply behind
            if change.spec is not None:
                try:
                    check_storable(change.spec)
                except ValueError as exc:
                    raise ManifestError(f"model/{change.name}: {exc}") from None
        with self.state.transaction():
            for change in changes:
                if change.action in (ChangeAction.CREATED, ChangeAction.CONFIGURED) and change.spec is not None:
                    self.state.put_model(change.spec)
                elif change.action in (ChangeAction.PRUNED, ChangeAction.DELETED):
                    self.state.remove_model(change.name)

    # -- drop, demand, describe ---------------------------------------------------------------------
    async def drop(self, request: Request) -> Response:
        try:
            name = _DropRequest.model_validate_json(await request.body()).model
        except ValidationError:
            raise _RequestError(400, 'expected a JSON body {"model": NAME}', code="invalid_request") from None
        demand = [key for key, entry in self.state.demand().items() if entry.model == name]
        leases = [key for key, lease in self.state.leases().items() if lease.model == name]
        if name not in self.state.models() and not demand and not leases:
            raise _RequestError(404, f"model {name!r} not found; `meshllm get models` lists them",
                                code="model_not_found")
        with self.state.transaction():
            removed = self.state.remove_model(name)
            for key in demand:
                self.state.remove_demand(key)
            for key in leases:
                self.state.remove_lease(key)
        return JSONResponse({"model": name, "removed": {"model": removed, "demand": len(demand),
                                                        "leases": len(leases)}})

    async def demand(self, request: Request) -> Response:
        now = self.clock()
        entries = sorted(self.state.demand().values(), key=lambda e: (e.model, e.node))
        return JSONResponse({"demand": [{**e.model_dump(mode="json"), "live": e.expires_at > now}
                                        for e in entries]})

    async def describe(self, request: Request) -> Response:
        name = ModelName(request.path_params["name"])
        spec = self.state.models().get(name)
        if spec is None:
            raise _RequestError(404, f"model {name!r} not found; `meshllm get models` lists them",
                                code="model_not_found")
        now = self.clock()
        condition = conditions(self.state, now=now).get(name)
        try:
            events = await self.events(name)
        except Exception:
            log.exception("reading the events of %s failed", name)
            events = []
        return JSONResponse({
            "model": spec.model_dump(mode="json"),
            "condition": condition.model_dump(mode="json") if condition else None,
            "servers": [s.model_dump(mode="json") for s in self.state.servers_for(name)],
            "workers": [w.model_dump(mode="json") for w in self.state.workers().values() if w.model == name],
            "leases": [lease.model_dump(mode="json")
                       for _, lease in sorted(self.state.leases().items()) if lease.model == name],
            "demand": [{**e.model_dump(mode="json"), "live": e.expires_at > now}
                       for e in self.state.demand().values() if e.model == name],
            "events": events,
        })


async def _manifests(request: Request) -> list[LoadedManifest]:
    """The request's manifests, validated; ``?source=NAME`` names them in errors (the CLI passes the
    file name; documents are numbered by their place in the list, ``null`` ones counted)."""
    try:
        body = loads(await request.body())
    except ValueError as exc:  # not JSON, not UTF-8, or nested too deeply
        raise _RequestError(400, f"the request body is not JSON ({exc}); send a JSON list of manifests",
                            code="invalid_json") from None
    if not isinstance(body, list):
        raise _RequestError(400, "expected a JSON list of manifests", code="invalid_request")
    return validate_documents(body, source_name=request.query_params.get("source") or "request")


def _trained_context(resolved: ResolvedModel) -> int:
    """The model's trained context length from its GGUF header, 0 when it does not say."""
    try:
        return context_length(resolved.path)
    except (ModelError, OSError):
        return 0


def _pin(model: ManifestModel, nodes: dict[NodeId, NodeStatus]) -> tuple[NodeId, str | None]:
    """``spec.placement.node`` as a node id (it may name a node); a node not known yet is kept as given."""
    wanted = model.spec.node
    if not wanted or wanted in nodes:
        return NodeId(wanted), None
    named = sorted(nid for nid, node in nodes.items() if node.name == wanted)
    if len(named) == 1:
        return named[0], None
    if named:
        raise ManifestError(f"{model.where('placement.node')}: node name {wanted!r} matches {len(named)} "
                            f"nodes ({', '.join(named)}); give the node id")
    return NodeId(wanted), (f"model/{model.spec.name}: placement.node {wanted!r} is not a known node id or name; "
                    "the model stays pending until that node joins")


def _result(changes: list[ModelChange], warnings: list[str]) -> JSONResponse:
    return JSONResponse({
        "changes": [{"kind": "Model", **change.model_dump(mode="json", by_alias=True)} for change in changes],
        "warnings": warnings,
    })
