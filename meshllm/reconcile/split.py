"""Split planning: which nodes run a dense model together, split by layers, when no one node can.

A split has one *host* (it runs llama-server and owns the API side of the model) and *workers*
(each runs ggml-rpc-server and holds a contiguous run of layers). Every decoded token pays about one
network round trip per worker, so the planner is latency-first: it takes the closest peers, not the
biggest, and a peer further than ``MAX_RTT_MS`` from the host is never a worker (it stays an API
client of the mesh). The rules, in order:

1. Split only when no live server node has capacity >= ``FIT_FACTOR`` x the model's size, or when
   forced (``--split``); otherwise solo placement (``placement.py``) serves the model.
2. The host is the node with the most capacity (ties: the smallest node id).
3. Workers are the other server nodes in RTT order from the host (ties: more capacity, then the
   smaller id), leaving out any peer over ``MAX_RTT_MS`` or with no RTT measured; they are added
   until the participants' total capacity is >= ``FIT_FACTOR`` x the model's size (a forced split
   takes at least one worker).
4. ``tensor_split`` is proportional to each participant's capacity, host first.

RTT comes from ``NodeStatus.rtt_ms``: the host's own measurement of the peer, else the peer's of the
host. A running split is expensive to restart (every participant reloads its layers), so
``keep_or_replan`` keeps the current plan unless a participant died or went out of reach, or the
candidate is clearly better: fewer participants, or a worst RTT lower by more than
``RTT_HYSTERESIS_MS``. Pure functions of their inputs; nothing here is wired into the node yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshllm.state.schema import NodeRole, NodeStatus

__all__ = [
    "FIT_FACTOR", "HEAD_PATTERN", "MAX_RTT_MS", "RTT_HYSTERESIS_MS", "NoSplit", "SplitPlan", "head_args", "keep_or_replan",
    "plan_split", "rtt", "split_layout",
]

FIT_FACTOR = 1.1  # the participants' capacity must be at least this times the model's size
MAX_RTT_MS = 80.0  # a peer further than this from the host is never a worker
RTT_HYSTERESIS_MS = 20.0  # a new plan must lower the worst RTT by more than this to replace a running one
# the output head's tensors (a tied head reads the token embeddings): a CPU split host keeps them
HEAD_PATTERN = r"^(output|output_norm|token_embd)\."


@dataclass(frozen=True)
class SplitPlan:
    """Run the model on ``host`` with ``workers`` (RTT order); ``tensor_split`` is host first."""

    host: str
    workers: tuple[str, ...]
    tensor_split: tuple[float, ...]
    worst_rtt_ms: float
    capacity_bytes: int

    @property
    def participants(self) -> tuple[str, ...]:
        return (self.host, *self.workers)

    def tensor_split_arg(self) -> str:
        """The value for llama-server's ``--tensor-split``, e.g. ``0.6,0.4``."""
        return ",".join(f"{share:.4g}" for share in self.tensor_split)


@dataclass(frozen=True)
class NoSplit:
    """No split: ``solo`` when one node holds the model (placement serves it), else ``reason`` says why."""

    reason: str
    solo: bool = False


def rtt(nodes: Mapping[str, NodeStatus], a: str, b: str) -> float | None:
    """RTT between two nodes in ms: ``a``'s measurement of ``b``, else ``b``'s of ``a``; None if unknown."""
    for src, dst in ((a, b), (b, a)):
        node = nodes.get(src)
        if node is not None and dst in node.rtt_ms:
            return node.rtt_ms[dst]
    return None


