"""What a layer split costs a decoded token, estimated from what the mesh measures (issue 19 item 5).

A split never decodes faster than one node holding the whole model: a token still reads every weight
once, only on several machines one after another. What it adds is per worker and per token: the host
sends the worker the token's activations, the worker computes its layers, and the host waits for the
result (one blocking round trip, ../shared/ENGINE.md); the host keeps the output head
(``split.head_args``), so what comes back is a hidden state, not the logits. The estimate:

    added ms/token = sum over workers of (RTT + HOP_MS + bytes of the token / LINK_BYTES_PER_S)

- ``HOP_MS``: what one worker adds besides the network, measured side by side with solo
  (bench/split.py, bench/README.md): stock RPC +0.98 ms a token on one H100 (8B F16, two processes on
  one GPU), +0.2-0.4 ms on the 2-core CPU VM. The larger figure is used.
- bytes of a token, per worker: its activations both ways (``n_embd`` x 4 bytes each way) and the
  positions and masks that go with them (``TOKEN_EXTRA_BYTES``: 6.8 KB measured on gemma-3-270m by
  bench/rpc_per_token.py). The width comes from the model's GGUF (``ModelSpec.embedding_length``);
  ``DEFAULT_N_EMBD`` (an 8B's) where no node has read it yet.
- ``LINK_BYTES_PER_S``: 1 Gbit/s. The mesh measures RTT between nodes, not bandwidth.

Loading costs the workers their share of the weights, read from their own copy of the file (or fetched
once, ``reconcile.shares``). So a split is for a model that fits no single node; when a smaller
quantization of it fits one node (``solo_max_bytes``), serving that solo decodes faster on two counts:
no per-token cost above, and fewer bytes of weights to read a token (decode speed goes roughly as
memory bandwidth / file size). The split keeps the quality of the bigger file. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_N_EMBD", "HOP_MS", "LINK_BYTES_PER_S", "TOKEN_EXTRA_BYTES", "SplitCost", "split_cost",
           "worker_ms"]

HOP_MS = 1.0  # engine time one worker adds to a decoded token besides the network (measured, see above)
LINK_BYTES_PER_S = 125e6  # 1 Gbit/s assumed between nodes
TOKEN_EXTRA_BYTES = 7_000  # positions and masks sent with each token's activations (6,774 measured)
DEFAULT_N_EMBD = 4096  # the width assumed while the model's is unknown


def token_bytes(n_embd: int) -> int:
    """Bytes one worker exchanges with the host for one decoded token, both ways."""
    return 2 * 4 * (n_embd or DEFAULT_N_EMBD) + TOKEN_EXTRA_BYTES


def worker_ms(rtt_ms: float, n_embd: int) -> float:
    """What one worker ``rtt_ms`` away adds to a decoded token."""
    return rtt_ms + HOP_MS + 1000 * token_bytes(n_embd) / LINK_BYTES_PER_S


@dataclass(frozen=True)
class SplitCost:
    """The estimated cost of one split (``split_cost``)."""

    rtts_ms: tuple[float, ...]  # each worker's RTT from the host
    bytes_per_token: int  # host <-> workers, both ways, per decoded token
    load_bytes: int  # the workers' share of the weights
    solo_max_bytes: int  # the biggest model file one node of the mesh holds alone (0: none)
    n_embd: int

    @property
    def added_ms(self) -> float:
        return sum(worker_ms(ms, self.n_embd) for ms in self.rtts_ms)

    def line(self) -> str:
        """One line for ``describe`` and the console."""
        n = len(self.rtts_ms)
        wire = 1000 * self.bytes_per_token / LINK_BYTES_PER_S
        text = (f"~{self.added_ms:.1f} ms/token added ({n} worker{'s' if n != 1 else ''}: "
                f"{sum(self.rtts_ms):.1f} ms of round trips, {n} x {HOP_MS:g} ms engine, "
                f"{_size(self.bytes_per_token)}/token = {wire:.2f} ms at 1 Gbit/s); "
                f"workers load {_size(self.load_bytes)}")
        if self.solo_max_bytes:
            text += (f"; a quantization of at most {_size(self.solo_max_bytes)} fits one node and, served solo,"
                     f" decodes faster")
        return text


def split_cost(rtts_ms: Sequence[float], *, size_bytes: int, worker_fraction: float, n_embd: int = 0,
               solo_max_bytes: int = 0) -> SplitCost:
    """The cost of a split whose workers are ``rtts_ms`` away from the host and hold ``worker_fraction``
    of a model of ``size_bytes`` (``n_embd`` wide; 0: unknown)."""
    return SplitCost(rtts_ms=tuple(rtts_ms), bytes_per_token=len(rtts_ms) * token_bytes(n_embd),
                     load_bytes=int(size_bytes * worker_fraction), solo_max_bytes=solo_max_bytes, n_embd=n_embd)


def _size(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"
