"""Expert importance: how much each expert of each layer of an MoE model is used, to choose the shared core.

The expert shard planner (``moe.plan``) puts the most important experts of every layer in every shard
(the shared core) and spreads the rest. This module is the one place that importance comes from:

    load_importance(path) -> list[list[float]] | None

``path`` is the model's GGUF file. The answer has one list per layer (``blk.<i>``, in layer order), each
with one non-negative figure per expert (expert id order): the share of the layer's routing selections the
expert took in calibration text (a layer without routed experts has an empty list). None when there are no
statistics for the file.

Where the statistics come from: llama.cpp's ``llama-imatrix`` (an engine target) runs calibration text through
the model and, for every ``*_exps`` tensor, counts the tokens routed to each expert (it reads the expert ids of
``ggml_mul_mat_id``); its GGUF output holds them as ``blk.<i>.ffn_{gate,up,down}_exps.weight.counts`` (F32,
one per expert). ``compute_routing_stats`` runs it once per model file and caches the counts as
``<cache>/moe-importance/<key>.json``, keyed by ``model_key`` (the file's fingerprint, which hashes its header,
and a hash of its routers' weights), so a renamed or re-downloaded copy of the same file finds them and a
different model never does. The default calibration
text is the Python documentation that ships with every Python (``pydoc_data.topics``: English prose with
code), so no download is needed.

Replication: one node of the mesh computes the counts, automatically, once per model file: the node holding the
lowest expert-shard slot of the model (``reconcile.importance``), from its own copy, unless its cache has them
already. It writes them into the state document (``ExpertImportance``, keyed by the file's fingerprint:
``encode_counts``, one short line of integers per MoE layer), and every node writing a shard reads the order from
there, so every node deals the same experts. A node that resolves a model whose counts are in its own cache
also writes the order into the spec (``ModelSpec.expert_ranks``), which then wins. The counts also travel as
``to_blob`` (zlib-compressed JSON, base64) that ``store_blob`` writes into another node's cache.

Order of the experts, for a shard (the first that exists wins):
1. ``ModelSpec.expert_ranks`` (the resolving node had statistics cached, or a manifest names the order);
2. the document's ``ExpertImportance`` of the file, once ready; shards wait for it while it is computed;
3. none (the computation failed: ``ExpertImportance.message`` says why): every layer's experts by id
   (0, 1, 2, ...), an order every node computes alike. ``expert_ranks`` turns either into ranks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import gguf

from meshllm.engine.build import cache_root
from meshllm.engine.models import file_fingerprint
from meshllm.engine.tensors import file_table, hash_tensors
from meshllm.errors import ModelError

__all__ = [
    "IMATRIX_BINARY", "ImatrixCancelled", "ImatrixRun", "RoutingStats", "calibration_text", "compute_routing_stats", "counts_from_imatrix",
    "decode_counts", "encode_counts", "expert_ranks", "from_blob", "load_importance", "model_key", "read_stats",
    "routing_mass", "skew", "stats_folder", "stats_path", "store_blob", "to_blob",
]

IMATRIX_BINARY = "llama-imatrix"
_COUNTS = re.compile(r"^blk\.(\d+)\.ffn_(?:gate_up|gate|up|down)_exps\.weight\.counts$")
_FINGERPRINT = re.compile(r"\d+:[0-9a-f]+(:[0-9a-f]+)?")  # model_key's shape: it names the cache file
_ROUTER = re.compile(r"^blk\.\d+\.ffn_gate_inp\.weight$")


@dataclass(frozen=True)
class RoutingStats:
    """Routing selections per layer (``blk.<i>``) and expert; ``selections``: the most any layer made
    (calibration tokens x experts used per token)."""

    fingerprint: str
    selections: int
    counts: Mapping[int, tuple[int, ...]]  # layer -> selections per expert (id order)

    def shares(self, n_layer: int) -> list[list[float]]:
        """Per layer 0..n_layer-1: each expert's share of the layer's selections ([] for a layer without)."""
        result = []
        for layer in range(n_layer):
            row = self.counts.get(layer, ())
            total = sum(row)
            result.append([c / total for c in row] if total else [])
        return result

    def to_json(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, "selections": self.selections,
                "counts": {str(layer): list(row) for layer, row in sorted(self.counts.items())}}

    @classmethod
    def from_json(cls, raw: object) -> RoutingStats:
        """Validated: ``ValueError`` for anything but the shape ``to_json`` writes."""
        if not isinstance(raw, dict) or not isinstance(raw.get("counts"), dict):
            raise ValueError("routing statistics must be an object with 'counts'")
        counts: dict[int, tuple[int, ...]] = {}
        for layer, row in raw["counts"].items():
            if not isinstance(row, list) or not all(isinstance(c, int) and c >= 0 for c in row):
                raise ValueError(f"layer {layer}: counts must be non-negative integers")
            counts[int(layer)] = tuple(row)
        fingerprint = str(raw.get("fingerprint", ""))
        if fingerprint and not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"not a model fingerprint: {fingerprint[:40]!r}")
        return cls(fingerprint=fingerprint, selections=int(raw.get("selections", 0)),
                   counts=counts)


def stats_folder() -> Path:
    return cache_root() / "moe-importance"


def stats_path(fingerprint: str, *, folder: Path | None = None) -> Path:
    """Where the statistics of the file with this key (``model_key``) are cached (``:`` -> ``-``)."""
    return (folder or stats_folder()) / (fingerprint.replace(":", "-") + ".json")


def model_key(path: Path) -> str:
    """What routing statistics are cached under: the file's fingerprint (size and header: every tensor's name,
    type, shape and offset) and a hash of its routers' weights, since two models of one layout trained apart
    share a header but not their routing."""
    routers = [t for t in file_table(path).tensors if _ROUTER.match(t.name)]
    hashes = hash_tensors(path, routers)
    digest = hashlib.blake2b("".join(f"{n}={h};" for n, h in sorted(hashes.items())).encode(), digest_size=8)
    return f"{file_fingerprint(path)}:{digest.hexdigest()}"


def read_stats(path: Path, *, fingerprint: str | None = None) -> RoutingStats | None:
    """The cached statistics of ``path`` (a model file), or None when there are none or they do not match it."""
    fingerprint = fingerprint or model_key(path)
    try:
        stats = RoutingStats.from_json(json.loads(stats_path(fingerprint).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return stats if stats.fingerprint == fingerprint else None


def load_importance(path: Path) -> list[list[float]] | None:
    """Per layer, per expert: the share of routing selections (see the module docstring); None: no statistics."""
    try:
        stats = read_stats(path)
    except (OSError, ModelError):  # no such file, or not a GGUF: no statistics
        return None
    if stats is None:
        return None
    n_layer = max(stats.counts, default=-1) + 1
    return stats.shares(n_layer)


def expert_ranks(importance: list[list[float]] | None, *, n_layer: int, n_expert: int) -> list[list[int]]:
    """Per layer, expert ids most important first (ties: the smaller id first); the id order without
    statistics, or where a layer's figures do not cover every expert."""
    ranks = []
    for layer in range(n_layer):
        figures = importance[layer] if importance is not None and layer < len(importance) else []
        if len(figures) != n_expert:
            ranks.append(list(range(n_expert)))
            continue
        ranks.append(sorted(range(n_expert), key=lambda e: (-figures[e], e)))
    return ranks


