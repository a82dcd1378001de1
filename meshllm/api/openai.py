"""The OpenAI-compatible API a node serves on :9337: list models, say whether it can serve, proxy requests.

Every llama-server endpoint of ``api.endpoints`` is proxied. The proxy reads the body (it is small,
and names the model), asks the router for a lease on a route for that model, and relays the request
through the route's backend (``api.backends``: this node's llama-server, or a peer through the mesh)
along the one response path of ``api.failover``, which moves it to another server of the model when its
own fails. Where the model has one server, the body is forwarded unchanged and the response streams
back byte for byte (SSE included); where it has more, a stream is followed event by event so it can be
carried on (``api.resume``). The data plane's
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

from meshllm.api.backends import DataPlane, ProxyRequest
from meshllm.api.bodies import BODY_DEADLINE, BodyTimeout, BodyTooLarge, ClientGone, read_body
from meshllm.api.endpoints import ENDPOINTS, BadRequest, is_anthropic, requested_model
from meshllm.api.errors import openai_error
from meshllm.api.failover import Failover, FailoverEvents, FailoverPolicy, Silence
from meshllm.api.proxy import send_error
from meshllm.api.routing import Lease, Unavailable
from meshllm.api.sessions import session_key
from meshllm.state.schema import ModelName

__all__ = ["DEFAULT_MAX_BODY", "OpenAIProxy", "create_openai_app"]

DEFAULT_MAX_BODY = 16 * 1024 * 1024


class OpenAIProxy:
    """The ASGI endpoint of the proxied routes."""

    def __init__(self, plane: DataPlane, *, max_body_bytes: int, demand: Callable[[ModelName], None] | None,
                 failover: Failover, body_deadline: float = BODY_DEADLINE) -> None:
        self.plane = plane
        self.failover = failover
        self.max_body_bytes = max_body_bytes
        self.body_deadline = body_deadline
        self.demand = demand

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        anthropic = is_anthropic(scope["path"])
        try:
            body = await read_body(scope, receive, limit=self.max_body_bytes, deadline=self.body_deadline)
        except BodyTooLarge:
            await send_error(send, 413, f"request body is larger than the limit of {self.max_body_bytes} bytes",
                             code="request_too_large", anthropic=anthropic)
            return
        except BodyTimeout:
            await send_error(send, 408, f"the request body did not arrive within {self.body_deadline:g} s",
                             code="request_timeout")
            return
        except ClientGone:
            return
        query = scope["query_string"].decode("latin-1")
        named = requested_model(body, query)
        session = self._session(named, scope, body)
        lease = self._lease(named, session=session)
        if isinstance(lease, BadRequest):
            await send_error(send, lease.status, lease.message, code=lease.code, param=lease.param,
                             anthropic=anthropic, retry_after=2 if lease.status == 503 else None)
            return
        if self.demand is not None:
            self.demand(lease.route.model if isinstance(lease, Lease) else lease.model)
        if isinstance(lease, Unavailable):
            await send_error(send, 503, lease.reason, code="model_not_ready", retry_after=lease.retry_after,
                             anthropic=anthropic)
            return
        with lease:
            route = lease.route
            what = f"{scope['path']} {route.model} via {'this node' if route.local else 'node ' + route.node}"
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            request = ProxyRequest(scope["method"], scope["path"], query, headers, body)
            await self.failover.serve(lease, request, receive, send, what=what, session=session)

    def _lease(self, named: str | None | BadRequest, *, session: str | None) -> Lease | Unavailable | BadRequest:
        """A lease for the model the request names (``api.endpoints``), or why there is none."""
        if isinstance(named, BadRequest):
            return named
        router = self.plane.router
        if named is None and router.only_model() is None:
            known = router.known_models()
            if not known:
                return BadRequest(router.unready_reason() or "no model is served", "no_model_ready", status=503)
            return BadRequest(f"this mesh serves several models ({', '.join(known)}): name one in `model` "
                              "(in the body, or ?model= for a request without one)", "missing_model", "model")
        lease = self.failover.lease(named, session=session)
        if lease is None:
            return BadRequest(f"the model {named!r} does not exist in this mesh; see /v1/models", "model_not_found",
                              "model", status=404)
        return lease

    def _session(self, named: str | None | BadRequest, scope: Scope, body: bytes) -> str | None:
        """The session key of a request for an expert-sharded model (``api.sessions``); None otherwise."""
        if isinstance(named, BadRequest) or not self.plane.router.sharded(named):
            return None
        return session_key(body, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])


def create_openai_app(plane: DataPlane, *, max_body_bytes: int = DEFAULT_MAX_BODY,
                      demand: Callable[[ModelName], None] | None = None, failover: FailoverPolicy | None = None,
                      failover_events: FailoverEvents | None = None, silence: Silence | None = None,
                      body_deadline: float = BODY_DEADLINE) -> Starlette:
    """The :9337 app. ``plane`` routes and forwards each request, moving it to another server of its
    model when its own fails (``failover``, counted in ``failover_events``); ``demand`` hears of every
    request for a model the mesh knows (served or not yet)."""
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
        return openai_error(404, f"no route for {request.method} {request.url.path}", code="not_found",
                            anthropic=is_anthropic(request.url.path))

    async def wrong_method(request: Request, exc: Exception) -> Response:
        allowed = getattr(exc, "headers", None) or {}
        response = openai_error(405, f"{request.url.path} does not take {request.method}"
                                + (f" (it takes {allowed['Allow']})" if "Allow" in allowed else ""),
                                code="method_not_allowed", anthropic=is_anthropic(request.url.path))
        response.headers.update(allowed)
        return response

    proxy = OpenAIProxy(plane, max_body_bytes=max_body_bytes, demand=demand,
                        failover=Failover(plane, policy=failover, events=failover_events, silence=silence),
                        body_deadline=body_deadline)
    routes = [HttpRoute(e.path, proxy, methods=[e.method]) for e in ENDPOINTS]
    for route in routes:  # starlette adds HEAD to GET; a HEAD's answer has no body for the proxy to relay
        assert route.methods is not None
        route.methods.discard("HEAD")
    routes += [HttpRoute(path, list_models, methods=["GET"]) for path in ("/v1/models", "/models")]
    routes += [HttpRoute(path, health, methods=["GET"]) for path in ("/health", "/v1/health")]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: wrong_method})
