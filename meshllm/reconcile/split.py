"""Split planning: which nodes run a dense model together, split by layers, when no one node can.

A split has one *host* (it runs llama-server and owns the API side of the model) and *workers*
(each runs ggml-rpc-server and holds a contiguous run of layers). Every decoded token pays about one
network round trip and some engine time per worker (``split_cost``: the estimate, and when a smaller
quantization served solo is the better deal), so the planner takes the split that adds the least
time a token, which favours fewer workers; a peer further than ``MAX_RTT_MS`` from the host is never
a worker (it stays an API client of the mesh). The rules, in order:

1. Split only when no live server node has capacity >= ``FIT_FACTOR`` x the model's size, or when
   forced (``--split``); otherwise solo placement (``placement.py``) serves the model.
2. The host is the node with the most capacity (ties: the smallest node id).
3. Workers: among the other server nodes within ``MAX_RTT_MS`` of the host (a peer with no RTT
   measured is left out), the set whose capacity with the host's is >= ``FIT_FACTOR`` x the model's
   size (a forced split takes at least one worker) at the least estimated cost a token
   (``split_cost.worker_ms`` each: RTT, engine time, the token's bytes); ties: fewer workers, then
   nearer ones. Each worker costs at least ``HOP_MS`` more, so one peer that suffices beats two
   nearer ones unless it is that much further.
4. ``tensor_split`` is proportional to each participant's capacity, host first.

RTT comes from ``NodeStatus.rtt_ms``: the host's own measurement of the peer, else the peer's of the
host. A running split is expensive to restart (every participant reloads its layers), so
``keep_or_replan`` keeps the current plan unless a participant died or went out of reach, or the
candidate is clearly better: fewer participants at no higher cost, or a cost lower by more than
``COST_HYSTERESIS_MS`` a token (RTTs as measured now). ``plan_cost`` says what a plan costs.
Pure functions of their inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshllm.engine.tensors import layer_devices
from meshllm.reconcile.split_cost import SplitCost, split_cost, worker_ms
from meshllm.state.schema import NodeId, NodeRole, NodeStatus

__all__ = [
    "COST_HYSTERESIS_MS", "FIT_FACTOR", "HEAD_PATTERN", "MAX_RTT_MS", "NoSplit", "SplitPlan", "head_args",
    "host_keeps_head", "keep_or_replan", "plan_cost", "plan_split", "rtt", "split_layout",
]

FIT_FACTOR = 1.1  # the participants' capacity must be at least this times the model's size
MAX_RTT_MS = 80.0  # a peer further than this from the host is never a worker
COST_HYSTERESIS_MS = 20.0  # a new plan must cost this much less a token to replace a running one
MAX_CANDIDATES = 16  # the nearest peers the cheapest set of workers is sought among
MAX_SETS = 20_000  # sets of workers weighed at most; beyond, the nearest peers in RTT order
# the output head's tensors (a tied head reads the token embeddings): a CPU split host keeps them
HEAD_PATTERN = r"^(output|output_norm|token_embd)\."


@dataclass(frozen=True)
class SplitPlan:
    """Run the model on ``host`` with ``workers`` (RTT order); ``tensor_split`` is host first."""

    host: NodeId
    workers: tuple[NodeId, ...]
    tensor_split: tuple[float, ...]
    worst_rtt_ms: float
    capacity_bytes: int

    @property
    def participants(self) -> tuple[NodeId, ...]:
        return (self.host, *self.workers)

    def tensor_split_arg(self) -> str:
        """The value for llama-server's ``--tensor-split``, e.g. ``0.6,0.4``."""
        return ",".join(f"{share:.4g}" for share in self.tensor_split)


@dataclass(frozen=True)
class NoSplit:
    """No split: ``solo`` when one node holds the model (placement serves it), else ``reason`` says why."""

    reason: str
    solo: bool = False


def rtt(nodes: Mapping[NodeId, NodeStatus], a: NodeId, b: NodeId) -> float | None:
    """RTT between two nodes in ms: ``a``'s measurement of ``b``, else ``b``'s of ``a``; None if unknown."""
    for src, dst in ((a, b), (b, a)):
        node = nodes.get(src)
        if node is not None and dst in node.rtt_ms:
            return node.rtt_ms[dst]
    return None