def encode_counts(counts: Mapping[int, Sequence[int]]) -> list[str]:
    """Counts per layer as the document holds them: ``"<layer>:<c0>,<c1>,..."``, in layer order."""
    return [f"{layer}:{','.join(map(str, row))}" for layer, row in sorted(counts.items())]


def decode_counts(lines: Sequence[str]) -> dict[int, tuple[int, ...]]:
    """``encode_counts`` read back; ``ValueError`` for anything else (a damaged entry from a peer)."""
    counts: dict[int, tuple[int, ...]] = {}
    for line in lines:
        layer, sep, row = line.partition(":")
        values = tuple(int(c) for c in row.split(",")) if row else ()
        if not sep or not layer.isdigit() or any(c < 0 for c in values):
            raise ValueError(f"not a layer's expert counts: {line[:40]!r}")
        counts[int(layer)] = values
    return counts


def routing_mass(counts: Mapping[int, Sequence[int]], kept: Mapping[int, Sequence[int]]) -> tuple[float, float] | None:
    """The share of calibration routing selections that went to experts a shard keeps: the mean over its MoE layers
    and the lowest layer's. 1.0 for every expert; a token routed to a dropped expert goes to the next best kept one,
    so this is how much of the routing a shard serves as the whole model would. None without counts for a layer."""
    shares = []
    for layer, experts in kept.items():
        row = counts.get(layer, ())
        total = sum(row)
        if not total or any(e >= len(row) for e in experts):
            return None
        shares.append(sum(row[e] for e in set(experts)) / total)
    return (sum(shares) / len(shares), min(shares)) if shares else None


