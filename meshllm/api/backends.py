"""The data plane's backends: where a proxied request is sent once the router has leased it a route.

A ``Backend`` sends one request and returns when the response head has arrived; the response is
iterated for its body and then closed. Two implementations:

- ``LocalBackend``: this node's llama-server, over the pooled loopback client of ``api.upstream``;
- ``PeerBackend``: another node's llama-server, through an HTTP tunnel stream (``tunnels.http``).

Both fail the same two ways (``api.errors``): ``BackendUnavailable`` before the head, and an
exception from iterating the body after it (``BackendBroken`` locally, ``TunnelBroken`` through a
peer; the proxy treats anything raised there as a broken upstream). ``DataPlane`` holds the router,
the one connection pool (opened and closed by the OpenAI app's lifespan) and the tunnel client, picks
the backend for a route, and answers the requests peers tunnel to this node from the same pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from meshllm.api.bodies import loads
from meshllm.api.endpoints import MODEL_HEADER, BadRequest, endpoint_for, is_anthropic, requested_model
from meshllm.api.errors import BackendUnavailable, error_body
from meshllm.api.routing import Lease, Route, Router
from meshllm.api.upstream import UpstreamPool
from meshllm.state.schema import NodeId
from meshllm.tunnels.http import Answer, HttpTunnelClient, TunnelRequest, TunnelUnavailable

__all__ = ["Backend", "BackendResponse", "DataPlane", "FixedResponse", "LocalBackend", "PeerBackend", "ProxyRequest",
           "forwardable"]

# Headers that describe one hop, not the request: never forwarded. ``expect`` above all: the proxy
# answers ``Expect: 100-continue`` itself, and an upstream asked for it would send an interim response.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "expect",
})


def forwardable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop ones (requests and responses alike)."""
    return [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]


@dataclass(frozen=True)
class ProxyRequest:
    """A request as the proxy forwards it: the body is read whole (it names the model)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


class BackendResponse(Protocol):
    """A response whose head has arrived. Iterate it for the body (an exception there means the
    upstream broke mid-body); ``aclose`` always, which cancels an unfinished request upstream."""

    status_code: int
    headers: list[tuple[str, str]]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    async def send(self, request: ProxyRequest) -> BackendResponse:
        """Send ``request``; returns once the response head arrived. Raises ``BackendUnavailable``."""
        ...


# llama-server's 500s that blame the request (seen: a message without a role, tools that are not a list,
# /v1/messages without messages)
_CLIENT_MISTAKES = ("Failed to parse", "[json.exception.", "' is required", "Expected '")


async def _client_mistake(response: BackendResponse) -> BackendResponse:
    """``response``, or a 400 when it is one of llama-server's 500s for a malformed request (a message
    without ``role``, ``tools`` that is not a list): the client must fix its request, not retry it."""
    if response.status_code != 500 or not any(
            k.lower() == "content-type" and v.startswith("application/json") for k, v in response.headers):
        return response
    body = b""
    try:
        async for chunk in response:  # an error body: a few hundred bytes
            body += chunk
    finally:
        await response.aclose()
    try:
        message = loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return FixedResponse(500, response.headers, body)
    if isinstance(message, str) and any(m in message for m in _CLIENT_MISTAKES):
        return FixedResponse.error(400, message, code="invalid_request")
    return FixedResponse(500, response.headers, body)


class LocalBackend:
    """This node's llama-server on 127.0.0.1:``port``; its 500s for malformed requests become 400s."""

    def __init__(self, pool: UpstreamPool, route: Route) -> None:
        self.pool = pool
        self.route = route

    async def send(self, request: ProxyRequest) -> BackendResponse:
        try:
            response = await self.pool.request("127.0.0.1", self.route.port, request.method, request.target,
                                               forwardable(request.headers), request.body)
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"model {self.route.model!r} on this node did not answer: {exc}",
                                     status=exc.status, code=exc.code, retry_after=exc.retry_after) from None
        return await _client_mistake(response)


