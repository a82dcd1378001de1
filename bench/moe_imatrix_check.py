"""Check that llama-imatrix's per-expert counts are the router's selections: count them again in PyTorch.

Loads the GGUF that ``bench/moe_train.py`` wrote back into its PyTorch model, runs the same windows llama-imatrix
runs (``--chunks`` windows of ``--ctx`` tokens, BOS first in each) and compares the experts each layer selected with
the cached routing statistics (``python -m meshllm.moe.importance MODEL --text CALIB --ctx 256 --chunks 64``).
Counts can differ by a few selections where two experts' router scores tie within float rounding.

    .torchvenv/bin/python bench/moe_imatrix_check.py --stats CACHE/moe-importance/<fingerprint>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import moe_train as mt  # noqa: E402  (the model definition lives beside this script)

_BLOCK_TENSORS = {"attn_norm": "attn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "ffn_norm": "ffn_norm",
                  "gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
_BLOCK_LINEARS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "router": "ffn_gate_inp"}


def load(path: Path, shape: mt.Shape) -> mt.Model:
    tensors = {t.name: torch.from_numpy(np.array(t.data).copy()) for t in gguf.GGUFReader(path).tensors}
    model = mt.Model(shape)
    with torch.no_grad():
        model.embed.weight.copy_(tensors["token_embd.weight"])
        model.out_norm.copy_(tensors["output_norm.weight"])
        model.head.weight.copy_(tensors["output.weight"])
        for i, block in enumerate(model.blocks):
            for attr, name in _BLOCK_TENSORS.items():
                getattr(block, attr).copy_(tensors[f"blk.{i}.{name}.weight"])
            for attr, name in _BLOCK_LINEARS.items():
                getattr(block, attr).weight.copy_(tensors[f"blk.{i}.{name}.weight"])
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("bench/out/moe/stdlib-moe.gguf"))
    p.add_argument("--train-json", type=Path, default=Path("bench/out/moe/train.json"))
    p.add_argument("--calib", type=Path, default=Path("bench/out/moe/calib.txt"))
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=64)
    args = p.parse_args()
    shape = mt.Shape(**json.loads(args.train_json.read_text())["shape"])
    model = load(args.model, shape)
    tokens = [mt.BOS_ID, *mt.encode(args.calib.read_text(encoding="utf-8"))]
    counts = [torch.zeros(shape.n_expert, dtype=torch.long) for _ in range(shape.n_layer)]
    with torch.no_grad():
        for c in range(args.chunks):
            ids = torch.tensor(tokens[c * args.ctx : (c + 1) * args.ctx])
            ids[0] = mt.BOS_ID
            for acc, layer_counts in zip(counts, model(ids[None])[2]):
                acc += layer_counts
    cached = json.loads(args.stats.read_text())["counts"]
    for layer, mine in enumerate(counts):
        theirs = cached[str(layer)]
        diff = sum(abs(a - b) for a, b in zip(mine.tolist(), theirs))
        print(f"blk.{layer}: |PyTorch - llama-imatrix| = {diff} of {int(mine.sum())} selections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