def counts_from_imatrix(path: Path) -> dict[int, tuple[int, ...]]:
    """Selections per expert of each MoE layer, read from a ``llama-imatrix`` GGUF output file.

    The gate, up and down tensors of a layer see the same routing ids, so they carry equal counts; the first
    one found is taken. ``ModelError`` when the file is not an imatrix or holds no expert counts (a dense model).
    """
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a readable imatrix file ({exc})") from None
    counts: dict[int, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        match = _COUNTS.match(tensor.name)
        if match and int(match.group(1)) not in counts:
            counts[int(match.group(1))] = tuple(int(round(float(c))) for c in tensor.data.ravel())
    if not counts:
        raise ModelError(f"{path}: no per-expert counts (is the model a mixture of experts?)")
    return counts


def calibration_text() -> str:
    """The default calibration text: Python's own documentation topics, shipped with every Python."""
    from pydoc_data.topics import topics  # the import is slow and the text large: only when needed

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True, kw_only=True)
class ImatrixRun:
    """How ``llama-imatrix`` reads the calibration text: ``chunks`` windows of ``ctx`` tokens."""

    ctx: int = 512
    chunks: int = 64
    threads: int = 0  # 0: llama.cpp's default
    gpu_layers: int = 0
    timeout_s: float = 1800.0


class ImatrixCancelled(Exception):
    """The node stopped while llama-imatrix ran (the process was killed)."""


