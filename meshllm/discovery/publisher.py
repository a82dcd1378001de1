"""Keeping a public mesh listed while it lives: the node component behind ``--publish``/``--mesh-name``.

Every ``poll`` seconds the publisher reads the replicated state into a listing (``mesh_summary``) and
publishes it when it changed or a third of its TTL has passed (so it never expires while the mesh
lives). While ``--max-clients`` or more clients are connected it publishes a delisting instead, and
lists the mesh again once fewer are. When the mesh key rotates (``rotate-key``) it replaces the listing
signed with the old key by a delisting, then lists the mesh under the new key. When it stops (the node stops) it withdraws the listing; a node
killed outright leaves a listing that expires by itself after the TTL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from meshllm.discovery.nostr import Event
from meshllm.discovery.listing import ListingContent, make_event, mesh_summary
from meshllm.state.document import MeshState
from meshllm.store.mesh import MeshCredentials

__all__ = ["ListingSink", "PublishSettings", "Publisher"]

log = logging.getLogger(__name__)


class ListingSink(Protocol):
    """Where listings go (``discovery.directory.Directory``): ``put(None)`` withdraws this node's LAN record."""

    timeout: float

    async def put(self, event: Event | None) -> int: ...


@dataclass(frozen=True)
class PublishSettings:
    name: str
    region: str = ""
    max_clients: int = 0  # 0: no limit
    ttl: float = 300.0
    poll: float = 1.0


class Publisher:
    def __init__(self, state: MeshState, directory: ListingSink, *, settings: PublishSettings,
                 creds: Callable[[], MeshCredentials], token: Callable[[], str], version: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.directory = directory
        self.settings = settings
        self.creds = creds
        self.token = token
        self.version = version
        self.clock = clock
        self.published: ListingContent | None = None  # the last content sent (delisted or not)
        self.published_at = 0.0
        self._last_created = 0
        self._signed_with: MeshCredentials | None = None  # the key of the live listing

    def current(self) -> tuple[ListingContent, int]:
        """The listing to publish now (a delisting at ``--max-clients``), and the clients connected."""
        creds = self.creds()
        content = mesh_summary(self.state, mesh_id=creds.mesh_id, name=self.settings.name,
                               region=self.settings.region, version=self.version, token=self.token())
        limit = self.settings.max_clients
        if limit and content.clients >= limit:
            return ListingContent(mesh=creds.mesh_id, name=self.settings.name, delisted=True), content.clients
        return content, content.clients

    async def step(self) -> None:
        """Publish the listing if it changed or is due for a refresh."""
        (content, clients), now = self.current(), self.clock()
        if self._signed_with is not None and self._signed_with != self.creds():  # the mesh key rotated
            await self._withdraw_old(self._signed_with, now)
        if content == self.published and now - self.published_at < self.settings.ttl / 3:
            return
        if content.delisted != (self.published is not None and self.published.delisted):
            log.info("discovery: %s mesh %r (%d client(s), --max-clients %d)",
                     "delisting" if content.delisted else "listing", self.settings.name,
                     content.clients, self.settings.max_clients)
        await self.directory.put(self._event(content, now))
        self.published, self.published_at = content, now

    async def _withdraw_old(self, old: MeshCredentials, now: float) -> None:
        """Replace the listing signed with a retired key (its token is refused now) by a delisting."""
        log.info("discovery: the mesh key rotated; withdrawing the listing signed with the old key")
        gone = ListingContent(mesh=old.mesh_id, name=self.settings.name, delisted=True)
        await self.directory.put(self._event(gone, now, creds=old))
        self.published = None

    def _event(self, content: ListingContent, now: float, *, creds: MeshCredentials | None = None) -> Event:
        """The signed listing, dated strictly after the last one (a relay keeps the newest per mesh; a tie
        within one second must not keep a listing over the delisting that followed it)."""
        self._last_created = max(int(now), self._last_created + 1)
        signer = self.creds() if creds is None else creds
        if creds is None:
            self._signed_with = signer
        return make_event(signer, content, now=self._last_created, ttl=self.settings.ttl)

    async def withdraw(self) -> None:
        creds = self.creds()
        gone = ListingContent(mesh=creds.mesh_id, name=self.settings.name, delisted=True)
        with anyio.move_on_after(self.directory.timeout + 1):
            await self.directory.put(self._event(gone, self.clock()))
        await self.directory.put(None)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List the mesh until cancelled, then withdraw the listing."""
        task_status.started()
        try:
            while True:
                try:
                    await self.step()
                except Exception:  # a bug in listing must never take the node down with it
                    log.exception("discovery: publishing the listing failed; trying again")
                await anyio.sleep(self.settings.poll)
        finally:
            with anyio.CancelScope(shield=True):
                await self.withdraw()
