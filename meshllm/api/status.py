"""The node's management API (console port, :3131 by default): ``/api/status`` for people and the CLI,
the control routes (``/api/apply`` and the rest, see ``control``) and ``/api/token`` (the invite token),
all behind ``admin.AdminGate``: the admin token, a Host naming this node, JSON-only changes. A request
body is read whole before any route runs, within ``CONSOLE_MAX_BODY`` bytes (413) and a deadline (408).

``/api/status`` reports what the state document says: this node, every node it knows, and each
desired model with its condition and the servers (and split workers) observed for it. ``meshllm get``
renders this JSON. It carries no secret: on a loopback-bound console anyone on the machine may read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshllm.api.admin import AdminGate, ConsoleAccess
from meshllm.api.bodies import BODY_DEADLINE, BodyLimit
from meshllm.api.control import AppliedHook, ControlAPI, EventSource, Resolver, no_events
from meshllm.api.errors import openai_error
from meshllm.engine.models import resolve_model
from meshllm.engine.sources import SourcePolicy
from meshllm.reconcile.placement import conditions
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelName, NodeId

__all__ = ["CONSOLE_MAX_BODY", "create_status_app", "status_snapshot"]

CONSOLE_MAX_BODY = 1 << 20  # 1 MiB: a manifest of MAX_MODELS models fits several times over


def status_snapshot(state: MeshState, *, node_id: NodeId, now: float,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    nodes, alive = state.nodes(), state.alive_nodes()
    servers, workers = state.servers(), state.workers()
    conds = conditions(state, now=now)
    demand: dict[ModelName, dict[str, float]] = {}
    for entry in state.demand().values():
        if entry.expires_at > now:
            summed = demand.setdefault(entry.model, {"count": 0, "rate": 0.0})
            summed["count"] += entry.count
            summed["rate"] += entry.rate
    models = []
    for name, spec in sorted(state.models().items()):
        serving = [s for s in servers.values() if s.model == name]
        condition = conds.get(name)
        models.append({
            **spec.model_dump(mode="json"),
            "servers": [s.model_dump(mode="json") for s in serving],
            "workers": [w.model_dump(mode="json") for w in workers.values() if w.model == name],
            "phase": _model_phase(serving),
            "condition": condition.model_dump(mode="json") if condition else None,
            "demand": demand.get(name),
        })
    me = nodes.get(node_id)
    return {
        **{key: value() if callable(value) else value for key, value in (extra or {}).items()},
        "node": me.model_dump(mode="json") if me else {"id": node_id},
        "nodes": [{**n.model_dump(mode="json"), "state": "alive" if nid in alive else "dead"}
                  for nid, n in sorted(nodes.items())],
        "models": models,
    }


def _model_phase(serving: list[Any]) -> str:
    phases = {s.phase.value for s in serving}
    for phase in ("ready", "loading", "failed"):
        if phase in phases:
            return phase
    return "pending"


def create_status_app(state: MeshState, *, node_id: NodeId, access: ConsoleAccess, sources: SourcePolicy,
                      extra: dict[str, Any] | None = None, invite: Callable[[], str] | None = None,
                      resolve: Resolver = resolve_model, events: EventSource = no_events,
                      on_applied: AppliedHook | None = None, routes: Sequence[Route] = (),
                      clock: Callable[[], float] = time.time, max_body_bytes: int = CONSOLE_MAX_BODY,
                      body_deadline: float = BODY_DEADLINE) -> AdminGate:
    """The console app: ``/api/status``, the control routes and ``routes``, behind ``access``.
    ``events`` and ``on_applied`` connect the store (model events; applied manifests); ``sources`` and
    ``resolve`` check manifest sources on this node; ``invite`` makes the invite token (``/api/token``)."""
    async def status(request: Request) -> JSONResponse:
        return JSONResponse(status_snapshot(state, node_id=node_id, now=clock(), extra=extra))

    async def token(request: Request) -> JSONResponse:
        if invite is None:
            return openai_error(404, "this node has no invite token", code="not_found")
        return JSONResponse({"token": invite()})

    control = ControlAPI(state=state, sources=sources, resolve=resolve, events=events, on_applied=on_applied,
                         clock=clock)
    app = Starlette(routes=[Route("/api/status", status, methods=["GET"]),
                            Route("/api/token", token, methods=["GET"]), *control.routes(), *routes])
    return AdminGate(BodyLimit(app, limit=max_body_bytes, deadline=body_deadline), access)
