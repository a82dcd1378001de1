"""The blackboard on a fake clock: composing posts, TTL, the 500 cap, the rate limit, garbage collection on
every replica (three boards gossiping over memory channels), search ranking and the console routes."""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import httpx
import pytest
from pycrdt import Map

from meshllm.api.admin import AdminGate, ConsoleAccess
from meshllm.api.blackboard import BlackboardAPI
from meshllm.gossip import DocGossip, memory_channel_pair
from meshllm.reconcile.board import BoardKeeper
from meshllm.state.board import (
    BOARD_TTL, MAX_ITEMS, Board, BoardError, BoardItem, PostKind, RateLimit, parse_kind, plan_gc,
)
from meshllm.state.board_search import FeedFilter, feed, search
from starlette.applications import Starlette

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def poster(board: Board, clock: FakeClock, *, node: str = "node-a", author: str = "alice",
           rate: int = 10_000, cap: int = MAX_ITEMS) -> BlackboardAPI:
    return BlackboardAPI(board=board, node_id=node, author=author, node_name=node, clock=clock,
                         rate=RateLimit(limit=rate), cap=cap)


# -- composing a post ----------------------------------------------------------------------------
def test_a_post_is_scrubbed_kinded_and_kept_48_hours() -> None:
    board, clock = Board(), FakeClock()
    item, cleaned = poster(board, clock).post("  finding: alice@example.com fixed it in /home/alice/x  ")
    assert item.text == "FINDING: [EMAIL] fixed it in /home/[USER]/x"
    assert item.kind == PostKind.FINDING
    assert cleaned.found == {"email": 1, "home_path": 1}
    assert item.expires_at == T0 + BOARD_TTL
    assert board.items() == [item]


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("STATUS: x", None, ("STATUS: x", PostKind.STATUS)),
    ("question:why", None, ("QUESTION:why", PostKind.QUESTION)),
    ("why is it slow?", PostKind.QUESTION, ("QUESTION: why is it slow?", PostKind.QUESTION)),
    ("plain note", None, ("plain note", None)),
    ("Note: not a kind", None, ("Note: not a kind", None)),
])
def test_kind_comes_from_the_prefix_or_is_written_as_one(text: str, kind: PostKind | None,
                                                         expected: tuple[str, PostKind | None]) -> None:
    assert parse_kind(text, kind) == expected


@pytest.mark.parametrize(("text", "code"), [
    ("", "empty_text"),
    ("   \n\t ", "empty_text"),
    ("x" * 4097, "text_too_long"),
    ("é" * 2049, "text_too_long"),  # 4098 bytes in 2049 characters
    ("bin\x00ary\x01", "invalid_text"),
    ("\udcff\udcfe garbage from argv", "invalid_text"),
    ("ok text \ufffd replacement char", "invalid_text"),
])
def test_bad_text_is_refused_with_a_reason(text: str, code: str) -> None:
    board = Board()
    with pytest.raises(BoardError) as refused:
        poster(board, FakeClock()).post(text)
    assert refused.value.code == code and str(refused.value)
    assert board.items() == []


def test_exactly_4096_bytes_is_accepted() -> None:
    item, _ = poster(Board(), FakeClock()).post("x" * 4096)
    assert len(item.text.encode()) == 4096


def test_a_reply_must_name_a_post_on_the_board() -> None:
    board, clock = Board(), FakeClock()
    api = poster(board, clock)
    question, _ = api.post("QUESTION: which branch?")
    answer, _ = api.post("ANSWER: main", reply_to=question.id)
    assert answer.reply_to == question.id
    with pytest.raises(BoardError, match="no post 'aaaaaaaaaaaa'"):
        api.post("ANSWER: x", reply_to="aaaaaaaaaaaa")


# -- the rate limit ----------------------------------------------------------------------------
def test_the_eleventh_post_in_a_minute_is_refused_and_the_first_ten_stay() -> None:
    board, clock = Board(), FakeClock()
    api = poster(board, clock, rate=10)
    for i in range(10):
        api.post(f"STATUS: step {i}")
        clock.now += 1
    with pytest.raises(BoardError) as refused:
        api.post("STATUS: one too many")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert "post again in 50 s" in str(refused.value)
    assert [i.text for i in board.items()] == [f"STATUS: step {i}" for i in range(10)]
    clock.now = T0 + 60.5  # the first post left the window
    assert api.post("STATUS: later")[0].text == "STATUS: later"


def test_a_restarted_node_counts_its_posts_already_on_the_board() -> None:
    board, clock = Board(), FakeClock()
    first = poster(board, clock, rate=3)
    for i in range(3):
        first.post(f"STATUS: {i}")
    restarted = poster(board, clock, rate=3)  # a fresh rate limiter over the same replica
    with pytest.raises(BoardError, match="posted 3 times"):
        restarted.post("STATUS: again")
    other_node = poster(board, clock, node="node-b", rate=3)
    assert other_node.post("STATUS: b")[0].node == "node-b"


