"""The model catalog: names users type after ``--model`` and ``meshllm download``, mapped to files on
Hugging Face. The entries are data (``catalog.json`` beside this module); this module loads them and
finds one by a name that may be partial (``Qwen3-8B`` finds ``Qwen3-8B-Q4_K_M``). A partial name that
fits several entries is an error listing them: the catalog never guesses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

from meshllm.errors import ModelError

__all__ = ["CatalogEntry", "catalog", "find_entry", "lookup"]


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str  # ORG/REPO on the hub
    files: tuple[str, ...]  # paths in the repository; several: a split GGUF, first part first
    size_bytes: int  # approximate (the hub's size is checked at download)
    quantization: str
    moe: bool
    tools: bool  # the chat template supports tool calls
    draft: str = ""  # catalog name of the draft model for speculative decoding
    description: str = ""


def catalog() -> tuple[CatalogEntry, ...]:
    """Every entry of the shipped catalog, in its order."""
    text = resources.files("meshllm.engine").joinpath("catalog.json").read_text(encoding="utf-8")
    return tuple(CatalogEntry(**{**raw, "files": tuple(raw["files"])}) for raw in json.loads(text)["models"])


def _fits(query: str, name: str) -> bool:
    """``query`` names ``name`` up to whole parts (``-``, ``.``, ``_`` bound them)."""
    return re.search(rf"(^|[-._]){re.escape(query)}($|[-._])", name) is not None


def lookup(query: str) -> list[CatalogEntry]:
    """The entries ``query`` may mean: the exact name (any case), else those it starts, else those it
    names a whole part of."""
    q = query.strip().lower()
    entries = catalog()
    exact = [e for e in entries if e.name.lower() == q]
    if exact:
        return exact
    prefix = [e for e in entries if _fits(q, e.name.lower()) and e.name.lower().startswith(q)]
    return prefix or [e for e in entries if _fits(q, e.name.lower())]


def find_entry(query: str) -> CatalogEntry | None:
    """The one entry ``query`` means; None when none fits; ``ModelError`` listing them when several do."""
    found = lookup(query)
    if len(found) > 1:
        names = ", ".join(e.name for e in found)
        raise ModelError(f"{query!r} fits several catalog models: {names}; give one of them")
    return found[0] if found else None
