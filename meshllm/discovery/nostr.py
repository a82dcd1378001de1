"""Nostr (NIP-01) events and relays: the public directory of meshes needs no server of ours.

An event is a JSON object ``{id, pubkey, created_at, kind, tags, content, sig}``. ``id`` is the hex
sha256 of the compact JSON array ``[0, pubkey, created_at, kind, tags, content]``; ``pubkey`` is a
32-byte x-only secp256k1 key (hex) and ``sig`` a BIP-340 Schnorr signature of the id (hex), made and
checked with ``coincurve`` (libsecp256k1). A relay speaks JSON arrays over a websocket:

    client -> ["EVENT", event]          relay -> ["OK", id, accepted, message]
    client -> ["REQ", sub, filter]      relay -> ["EVENT", sub, event] ... ["EOSE", sub]
    client -> ["CLOSE", sub]

Kinds 30000-39999 are parameterized replaceable: a relay keeps only the newest event per
(pubkey, kind, ``d`` tag), which is what a mesh listing re-published while the mesh lives needs.
A relay is untrusted: whatever it sends that is not a well-formed array is skipped, and every event
it returns is verified by the reader (``verify_event``) before it means anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Sequence
from typing import Any

import anyio
import coincurve
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from meshllm.jsonsafe import loads
from meshllm.errors import MeshError

__all__ = ["NostrKey", "RelayError", "event_id", "publish", "query", "sign_event", "verify_event"]

log = logging.getLogger(__name__)

Event = dict[str, Any]


class RelayError(MeshError):
    """A relay could not be reached, refused an event, or answered with nothing usable."""


class NostrKey:
    """A secp256k1 key pair that signs events (BIP-340 Schnorr)."""

    def __init__(self, secret: bytes) -> None:
        self._key = coincurve.PrivateKey(secret)  # raises ValueError for 0 or >= the group order
        self.pubkey = self._key.public_key_xonly.format().hex()

    def sign(self, digest: bytes, *, aux: bytes | None = None) -> bytes:
        return self._key.sign_schnorr(digest, secrets.token_bytes(32) if aux is None else aux)


def event_id(event: Event) -> str:
    """The NIP-01 id: sha256 of the event's serialized form."""
    body = [0, event["pubkey"], event["created_at"], event["kind"], event["tags"], event["content"]]
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest()


def sign_event(key: NostrKey, *, kind: int, tags: list[list[str]], content: str, created_at: int) -> Event:
    event: Event = {"pubkey": key.pubkey, "created_at": created_at, "kind": kind, "tags": tags, "content": content}
    event["id"] = event_id(event)
    event["sig"] = key.sign(bytes.fromhex(event["id"])).hex()
    return event


def verify_event(event: Any) -> bool:
    """Whether ``event`` is well formed, its id is its digest and its signature is its pubkey's."""
    try:
        if not isinstance(event, dict) or not isinstance(event.get("content"), str):
            return False
        if not isinstance(event["created_at"], int) or not isinstance(event["kind"], int):
            return False
        tags = event["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, list) and all(isinstance(s, str) for s in t)
                                                 for t in tags):
            return False
        if event_id(event) != event["id"]:
            return False
        pubkey = coincurve.PublicKeyXOnly(bytes.fromhex(event["pubkey"]))
        return bool(pubkey.verify(bytes.fromhex(event["sig"]), bytes.fromhex(event["id"])))
    except (KeyError, TypeError, ValueError):
        return False


def _frame(raw: str | bytes) -> list[Any] | None:
    try:
        msg = loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, list) and msg and isinstance(msg[0], str) else None


async def publish(url: str, event: Event, *, timeout: float = 5.0) -> None:
    """Send ``event`` to the relay at ``url`` and wait for its OK; raises RelayError otherwise."""
    try:
        with anyio.fail_after(timeout):
            async with connect(url, open_timeout=timeout, close_timeout=1) as ws:
                await ws.send(json.dumps(["EVENT", event]))
                async for raw in ws:
                    msg = _frame(raw)
                    if msg is None:
                        log.debug("relay %s sent a frame that is not a Nostr message: %.80r", url, raw)
                    elif msg[0] == "OK" and len(msg) >= 3 and msg[1] == event["id"]:
                        if msg[2] is True:
                            return
                        raise RelayError(f"relay {url} refused the listing: {msg[3] if len(msg) > 3 else ''}")
                raise RelayError(f"relay {url} closed without acknowledging the listing")
    except TimeoutError:
        raise RelayError(f"relay {url} did not answer within {timeout:g}s") from None
    except (OSError, WebSocketException, ValueError) as exc:
        raise RelayError(f"relay {url} is unreachable: {exc}") from None


async def query(url: str, filters: Sequence[dict[str, Any]], *, timeout: float = 5.0) -> list[Event]:
    """The events the relay at ``url`` holds that match ``filters``, unverified (the caller verifies);
    what it has sent by ``timeout`` if it never ends its answer. Raises RelayError if unreachable."""
    sub = "meshllm-" + secrets.token_hex(4)
    events: list[Event] = []
    try:
        async with connect(url, open_timeout=timeout, close_timeout=1) as ws:
            with anyio.move_on_after(timeout):
                await ws.send(json.dumps(["REQ", sub, *filters]))
                async for raw in ws:
                    msg = _frame(raw)
                    if msg is None or len(msg) < 2 or msg[1] != sub:
                        continue
                    if msg[0] == "EVENT" and len(msg) >= 3:
                        events.append(msg[2])
                    elif msg[0] in ("EOSE", "CLOSED"):
                        break
            try:
                await ws.send(json.dumps(["CLOSE", sub]))
            except WebSocketException:
                pass
    except TimeoutError:
        raise RelayError(f"relay {url} did not answer within {timeout:g}s") from None
    except (OSError, WebSocketException, ValueError) as exc:
        raise RelayError(f"relay {url} is unreachable: {exc}") from None
    return events