# -- TTL and cap -------------------------------------------------------------------------------
def item(n: int, *, at: float, expires_at: float | None = None) -> BoardItem:
    return BoardItem(id=f"{n:012x}", author="a", node="n", at=at, expires_at=expires_at or at + BOARD_TTL,
                     text=f"t{n}")


def test_plan_gc_removes_expired_then_the_oldest_beyond_the_cap() -> None:
    items = [item(n, at=T0 + n) for n in range(10)] + [item(99, at=T0, expires_at=T0 + 5)]
    assert plan_gc(items, now=T0 + 10, cap=100) == [f"{99:012x}"]
    assert plan_gc(items, now=T0 + 10, cap=7) == [f"{99:012x}", f"{0:012x}", f"{1:012x}", f"{2:012x}"]
    assert plan_gc(items, now=T0, cap=100) == []


def test_the_poster_keeps_the_newest_500_and_the_keeper_expires_the_rest() -> None:
    board, clock = Board(), FakeClock()
    api = poster(board, clock)
    for i in range(MAX_ITEMS + 20):
        api.post(f"STATUS: post {i}")
        clock.now += 10
    texts = [i.text for i in board.items()]
    assert len(texts) == MAX_ITEMS and texts[0] == "STATUS: post 20" and texts[-1] == f"STATUS: post {MAX_ITEMS + 19}"
    keeper = BoardKeeper(board, clock=clock)
    assert keeper.collect() == 0
    clock.now = board.items()[250].expires_at
    assert keeper.collect() == 251
    clock.now += BOARD_TTL
    assert keeper.collect() == MAX_ITEMS - 251
    assert len(board) == 0 and len(list(board.doc.get("posts", type=Map).keys())) == 0  # buckets gone too


def test_garbage_collection_keeps_the_document_small() -> None:
    board, clock = Board(), FakeClock()
    api, keeper = poster(board, clock), BoardKeeper(board, clock=clock)
    for i in range(2000):
        api.post(f"STATUS: post number {i} " + "x" * 150)
        clock.now += 100  # 2000 posts over 55 hours
        keeper.collect()
    live = Board()
    for kept in board.items():
        live.add(kept)
    assert len(board) == MAX_ITEMS
    # a flat map would keep about 22 bytes per deleted post (33 KB here, 20% more); buckets keep a few per hour
    assert board.size_bytes() < live.size_bytes() * 1.05


