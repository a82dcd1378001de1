"""A mesh listing: what a published mesh tells the world, signed, and how a node picks the best one.

A listing is a Nostr event (``discovery.nostr``) of kind ``LISTING_KIND`` (NIP-78 application data,
parameterized replaceable) with the tags ``d`` = ``meshllm:<mesh id>``, ``t`` = ``meshllm-mesh`` and
``expiration`` (NIP-40, unix seconds), and a JSON content:

    {"v": 1, "mesh": id, "name", "served": [models with a ready server], "wanted": [models asked for, unserved],
     "free_bytes", "nodes", "clients", "region", "version", "token": invite token, "delisted": false}

Trust. The event is signed with the mesh's publishing key, derived from the mesh id and secret
(``publishing_key``): only a holder of the mesh secret can sign for the mesh, every member signs the
same replaceable listing, and a ``rotate-key`` gives the mesh a new key. A reader accepts a listing only
if its signature and id verify, it has not expired and is not dated in the future, its content parses,
and its token names the same mesh as the listing *and* its secret derives the key that signed it: a
listing cannot send a node to a mesh other than the one it names and signs for. A delisted listing
(``delisted``: true, published by ``--max-clients`` and on stop) replaces the live one and is dropped.

The score ``choose`` uses (higher is better; a listing that does not fit is left out):

    fits        not delisted; serves or wants ``--model`` when one is asked for; named ``--mesh-name`` if given
    +100        serves the model asked for (+50 if it only wants it)
    +20         its region is the one asked for
    +0..10      free capacity, 1 per GB, at most 10
    -5 x        clients per node
    -0..5       age: 5 x (seconds since published / TTL)
    ties        the mesh id, so every node given the same listings picks the same mesh
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError

from meshllm.jsonsafe import loads
from meshllm.discovery.nostr import Event, NostrKey, sign_event, verify_event
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelName, NodeRole, ServerPhase
from meshllm.store.mesh import InviteToken, MeshCredentials

__all__ = ["LISTING_KIND", "LISTING_TAG", "Listing", "ListingContent", "choose", "listing_filter", "make_event",
           "mesh_summary", "parse_listing", "publishing_key", "score"]

LISTING_KIND = 30078
LISTING_TAG = "meshllm-mesh"
FUTURE_SLACK = 60  # seconds a listing may be dated ahead of this clock


def publishing_key(creds: MeshCredentials) -> NostrKey:
    """The key every member of the mesh signs its listing with."""
    seed = hashlib.sha256(b"meshllm nostr publishing key\0" + creds.mesh_id.encode() + b"\0" + creds.secret)
    return NostrKey(seed.digest())


class ListingContent(BaseModel):
    v: int = 1
    mesh: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=64)
    served: list[ModelName] = Field(default_factory=list, max_length=64)
    wanted: list[ModelName] = Field(default_factory=list, max_length=64)
    free_bytes: int = Field(default=0, ge=0)
    nodes: int = Field(default=0, ge=0)
    clients: int = Field(default=0, ge=0)
    region: str = Field(default="", max_length=32)
    version: str = Field(default="", max_length=32)
    token: str = Field(default="", max_length=4096)
    delisted: bool = False


@dataclass(frozen=True)
class Listing:
    """A verified, live listing."""

    content: ListingContent
    pubkey: str
    created_at: int
    expires_at: int
    source: str  # the relay URL, or "mdns"

    @property
    def mesh_id(self) -> str:
        return self.content.mesh

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)


def mesh_summary(state: MeshState, *, mesh_id: str, name: str, region: str, version: str,
                 token: str) -> ListingContent:
    """What the replicated state says about the mesh, as a listing's content."""
    alive = state.alive_nodes()
    models = state.models()
    ready = [s for s in state.servers().values() if s.node in alive and s.phase == ServerPhase.READY]
    served = sorted({s.model for s in ready})
    demanded = {d.model for d in state.demand().values()}
    wanted = sorted((set(models) | demanded) - set(served))
    capacity = sum(n.capacity_bytes for n in alive.values() if n.role != NodeRole.CLIENT)
    used = sum(models[s.model].size_bytes for s in ready if s.model in models)
    clients = sum(1 for n in alive.values() if n.role == NodeRole.CLIENT)
    return ListingContent(mesh=mesh_id, name=name, served=served, wanted=wanted, free_bytes=max(0, capacity - used),
                          nodes=len(alive) - clients, clients=clients, region=region, version=version, token=token)


