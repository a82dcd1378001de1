"""``meshllm`` with no arguments: the console, read-only, for a machine that runs no node yet.

The seed's first screen: the instructions on the terminal and a console on :3131 that shows this
machine (what it could offer the mesh) and the meshes published on the relays and the LAN, each with
the command that joins it. Nothing here can change anything: there is no state document, no engine,
no mesh, and every request other than a read answers 405 with what to run instead. It binds loopback
(``--listen-all`` widens it, as for a node): the page shows nothing secret, listings are public by
design, and their invite tokens are left out all the same (``meshllm discover --auto`` joins).

The page is the node's console (``api.console``): it reads the same ``/api/status`` and
``/api/events`` shapes, with ``readonly: true`` and a ``meshes`` list, and renders a banner and a
table of meshes instead of the chat.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshllm import __version__
from meshllm.api.console import page_routes
from meshllm.api.errors import openai_error
from meshllm.api.events import EventHub
from meshllm.discovery.listing import Listing
from meshllm.engine.capacity import Capacity, detect_capacity
from meshllm.node.config import NodeConfig
from meshllm.node.discovery import directory_for
from meshllm.node.http import HttpApi

__all__ = ["Lobby", "lobby_status", "run_lobby"]

log = logging.getLogger(__name__)

def lobby_status(*, capacity: Capacity, listings: Sequence[Listing], hint: str, now: float,
                 name: str = "") -> dict[str, Any]:
    """The ``/api/status`` of a machine that runs no node: itself, no models, the published meshes."""
    me = {"id": "this-machine", "name": name or socket.gethostname(), "role": "viewer",
          "capacity_bytes": capacity.bytes, "capacity": capacity.description, "version": __version__,
          "gpus": [{"name": name, "bytes": size} for name, size in capacity.devices],
          "rtt_ms": {}, "state": "alive"}
    meshes = [{"mesh_id": e.mesh_id, "name": e.content.name, "models": list(e.content.served),
               "wanted": list(e.content.wanted), "nodes": e.content.nodes, "clients": e.content.clients,
               "region": e.content.region, "free_bytes": e.content.free_bytes, "version": e.content.version,
               "age_s": round(e.age(now)), "source": e.source,
               "join": _join_command(e)}
              for e in listings]
    return {"readonly": True, "hint": hint, "mesh_id": None, "node": me, "nodes": [me], "models": [],
            "meshes": meshes}


def _join_command(listing: Listing) -> str:
    if listing.content.name:
        return f"meshllm --standby --mesh-name {listing.content.name}"
    served = listing.content.served
    return "meshllm discover --auto" + (f" --model {served[0]}" if served else "")


@dataclass
class Lobby:
    """The read-only console: a page, its status and event feed, and a refresh of the listings."""

    capacity: Capacity
    hint: str
    find: Callable[[], Any] | None = None  # async () -> list[Listing]; None: discovery off
    refresh_every: float = 30.0
    name: str = ""
    listings: list[Listing] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.events = EventHub(self.status)

    def status(self) -> dict[str, Any]:
        return lobby_status(capacity=self.capacity, listings=self.listings, hint=self.hint, now=time.time(),
                            name=self.name)

    def app(self) -> Starlette:
        async def status(request: Request) -> JSONResponse:
            return JSONResponse(self.status())

        async def refuse(request: Request) -> Response:
            if request.method in ("GET", "HEAD"):
                return openai_error(404, f"no {request.url.path} here: this is the read-only console of a "
                                    "machine that runs no node", code="not_found")
            return openai_error(405, "read-only console: no node runs here; start one with `meshllm --model "
                                "NAME` or join one with `meshllm --join TOKEN`", code="read_only")

        return Starlette(routes=[*page_routes(), Route("/api/status", status, methods=["GET"]),
                                 *self.events.routes(),
                                 Route("/{path:path}", refuse, methods=["GET", "HEAD", "POST", "PUT", "DELETE",
                                                                         "PATCH"])])

    async def _refresh(self) -> None:
        assert self.find is not None
        while True:
            try:
                self.listings = list(await self.find())
            except Exception as exc:  # discovery is best effort: the page shows what it had
                log.warning("discovery: %s", exc)
            self.events.notify()
            await anyio.sleep(self.refresh_every)

    async def run(self, *, host: str, port: int, announce: Callable[[str], None]) -> None:
        api = HttpApi(self.app(), host=host, port=port, what="console", on_stop=self.events.close)
        api.bind()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        announce(f"Read-only console: http://{shown}:{port}/  (Ctrl-C to stop)")
        async with anyio.create_task_group() as tg:
            await tg.start(api.run)
            tg.start_soon(self.events.run)
            if self.find is not None:
                tg.start_soon(self._refresh)


async def run_lobby(config: NodeConfig, *, hint: str, announce: Callable[[str], None]) -> None:
    """Serve the read-only console of ``config`` (its console port, host, name, relays, mDNS) until
    cancelled; discovery reads the relays and the LAN every 30 s."""
    directory = directory_for(config, instance="lobby") if config.mdns or config.relays != () else None
    find = (lambda: directory.find(wait=config.mdns_wait)) if directory is not None else None
    lobby = Lobby(capacity=detect_capacity(max_vram=config.max_vram), hint=hint, find=find, name=config.name)
    await lobby.run(host=config.host, port=config.console_port, announce=announce)