class PeerBackend:
    """Another node's llama-server, through an HTTP tunnel over the mesh; the request carries the
    model it was routed for (``MODEL_HEADER``: its body may name an alias, or nothing). A node it cannot
    reach is reported (``on_unreachable``: the router then leaves it out of the next requests' routes)."""

    def __init__(self, tunnels: HttpTunnelClient, route: Route, *,
                 on_unreachable: Callable[[NodeId], None] | None = None) -> None:
        self.tunnels = tunnels
        self.route = route
        self.on_unreachable = on_unreachable

    async def send(self, request: ProxyRequest) -> BackendResponse:
        headers = [(k, v) for k, v in forwardable(request.headers) if k.lower() != MODEL_HEADER]
        headers.append((MODEL_HEADER, self.route.model))
        tunnelled = TunnelRequest(request.method, request.path, request.query, headers, request.body)
        try:
            return await self.tunnels.request(self.route.node, tunnelled)
        except TunnelUnavailable as exc:
            if self.on_unreachable is not None:
                self.on_unreachable(self.route.node)
            raise BackendUnavailable(f"model {self.route.model!r} on node {self.route.node} did not answer: "
                                     f"{exc}") from None


class FixedResponse:
    """A whole response known in advance (an error the serving node answers a peer with)."""

    def __init__(self, status_code: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body

    @classmethod
    def error(cls, status: int, message: str, *, code: str, retry_after: float | None = None,
              anthropic: bool = False) -> FixedResponse:
        headers = [("content-type", "application/json")]
        if retry_after is not None:
            headers.append(("retry-after", str(max(1, round(retry_after)))))
        return cls(status, headers, error_body(status, message, code=code, anthropic=anthropic))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body

    async def aclose(self) -> None:
        pass


class _LeasedResponse:
    """A local response answering a peer, holding its lease until closed (no cost per chunk)."""

    def __init__(self, response: BackendResponse, lease: Lease) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self._response = response
        self._lease = lease

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._response.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._lease.release()


class DataPlane:
    """The router, the one upstream pool and the tunnel client: what the proxy and the HTTP tunnel
    service forward through. ``running()`` (the OpenAI app's lifespan) owns the pool."""

    def __init__(self, router: Router, *, tunnels: HttpTunnelClient | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.router = router
        self.tunnels = tunnels
        self.connect_timeout = connect_timeout
        self._pool: UpstreamPool | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DataPlane]:
        async with UpstreamPool(connect_timeout=self.connect_timeout) as pool:
            self._pool = pool
            try:
                yield self
            finally:
                self._pool = None

    def backend(self, route: Route) -> Backend:
        """How to reach ``route``; raises ``BackendUnavailable`` when this node cannot now."""
        if route.local:
            if self._pool is None:
                raise BackendUnavailable("this node's API is starting or stopping")
            return LocalBackend(self._pool, route)
        if self.tunnels is None:
            raise BackendUnavailable(f"model {route.model!r} is served by node {route.node}, which this node "
                                     "cannot reach")
        return PeerBackend(self.tunnels, route, on_unreachable=self.router.unreachable)

    async def answer_peer(self, request: TunnelRequest) -> Answer:
        """A request another node tunnelled here: served only by this node's own llama-servers, for
        the model the requesting node routed it to."""
        anthropic = is_anthropic(request.path)
        if endpoint_for(request.method, request.path) is None:
            return FixedResponse.error(404, f"no route for {request.method} {request.path}", code="not_found",
                                       anthropic=anthropic)
        model = next((v for k, v in request.headers if k.lower() == MODEL_HEADER), None)
        if model is None:
            named = requested_model(request.body, request.query)
            if isinstance(named, BadRequest):
                return FixedResponse.error(400, named.message, code=named.code, anthropic=anthropic)
            model = named
        lease = self.router.lease(model, local_only=True)
        if not isinstance(lease, Lease):
            return FixedResponse.error(503, f"model {model!r} is not ready on this node", code="model_not_ready",
                                       retry_after=2, anthropic=anthropic)
        try:
            backend = self.backend(lease.route)
            response = await backend.send(ProxyRequest(request.method, request.path, request.query,
                                                       request.headers, request.body))
        except BackendUnavailable as exc:
            lease.release()
            return FixedResponse.error(exc.status, str(exc), code=exc.code, retry_after=exc.retry_after,
                                       anthropic=anthropic)
        except BaseException:
            lease.release()
            raise
        return _LeasedResponse(response, lease)