def make_event(creds: MeshCredentials, content: ListingContent, *, now: float, ttl: float) -> Event:
    created = int(now)
    tags = [["d", f"meshllm:{creds.mesh_id}"], ["t", LISTING_TAG], ["expiration", str(int(now + ttl))]]
    if content.region:
        tags.append(["r", content.region])  # lets a relay filter by region one day; readers check content
    return sign_event(publishing_key(creds), kind=LISTING_KIND, tags=tags,
                      content=content.model_dump_json(exclude_defaults=False), created_at=created)


def listing_filter(*, since: int | None = None) -> dict[str, object]:
    found: dict[str, object] = {"kinds": [LISTING_KIND], "#t": [LISTING_TAG], "limit": 500}
    if since is not None:
        found["since"] = since
    return found


def _tag(event: Event, name: str) -> str | None:
    return next((t[1] for t in event["tags"] if len(t) >= 2 and t[0] == name), None)


def parse_listing(event: object, *, now: float, source: str = "") -> Listing | None:
    """The listing ``event`` carries, or None if it is forged, stale, malformed or for another mesh.
    A delisted listing is returned (so it can replace an older live one) with ``content.delisted``."""
    if not verify_event(event):
        return None
    assert isinstance(event, dict)
    try:
        expires = int(_tag(event, "expiration") or "")
        content = ListingContent.model_validate(loads(event["content"]))
        token = InviteToken.decode(content.token) if not content.delisted else None
    except (ValueError, ValidationError):
        return None
    if event["kind"] != LISTING_KIND or _tag(event, "d") != f"meshllm:{content.mesh}":
        return None
    if expires <= now or event["created_at"] > now + FUTURE_SLACK:
        return None
    if token is not None and (token.credentials.mesh_id != content.mesh
                              or publishing_key(token.credentials).pubkey != event["pubkey"]):
        return None
    return Listing(content, pubkey=event["pubkey"], created_at=event["created_at"], expires_at=expires,
                   source=source)


def newest(listings: Iterable[Listing]) -> list[Listing]:
    """One listing per mesh key, the newest; delisted meshes dropped. Sorted by name, then mesh id."""
    best: dict[tuple[str, str], Listing] = {}
    for listing in listings:
        key = (listing.pubkey, listing.mesh_id)
        if key not in best or listing.created_at > best[key].created_at:
            best[key] = listing
    live = [entry for entry in best.values() if not entry.content.delisted]
    return sorted(live, key=lambda entry: (entry.content.name, entry.mesh_id))


def score(listing: Listing, *, model: ModelName = ModelName(""), region: str = "", now: float,
          ttl: float) -> float | None:
    """The listing's score for a node asking for ``model`` in ``region`` (see the module docstring);
    None if it does not fit."""
    c = listing.content
    if c.delisted:
        return None
    points = 0.0
    if model:
        if model in c.served:
            points += 100
        elif model in c.wanted:
            points += 50
        else:
            return None
    if region and c.region.lower() == region.lower():
        points += 20
    points += min(10.0, c.free_bytes / 1e9)
    points -= 5 * c.clients / max(1, c.nodes)
    points -= 5 * min(1.0, listing.age(now) / max(ttl, 1.0))
    return points


def choose(listings: Sequence[Listing], *, model: ModelName = ModelName(""), region: str = "", name: str = "",
           now: float, ttl: float) -> Listing | None:
    """The best listing for this node, or None if none fits."""
    scored = [(s, entry) for entry in listings if (not name or entry.content.name == name)
              and (s := score(entry, model=model, region=region, now=now, ttl=ttl)) is not None]
    if not scored:
        return None
    return max(scored, key=lambda pair: (pair[0], pair[1].mesh_id))[1]
