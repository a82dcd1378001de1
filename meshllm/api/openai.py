"""The OpenAI-compatible API a node serves on :9337: list models, and proxy requests to llama-server.

The proxy peeks at the ``model`` field, asks the ``Router`` where that model is served, and forwards
the request body unchanged. The response streams back byte for byte (SSE included); when the client
goes away the upstream request is closed, which makes llama-server stop generating.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from meshllm.api.errors import openai_error
from meshllm.api.routing import Route, Router, Unavailable

__all__ = ["DEFAULT_MAX_BODY", "create_openai_app"]

DEFAULT_MAX_BODY = 16 * 1024 * 1024
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}


class _TooLarge(Exception):
    pass


class UpstreamResponse:
    """An ASGI response relaying an upstream httpx response; closes it when the client disconnects."""

    def __init__(self, upstream: httpx.Response) -> None:
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        up = self.upstream
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in up.headers.items()
                   if k.lower() not in _HOP_BY_HOP or k.lower() == "content-length"]
        try:
            await send({"type": "http.response.start", "status": up.status_code, "headers": headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                async for chunk in up.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-send
        finally:
            await up.aclose()


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


def create_openai_app(router: Router, *, max_body_bytes: int = DEFAULT_MAX_BODY) -> Starlette:
    """The :9337 app. ``router`` decides where each model's requests go."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            app.state.client = client
            yield

    async def proxy(request: Request) -> Response | UpstreamResponse:
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
        if isinstance(target, Unavailable):
            return openai_error(503, target.reason, code="model_not_ready", retry_after=target.retry_after)
        return await _forward(request.app.state.client, request, target, body)

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


async def _forward(client: httpx.AsyncClient, request: Request, route: Route,
                   body: bytes) -> Response | UpstreamResponse:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
    upstream = client.build_request("POST", route.base_url + request.url.path, content=body,
                                    headers=headers, params=request.query_params)
    try:
        response = await client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        return openai_error(503, f"model {route.model!r} on node {route.node} did not answer: {exc!r}",
                            code="upstream_unavailable", retry_after=2)
    return UpstreamResponse(response)
