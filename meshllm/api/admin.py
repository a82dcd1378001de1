"""Who may use the management API (:3131): the admin token, the Host a request names, JSON-only changes.

The console can apply manifests, drop models and print the invite token, so it is guarded like a root
shell. ``AdminGate`` wraps the console app and decides before any route runs:

- ``Host`` must name this node: a loopback name, or (with ``--listen-all``) one of the machine's
  addresses or host names. A page that rebinds its own DNS name to 127.0.0.1 sends its own name as
  ``Host`` and is refused (403), with or without a token.
- Anything but GET/HEAD changes state: it needs the admin token (``Authorization: Bearer``) and a
  ``Content-Type: application/json`` body. A cross-site form or a ``fetch`` without CORS can send
  neither a custom header nor that type, and the console answers no CORS preflight, so a web page the
  user opens cannot act on the node, not even blindly.
- Reads are open only on a loopback-bound console and only for the routes listed as public (status,
  one model, demand, the console page, its event stream, Prometheus metrics), which carry no secret; everything else, and everything when the console is
  reachable beyond loopback, needs the token. New routes are private unless listed here.

Failures are OpenAI-shaped errors that name what is missing and never echo a credential.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["AdminGate", "ConsoleAccess", "LOOPBACK_HOSTS", "PUBLIC_READS"]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Read-only routes a loopback-bound console answers without the token; a trailing "/" is a prefix
# (but "/" alone is the page, exactly).
# The console page ("/", its script and stylesheet) carries no secret; /api/events streams what
# /api/status says; /metrics (Prometheus) says how much, never what: scrapers rarely hold a token.
PUBLIC_READS = ("/api/status", "/api/demand", "/api/models/", "/", "/console.js", "/console.css", "/api/events",
                "/metrics")
_READ_METHODS = {"GET", "HEAD"}


@dataclass(frozen=True, kw_only=True)
class ConsoleAccess:
    """Who the console answers: the token, the Host names that mean this node, whether reads are open."""

    token: str
    hosts: frozenset[str] = LOOPBACK_HOSTS
    open_reads: bool = True  # False when the console is reachable beyond loopback

    @classmethod
    def for_bind(cls, token: str, *, listen_all: bool, names: Collection[str] = ()) -> ConsoleAccess:
        """Loopback only: open public reads and loopback hosts; ``--listen-all``: ``names`` too, no open reads."""
        hosts = LOOPBACK_HOSTS | {n.lower() for n in names} if listen_all else LOOPBACK_HOSTS
        return cls(token=token, hosts=frozenset(hosts), open_reads=not listen_all)

    def holds_token(self, authorization: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def refusal(self, *, method: str, path: str, host: str, authorization: str,
                content_type: str) -> tuple[int, str, str] | None:
        """Why a request is refused, as (status, code, message); None when it may go on."""
        if _host_name(host) not in self.hosts:
            return (403, "host_not_allowed",
                    "this console answers only requests that name it by a loopback name or, with "
                    "--listen-all, one of its addresses or host names in the Host header")
        authorised = self.holds_token(authorization)
        if method not in _READ_METHODS:
            if content_type.split(";")[0].strip().lower() != "application/json":
                return 415, "unsupported_media_type", "changes must be sent as Content-Type: application/json"
            if not authorised:
                return 401, "admin_token_required", _TOKEN_HELP
            return None
        if authorised or (self.open_reads and _public(path)):
            return None
        return 401, "admin_token_required", _TOKEN_HELP


_TOKEN_HELP = ("this request needs the node's admin token (Authorization: Bearer TOKEN); the meshllm CLI "
               "reads it from the node's state folder (admin.token): run it as the node's user, with the "
               "node's --state-dir, or set MESHLLM_ADMIN_TOKEN")


def _public(path: str) -> bool:
    # "/" (the console page) is the one exact path ending in "/": as a prefix it would open everything
    return any(path.startswith(p) if p.endswith("/") and p != "/" else path == p for p in PUBLIC_READS)


def _host_name(host: str) -> str:
    """The name part of a Host header: ``[::1]:3131`` -> ``::1``, ``Node.lan:3131`` -> ``node.lan``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


class AdminGate:
    """ASGI middleware applying ``ConsoleAccess`` to every HTTP request of the console app."""

    def __init__(self, app: ASGIApp, access: ConsoleAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self.access.refusal(method=scope["method"], path=scope["path"], host=headers.get("host", ""),
                                      authorization=headers.get("authorization", ""),
                                      content_type=headers.get("content-type", ""))
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refused
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        extra = [(b"www-authenticate", b'Bearer realm="meshllm console"')] if status == 401 else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
