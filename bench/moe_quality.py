"""What expert sharding costs in quality: each shard of a plan against the whole model, on held-out text.

For an MoE GGUF (``bench/moe_train.py`` makes a real one), this script

1. computes the routing statistics with ``llama-imatrix`` on calibration text (``meshllm.moe.importance``) and
   prints how skewed they are per layer: the share of selections the top 25% of experts take (0.25 when
   uniform) and the entropy of the selection shares against its maximum;
2. plans ``--shards`` shards with the planner (``moe.plan``: the core of the most important experts in every
   shard, the rest dealt round-robin, 1 or 2 copies) from that importance order and, to compare, from the
   id order a node uses without statistics; writes every shard with ``moe.shard.write_shard``;
3. runs ``llama-perplexity`` on the held-out text: once on the whole model, saving its logits
   (``--kl-divergence-base``), then on every shard against them (``--kl-divergence``), which gives the shard's
   perplexity, the mean KL divergence from the whole model and "same top p": the share of positions where the
   shard's greedy next token is the whole model's. A shard keeping every expert is measured too (it must give
   the whole model's figures exactly: the shard writer changes nothing else).

The figures of the importance-ordered plan are written beside each shard as ``<shard>.quality.json``
(``moe.quality``), which the node shows in the model's status.

    MESHLLM_ENGINE_DIR=... PYTHONPATH=$PWD .venv/bin/python bench/moe_quality.py --model bench/out/moe/stdlib-moe.gguf \\
        --calib bench/out/moe/calib.txt --heldout bench/out/moe/heldout.txt
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from meshllm.engine.build import find_engine
from meshllm.engine.models import file_fingerprint
from meshllm.moe.detect import MoeInfo, detect_moe
from meshllm.moe.importance import ImatrixRun, compute_routing_stats, expert_ranks, skew
from meshllm.moe.plan import core_size, experts_per_shard, shard_experts
from meshllm.moe.quality import quality_path
from meshllm.moe.shard import write_shard

# one row per chunk of `llama-perplexity --kl-divergence`, every figure cumulative over the chunks so far:
# chunk, PPL ± u, ln(PPL(Q)/PPL(base)) ± u, KLD ± u, Δp RMS ± u %, same top p ± u %
_ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s*±\s*\S+\s+(-?[\d.]+)\s*±\s*\S+\s+(-?[\d.]+)\s*±\s*\S+\s+"
                  r"[\d.]+\s*±\s*\S+\s*%\s+([\d.]+)\s*±", re.MULTILINE)


def _perplexity(engine: Path, model: Path, args: argparse.Namespace, *extra: str) -> str:
    """The output of one llama-perplexity run (unbuffered, so that less of its end is lost: see ``_measure``)."""
    cmd = ["stdbuf", "-o0", "-e0", str(engine / "llama-perplexity"), "-m", str(model), "-f", str(args.heldout), "-c", str(args.ctx),
           "--chunks", str(args.chunks), "-t", str(args.threads), "-b", str(args.ctx), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"llama-perplexity failed on {model.name}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    return done.stdout + done.stderr


def _rows(log: str) -> dict[int, dict[str, float]]:
    """Figures after each chunk (every row is cumulative over the chunks so far)."""
    rows = {}
    for chunk, ppl, log_ratio, kld, same_top in _ROW.findall(log):
        rows[int(chunk)] = {"ppl": float(ppl), "ppl_base": float(ppl) / math.exp(float(log_ratio)),
                            "kld": float(kld), "same_top": float(same_top) / 100.0}
    if not rows:
        sys.exit(f"no KL-divergence rows in llama-perplexity's output:\n{log[-1500:]}")
    return rows


def _routing(engine: Path, model: Path, info: MoeInfo, args: argparse.Namespace) -> list[list[int]]:
    started = time.monotonic()
    run = ImatrixRun(ctx=args.ctx, chunks=args.calib_chunks, threads=args.threads)
    stats = compute_routing_stats(model, engine_dir=engine, text=args.calib.read_text(encoding="utf-8"), run=run)
    print(f"routing statistics: llama-imatrix, {args.calib_chunks} chunks x {args.ctx} tokens of {args.calib.name}, "
          f"{time.monotonic() - started:.1f} s, cached for fingerprint {stats.fingerprint}")
    print(f"{'layer':>5}  {'top 25% share':>13}  {'entropy bits':>12}  {'max':>5}  selections per expert")
    for layer in info.moe_layers:
        row = stats.counts[layer]
        s = skew(row)
        print(f"{layer:>5}  {s['top_share']:>13.3f}  {s['entropy_bits']:>12.3f}  {s['max_entropy_bits']:>5.2f}  "
              f"{list(row)}")
    total = [sum(stats.counts[layer][e] for layer in info.moe_layers) for e in range(info.n_expert)]
    print(f"{'all':>5}  {skew(total)['top_share']:>13.3f}  (experts summed over layers: less skewed than any layer "
          "when layers favour different experts)")
    shares = stats.shares(info.n_layer)
    return expert_ranks(shares, n_layer=info.n_layer, n_expert=info.n_expert)


def _plans(info: MoeInfo, ranks: list[list[int]], args: argparse.Namespace) -> list[tuple[str, int, list[list[int]]]]:
    """(label, copies, ranks) of each plan measured."""
    id_order = [list(range(info.n_expert)) for _ in range(info.n_layer)]
    plans = []
    for copies in args.copies:
        plans.append(("importance", copies, ranks))
        plans.append(("id order", copies, id_order))
    return plans


def _measure(engine: Path, model: Path, info: MoeInfo, ranks: list[list[int]], args: argparse.Namespace) -> None:
    """Every shard's figures, read at one chunk count for all: this version's logger thread is not flushed at exit
    (its singleton is leaked on purpose), so a run's closing summary and last rows can be lost; the rows are
    cumulative, so all shards are compared over the chunks every run printed."""
    out = args.out
    base = out / "base.kld"
    _perplexity(engine, model, args, "--kl-divergence-base", str(base))
    kld = ("--kl-divergence-base", str(base), "--kl-divergence")
    results: list[tuple[str, int, int, int, Path, dict[int, dict[str, float]]]] = []
    everything = out / "all-experts.gguf"
    write_shard(model, everything, {layer: list(range(info.n_expert)) for layer in info.moe_layers})
    results.append(("all experts", 0, 0, info.n_expert, everything, _rows(_perplexity(engine, everything, args, *kld))))
    fingerprint = file_fingerprint(model)
    core = core_size(info.n_expert, info.n_used, args.core)
    for label, copies, order in _plans(info, ranks, args):
        for index in range(args.shards):
            experts = shard_experts([order[layer] for layer in info.moe_layers], core=core, shards=args.shards,
                                    copies=copies, index=index)
            path = out / f"shard-{label.replace(' ', '')}-c{copies}-{index}.gguf"
            write_shard(model, path, dict(zip(info.moe_layers, experts, strict=True)), source_fingerprint=fingerprint)
            rows = _rows(_perplexity(engine, path, args, *kld))
            results.append((label, copies, index, len(experts[0]), path, rows))
    chunks = min(max(rows) for *_, rows in results)
    print(f"\nwhole model: {info.n_expert} experts/layer, {model.stat().st_size / 1e6:.2f} MB; core {core}; held-out: "
          f"the first {chunks} windows of {args.ctx} tokens (the second half of each scored)")
    print(f"{'plan':<12} {'copies':>6} {'shard':>5} {'experts/layer':>13} {'MB':>7} {'PPL':>8} {'full PPL':>8} "
          f"{'PPL/full':>8} {'KLD':>7} {'same top':>8}")
    for label, copies, index, kept, path, rows in results:
        fig = rows[chunks]
        print(f"{label:<12} {copies:>6} {index:>5} {kept:>13} {path.stat().st_size / 1e6:>7.2f} {fig['ppl']:>8.4f} "
              f"{fig['ppl_base']:>8.4f} {fig['ppl'] / fig['ppl_base']:>8.4f} {fig['kld']:>7.4f} "
              f"{100 * fig['same_top']:>7.2f}%")
        if label == "importance":
            quality_path(path).write_text(json.dumps({"agreement": fig["same_top"], "perplexity": fig["ppl"],
                                                      "perplexity_full": fig["ppl_base"]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("bench/out/moe/stdlib-moe.gguf"))
    p.add_argument("--calib", type=Path, default=Path("bench/out/moe/calib.txt"))
    p.add_argument("--heldout", type=Path, default=Path("bench/out/moe/heldout.txt"))
    p.add_argument("--out", type=Path, default=Path("bench/out/moe/quality"))
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--copies", type=int, nargs="+", default=[1, 2])
    p.add_argument("--core", type=float, default=0.5, help="share of each layer's experts every shard keeps")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=100, help="held-out windows scored")
    p.add_argument("--calib-chunks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    engine = find_engine()
    if engine is None or not (engine / "llama-perplexity").is_file():
        sys.exit("needs an engine with llama-imatrix and llama-perplexity (meshllm engine build, or MESHLLM_ENGINE_DIR)")
    info = detect_moe(args.model)
    if info is None:
        sys.exit(f"{args.model} is not a mixture of experts")
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = _routing(engine, args.model, info, args)
    _measure(engine, args.model, info, ranks, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
