"""The blackboard: short posts agents and people share across the mesh, in a replicated document of
their own (not the state document; bench/README.md "Blackboard" has the measurements behind that).

Layout of the board document (a pycrdt ``Doc``)::

    posts (Map)
      "<hour>.<client>" (Map)     one bucket per writer replica and hour of posting: only that replica
                                  (the Doc's client id, new at each start of a node) adds to it
        "<post id>" -> dict       a ``BoardItem``, a plain value written once, never changed

=========================  ====================  =====================================================
key                        writer                meaning
=========================  ====================  =====================================================
``<hour>.<client>``        the posting replica   the posts it made in that UTC hour (``hour`` is
                                                 ``int(at // 3600)``); removed by any node's keeper
                                                 once empty or wholly expired
``<hour>.<client>/<id>``   the posting replica   one post (``BoardItem``); removed by any node's keeper
                                                 when it expires (``expires_at``, 48 h after posting)
                                                 or falls out of the newest 500
=========================  ====================  =====================================================

Why buckets: a Yjs map keeps a small tombstone for every key ever deleted from it, so a flat map of
posts grows by every post the mesh ever made; a deleted bucket's posts collapse into a range, and
only the bucket's own key stays (bench/blackboard.py measures both). Why one writer per bucket: two
replicas creating the same nested map concurrently would each make their own and one would hide the
other's posts; a bucket named after its writer's client id is created by one replica only.

Deletion is idempotent, so every node may garbage-collect: each computes the same ``plan_gc`` from
the same items. The poster evicts beyond the cap in the same transaction as its post, so usually one
update carries both. No I/O here; gossip replicates ``Board.doc``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pycrdt import Doc, Map
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshllm.errors import MeshError
from meshllm.state.schema import NodeId

__all__ = [
    "BOARD_TTL", "MAX_ITEMS", "MAX_TEXT_BYTES", "POSTS_PER_MINUTE", "Board", "BoardError", "BoardItem", "PostKind",
    "RateLimit", "board_json_schemas", "bucket_hour", "parse_kind", "plan_gc", "validate_text",
]

MAX_TEXT_BYTES = 4096
BOARD_TTL = 48 * 3600.0
MAX_ITEMS = 500
POSTS_PER_MINUTE = 10


class BoardError(MeshError):
    """A post the board refuses; the message says why and what to do. ``status`` is the HTTP status."""

    def __init__(self, message: str, *, code: str, status: int = 400, param: str | None = "text",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.param, self.retry_after = code, status, param, retry_after


class PostKind(StrEnum):
    """What a post is, as its author chose: the ``KIND:`` prefix its text starts with."""

    STATUS = "STATUS"
    FINDING = "FINDING"
    QUESTION = "QUESTION"
    ANSWER = "ANSWER"


class BoardItem(BaseModel):
    """One post on the blackboard."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{12}$")
    author: str = Field(min_length=1, max_length=64, description="--name of the posting node, default $USER")
    node: NodeId = Field(description="id of the posting node")
    node_name: str = Field(default="", max_length=128, description="display name of the posting node")
    at: float = Field(description="when it was posted (UNIX seconds, the poster's clock)")
    expires_at: float = Field(description="at + 48 h: every node removes it after")
    text: str = Field(min_length=1, max_length=MAX_TEXT_BYTES, description="scrubbed text, at most 4096 bytes")
    kind: PostKind | None = None
    reply_to: str = Field(default="", pattern=r"^([0-9a-f]{12})?$", description="id of the post it answers")


def board_json_schemas() -> dict[str, dict[str, object]]:
    return {"board.BoardItem": BoardItem.model_json_schema()}


def bucket_hour(key: str) -> int | None:
    head, _, _ = key.partition(".")
    return int(head) if head.isdigit() else None


