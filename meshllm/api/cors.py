"""CORS on the OpenAI API, as llama-server does it, so browser front-ends can call a node directly.

A browser asks before a cross-origin request with a JSON body or an ``Authorization`` header (the
preflight, ``OPTIONS`` without credentials); ``CorsGate`` answers it itself, 200 and empty, in front
of the API-key gate, and adds ``Access-Control-Allow-Origin`` to every other answer (errors
included, so the page can read them); a request without an ``Origin`` (not from a browser) passes
untouched. The rules are llama-server's (``--cors-origins``,
``tools/server/server-http.cpp``):

- ``*`` (the default, credentials allowed): any origin, echoed back;
- ``localhost``: an origin on localhost, 127.0.0.1 or ::1 only, echoed back;
- otherwise a comma-separated list of origins: one of them, echoed back (llama-server sends the list
  as it is, which browsers accept only when it holds one origin).

Where llama-server allows the headers ``*``, a preflight gets the headers it asked for: a browser
never lets ``*`` cover ``Authorization``, and a page that sends an API key needs it covered. The
``Access-Control-*`` headers of the upstream llama-server (its own policy) are replaced by the node's.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEFAULT_CORS_ORIGINS", "CorsGate", "CorsPolicy"]

DEFAULT_CORS_ORIGINS = "*"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins may call the API from a browser (llama-server's ``--cors-*`` options)."""

    origins: str = DEFAULT_CORS_ORIGINS
    methods: str = "GET, POST, DELETE, OPTIONS"
    headers: str = "*"
    credentials: bool = True

    def allowed_origin(self, origin: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or None."""
        if not origin:
            return None if self.origins != "*" or self.credentials else "*"
        if self.origins == "*":
            return origin if self.credentials else "*"
        if self.origins == "localhost":
            try:
                host = urlsplit(origin).hostname
            except ValueError:
                return None
            return origin if host in _LOCAL_HOSTS else None
        allowed = {o.strip().rstrip("/") for o in self.origins.split(",") if o.strip()}
        return origin if origin.rstrip("/") in allowed else None


class CorsGate:
    """ASGI middleware: answers preflights and stamps the node's CORS headers on every response."""

    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = next((v for k, v in scope["headers"] if k == b"origin"), None) if scope["type"] == "http" else None
        if origin is None and (scope["type"] != "http" or scope["method"] != "OPTIONS"):
            await self.app(scope, receive, send)  # not from a browser: nothing to add (no cost per chunk)
            return
        request_headers = dict(scope["headers"])
        allowed = self.policy.allowed_origin((origin or b"").decode("latin-1"))
        stamp = [(b"access-control-allow-origin", allowed.encode("latin-1"))] if allowed is not None else []
        if allowed is not None and allowed != "*":
            stamp.append((b"vary", b"Origin"))
        if scope["method"] == "OPTIONS":
            await self._preflight(request_headers, stamp, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message["headers"] if not k.lower().startswith(b"access-control-")]
                message = {**message, "headers": kept + stamp}
            await send(message)

        await self.app(scope, receive, stamped)

    async def _preflight(self, request_headers: dict[bytes, bytes], stamp: list[tuple[bytes, bytes]],
                         send: Send) -> None:
        policy = self.policy
        asked = request_headers.get(b"access-control-request-headers", b"")
        headers = asked if policy.headers == "*" and asked else policy.headers.encode("latin-1")
        answer = [*stamp,
                  (b"access-control-allow-credentials", b"true" if policy.credentials else b"false"),
                  (b"access-control-allow-methods", policy.methods.encode("latin-1")),
                  (b"access-control-allow-headers", headers),
                  (b"content-type", b"text/html"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": answer})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