def _fmt(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _servers(nodes: Iterable[NodeStatus]) -> dict[NodeId, NodeStatus]:
    return {n.id: n for n in sorted(nodes, key=lambda n: n.id) if n.role is NodeRole.SERVER and n.capacity_bytes > 0}


def _reachable_peers(servers: Mapping[NodeId, NodeStatus], host: NodeId,
                     max_rtt_ms: float) -> list[tuple[float, NodeId]]:
    peers = []
    for nid, node in servers.items():
        ms = rtt(servers, host, nid) if nid != host else None
        if ms is not None and ms <= max_rtt_ms:
            peers.append((ms, -node.capacity_bytes, nid))
    return [(ms, nid) for ms, _, nid in sorted(peers)]


def _cheapest_workers(peers: Sequence[tuple[float, NodeId]], capacity: Mapping[NodeId, int], short: float,
                      n_embd: int) -> tuple[NodeId, ...] | None:
    """The set of ``peers`` (RTT order) with at least ``short`` bytes of capacity (and at least one
    peer) that adds the least time a token; ties: fewer, then nearer. None if no set has enough."""
    near = list(peers[:MAX_CANDIDATES])
    best: tuple[float, int, tuple[float, ...], tuple[NodeId, ...]] | None = None
    weighed = 0
    for k in range(1, len(near) + 1):
        floor = sum(worker_ms(ms, n_embd) for ms, _ in near[:k])  # the k nearest: the least k can cost
        if best is not None and floor > best[0]:
            break
        for chosen in itertools.combinations(near, k):
            weighed += 1
            if weighed > MAX_SETS:
                return best[3] if best is not None else _nearest_until(peers, capacity, short)
            if sum(capacity[nid] for _, nid in chosen) < short:
                continue
            key = (sum(worker_ms(ms, n_embd) for ms, _ in chosen), k, tuple(ms for ms, _ in chosen),
                   tuple(nid for _, nid in chosen))
            if best is None or key[:3] < best[:3]:
                best = key
    return best[3] if best is not None else None


def _nearest_until(peers: Sequence[tuple[float, NodeId]], capacity: Mapping[NodeId, int],
                   short: float) -> tuple[NodeId, ...] | None:
    chosen: list[NodeId] = []
    for _, nid in peers:
        if chosen and sum(capacity[c] for c in chosen) >= short:
            break
        chosen.append(nid)
    return tuple(chosen) if chosen and sum(capacity[c] for c in chosen) >= short else None


def plan_split(size_bytes: int, nodes: Iterable[NodeStatus], *, force: bool = False,
               max_rtt_ms: float = MAX_RTT_MS, n_embd: int = 0) -> SplitPlan | NoSplit:
    """The split for a model of ``size_bytes`` (``n_embd`` wide; 0: unknown) over the live ``nodes``,
    or why there is none."""
    servers = _servers(nodes)
    if not servers:
        return NoSplit("no server node offers capacity")
    need = FIT_FACTOR * size_bytes
    host = min(servers.values(), key=lambda n: (-n.capacity_bytes, n.id))
    if host.capacity_bytes >= need and not force:
        return NoSplit(f"{host.id} holds it alone ({_fmt(host.capacity_bytes)} >= {_fmt(need)})", solo=True)
    peers = _reachable_peers(servers, host.id, max_rtt_ms)
    capacity = {nid: servers[nid].capacity_bytes for _, nid in peers}
    workers = _cheapest_workers(peers, capacity, need - host.capacity_bytes, n_embd) if peers else None
    if workers is None:
        total = host.capacity_bytes + sum(capacity.values())
        far = len(servers) - 1 - len(peers)
        return NoSplit(f"needs {_fmt(need)}; host {host.id} and {len(peers)} peer(s) within {max_rtt_ms:g} ms"
                       f" offer {_fmt(total)}" + (f" ({far} peer(s) further or unmeasured left out)" if far else ""))
    workers = tuple(sorted(workers, key=lambda w: next(i for i, (_, nid) in enumerate(peers) if nid == w)))
    caps = [host.capacity_bytes, *(capacity[w] for w in workers)]
    shares = tuple(round(c / sum(caps), 4) for c in caps)
    worst = max(ms for ms, nid in peers if nid in workers)
    return SplitPlan(host.id, workers, shares, worst, sum(caps))


def plan_cost(plan: SplitPlan, nodes: Iterable[NodeStatus], *, size_bytes: int, n_embd: int = 0) -> SplitCost:
    """What ``plan`` costs a decoded token with the RTTs measured now (an unmeasured worker counts as
    ``MAX_RTT_MS`` away), and the biggest file one of ``nodes`` could serve alone instead."""
    servers = _servers(nodes)
    rtts = [rtt(servers, plan.host, w) for w in plan.workers]
    biggest = max((n.capacity_bytes for n in servers.values()), default=0)
    return split_cost([MAX_RTT_MS if ms is None else ms for ms in rtts], size_bytes=size_bytes,
                      worker_fraction=1 - plan.tensor_split[0] / sum(plan.tensor_split), n_embd=n_embd,
                      solo_max_bytes=round(biggest / FIT_FACTOR))


def _current_rtts(plan: SplitPlan, servers: Mapping[NodeId, NodeStatus]) -> list[float] | None:
    """The running plan's workers' RTTs as measured now; None when a worker has no measurement."""
    rtts = []
    for worker in plan.workers:
        ms = rtt(servers, plan.host, worker)
        if ms is None:
            return None
        rtts.append(ms)
    return rtts


def keep_or_replan(current: SplitPlan | None, size_bytes: int, nodes: Iterable[NodeStatus], *,
                   force: bool = False, max_rtt_ms: float = MAX_RTT_MS, n_embd: int = 0) -> SplitPlan | NoSplit:
    """The plan to run now: ``current`` unless a participant died or went out of reach, or the
    candidate is clearly better (fewer participants at no higher cost a token, or a cost lower by
    more than ``COST_HYSTERESIS_MS``)."""
    nodes = list(nodes)
    candidate = plan_split(size_bytes, nodes, force=force, max_rtt_ms=max_rtt_ms, n_embd=n_embd)
    if current is None:
        return candidate
    servers = _servers(nodes)
    if any(p not in servers for p in current.participants):
        return candidate  # a participant died (or stopped offering capacity): the split is broken anyway
    rtts = _current_rtts(current, servers)
    if rtts is None or max(rtts, default=0.0) > max_rtt_ms:
        return candidate  # a worker went out of reach
    if sum(servers[p].capacity_bytes for p in current.participants) < FIT_FACTOR * size_bytes:
        return candidate  # the participants no longer hold it
    if isinstance(candidate, NoSplit):
        return candidate if candidate.solo else current  # solo beats any split; else keep what runs
    now = sum(worker_ms(ms, n_embd) for ms in rtts)
    then = sum(worker_ms(ms, n_embd) for ms in (rtt(servers, candidate.host, w) or 0.0 for w in candidate.workers))
    if len(candidate.participants) < len(current.participants) and then <= now:
        return candidate
    if then < now - COST_HYSTERESIS_MS:
        return candidate
    return current


def split_layout(n_layer: int, tensor_split: Sequence[float], *, gpu: bool) -> tuple[int, list[float]]:
    """A split host's ``--n-gpu-layers`` and ``--tensor-split`` shares, for the lease's shares (workers
    first, host last). Split participants that fetch only their tensors derive their layers from it
    (``engine.tensors.layer_devices``), so both must come from here.

    llama.cpp puts RPC devices first and the host's own GPU last, so on a GPU host every layer is
    offloaded and ``--tensor-split`` lists the workers' shares then the host's. A CPU is never a split
    device: a CPU host keeps its share of the layers by offloading only the rest, shared among the
    workers. ``--n-gpu-layers n`` offloads the output head and the last ``n - 1`` layers (llama.cpp
    counts the head as a layer and offloads it first), so the workers' layers are ``n - 1``."""
    shares = list(tensor_split)
    if gpu:
        return 999, shares
    host_share = shares[-1] / sum(shares)
    host_layers = min(n_layer - 1, round(host_share * n_layer))
    return n_layer - host_layers + 1, shares[:-1]


def host_keeps_head(n_layer: int, tensor_split: Sequence[float], *, host_gpu: bool,
                    workers_gpu: Sequence[bool]) -> bool:
    """Whether a split's host computes the output head (``head_args``); ``tensor_split`` as the
    lease's (workers first), ``workers_gpu``: whether each of the lease's workers computes on a GPU.

    llama.cpp puts the head on the device of the output layer. On a CPU host that is a worker (the
    last, ``layer_devices``), which then sends the host every token's logits (n_vocab x 4 bytes: 1 MB
    a token for a 262k vocabulary); with the head on the host it sends the last hidden state (n_embd
    x 4 bytes) and the host computes the logits, as a solo CPU server does. That is the better deal
    when that worker computes on a CPU too: the same work, on a machine as fast, without the bytes.
    A GPU worker keeps it: it reads the head far faster than a CPU host would (a 128k x 4096 Q4_K head
    is ~0.3 GB: ~15 ms a token for a CPU at 20 GB/s, where its logits, 512 KB, take 4 ms at 1 Gbit/s).
    A GPU host holds the last layers and the head already (RPC devices come first)."""
    if host_gpu or not workers_gpu:
        return True
    gpu_layers, splits = split_layout(n_layer, tensor_split, gpu=False)
    return not workers_gpu[layer_devices(n_layer, gpu_layers, splits)[n_layer]]


def head_args(*, gpu: bool, keep: bool = True) -> tuple[str, ...]:
    """The llama-server arguments that keep a split's output head on a CPU host (``keep``:
    ``host_keeps_head``); a GPU host needs none. ``engine.tensors.device_tensors``'s ``head`` says
    the same to a participant that fetches only its tensors."""
    return ("--override-tensor", f"{HEAD_PATTERN}=CPU") if keep and not gpu else ()
