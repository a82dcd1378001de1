"""Reading the blackboard: the feed (newest first, filtered) and search (ranked by term matches, then
recency). Pure functions over ``BoardItem`` lists, so the API, the CLI's tests and the bench agree.

Search splits the query into words (``billing refactor``); a post scores for each word it contains
(1 for the word itself, 0.6 for a longer word it starts, as ``refactor`` in ``refactoring``), across
its text, kind, author and node name; containing the whole query as typed adds 0.5. Posts matching no
word are left out. The score is then weighed by age, ``0.5 + 0.5 * 2^(-age / 24 h)``, so a post that
matches more words wins over a newer one that matches fewer, and among equal matches the newest
comes first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshllm.state.board import BoardItem

__all__ = ["FeedFilter", "Scored", "feed", "search", "terms"]

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
HALF_LIFE = 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class FeedFilter:
    """Which posts a read covers: newer than ``since`` hours, by ``author`` (any case), at most ``limit``."""

    since_hours: float | None = None
    author: str = ""
    limit: int = 20

    def admits(self, item: BoardItem, now: float) -> bool:
        if self.since_hours is not None and item.at < now - self.since_hours * 3600:
            return False
        return not self.author or item.author.casefold() == self.author.casefold()


@dataclass(frozen=True)
class Scored:
    item: BoardItem
    score: float


def terms(text: str) -> list[str]:
    """The lower-cased words of ``text``, each once, in order."""
    return list(dict.fromkeys(t.casefold() for t in _TOKEN.findall(text)))


def feed(items: Iterable[BoardItem], *, now: float, where: FeedFilter = FeedFilter()) -> list[BoardItem]:
    """The newest posts that ``where`` admits, newest first."""
    chosen = [i for i in items if where.admits(i, now)]
    chosen.sort(key=lambda i: (i.at, i.id), reverse=True)
    return chosen[:max(0, where.limit)]


def _term_score(item: BoardItem, words: Sequence[str], phrase: str) -> float:
    tokens = set(terms(f"{item.text} {item.kind.value if item.kind else ''} {item.author} {item.node_name}"))
    score = 0.0
    for word in words:
        if word in tokens:
            score += 1.0
        elif any(t.startswith(word) for t in tokens):
            score += 0.6
    if score and len(words) > 1 and phrase in item.text.casefold():
        score += 0.5
    return score


def search(items: Iterable[BoardItem], query: str, *, now: float,
           where: FeedFilter = FeedFilter()) -> list[Scored]:
    """Posts matching any word of ``query``, best first (see the module docstring)."""
    words = terms(query)
    if not words:
        return []
    phrase = " ".join(query.casefold().split())
    found = []
    for item in items:
        if not where.admits(item, now):
            continue
        score = _term_score(item, words, phrase)
        if score:
            age = max(0.0, now - item.at)
            found.append(Scored(item, round(score * (0.5 + 0.5 * 0.5 ** (age / HALF_LIFE)), 4)))
    found.sort(key=lambda s: (s.score, s.item.at, s.item.id), reverse=True)
    return found[:max(0, where.limit)]