def validate_text(text: str) -> str:
    """``text`` stripped, or a ``BoardError`` naming what is wrong with it (empty, binary, too long)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BoardError("the text is not valid UTF-8 (binary data?); post plain text",
                         code="invalid_text") from None
    stripped = text.strip()
    if not stripped:
        raise BoardError("the text is empty; write what you are working on, found or want to ask",
                         code="empty_text")
    bad = next((ch for ch in stripped if (ord(ch) < 32 and ch not in "\n\t\r") or 0x7F <= ord(ch) < 0xA0
                or ch == "\ufffd"), None)
    if bad is not None:
        raise BoardError(f"the text holds the control character U+{ord(bad):04X} (binary data?); post plain text",
                         code="invalid_text")
    if size > MAX_TEXT_BYTES:
        raise BoardError(f"the text is {size} bytes; a post holds at most {MAX_TEXT_BYTES} (4 KB): shorten it "
                         "or split it into posts", code="text_too_long")
    return stripped


def parse_kind(text: str, kind: PostKind | None) -> tuple[str, PostKind | None]:
    """The text with its ``KIND:`` prefix, and the kind: an explicit ``kind`` is written as the prefix
    when the text has none; otherwise the prefix (any case) decides."""
    head, sep, rest = text.partition(":")
    named = PostKind.__members__.get(head.strip().upper()) if sep and len(head) <= 10 else None
    if named is not None:
        text = f"{named.value}:{rest}"
        if kind is not None and kind != named:
            raise BoardError(f"kind {kind.value} does not match the text's {named.value}: prefix; drop one",
                             code="kind_mismatch", param="kind")
        return text, named
    if kind is not None:
        return f"{kind.value}: {text}", kind
    return text, None


def plan_gc(items: Iterable[BoardItem], *, now: float, cap: int = MAX_ITEMS) -> list[str]:
    """Ids to remove: every expired post, then the oldest beyond ``cap`` (oldest first, ties by id)."""
    live = sorted((i for i in items), key=lambda i: (i.at, i.id))
    expired = [i.id for i in live if i.expires_at <= now]
    kept = [i for i in live if i.expires_at > now]
    return expired + [i.id for i in kept[:max(0, len(kept) - cap)]]


@dataclass
class RateLimit:
    """At most ``limit`` posts per ``window`` seconds from this node: a sliding window on its clock."""

    limit: int = POSTS_PER_MINUTE
    window: float = 60.0

    def __post_init__(self) -> None:
        self._recent: dict[str, float] = {}  # post id -> when

    def check(self, now: float, *, on_board: Iterable[tuple[str, float]] = ()) -> None:
        """Raise ``BoardError`` (429) when a post now would be one too many. ``on_board``: (id, time) of
        this node's posts on the board, which count too (a restarted node remembers its recent posts)."""
        recent = {i: t for i, t in (*self._recent.items(), *on_board) if now - self.window < t <= now}
        self._recent = recent
        if len(recent) >= self.limit:
            wait = sorted(recent.values())[-self.limit] + self.window - now
            raise BoardError(f"this node posted {len(recent)} times in the last {self.window:g} s (at most "
                             f"{self.limit}); post again in {max(1, round(wait))} s", code="rate_limited",
                             status=429, param=None, retry_after=wait)

    def note(self, post_id: str, now: float) -> None:
        self._recent[post_id] = now


