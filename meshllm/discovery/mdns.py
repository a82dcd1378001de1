"""Listings on the local network by mDNS/DNS-SD (zeroconf): meshes on one LAN find each other with no relay.

A publishing node registers a ``_meshllm._udp.local.`` service, one instance per node
(``<mesh id>-<node id>``), whose TXT record carries the same signed listing event it sends to the
relays, cut into 200-byte strings ``e0``, ``e1``, ... (a TXT string holds at most 255 bytes). A
reader browses for the service type for a moment, reassembles each instance's event and verifies it
exactly as one from a relay (``listing.parse_listing``): the LAN is no more trusted than a relay.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import anyio
from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from meshllm.jsonsafe import loads
from meshllm.discovery.nostr import Event

__all__ = ["SERVICE_TYPE", "MdnsDirectory", "event_from_txt", "event_to_txt"]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshllm._udp.local."
CHUNK = 200


def event_to_txt(event: Event) -> dict[str, str]:
    raw = json.dumps(event, separators=(",", ":"))
    return {f"e{i}": raw[at:at + CHUNK] for i, at in enumerate(range(0, len(raw), CHUNK))}


def event_from_txt(properties: dict[bytes, bytes | None]) -> object:
    """The event in a TXT record, or None if it holds none."""
    parts = []
    for i in range(len(properties)):
        part = properties.get(f"e{i}".encode())
        if part is None:
            break
        parts.append(part.decode(errors="replace"))
    try:
        return loads("".join(parts))
    except ValueError:
        return None


class MdnsDirectory:
    """This node's record on the LAN (while it publishes) and a browser of the others'."""

    def __init__(self, *, instance: str, port: int = 0, address: str = "127.0.0.1") -> None:
        self.instance = instance
        self.port = port
        self.address = address
        self._zc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None

    async def put(self, event: Event | None) -> None:
        """Advertise ``event`` (replacing the last one); None withdraws the record."""
        try:
            if event is None:
                await self._close()
                return
            info = ServiceInfo(SERVICE_TYPE, f"{self.instance}.{SERVICE_TYPE}", port=self.port,
                               server=f"{self.instance}.local.",
                               addresses=[socket.inet_aton(self.address)], properties=event_to_txt(event))
            if self._zc is None:
                self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            if self._info is None:
                await self._zc.async_register_service(info, allow_name_change=True)
            else:
                await self._zc.async_update_service(info)
            self._info = info
        except Exception as exc:  # zeroconf raises assorted types; the LAN is best effort
            log.warning("discovery: mDNS on the LAN failed: %s (carrying on without it)", exc)

    async def _close(self) -> None:
        zc, info, self._zc, self._info = self._zc, self._info, None, None
        if zc is not None:
            if info is not None:
                await zc.async_unregister_service(info)
            await zc.async_close()

    async def find(self, *, wait: float) -> list[Event]:
        """The events of the records seen on the LAN within ``wait`` seconds (none if mDNS fails here)."""
        try:
            return await self._browse(wait)
        except Exception as exc:  # as in put: a warning, never the node
            log.warning("discovery: mDNS on the LAN failed: %s (carrying on without it)", exc)
            return []

    async def _browse(self, wait: float) -> list[Event]:
        names: set[str] = set()

        def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change is not ServiceStateChange.Removed:
                names.add(name)

        found: list[Any] = []
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        try:
            browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
            await anyio.sleep(wait)
            await browser.async_cancel()
            for name in sorted(names):
                info = await zc.async_get_service_info(SERVICE_TYPE, name, timeout=1000)
                if info is not None and (event := event_from_txt(info.properties)) is not None:
                    found.append(event)
        finally:
            await zc.async_close()
        return found
