"""The blackboard's figures: the document layout (why a document of its own, why hour buckets) and what a
mesh of real nodes sustains (posts/s, bytes each node sends per post, time until a post is everywhere).

    python bench/blackboard.py                      # both parts, 3 nodes
    python bench/blackboard.py --layout-only        # the in-process document measurements (seconds)
    python bench/blackboard.py --nodes 3 --seconds 10 --text-bytes 200

Layout (in one process, a fake clock): 5,000 posts from 3 writers, 40 s apart, the newest 500 kept and
48 h TTL, replicated between three documents; the encoded document (what a node joining receives) and
its delete set, for three layouts: a flat map of nested maps (how ``MeshState`` writes an entity), a
flat map of plain values, and per-writer hour buckets (what ships). Then what the board would cost
inside the state document: the state document's size (what every join and every resync carries)
and the digest time, without and with 500 posts of 4 KB.

Mesh (real ``--client --blackboard`` node processes on 127.0.0.x, ``--blackboard-rate`` lifted so the
rate limit does not cap the run): first an idle baseline of the board gossip's bytes, then posts one
at a time (each waited on until every node holds it: propagation latency and bytes per post), then
every node posting as fast as it can for ``--seconds`` (sustained posts/s: posts over the time until
the last one is on every node). Bytes are the board gossip's own counters (QUIC framing and
encryption add to them), minus the idle baseline.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pycrdt import Doc, Map

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cpu_seconds, percentile  # noqa: E402
from meshllm.api.blackboard import BlackboardAPI  # noqa: E402
from meshllm.gossip.digest import state_digest  # noqa: E402
from meshllm.reconcile.board import BoardKeeper  # noqa: E402
from meshllm.state.board import BOARD_TTL, MAX_ITEMS, Board, BoardItem, RateLimit  # noqa: E402
from meshllm.state.document import MeshState  # noqa: E402
from meshllm.state.schema import ModelSpec, NodeStatus, ServerPhase, ServerStatus  # noqa: E402

T0 = 1_800_000_000.0


# -- layout ------------------------------------------------------------------------------------------
def _text(i: int, size: int) -> str:
    head = f"STATUS: [org/repo branch:main] step {i} "
    return head + "x" * max(0, size - len(head))


def _sync(docs: list[Doc[Any]], source: int) -> None:
    for j, doc in enumerate(docs):
        if j != source:
            doc.apply_update(docs[source].get_update(doc.get_state()))


def flat_layout(posts: int, *, nested: bool, text_bytes: int, gap: float) -> Doc[Any]:
    """Posts as entries of one map (nested maps like MeshState's entities, or plain values)."""
    docs: list[Doc[Any]] = [Doc() for _ in range(3)]
    tables = [d.get("board", type=Map) for d in docs]
    live: list[tuple[float, str]] = []
    for i in range(posts):
        w, at = i % 3, T0 + i * gap
        item = BoardItem(id=f"{i:012x}", author="alice", node=f"node-{w}", node_name=f"node-{w}", at=at,
                         expires_at=at + BOARD_TTL, text=_text(i, text_bytes)).model_dump(mode="json")
        with docs[w].transaction():
            tables[w][item["id"]] = Map(item) if nested else item
            live.append((at, item["id"]))
            while len(live) > MAX_ITEMS or live[0][0] + BOARD_TTL <= at:
                del tables[w][live.pop(0)[1]]
        _sync(docs, w)
    return docs[0]


def bucket_layout(posts: int, *, text_bytes: int, gap: float) -> Board:
    """What ships: three replicas posting through ``BlackboardAPI``, each with its keeper."""
    clock = [T0]
    boards = [Board() for _ in range(3)]
    apis = [BlackboardAPI(board=b, node_id=f"node-{i}", author="alice", clock=lambda: clock[0],
                          rate=RateLimit(limit=10**9)) for i, b in enumerate(boards)]
    keepers = [BoardKeeper(b, clock=lambda: clock[0]) for b in boards]
    for i in range(posts):
        w = i % 3
        clock[0] = T0 + i * gap
        apis[w].post(_text(i, text_bytes))
        keepers[w].collect()
        _sync([b.doc for b in boards], w)
    return boards[0]


def state_doc(posts: int, text_bytes: int) -> MeshState:
    """A 3-node state document serving 2 models, with ``posts`` board entries in a table of its own."""
    state = MeshState()
    for n in range(3):
        state.put_node(NodeStatus(id=f"node-{n}", name=f"host-{n}", addrs=[f"10.0.0.{n}:4433"], incarnation=T0))
    for m in ("gemma-3-270m", "qwen3-8b"):
        state.put_model(ModelSpec(name=m, source=m, created_at=T0))
        state.put_server(ServerStatus(node="node-0", model=m, phase=ServerPhase.READY, port=8000, since=T0))
    table = state.doc.get("board", type=Map)
    for i in range(posts):
        table[f"{i:012x}"] = Map(BoardItem(id=f"{i:012x}", author="alice", node="node-0", at=T0 + i,
                                           expires_at=T0 + i + BOARD_TTL, text=_text(i, text_bytes)
                                           ).model_dump(mode="json"))
    return state


def _digest_ms(doc: Doc[Any], rounds: int = 50) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        state_digest(doc)
    return (time.perf_counter() - start) / rounds * 1000


def run_layout(posts: int, text_bytes: int) -> None:
    gap = 40.0
    print(f"== layout: {posts} posts of {text_bytes} B from 3 writers, {gap:g} s apart, newest {MAX_ITEMS} kept, "
          f"48 h TTL ==")
    live = Board()
    shipped = bucket_layout(posts, text_bytes=text_bytes, gap=gap)
    for item in shipped.items():
        live.add(item)
    rows = [("live posts only (floor)", live.doc),
            ("flat map, nested maps", flat_layout(posts, nested=True, text_bytes=text_bytes, gap=gap)),
            ("flat map, plain values", flat_layout(posts, nested=False, text_bytes=text_bytes, gap=gap)),
            ("hour buckets per writer (ships)", shipped.doc)]
    floor = len(live.doc.get_update())
    print(f"{'layout':34} {'doc bytes':>10} {'x floor':>8} {'delete set':>11} {'B/deleted post':>15}")
    for name, doc in rows:
        size = len(doc.get_update())
        per_deleted = (size - floor) / max(1, posts - MAX_ITEMS)
        print(f"{name:34} {size:10d} {size / floor:8.2f} {len(doc.get_update(doc.get_state())):11d} "
              f"{per_deleted:15.1f}")
    print(f"\n== the board inside the state document (3 nodes, 2 models; 500 posts of 4 KB) ==")
    plain, full = state_doc(0, 4096), state_doc(MAX_ITEMS, 4096)
    for name, state in (("state document alone", plain), ("state document + 500 posts", full)):
        print(f"{name:34} join/resync bytes {len(state.doc.get_update()):9d}   digest {_digest_ms(state.doc):6.3f} ms")
    board = Board()
    for i in range(MAX_ITEMS):
        board.add(BoardItem(id=f"{i:012x}", author="a", node="n", at=T0 + i, expires_at=T0 + i + BOARD_TTL,
                            text=_text(i, 4096)))
    print(f"{'board document of its own':34} join/resync bytes {len(board.doc.get_update()):9d}   "
          f"digest {_digest_ms(board.doc):6.3f} ms")


# -- mesh --------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, root: Path, index: int, join: str | None) -> None:
        self.state_dir = root / f"n{index}"
        self.console, self.port = _free_port(), _free_port()
        args = [sys.executable, "-m", "meshllm", "--client", "--blackboard", "--blackboard-rate", "1000000",
                "--bind-host", f"127.0.0.{2 + index}", "--console", str(self.console), "--port", str(self.port),
                "--state-dir", str(self.state_dir), "--name", f"bench-{index}"]
        if join:
            args += ["--join", join]
        self.state_dir.mkdir(parents=True)
        with (self.state_dir / "node.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.console}", timeout=10, trust_env=False)

    def headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + (self.state_dir / "admin.token").read_text().strip()}

    def wait_up(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited; see {self.state_dir / 'node.log'}")
            try:
                return str(self.http.get("/api/token", headers=self.headers()).json()["token"])
            except (httpx.HTTPError, FileNotFoundError, KeyError, ValueError):
                time.sleep(0.2)
        raise TimeoutError("node did not come up")

    def alive(self) -> int:
        return sum(1 for n in self.http.get("/api/status").json()["nodes"] if n["state"] == "alive")

    def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/api/blackboard/stats", headers=self.headers()).json()
        return answer

    def post(self, text: str) -> str:
        answer = self.http.post("/api/blackboard", json={"text": text}, headers=self.headers())
        answer.raise_for_status()
        return str(answer.json()["item"]["id"])

    def ids(self) -> set[str]:
        items = self.http.get("/api/blackboard", params={"limit": "500"}, headers=self.headers()).json()["items"]
        return {i["id"] for i in items}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait(check: Any, timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)
    return time.monotonic() - start


def _sent(nodes: list[Node]) -> list[int]:
    return [int(n.stats()["gossip"]["bytes_sent"]) for n in nodes]


def one_at_a_time(nodes: list[Node], count: int, text_bytes: int, idle_rate: list[float]) -> None:
    latencies = []
    before, start = _sent(nodes), time.monotonic()
    for i in range(count):
        poster = nodes[i % len(nodes)]
        t = time.monotonic()
        item = poster.post(_text(i, text_bytes))
        _wait(lambda: all(item in n.ids() for n in nodes if n is not poster), 10)
        latencies.append(time.monotonic() - t)
    elapsed = time.monotonic() - start
    per_node = [(after - b - rate * elapsed) / count for after, b, rate in zip(_sent(nodes), before, idle_rate, strict=True)]
    print(f"one at a time ({count} posts, round robin): post to on-every-node p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p90 {percentile(latencies, 90) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"  bytes each node sent per post: {', '.join(f'{b:.0f}' for b in per_node)} "
          f"(mean {sum(per_node) / len(per_node):.0f}; the post's text is {text_bytes} B)")


def _poster(console: int, token: str, seconds: float, text_bytes: int, queue: Any) -> None:
    """One poster process: posts through one node's console as fast as it answers."""
    http = httpx.Client(base_url=f"http://127.0.0.1:{console}", timeout=10, trust_env=False,
                        headers={"Authorization": f"Bearer {token}"})
    count, last, stop = 0, "", time.monotonic() + seconds
    while time.monotonic() < stop:
        answer = http.post("/api/blackboard", json={"text": _text(count, text_bytes)})
        answer.raise_for_status()
        last, count = answer.json()["item"]["id"], count + 1
    queue.put((count, last))


def flood(nodes: list[Node], seconds: float, text_bytes: int, idle_rate: list[float]) -> None:
    """Every node posting as fast as it can, each fed by a poster process of its own."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_poster, args=(n.console, n.headers()["Authorization"][7:], seconds, text_bytes, queue))
             for n in nodes]
    before, cpu_before, start = _sent(nodes), [cpu_seconds(n.proc.pid) for n in nodes], time.monotonic()
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    posted = time.monotonic() - start
    for p in procs:
        p.join()
    last = {item for _, item in results}
    _wait(lambda: all(last <= n.ids() for n in nodes), 60)
    everywhere = time.monotonic() - start
    total = sum(count for count, _ in results)
    cpu = [(cpu_seconds(n.proc.pid) - b) / total * 1000 for n, b in zip(nodes, cpu_before, strict=True)]
    per_node = [(after - b - rate * everywhere) / total for after, b, rate in zip(_sent(nodes), before, idle_rate, strict=True)]
    print(f"flood ({len(nodes)} poster processes, one per node, {seconds:g} s): {total} posts accepted in {posted:.1f} s "
          f"({total / posted:.0f}/s), on every node after {everywhere:.1f} s: sustained {total / everywhere:.0f} posts/s")
    print(f"  bytes each node sent per post: {', '.join(f'{b:.0f}' for b in per_node)} "
          f"(mean {sum(per_node) / len(per_node):.0f})")
    print(f"  node CPU per post (posting, relaying, keeping the newest 500): {', '.join(f'{c:.2f}' for c in cpu)} ms")


def run_mesh(n: int, seconds: float, text_bytes: int, singles: int) -> None:
    print(f"\n== mesh: {n} --client --blackboard nodes on 127.0.0.2-{1 + n}, posts of {text_bytes} B ==")
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-board-") as tmp:
        nodes: list[Node] = []
        try:
            nodes.append(Node(Path(tmp), 0, None))
            token = nodes[0].wait_up()
            nodes += [Node(Path(tmp), i, token) for i in range(1, n)]
            for node in nodes:
                node.wait_up()
            _wait(lambda: all(node.alive() == n for node in nodes), 60)
            time.sleep(1.0)  # let the joins' syncs settle before the idle baseline
            before, idle = _sent(nodes), 5.0
            time.sleep(idle)
            idle_rate = [(a - b) / idle for a, b in zip(_sent(nodes), before, strict=True)]
            print(f"idle: each node sends {', '.join(f'{r:.0f}' for r in idle_rate)} B/s of board gossip (anti-entropy)")
            one_at_a_time(nodes, singles, text_bytes, idle_rate)
            flood(nodes, seconds, text_bytes, idle_rate)
            cpu = os.getloadavg()[0]
            print(f"load average after the run: {cpu:.2f} (2 cores, shared)")
        finally:
            for node in nodes:
                node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--text-bytes", type=int, default=200)
    parser.add_argument("--singles", type=int, default=30, help="posts sent one at a time")
    parser.add_argument("--layout-posts", type=int, default=5000)
    parser.add_argument("--layout-only", action="store_true")
    parser.add_argument("--mesh-only", action="store_true")
    args = parser.parse_args()
    if not args.mesh_only:
        run_layout(args.layout_posts, args.text_bytes)
    if not args.layout_only:
        run_mesh(args.nodes, args.seconds, args.text_bytes, args.singles)


if __name__ == "__main__":
    main()
