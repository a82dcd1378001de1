"""Where listings live: the Nostr relays (``--relay``) and, on the LAN, mDNS; read and written as one.

``Directory.find`` asks every relay (concurrently) and the LAN, verifies each event it gets back
(``listing.parse_listing``) and keeps the newest live listing per mesh. ``Directory.put`` sends one
signed listing to every relay and the LAN. An unreachable relay, or one that sends garbage, forged or
malformed listings, costs a warning (once until it behaves again), never the node: discovery is best
effort by design.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from meshllm.discovery import nostr
from meshllm.discovery.listing import Listing, listing_filter, newest, parse_listing
from meshllm.discovery.nostr import Event, RelayError, verify_event

__all__ = ["DEFAULT_RELAYS", "Directory", "LanDirectory"]

log = logging.getLogger(__name__)

# Public relays that accept NIP-78 events from anyone (checked when this list was written); --relay replaces it.
DEFAULT_RELAYS = ("wss://relay.damus.io", "wss://nos.lol", "wss://relay.nostr.band")


class LanDirectory(Protocol):
    """Listings on the local network (``discovery.mdns``)."""

    async def put(self, event: Event | None) -> None: ...
    async def find(self, *, wait: float) -> list[Event]: ...


@dataclass
class Directory:
    relays: Sequence[str] = DEFAULT_RELAYS
    lan: LanDirectory | None = None
    timeout: float = 5.0
    _failing: set[str] = field(default_factory=set)
    _sent_bad: set[str] = field(default_factory=set)  # sources that sent forged or malformed listings last time

    def _failed(self, relay: str, exc: Exception) -> None:
        if relay not in self._failing:
            log.warning("discovery: %s (carrying on without it)", exc)
            self._failing.add(relay)

    def _ok(self, relay: str) -> None:
        if relay in self._failing:
            log.info("discovery: relay %s answers again", relay)
            self._failing.discard(relay)

    async def put(self, event: Event | None) -> int:
        """Publish ``event`` everywhere (None: withdraw this node's LAN record); returns how many relays took it."""
        accepted = 0

        async def one(relay: str) -> None:
            nonlocal accepted
            try:
                await nostr.publish(relay, event, timeout=self.timeout)  # type: ignore[arg-type]
                accepted += 1
                self._ok(relay)
            except RelayError as exc:
                self._failed(relay, exc)

        async with anyio.create_task_group() as tg:
            if event is not None:
                for relay in self.relays:
                    tg.start_soon(one, relay)
            if self.lan is not None:
                await self.lan.put(event)
        return accepted

    async def events(self, *, wait: float = 2.0) -> list[tuple[str, object]]:
        """Every event the relays and the LAN return, unverified, with where it came from."""
        found: list[tuple[str, object]] = []

        async def one(relay: str) -> None:
            try:
                got = await nostr.query(relay, [listing_filter()], timeout=self.timeout)
                found.extend((relay, e) for e in got)
                self._ok(relay)
            except RelayError as exc:
                self._failed(relay, exc)

        async def lan() -> None:
            assert self.lan is not None
            found.extend(("mdns", e) for e in await self.lan.find(wait=wait))

        async with anyio.create_task_group() as tg:
            for relay in self.relays:
                tg.start_soon(one, relay)
            if self.lan is not None:
                tg.start_soon(lan)
        return found

    async def find(self, *, wait: float = 2.0, now: float | None = None) -> list[Listing]:
        """The live, verified listings, one per mesh (forged, stale and malformed ones skipped: a source that
        sends forged or malformed ones is warned about once, until it sends none)."""
        when = time.time() if now is None else now
        parsed = []
        expired, bad = 0, Counter[str]()
        for source, event in await self.events(wait=wait):
            listing = parse_listing(event, now=when, source=source)
            if listing is not None:
                parsed.append(listing)
            elif _expired(event, when):
                expired += 1
            else:
                bad[source] += 1
        if expired:
            log.info("discovery: skipped %d expired listing(s)", expired)
        for source, count in bad.items():
            if source not in self._sent_bad:
                log.warning("discovery: ignored %d listing(s) from %s that were forged or malformed", count, source)
        self._sent_bad = set(bad)
        return newest(parsed)


def _expired(event: object, now: float) -> bool:
    """A genuine event past its expiration (relays may keep them): routine, not worth a warning."""
    if not verify_event(event) or not isinstance(event, dict):
        return False
    stamps = [t[1] for t in event["tags"] if len(t) >= 2 and t[0] == "expiration"]
    return bool(stamps) and stamps[0].isdigit() and int(stamps[0]) <= now
