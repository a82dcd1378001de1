"""Train a small Qwen3-MoE-shaped model on the Python standard library and export it as a GGUF llama.cpp loads.

No real mixture-of-experts GGUF can be downloaded where meshllm is tested, and random weights route tokens
uniformly, so expert sharding's quality cost cannot be measured on them. This script makes a real one: a byte-level
language model with the ``qwen3moe`` architecture (RMSNorm, Q/K norm, NEOX RoPE, GQA attention, a softmax router
choosing the top-k experts per token with renormalised weights, SwiGLU experts) trained for a few minutes on the
sources that ship with Python, with a Switch-style load-balancing loss. Its routing is learnt, hence not uniform.

The vocabulary is SentencePiece-shaped so llama.cpp tokenises text exactly as training did: ``<unk> <s> </s>``, the
256 byte tokens ``<0x00>..<0xFF>`` and ``▁`` (a space), no space prefix. Every byte becomes its byte token except the
space, which becomes ``▁``. The model is written in F32 (its size is a few megabytes).

Run it with PyTorch (CPU is enough)::

    python3 -m venv .torchvenv && .torchvenv/bin/pip install torch numpy gguf
    .torchvenv/bin/python bench/moe_train.py --minutes 13 --n-embd 96 --n-ff 96 --seq 128 --out bench/out/moe

(the model measured in bench/README.md: 335 steps in 13 minutes on the shared 2-core machine; ``--steps N``
trains exactly N steps with the learning-rate schedule over steps, the same weights on every run).

It writes ``MODEL.gguf``, ``heldout.txt`` (files of the standard library kept out of training), ``calib.txt``
(training text for routing statistics) and ``train.json`` (recipe, losses and the PyTorch routing counts on the
held-out text, to check llama.cpp's against).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SPACE_ID = 259
BOS_ID = 1
N_VOCAB = 260


@dataclass(frozen=True)
class Shape:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 16
    n_expert_used: int = 2
    n_ff: int = 128  # each expert's width
    n_ctx: int = 512
    rope_base: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def encode(text: str) -> list[int]:
    """Token ids as llama.cpp's SPM tokenizer gives them for this vocabulary (space -> ``▁``, else byte tokens)."""
    return [SPACE_ID if b == 0x20 else 3 + b for b in text.encode("utf-8")]


def decode(ids: list[int]) -> str:
    raw = bytes(0x20 if i == SPACE_ID else i - 3 for i in ids if i >= 3)
    return raw.decode("utf-8", errors="replace")


def corpus(*, heldout_every: int = 25) -> tuple[str, str]:
    """(training text, held-out text): the standard library's ``.py`` files outside its tests, split by file name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "test" in rel.split("/")[0] or "site-packages" in rel or "/tests/" in rel or "idle_test" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "\u2581" in text:  # would tokenise as a space in llama.cpp
            continue
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % heldout_every
        (held if bucket == 0 else train).append(f"# file: {rel}\n{text}\n")
    return "".join(train), "".join(held)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """NEOX RoPE (llama.cpp's for qwen3moe): rotate dimension i with i + head_dim/2. x: (B, H, T, hd)."""
    t, hd = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        d, hd = s.n_embd, s.head_dim
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, s.n_head * hd, bias=False)
        self.k = nn.Linear(d, s.n_head_kv * hd, bias=False)
        self.v = nn.Linear(d, s.n_head_kv * hd, bias=False)
        self.o = nn.Linear(s.n_head * hd, d, bias=False)
        self.q_norm = nn.Parameter(torch.ones(hd))
        self.k_norm = nn.Parameter(torch.ones(hd))
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.router = nn.Linear(d, s.n_expert, bias=False)
        scale = d**-0.5
        self.gate = nn.Parameter(torch.randn(s.n_expert, s.n_ff, d) * scale)
        self.up = nn.Parameter(torch.randn(s.n_expert, s.n_ff, d) * scale)
        self.down = nn.Parameter(torch.randn(s.n_expert, d, s.n_ff) * s.n_ff**-0.5 / math.sqrt(2 * s.n_layer))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm, s.eps)
        q = self.q(h).view(b, t, s.n_head, s.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, s.n_head_kv, s.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, s.n_head_kv, s.head_dim).transpose(1, 2)
        q = rope(rms_norm(q, self.q_norm, s.eps), s.rope_base)
        k = rope(rms_norm(k, self.k_norm, s.eps), s.rope_base)
        rep = s.n_head // s.n_head_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))

    def moe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, load-balancing loss, selections per expert)."""
        s = self.s
        shape = x.shape
        h = rms_norm(x, self.ffn_norm, s.eps).reshape(-1, s.n_embd)
        probs = self.router(h).softmax(-1)
        top_w, top_i = probs.topk(s.n_expert_used, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        counts = torch.bincount(top_i.flatten(), minlength=s.n_expert)
        for e in range(s.n_expert):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = h[rows]
            ye = (F.silu(xe @ self.gate[e].T) * (xe @ self.up[e].T)) @ self.down[e].T
            out.index_add_(0, rows, ye * top_w[rows, slot, None])
        frac = counts.float() / top_i.numel()
        balance = s.n_expert * (frac * probs.mean(0)).sum()
        return out.view(shape), balance, counts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.attention(x)
        y, balance, counts = self.moe(x)
        return x + y, balance, counts


class Model(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(N_VOCAB, s.n_embd)
        nn.init.normal_(self.embed.weight, std=0.5)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.out_norm = nn.Parameter(torch.ones(s.n_embd))
        self.head = nn.Linear(s.n_embd, N_VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x = self.embed(ids)
        balance = torch.zeros(())
        counts = []
        for blk in self.blocks:
            x, bal, cnt = blk(x)
            balance = balance + bal
            counts.append(cnt)
        return self.head(rms_norm(x, self.out_norm, self.s.eps)), balance / len(self.blocks), counts


def batches(data: np.ndarray, *, seq: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(data) - seq, size=batch)
    rows = np.stack([data[s : s + seq] for s in starts])
    rows[:, 0] = BOS_ID  # llama.cpp starts every context with BOS
    return torch.from_numpy(rows.astype(np.int64))


def train(model: Model, data: np.ndarray, args: argparse.Namespace) -> list[dict[str, float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    log: list[dict[str, float]] = []
    start = time.monotonic()
    budget = args.minutes * 60
    step = 0
    while (elapsed := time.monotonic() - start) < budget and (args.steps == 0 or step < args.steps):
        frac = step / args.steps if args.steps else elapsed / budget  # a step budget makes the run reproducible
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batches(data, seq=args.seq + 1, batch=args.batch, rng=rng)
        logits, balance, _ = model(ids[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, N_VOCAB), ids[:, 1:].reshape(-1))
        loss = ce + args.balance * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            entry = {"step": step, "s": round(elapsed, 1), "ce": round(ce.item(), 4), "balance": round(balance.item(), 4)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        step += 1
    return log


@torch.no_grad()
def evaluate(model: Model, data: np.ndarray, *, seq: int) -> dict[str, object]:
    """Mean cross-entropy (nats/token) over non-overlapping windows, and the router's selections per layer."""
    total, n = 0.0, 0
    counts = [torch.zeros(model.s.n_expert, dtype=torch.long) for _ in range(model.s.n_layer)]
    for start in range(0, len(data) - seq - 1, seq):
        ids = torch.from_numpy(data[start : start + seq + 1].astype(np.int64))[None]
        ids[0, 0] = BOS_ID
        logits, _, cnt = model(ids[:, :-1])
        # llama-perplexity scores the second half of each window only; score the whole one here
        total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        n += seq
        for acc, c in zip(counts, cnt):
            acc += c
    ce = total / max(n, 1)
    return {"ce": ce, "ppl": math.exp(ce), "tokens": n, "counts": [c.tolist() for c in counts]}


