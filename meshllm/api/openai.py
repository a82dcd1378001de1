"""The OpenAI-compatible API a node serves on :9337: list models, and proxy requests to llama-server.

The proxy peeks at the ``model`` field, asks the ``Router`` where that model is served, and forwards
the request body unchanged. The response streams back byte for byte (SSE included); when the client
goes away the upstream request is closed, which makes llama-server stop generating.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from meshllm.api.errors import openai_error
from meshllm.api.routing import Route, Router, Unavailable
from meshllm.api.tunnel import LocalForward, TunnelResponse, TunnelStream, open_tunnel
from meshllm.api.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from meshllm.errors import MeshError
from meshllm.transport.errors import ErrorCode, TransportError

__all__ = ["DEFAULT_MAX_BODY", "RelayResponse", "TunnelOpener", "create_openai_app", "make_local_forward",
           "upstream_pool"]

DEFAULT_MAX_BODY = 16 * 1024 * 1024
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages")
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}


class _TooLarge(Exception):
    pass


class RelayResponse:
    """An ASGI response relaying chunks from upstream; stops and closes upstream when the client leaves."""

    def __init__(self, status: int, headers: list[tuple[str, str]], chunks: AsyncIterator[bytes], *,
                 close: Callable[[], Awaitable[None]], done: Callable[[], None] | None = None) -> None:
        self.status = status
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
                        if k.lower() not in _HOP_BY_HOP or k.lower() == "content-length"]
        self.chunks = chunks
        self.close = close
        self.done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-send
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()
            if self.done is not None:
                self.done()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _model_of(body: bytes) -> str | Response:
    """The request's model name, or the 400 response explaining what is wrong with the body."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return openai_error(400, f"request body is not valid JSON: {exc}", code="invalid_json")
    if not isinstance(payload, dict):
        return openai_error(400, "request body must be a JSON object", code="invalid_request")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "you must provide a model parameter (a model name from /v1/models)",
                            code="missing_model", param="model")
    return model


class TunnelOpener(Protocol):
    """Opens an HTTP tunnel stream to another node of the mesh."""

    async def __call__(self, node_id: str) -> TunnelStream: ...


def create_openai_app(router: Router, *, tunnels: TunnelOpener | None = None,
                      max_body_bytes: int = DEFAULT_MAX_BODY,
                      demand: Callable[[str], None] | None = None) -> Starlette:
    """The :9337 app. ``router`` decides where each model's requests go; ``tunnels`` reach other nodes;
    ``demand`` hears of every request for a model the mesh knows (served or not yet)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with upstream_pool() as pool:
            app.state.upstream = pool
            yield

    async def proxy(request: Request) -> Response | RelayResponse:
        try:
            body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            return openai_error(413, f"request body is larger than the limit of {max_body_bytes} bytes",
                                code="request_too_large")
        except ClientDisconnect:
            return Response(status_code=499)
        model = _model_of(body)
        if isinstance(model, Response):
            return model
        target = router.resolve(model)
        if target is None:
            return openai_error(404, f"the model {model!r} does not exist in this mesh; see /v1/models",
                                code="model_not_found", param="model")
        if demand is not None:
            demand(model)
        if isinstance(target, Unavailable):
            return openai_error(503, target.reason, code="model_not_ready", retry_after=target.retry_after)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        router.acquire(target)
        try:
            if target.local:
                response = await _forward_local(request.app.state.upstream, target, request.url.path,
                                                request.url.query, headers, body)
            else:
                response = await _forward_remote(tunnels, target, request.url.path, request.url.query,
                                                 headers, body)
        except BaseException:
            router.release(target)
            raise
        if isinstance(response, RelayResponse):
            response.done = lambda: router.release(target)
        else:
            router.release(target)
        return response

    async def list_models(request: Request) -> JSONResponse:
        data = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "meshllm"}
                for name in router.ready_models()]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return openai_error(404, f"no route for {request.method} {request.url.path}", code="not_found")

    routes = [HttpRoute(path, proxy, methods=["POST"]) for path in PROXIED]
    routes += [HttpRoute("/v1/models", list_models, methods=["GET"]),
               HttpRoute("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found})


def upstream_pool() -> UpstreamPool:
    """The connections to this node's llama-servers."""
    return UpstreamPool(connect_timeout=5.0)


async def _open_local(pool: UpstreamPool, route: Route, path: str, query: str,
                      headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse | Response:
    """Send the request to this node's llama-server for ``route``; a 503 response if it does not answer."""
    target = f"{path}?{query}" if query else path
    try:
        return await pool.request("127.0.0.1", route.port, "POST", target, headers, body)
    except UpstreamError as exc:
        return openai_error(503, f"model {route.model!r} on node {route.node} did not answer: {exc}",
                            code="upstream_unavailable", retry_after=2)


async def _forward_local(pool: UpstreamPool, route: Route, path: str, query: str,
                         headers: list[tuple[str, str]], body: bytes) -> Response | RelayResponse:
    response = await _open_local(pool, route, path, query, headers, body)
    if isinstance(response, Response):
        return response
    return RelayResponse(response.status_code, response.headers, response, close=response.aclose)


async def _forward_remote(tunnels: TunnelOpener | None, route: Route, path: str, query: str,
                          headers: list[tuple[str, str]], body: bytes) -> Response | RelayResponse:
    if tunnels is None:
        return openai_error(503, f"model {route.model!r} is served by node {route.node}, "
                                 "which this node cannot reach", code="upstream_unavailable", retry_after=2)
    try:
        reply = await _tunnel_request(tunnels, route.node, path=path, query=query, headers=headers, body=body)
    except (anyio.BrokenResourceError, anyio.EndOfStream, MeshError, ValueError) as exc:
        return openai_error(503, f"model {route.model!r} on node {route.node} did not answer: {exc}",
                            code="upstream_unavailable", retry_after=2)
    return RelayResponse(reply.status, reply.headers, reply.chunks(), close=reply.aclose)


async def _tunnel_request(tunnels: TunnelOpener, node: str, *, path: str, query: str,
                          headers: list[tuple[str, str]], body: bytes) -> TunnelResponse:
    try:
        stream = await tunnels(node)
        return await open_tunnel(stream, method="POST", path=path, query=query, headers=headers, body=body)
    except TransportError as exc:
        if exc.code != ErrorCode.DUPLICATE:
            raise
    # the two nodes had dialled each other at once and this connection lost the tie-break before
    # any answer came: the request goes again, on the connection that won
    stream = await tunnels(node)
    return await open_tunnel(stream, method="POST", path=path, query=query, headers=headers, body=body)


def make_local_forward(router: Router, pool: UpstreamPool) -> LocalForward:
    """How this node answers requests tunnelled to it by peers: only from its own llama-servers."""

    async def forward(method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> UpstreamResponse | tuple[int, list[tuple[str, str]], bytes]:
        model = _model_of(body)
        target = router.resolve(model, local_only=True) if isinstance(model, str) else None
        if isinstance(model, Response) or not isinstance(target, Route) or path not in PROXIED:
            error = model if isinstance(model, Response) else openai_error(
                503, f"model {model!r} is not ready on this node", code="model_not_ready", retry_after=2)
            return _as_tuple(error)
        response = await _open_local(pool, target, path, query, headers, body)
        return _as_tuple(response) if isinstance(response, Response) else response

    return forward


def _as_tuple(response: Response) -> tuple[int, list[tuple[str, str]], bytes]:
    return response.status_code, list(response.headers.items()), bytes(response.body)
