"""The blackboard on the console port: post, read the feed, search (``meshllm blackboard`` and the MCP
server are thin clients of these routes).

    POST /api/blackboard          {"text": "...", "kind": "QUESTION"?, "reply_to": "<id>"?}
                                  -> {"item": {...}, "scrubbed": {"email": 1}, "notice": "..."}
    GET  /api/blackboard          ?q=WORDS&from=NAME&since=HOURS&limit=N
                                  -> {"items": [...]} (newest first; ranked when q is given)
    GET  /api/blackboard/stats    -> items, document bytes, gossip counters

A post is composed on this node, before anything enters the replicated board: the text is checked
(not empty, plain text, at most 4 KB), scrubbed of personal data and secrets (``state.scrub``; the
answer tells the poster what was replaced), given its kind, and refused with 429 when this node
already posted 10 times in the last minute. Its ``expires_at`` is 48 h on; the newest 500 posts of
the mesh are kept, the poster evicting the oldest in the same update as its post. The routes sit
behind the console's admin gate like every private route; on a node started without
``--blackboard`` they answer 404 with how to enable it (the node still relays the board).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshllm.api.errors import openai_error
from meshllm.state.board import (
    BOARD_TTL, MAX_ITEMS, Board, BoardError, BoardItem, PostKind, RateLimit, parse_kind, plan_gc, validate_text,
)
from meshllm.state.board_search import FeedFilter, feed, search
from meshllm.state.schema import NodeId
from meshllm.state.scrub import ScrubResult, scrub

__all__ = ["BlackboardAPI", "MAX_POST_BODY"]

MAX_POST_BODY = 64 * 1024  # a post's JSON body; the text itself is held to 4 KB
_DISABLED = ("this node runs without --blackboard; restart it with --blackboard (a node without a model: "
             "meshllm --client --blackboard)")


class _PostRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    kind: PostKind | None = None
    reply_to: str = ""


@dataclass(kw_only=True)
class BlackboardAPI:
    """Posting and reading through one replica of the board, as ``author`` of node ``node_id``."""

    board: Board
    node_id: NodeId
    author: str
    node_name: str = ""
    enabled: bool = True
    clock: Callable[[], float] = time.time
    rate: RateLimit = field(default_factory=RateLimit)
    cap: int = MAX_ITEMS
    stats: Callable[[], dict[str, Any]] = dict

    def routes(self) -> list[Route]:
        return [Route("/api/blackboard", self._guarded(self.read_or_post), methods=["GET", "POST"]),
                Route("/api/blackboard/stats", self._guarded(self.stats_route), methods=["GET"])]

    def _guarded(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def route(request: Request) -> Response:
            if not self.enabled:
                return openai_error(404, _DISABLED, code="blackboard_disabled")
            try:
                response: Response = await handler(request)
                return response
            except BoardError as exc:
                return openai_error(exc.status, str(exc), code=exc.code, param=exc.param,
                                    retry_after=exc.retry_after)
        return route

    # -- posting --------------------------------------------------------------------------------
    def post(self, text: str, *, kind: PostKind | None = None, reply_to: str = "") -> tuple[BoardItem, ScrubResult]:
        """Check, scrub and write one post; raises ``BoardError`` when the board refuses it."""
        text = validate_text(text)
        cleaned = scrub(text)
        final, kind = parse_kind(validate_text(cleaned.text), kind)
        validate_text(final)  # the kind's prefix may have made it longer
        if reply_to and self.board.get(reply_to) is None:
            raise BoardError(f"no post {reply_to!r} on the board (expired, or a wrong id?); see meshllm blackboard",
                             code="unknown_post", param="reply_to")
        now, items = self.clock(), self.board.items()
        self.rate.check(now, on_board=[(i.id, i.at) for i in items if i.node == self.node_id])
        item = BoardItem(id=self.board.new_id(self.node_id, now, final), author=self.author, node=self.node_id,
                         node_name=self.node_name, at=now, expires_at=now + BOARD_TTL, text=final, kind=kind,
                         reply_to=reply_to)
        evict = plan_gc([*items, item], now=now, cap=self.cap)
        self.board.add(item, evict=[i for i in evict if i != item.id])
        self.rate.note(item.id, now)
        return item, cleaned

    async def _post(self, request: Request) -> Response:
        body = await _read_capped(request, MAX_POST_BODY)
        try:
            parsed = _PostRequest.model_validate_json(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(p) for p in error["loc"]) or None
            raise BoardError(f"{param or 'body'}: {error['msg']} (send JSON like {{\"text\": \"STATUS: ...\"}})",
                             code="invalid_request", param=param) from None
        item, cleaned = self.post(parsed.text, kind=parsed.kind, reply_to=parsed.reply_to)
        notice = f"scrubbed before posting: {cleaned.summary()}" if cleaned.changed else ""
        return JSONResponse({"item": item.model_dump(mode="json"), "scrubbed": cleaned.found, "notice": notice})

    # -- reading --------------------------------------------------------------------------------
    async def read_or_post(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._post(request)
        params = request.query_params
        where = FeedFilter(since_hours=_number(params.get("since"), "since", float, 0.0, 1e6),
                           author=params.get("from", ""),
                           limit=int(_number(params.get("limit"), "limit", int, 1, MAX_ITEMS) or 20))
        items, now = self.board.items(), self.clock()
        replies: dict[str, list[str]] = {}
        for i in items:
            if i.reply_to:
                replies.setdefault(i.reply_to, []).append(i.id)
        query = params.get("q", "")
        if query.strip():
            shown = [{**s.item.model_dump(mode="json"), "score": s.score, "replies": replies.get(s.item.id, [])}
                     for s in search(items, query, now=now, where=where)]
        else:
            shown = [{**i.model_dump(mode="json"), "replies": replies.get(i.id, [])}
                     for i in feed(items, now=now, where=where)]
        return JSONResponse({"items": shown, "total": len(items), "now": now})

    async def stats_route(self, request: Request) -> Response:
        items = self.board.items()
        return JSONResponse({"items": len(items), "doc_bytes": self.board.size_bytes(), "cap": self.cap,
                             "oldest": items[0].at if items else None, "node": self.node_id, "author": self.author,
                             "gossip": self.stats()})


def _number(raw: str | None, name: str, kind: type[float] | type[int], low: float, high: float) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise BoardError(f"{name} must be a number, not {raw[:20]!r}", code="invalid_request", param=name) from None
    if not low <= value <= high or value != value:
        raise BoardError(f"{name} must be between {low:g} and {high:g}", code="invalid_request", param=name)
    return value


async def _read_capped(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BoardError(f"the request body is over {limit // 1024} KiB; a post's text holds at most 4 KB",
                             code="body_too_large", status=413, param=None)
    return bytes(body)
