"""The OpenAI-compatible API a node serves on :9337: list models, say whether it can serve, proxy requests.

The proxy reads the body (it is small, and names the model), asks the router for a lease on a route
for that model, and relays the request through the route's backend (``api.backends``: this node's
llama-server, or a peer through the mesh) along the one response path of ``api.proxy``. The body is
forwarded unchanged and the response streams back byte for byte (SSE included). The data plane's
connection pool lives as long as the app (its lifespan).

``/health`` answers 200 while at least one model can be served through this node (its own, or one
served elsewhere in the mesh) and 503 with the reason while none can: loading, or nothing served.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from meshllm.api.backends import PROXIED, BadRequest, DataPlane, ProxyRequest, model_of
from meshllm.api.bodies import BODY_DEADLINE, BodyTimeout, BodyTooLarge, ClientGone, read_body
from meshllm.api.errors import BackendUnavailable, openai_error
from meshllm.api.proxy import relay, send_error
from meshllm.api.routing import Lease

__all__ = ["DEFAULT_MAX_BODY", "OpenAIProxy", "create_openai_app"]

DEFAULT_MAX_BODY = 16 * 1024 * 1024


class OpenAIProxy:
    """The ASGI endpoint of the proxied routes."""

    def __init__(self, plane: DataPlane, *, max_body_bytes: int, demand: Callable[[str], None] | None,
                 body_deadline: float = BODY_DEADLINE) -> None:
        self.plane = plane
        self.max_body_bytes = max_body_bytes
        self.body_deadline = body_deadline
        self.demand = demand

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, limit=self.max_body_bytes, deadline=self.body_deadline)
        except BodyTooLarge:
            await send_error(send, 413, f"request body is larger than the limit of {self.max_body_bytes} bytes",
                             code="request_too_large")
            return
        except BodyTimeout:
            await send_error(send, 408, f"the request body did not arrive within {self.body_deadline:g} s",
                             code="request_timeout")
            return
        except ClientGone:
            return
        model = model_of(body)
        if isinstance(model, BadRequest):
            await send_error(send, 400, model.message, code=model.code, param=model.param)
            return
        lease = self.plane.router.lease(model)
        if lease is None:
            await send_error(send, 404, f"the model {model!r} does not exist in this mesh; see /v1/models",
                             code="model_not_found", param="model")
            return
        if self.demand is not None:
            self.demand(model)
        if not isinstance(lease, Lease):
            await send_error(send, 503, lease.reason, code="model_not_ready", retry_after=lease.retry_after)
            return
        with lease:
            route = lease.route
            what = f"{scope['path']} {route.model} via {'this node' if route.local else 'node ' + route.node}"
            try:
                backend = self.plane.backend(route)
            except BackendUnavailable as exc:
                await send_error(send, exc.status, str(exc), code=exc.code, retry_after=exc.retry_after)
                return
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            request = ProxyRequest(scope["method"], scope["path"], scope["query_string"].decode("latin-1"),
                                   headers, body)
            await relay(backend, request, receive, send, what=what)


def create_openai_app(plane: DataPlane, *, max_body_bytes: int = DEFAULT_MAX_BODY,
                      demand: Callable[[str], None] | None = None, body_deadline: float = BODY_DEADLINE) -> Starlette:
    """The :9337 app. ``plane`` routes and forwards each request; ``demand`` hears of every request for
    a model the mesh knows (served or not yet)."""
    router = plane.router

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with plane.running():
            yield

    async def list_models(request: Request) -> JSONResponse:
        data = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "meshllm"}
                for name in router.ready_models()]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> JSONResponse:
        reason = router.unready_reason()
        if reason is not None:
            return openai_error(503, reason, code="no_model_ready", retry_after=2)
        return JSONResponse({"status": "ok", "models": router.ready_models()})

    async def not_found(request: Request, exc: Exception) -> Response:
        return openai_error(404, f"no route for {request.method} {request.url.path}", code="not_found")

    proxy = OpenAIProxy(plane, max_body_bytes=max_body_bytes, demand=demand, body_deadline=body_deadline)
    routes = [HttpRoute(path, proxy, methods=["POST"]) for path in PROXIED]
    routes += [HttpRoute("/v1/models", list_models, methods=["GET"]),
               HttpRoute("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found})