# -- every replica ------------------------------------------------------------------------------
async def test_posts_and_their_removal_reach_every_replica() -> None:
    clock = FakeClock()
    boards = [Board() for _ in range(3)]
    gossips = [DocGossip(b.doc, node_id=f"n{i}", anti_entropy=0.2, rng=random.Random(i)) for i, b in enumerate(boards)]
    keepers = [BoardKeeper(b, clock=clock, jitter=0.05, idle_check=0.05, rng=random.Random(i))
               for i, b in enumerate(boards)]

    async def until(check: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not check():
                await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        for g in gossips:
            await tg.start(g.run)
        for a, b in ((0, 1), (1, 2)):  # a chain: 0 - 1 - 2
            end_a, end_b = memory_channel_pair(gossips[a].node_id, gossips[b].node_id)
            tg.start_soon(gossips[a].attach, end_a)
            tg.start_soon(gossips[b].attach, end_b)
        await tg.start(keepers[0].run)  # one keeper, at one end: its removals must reach the others
        first = poster(boards[0], clock).post("FINDING: from the first node")[0]
        clock.now += 3600
        second = poster(boards[2], clock, node="n2", author="bob").post("QUESTION: from the last")[0]
        await until(lambda: all(len(b) == 2 for b in boards))
        assert [i.id for i in boards[1].items()] == [first.id, second.id]
        clock.now = first.expires_at + 1  # the first post expires everywhere; the second stays
        sizes = [b.size_bytes() for b in boards]
        await until(lambda: all([i.id for i in b.items()] == [second.id] for b in boards))
        assert all(b.size_bytes() < size for b, size in zip(boards, sizes, strict=True))  # content collected
        tg.cancel_scope.cancel()


async def test_the_keeper_saves_a_snapshot_a_fresh_replica_can_load(tmp_path: object) -> None:
    saved: list[bytes] = []
    board, clock = Board(), FakeClock()
    keeper = BoardKeeper(board, clock=clock, save=saved.append, save_every=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(keeper.run)
        posted = poster(board, clock).post("STATUS: remember me")[0]
        with anyio.fail_after(3):
            while not saved:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    restored = Board()
    restored.doc.apply_update(saved[-1])
    assert restored.items() == [posted]


# -- reading -----------------------------------------------------------------------------------
def test_search_ranks_by_matching_words_then_recency() -> None:
    board, clock = Board(), FakeClock()
    api = poster(board, clock)
    both_old = api.post("STATUS: [org/repo branch:main] refactoring billing module")[0]
    clock.now += 20 * 3600
    one_new = api.post("FINDING: billing tests need REDIS_URL")[0]
    clock.now += 60
    unrelated = api.post("QUESTION: who owns the auth client?")[0]
    clock.now += 60
    one_newer = api.post("STATUS: billing invoices done")[0]
    found = search(board.items(), "billing refactor", now=clock.now)
    assert [s.item.id for s in found] == [both_old.id, one_newer.id, one_new.id]
    assert unrelated.id not in {s.item.id for s in found}
    assert [s.item.id for s in search(board.items(), "question", now=clock.now)] == [unrelated.id]
    assert search(board.items(), "  ,, ", now=clock.now) == []


def test_feed_is_newest_first_and_filters_by_author_and_age() -> None:
    board, clock = Board(), FakeClock()
    old = poster(board, clock, author="alice").post("STATUS: old")[0]
    clock.now += 5 * 3600
    bob = poster(board, clock, node="node-b", author="Bob").post("STATUS: bob")[0]
    clock.now += 60
    new = poster(board, clock, author="alice").post("STATUS: new")[0]
    items = board.items()
    assert feed(items, now=clock.now) == [new, bob, old]
    assert feed(items, now=clock.now, where=FeedFilter(author="bob")) == [bob]
    assert feed(items, now=clock.now, where=FeedFilter(since_hours=1)) == [new, bob]
    assert feed(items, now=clock.now, where=FeedFilter(limit=1)) == [new]


# -- the console routes ------------------------------------------------------------------------
def client_for(api: BlackboardAPI, token: str = "t0k") -> httpx.AsyncClient:
    app = AdminGate(Starlette(routes=api.routes()), ConsoleAccess(token=token))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                             headers={"Authorization": f"Bearer {token}"})


async def test_routes_post_read_and_refuse_bad_input_with_openai_errors() -> None:
    board, clock = Board(), FakeClock()
    async with client_for(poster(board, clock, rate=3)) as http:
        posted = await http.post("/api/blackboard", json={"text": "STATUS: key sk-abcdefghijklmnopqrstuvwx"})
        assert posted.status_code == 200
        assert posted.json()["item"]["text"] == "STATUS: key [API KEY]"
        assert posted.json()["notice"] == "scrubbed before posting: 1 api_key"
        bad = {
            "empty": ({"text": ""}, 400, "empty_text"),
            "oversize": ({"text": "y" * 5000}, 400, "text_too_long"),
            "binary": ({"text": "\x00\x01\x02\x03"}, 400, "invalid_text"),
            "not a string": ({"text": 5}, 400, "invalid_request"),
            "unknown field": ({"text": "x", "author": "mallory"}, 400, "invalid_request"),
            "bad kind": ({"text": "x", "kind": "RANT"}, 400, "invalid_request"),
        }
        for name, (body, status, code) in bad.items():
            answer = await http.post("/api/blackboard", json=body)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), name
        garbage = await http.post("/api/blackboard", content=b"\xff\xfe\x00garbage",
                                  headers={"Content-Type": "application/json"})
        assert garbage.status_code == 400 and garbage.json()["error"]["message"]
        huge = await http.post("/api/blackboard", content=b'{"text": "' + b"z" * 70_000 + b'"}',
                               headers={"Content-Type": "application/json"})
        assert huge.status_code == 413
        for i in range(2):
            clock.now += 1
            assert (await http.post("/api/blackboard", json={"text": f"STATUS: {i}"})).status_code == 200
        clock.now += 1
        flood = await http.post("/api/blackboard", json={"text": "STATUS: flood"})
        assert flood.status_code == 429 and flood.headers["retry-after"] == "57"
        read = (await http.get("/api/blackboard", params={"q": "key"})).json()["items"]
        assert [i["text"] for i in read] == ["STATUS: key [API KEY]"]
        everything = (await http.get("/api/blackboard")).json()["items"]
        assert [i["text"] for i in everything] == ["STATUS: 1", "STATUS: 0", "STATUS: key [API KEY]"]
        assert (await http.get("/api/blackboard", params={"limit": "0"})).status_code == 400
        assert (await http.get("/api/blackboard", params={"since": "soon"})).status_code == 400
        unauthorised = await http.get("/api/blackboard", headers={"Authorization": ""})
        assert unauthorised.status_code == 401


async def test_a_node_without_blackboard_says_how_to_enable_it() -> None:
    api = poster(Board(), FakeClock())
    api.enabled = False
    async with client_for(api) as http:
        answer = await http.post("/api/blackboard", json={"text": "STATUS: x"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "blackboard_disabled"
    assert "--blackboard" in answer.json()["error"]["message"]