def export(model: Model, path: Path) -> None:
    s = model.s
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_name("meshllm-stdlib-moe")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.eps)
    w.add_vocab_size(N_VOCAB)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_expert_feed_forward_length(s.n_ff)
    tt = gguf.TokenType
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581"])
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types([int(t) for t in (tt.UNKNOWN, tt.CONTROL, tt.CONTROL, *[tt.BYTE] * 256, tt.NORMAL)])
    w.add_unk_token_id(0)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().float().contiguous().numpy())

    put("token_embd.weight", model.embed.weight)
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", b.attn_norm)
        put(p + "attn_q.weight", b.q.weight)
        put(p + "attn_k.weight", b.k.weight)
        put(p + "attn_v.weight", b.v.weight)
        put(p + "attn_output.weight", b.o.weight)
        put(p + "attn_q_norm.weight", b.q_norm)
        put(p + "attn_k_norm.weight", b.k_norm)
        put(p + "ffn_norm.weight", b.ffn_norm)
        put(p + "ffn_gate_inp.weight", b.router.weight)
        put(p + "ffn_gate_exps.weight", b.gate)
        put(p + "ffn_up_exps.weight", b.up)
        put(p + "ffn_down_exps.weight", b.down)
    put("output_norm.weight", model.out_norm)
    put("output.weight", model.head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
def greedy(model: Model, prompt: str, n: int) -> str:
    ids = [BOS_ID, *encode(prompt)]
    for _ in range(n):
        logits, _, _ = model(torch.tensor([ids[-model.s.n_ctx :]]))
        ids.append(int(logits[0, -1].argmax()))
    return decode(ids[1 + len(encode(prompt)) :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/moe"))
    p.add_argument("--minutes", type=float, default=12.0, help="training wall time")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: only the time limit)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--balance", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    for field, default in asdict(Shape()).items():
        if isinstance(default, int):
            p.add_argument("--" + field.replace("_", "-"), dest=field, type=int, default=default)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    shape = Shape(**{k: getattr(args, k) for k, v in asdict(Shape()).items() if isinstance(v, int)})
    train_text, held_text = corpus()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.txt").write_text(held_text, encoding="utf-8")
    (args.out / "calib.txt").write_text(train_text[: 200_000], encoding="utf-8")
    data = np.array(encode(train_text), dtype=np.int16)
    held = np.array(encode(held_text[:40_000]), dtype=np.int16)
    print(f"train {len(data):,} tokens, held-out {len(encode(held_text)):,} tokens, shape {shape}", flush=True)
    model = Model(shape)
    print(f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    log = train(model, data, args)
    model.eval()
    result = evaluate(model, held, seq=args.seq)
    print(f"held-out: {result['ce']:.4f} nats/token, perplexity {result['ppl']:.3f}", flush=True)
    sample = greedy(model, "def ", 80)
    print(f"greedy after 'def ': {sample!r}", flush=True)
    export(model, args.out / "stdlib-moe.gguf")
    recipe = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "train.json").write_text(json.dumps(
        {"recipe": recipe, "shape": asdict(shape), "log": log, "heldout": result, "greedy_def": sample,
         "torch": torch.__version__}, indent=1))
    print(f"wrote {args.out / 'stdlib-moe.gguf'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