def _run(cmd: list[str], log: IO[bytes], *, timeout_s: float, cancelled: Callable[[], bool], what: str) -> int:
    """Run ``cmd`` in its own session, its output to ``log``; killed on timeout or when ``cancelled()``."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if cancelled():
                    raise ImatrixCancelled(what) from None
                if time.monotonic() > deadline:
                    raise ModelError(f"{what} took longer than {timeout_s:.0f} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def compute_routing_stats(model: Path, *, engine_dir: Path, text: str | None = None, run: ImatrixRun = ImatrixRun(),
                          fingerprint: str | None = None, cache: bool = True,
                          cancelled: Callable[[], bool] = lambda: False) -> RoutingStats:
    """Run ``llama-imatrix`` on ``model`` over ``text`` (default ``calibration_text()``) and return the counts,
    cached (``stats_path``) unless ``cache`` is False. Blocking: call it from a worker thread; ``cancelled``
    is polled, and stops the run (``ImatrixCancelled``).

    ``ModelError`` when the engine has no ``llama-imatrix`` or the run fails (its log's last lines say why)."""
    binary = engine_dir / IMATRIX_BINARY
    if not binary.is_file():
        raise ModelError(f"{binary} is missing: rebuild the engine (`meshllm engine build`) to compute expert "
                         "routing statistics")
    fingerprint = fingerprint or model_key(model)
    with tempfile.TemporaryDirectory(prefix="meshllm-imatrix-") as tmp:
        folder = Path(tmp)
        (folder / "calibration.txt").write_text(text if text is not None else calibration_text(), encoding="utf-8")
        cmd = [str(binary), "-m", str(model), "-f", str(folder / "calibration.txt"), "-o", str(folder / "out.gguf"),
               "-c", str(run.ctx), "--chunks", str(run.chunks), "--no-ppl", "-ngl", str(run.gpu_layers)]
        if run.threads:
            cmd += ["-t", str(run.threads)]
        with (folder / "imatrix.log").open("wb") as log:
            code = _run(cmd, log, timeout_s=run.timeout_s, cancelled=cancelled, what=f"llama-imatrix on {model.name}")
        if code != 0 or not (folder / "out.gguf").is_file():
            tail = (folder / "imatrix.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise ModelError(f"llama-imatrix on {model.name} failed (exit {code}): {' | '.join(tail)}")
        counts = counts_from_imatrix(folder / "out.gguf")
    stats = RoutingStats(fingerprint=fingerprint, selections=max(sum(row) for row in counts.values()), counts=counts)
    if cache:
        _write(stats)
    return stats


def _write(stats: RoutingStats, *, folder: Path | None = None) -> Path:
    path = stats_path(stats.fingerprint, folder=folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(stats.to_json()) + "\n")
    os.replace(partial, path)
    return path


def to_blob(stats: RoutingStats) -> str:
    """The statistics as one ASCII string (zlib-compressed JSON in base64), for the state document or a peer."""
    return base64.b64encode(zlib.compress(json.dumps(stats.to_json()).encode(), 9)).decode()


def from_blob(blob: str) -> RoutingStats:
    """``ValueError`` for a damaged blob."""
    try:
        raw = json.loads(zlib.decompress(base64.b64decode(blob, validate=True)))
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"routing statistics blob is damaged: {exc}") from None
    try:
        return RoutingStats.from_json(raw)
    except TypeError as exc:
        raise ValueError(f"routing statistics blob is damaged: {exc}") from None


def store_blob(blob: str, *, folder: Path | None = None) -> Path:
    """Write statistics another node computed into this node's cache; returns the file."""
    stats = from_blob(blob)
    if not stats.fingerprint:
        raise ValueError("routing statistics without the model's fingerprint cannot be matched to a file")
    return _write(stats, folder=folder)


def skew(row: Sequence[int], *, top: float = 0.25) -> dict[str, float]:
    """How unevenly one layer routes: the share of selections taken by its ``top`` most used experts (0.25 for
    uniform routing with top=0.25) and the entropy of the selection shares in bits (log2(n) when uniform)."""
    total = sum(row)
    if not total:
        return {"top_share": 0.0, "entropy_bits": 0.0, "max_entropy_bits": math.log2(max(len(row), 1))}
    shares = sorted((c / total for c in row), reverse=True)
    k = max(1, round(top * len(shares)))
    entropy = -sum(p * math.log2(p) for p in shares if p > 0)
    return {"top_share": sum(shares[:k]), "entropy_bits": entropy, "max_entropy_bits": math.log2(len(shares))}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshllm.moe.importance MODEL.gguf``: compute and cache the routing statistics of a model once
    (the node then finds them when it resolves the model), and print how skewed each layer's routing is."""
    import argparse

    from meshllm.engine.build import find_engine

    parser = argparse.ArgumentParser(prog="python -m meshllm.moe.importance", description=main.__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--text", type=Path, help="calibration text (default: Python's documentation topics)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--ngl", type=int, default=0, help="layers on the GPU")
    args = parser.parse_args(argv)
    engine = find_engine()
    if engine is None:
        print("error: the engine is not built: run `meshllm engine build`", file=sys.stderr)
        return 1
    try:
        text = args.text.read_text(encoding="utf-8") if args.text else None
        stats = compute_routing_stats(args.model, engine_dir=engine, text=text,
                                      run=ImatrixRun(ctx=args.ctx, chunks=args.chunks, gpu_layers=args.ngl))
    except (ModelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{stats_path(stats.fingerprint)}")
    for layer, row in sorted(stats.counts.items()):
        figures = skew(row)
        print(f"blk.{layer}: top 25% of experts take {100 * figures['top_share']:.1f}% of selections, entropy "
              f"{figures['entropy_bits']:.2f} of {figures['max_entropy_bits']:.2f} bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
