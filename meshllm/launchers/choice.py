"""Which model an agent gets when the user names none: the strongest tool-capable model the mesh serves.

Agents (Claude Code, Goose, opencode, pi) drive everything through tool calls, so a model that cannot
call tools is useless to them however large it is. The rule, in order:

1. tool-capable first: a model whose catalog entry (``engine.catalog``) says its chat template supports
   tool calls beats a model outside the catalog (unknown: a local file, a hub URL), which beats a
   catalog model without tool calls;
2. then the most parameters, read from the name the mesh lists it under (``32B`` beats ``8B``;
   ``270m`` is 0.27B; ``8x7B`` is 56B; ``30B-A3B`` counts its 30B);
3. then the larger catalog size (a Q8 beats a Q4 of the same model);
4. then the name, alphabetically, so the choice never depends on the order of ``/v1/models``.

``choose_model`` with a name the user gave checks it is served (also under its file name,
``foo.gguf`` for ``foo``) and otherwise raises an error that lists what is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from meshllm.engine.catalog import CatalogEntry, catalog
from meshllm.engine.models import canonical_name
from meshllm.errors import MeshError
from meshllm.state.schema import ModelName

__all__ = ["ModelRank", "choose_model", "parameter_count", "rank"]

_SIZE = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")
_UNIT = {"b": 1e9, "m": 1e6}


def parameter_count(name: str) -> float:
    """The parameters the name announces (the largest figure in it), 0 when it announces none."""
    best = 0.0
    for experts, figure, unit in _SIZE.findall(name):
        best = max(best, float(figure) * _UNIT[unit.lower()] * (int(experts) if experts else 1))
    return best


@dataclass(frozen=True)
class ModelRank:
    """Why a model ranks where it does: 2 tool-capable, 1 unknown, 0 without tool calls; parameters;
    catalog bytes."""

    name: ModelName
    tools: int
    parameters: float
    size_bytes: int

    def key(self) -> tuple[int, float, int]:
        return self.tools, self.parameters, self.size_bytes


def _entry(name: str, entries: Sequence[CatalogEntry]) -> CatalogEntry | None:
    wanted = canonical_name(name).lower()
    return next((e for e in entries if e.name.lower() == wanted), None)


def rank(name: ModelName, *, entries: Sequence[CatalogEntry] | None = None) -> ModelRank:
    entry = _entry(name, catalog() if entries is None else entries)
    tools = 1 if entry is None else 2 if entry.tools else 0
    return ModelRank(name, tools, parameter_count(name), entry.size_bytes if entry else 0)


def choose_model(served: Sequence[ModelName], wanted: str = "", *,
                 entries: Sequence[CatalogEntry] | None = None) -> ModelName:
    """``wanted`` when the mesh serves it, else (no ``wanted``) the strongest served model by the rule
    above. Raises MeshError when nothing is served or ``wanted`` is not."""
    if not served:
        raise MeshError("the mesh serves no model yet; start one with `meshllm --model NAME` on a member")
    if wanted:
        for name in served:
            if name == wanted or name == canonical_name(wanted):
                return name
        raise MeshError(f"the mesh does not serve {wanted!r}; it serves: {', '.join(sorted(served))} "
                        "(pass one of them as --model, or leave --model out for the strongest tool-capable one)")
    ranked = sorted((rank(name, entries=entries) for name in served), key=lambda r: r.name)
    return max(ranked, key=ModelRank.key).name  # max keeps the first of equals: the alphabetical one
