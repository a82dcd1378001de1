"""The web console (``/`` on the console port): one HTML page, a stylesheet and a script, no framework,
no build step, nothing fetched from elsewhere (it works offline).

The page reads ``/api/events`` (a snapshot of ``/api/status``, then changes) with ``fetch`` streaming
rather than ``EventSource``: ``EventSource`` cannot send an ``Authorization`` header, and a console
reachable beyond loopback needs the admin token for every read. A query-string ticket would put a
credential in URLs (history, logs); a header keeps the token out of them. The page asks for the token
when an answer says 401 (or an action needs it), keeps it in ``sessionStorage`` (gone with the tab)
and sends it as ``Authorization: Bearer``. The node prints a console link whose fragment carries the
token (``#token=...``): a fragment never leaves the browser, and the page moves it to
``sessionStorage`` and clears it from the address bar.

The chat posts to ``/api/chat/completions`` here, which relays to this node's OpenAI API (:9337), so
the tokens come through the same path as any client's; it is a change-like POST (admin token, JSON).
An API key for :9337, when the mesh uses keys, is sent in ``X-Meshllm-Api-Key`` and relayed as the
Bearer key.
"""

from __future__ import annotations

from importlib import resources

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from meshllm.api.errors import openai_error

__all__ = ["PAGE_PATHS", "console_routes", "page_routes"]

_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/console.js": ("console.js", "text/javascript; charset=utf-8"),
          "/console.css": ("console.css", "text/css; charset=utf-8")}
PAGE_PATHS = tuple(_FILES)  # the page itself: no secret in it
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"}


def page_routes() -> list[Route]:
    """The page's files (read once)."""
    folder = resources.files(__name__)
    pages = {path: ((folder / name).read_bytes(), kind) for path, (name, kind) in _FILES.items()}

    async def page(request: Request) -> Response:
        body, kind = pages[request.url.path]
        return Response(body, media_type=kind, headers=_HEADERS)

    return [Route(path, page, methods=["GET"]) for path in _FILES]


def console_routes(*, openai_base: str) -> list[Route]:
    """The page's files and the chat relay to ``openai_base`` (``http://127.0.0.1:9337``)."""

    async def chat(request: Request) -> Response:
        headers = {"content-type": "application/json"}
        if key := request.headers.get("x-meshllm-api-key", "").strip():
            headers["authorization"] = f"Bearer {key}"
        client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        try:
            upstream = await client.send(client.build_request(
                "POST", f"{openai_base}/v1/chat/completions", content=await request.body(), headers=headers),
                stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            return openai_error(502, f"this node's OpenAI API did not answer: {exc}", code="upstream_unavailable")

        async def close() -> None:
            await upstream.aclose()
            await client.aclose()

        kept = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=kept,
                                 background=BackgroundTask(close))

    return [*page_routes(), Route("/api/chat/completions", chat, methods=["POST"])]