class Board:
    """Typed access to one replica of the board document; ``doc`` is what gossip replicates."""

    def __init__(self, doc: Doc[Any] | None = None) -> None:
        self.doc = doc if doc is not None else Doc()
        self._posts: Map[Any] = self.doc.get("posts", type=Map)
        self._decoded: dict[str, dict[str, BoardItem]] = {}  # bucket -> id -> item
        self._stale: set[str] | None = None  # buckets to decode again; None: all of them
        self._listeners: dict[int, Callable[[], None]] = {}
        self._handles = itertools.count(1)
        self._ids = itertools.count()
        self._sub = self._posts.observe_deep(self._on_change)

    def _on_change(self, events: list[Any]) -> None:
        for event in events:
            path, keys = getattr(event, "path", None), getattr(event, "keys", None)
            if self._stale is None:
                break
            if path:
                self._stale.add(str(path[0]))
            elif path == [] and isinstance(keys, dict):
                self._stale.update(str(k) for k in keys)
            else:
                self._stale = None
        for listener in list(self._listeners.values()):
            listener()

    def observe(self, callback: Callable[[], None]) -> int:
        """Call ``callback()`` after any change (local or a peer's); it must not raise."""
        handle = next(self._handles)
        self._listeners[handle] = callback
        return handle

    def unobserve(self, handle: int) -> None:
        self._listeners.pop(handle, None)

    def new_id(self, node: NodeId, at: float, text: str) -> str:
        seed = f"{node}\0{self.doc.client_id}\0{at!r}\0{next(self._ids)}\0{text}".encode()
        return hashlib.blake2b(seed, digest_size=6).hexdigest()

    # -- reads ------------------------------------------------------------------------------
    def _decode(self) -> dict[str, dict[str, BoardItem]]:
        stale = set(self._posts.keys()) | set(self._decoded) if self._stale is None else self._stale
        for bucket in stale:
            value = self._posts.get(bucket)
            if not isinstance(value, Map):
                self._decoded.pop(bucket, None)
                continue
            decoded = {}
            for key, raw in value.items():
                try:
                    item = BoardItem.model_validate(raw)
                except ValidationError:
                    continue  # a malformed post from a peer is skipped, never fatal
                if item.id == key:
                    decoded[key] = item
            self._decoded[bucket] = decoded
        self._stale = set()
        return self._decoded

    def items(self) -> list[BoardItem]:
        """Every post on this replica, oldest first."""
        return sorted((i for bucket in self._decode().values() for i in bucket.values()), key=lambda i: (i.at, i.id))

    def get(self, item_id: str) -> BoardItem | None:
        return next((b[item_id] for b in self._decode().values() if item_id in b), None)

    def __len__(self) -> int:
        return sum(len(b) for b in self._decode().values())

    def size_bytes(self) -> int:
        """The document's encoded size: what a replica starting from nothing receives."""
        return len(self.doc.get_update())

    # -- writes -----------------------------------------------------------------------------
    def add(self, item: BoardItem, *, evict: Iterable[str] = ()) -> None:
        """Write ``item`` into this replica's bucket for its hour, and remove ``evict`` in the same
        transaction (one update carries both)."""
        key = f"{int(item.at // 3600)}.{self.doc.client_id}"
        with self.doc.transaction():
            bucket = self._posts.get(key)
            if not isinstance(bucket, Map):
                bucket = Map()
                self._posts[key] = bucket
            bucket[item.id] = item.model_dump(mode="json")
            self._remove(evict)

    def remove(self, ids: Iterable[str], *, expired_before: float | None = None) -> int:
        """Remove the posts ``ids``, then every bucket left empty, or (``expired_before``) whose hour
        ended a TTL before it (malformed leftovers too). Returns how many posts went."""
        with self.doc.transaction():
            return self._remove(ids, expired_before=expired_before)

    def _remove(self, ids: Iterable[str], *, expired_before: float | None = None) -> int:
        wanted, removed = set(ids), 0
        for key in list(self._posts.keys()):
            bucket = self._posts.get(key)
            hour = bucket_hour(key)
            if not isinstance(bucket, Map) or (expired_before is not None and hour is not None
                                               and (hour + 1) * 3600 + BOARD_TTL <= expired_before):
                removed += len(bucket) if isinstance(bucket, Map) else 0
                del self._posts[key]
                continue
            for item_id in wanted.intersection(bucket.keys()):
                del bucket[item_id]
                removed += 1
            if wanted and len(bucket) == 0:
                del self._posts[key]
        return removed
