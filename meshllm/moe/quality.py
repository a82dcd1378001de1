"""The measured quality of an expert shard, where someone measured it, as one line for its status.

A shard drops experts, so its answers can differ from the whole model's; the node shows how much when the
figures exist. They live beside the shard's file, in ``<shard>.quality.json``, written by whoever measured
them (``bench/moe.py``, or a calibration run on the node): ``agreement`` (share of next-token choices equal
to the whole model's, 0..1), ``perplexity`` (the shard's, on held-out text) and ``perplexity_full`` (the
whole model's on the same text). Missing or unreadable figures give an empty line: "not measured".
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["quality_path", "read_quality"]


def quality_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".quality.json")


def read_quality(shard: Path) -> str:
    """``"agreement 93.1%, perplexity 5.20 (whole model 4.90)"``, or "" when not measured."""
    try:
        figures = json.loads(quality_path(shard).read_text())
        parts = [f"agreement {100 * float(figures['agreement']):.1f}%"]
        if "perplexity" in figures:
            full = f" (whole model {float(figures['perplexity_full']):.2f})" if "perplexity_full" in figures else ""
            parts.append(f"perplexity {float(figures['perplexity']):.2f}{full}")
        return ", ".join(parts)
    except (OSError, ValueError, KeyError, TypeError):
        return ""