def _fmt(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _servers(nodes: Iterable[NodeStatus]) -> dict[str, NodeStatus]:
    return {n.id: n for n in sorted(nodes, key=lambda n: n.id) if n.role is NodeRole.SERVER and n.capacity_bytes > 0}


def _reachable_peers(servers: Mapping[str, NodeStatus], host: str, max_rtt_ms: float) -> list[tuple[float, str]]:
    peers = []
    for nid, node in servers.items():
        ms = rtt(servers, host, nid) if nid != host else None
        if ms is not None and ms <= max_rtt_ms:
            peers.append((ms, -node.capacity_bytes, nid))
    return [(ms, nid) for ms, _, nid in sorted(peers)]


def plan_split(size_bytes: int, nodes: Iterable[NodeStatus], *, force: bool = False,
               max_rtt_ms: float = MAX_RTT_MS) -> SplitPlan | NoSplit:
    """The split for a model of ``size_bytes`` over the live ``nodes``, or why there is none."""
    servers = _servers(nodes)
    if not servers:
        return NoSplit("no server node offers capacity")
    need = FIT_FACTOR * size_bytes
    host = min(servers.values(), key=lambda n: (-n.capacity_bytes, n.id))
    if host.capacity_bytes >= need and not force:
        return NoSplit(f"{host.id} holds it alone ({_fmt(host.capacity_bytes)} >= {_fmt(need)})", solo=True)
    total, workers, worst = host.capacity_bytes, list[str](), 0.0
    peers = _reachable_peers(servers, host.id, max_rtt_ms)
    for ms, nid in peers:
        if total >= need and workers:
            break
        workers.append(nid)
        total += servers[nid].capacity_bytes
        worst = max(worst, ms)
    if total < need or not workers:
        far = len(servers) - 1 - len(peers)
        return NoSplit(f"needs {_fmt(need)}; host {host.id} and {len(peers)} peer(s) within {max_rtt_ms:g} ms"
                       f" offer {_fmt(total)}" + (f" ({far} peer(s) further or unmeasured left out)" if far else ""))
    caps = [host.capacity_bytes, *(servers[w].capacity_bytes for w in workers)]
    shares = tuple(round(c / sum(caps), 4) for c in caps)
    return SplitPlan(host.id, tuple(workers), shares, worst, total)


def _current_worst(plan: SplitPlan, servers: Mapping[str, NodeStatus]) -> float | None:
    """The running plan's worst RTT as measured now; None when a worker has no measurement."""
    worst = 0.0
    for worker in plan.workers:
        ms = rtt(servers, plan.host, worker)
        if ms is None:
            return None
        worst = max(worst, ms)
    return worst


def keep_or_replan(current: SplitPlan | None, size_bytes: int, nodes: Iterable[NodeStatus], *,
                   force: bool = False, max_rtt_ms: float = MAX_RTT_MS) -> SplitPlan | NoSplit:
    """The plan to run now: ``current`` unless a participant died or went out of reach, or the
    candidate is clearly better (fewer participants, or worst RTT lower by > ``RTT_HYSTERESIS_MS``)."""
    nodes = list(nodes)
    candidate = plan_split(size_bytes, nodes, force=force, max_rtt_ms=max_rtt_ms)
    if current is None:
        return candidate
    servers = _servers(nodes)
    if any(p not in servers for p in current.participants):
        return candidate  # a participant died (or stopped offering capacity): the split is broken anyway
    worst = _current_worst(current, servers)
    if worst is None or worst > max_rtt_ms:
        return candidate  # a worker went out of reach
    if sum(servers[p].capacity_bytes for p in current.participants) < FIT_FACTOR * size_bytes:
        return candidate  # the participants no longer hold it
    if isinstance(candidate, NoSplit):
        return candidate if candidate.solo else current  # solo beats any split; else keep what runs
    if len(candidate.participants) < len(current.participants):
        return candidate
    if candidate.worst_rtt_ms < worst - RTT_HYSTERESIS_MS:
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


def head_args(*, gpu: bool) -> tuple[str, ...]:
    """The llama-server arguments that keep a split's output head on its host.

    llama.cpp puts the head on the device of the last layer. On a CPU host that is the last worker,
    which then sends the host every token's logits (n_vocab x 4 bytes: 1 MB a token for a 262k
    vocabulary); with the head on the host it sends the last hidden state (n_embd x 4 bytes) and the
    host computes the logits, as a solo CPU server does. A GPU host holds the last layers and the head
    already (RPC devices come first), so it needs nothing. ``engine.tensors.device_tensors``'s ``head``
    says the same to a participant that fetches only its tensors."""
    return () if gpu else ("--override-tensor", f"{HEAD_PATTERN}=CPU")
