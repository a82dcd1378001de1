"""The blackboard across real node processes on 127.0.0.x (``--client`` nodes: no engine, no model).

What a user notices: a post on one node is found on the others within 2 s; a node serving a model
takes ``--blackboard`` as a client does; a node without ``--blackboard`` relays but says how to enable it; a restarted node gets the board back (from its
peers, and alone from its snapshot); bad input and a flood get clear errors and lose nothing else; an
MCP client (the official SDK, over stdio) lists the tools, posts, searches and reads the feed through
a 2-node mesh, with the MCP server starting (and stopping) its own client node, and an MCP server
pointed at a running node uses it and leaves it running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from meshllm.gossip.board import BoardGossip
from meshllm.state.board import Board, BoardItem
from meshllm.store.identity import NodeIdentity
from meshllm.transport import QuicEndpoint
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def board(node: NodeProcess, **params: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"http://127.0.0.1:{node.console}/api/blackboard", params=params,
                       headers=node.admin_headers(), timeout=5)
    answer.raise_for_status()
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def alive(node: NodeProcess) -> int:
    return sum(1 for n in node.status()["nodes"] if n["state"] == "alive")


def start_mesh(mesh: Mesh, *flags: tuple[str, ...]) -> list[NodeProcess]:
    first = mesh.start("a", "127.0.0.2", "--client", *flags[0])
    token = first.token()
    nodes = [first] + [mesh.start(chr(ord("a") + i), f"127.0.0.{2 + i}", "--client", "--join", token, *extra)
                       for i, extra in enumerate(flags[1:], start=1)]
    for node in nodes:
        node.token()  # its console is up
        wait_for(lambda node=node: alive(node) == len(nodes), timeout=30, what="every node to see the mesh")
    return nodes


def post(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return node.cli("blackboard", *args)


def test_a_post_is_searchable_on_every_node_within_two_seconds(mesh: Mesh) -> None:
    a, b, c = start_mesh(mesh, ("--blackboard", "--name", "alice"), (), ("--blackboard", "--name", "carol"))
    start = time.monotonic()
    posted = httpx.post(f"http://127.0.0.1:{a.console}/api/blackboard", headers=a.admin_headers(), timeout=5,
                        json={"text": "STATUS: [org/repo branch:main] refactoring billing; mail alice@example.com"})
    assert posted.json()["notice"] == "scrubbed before posting: 1 email"
    item_id = posted.json()["item"]["id"]
    wait_for(lambda: any(i["id"] == item_id for i in board(c, q="billing refactor")), timeout=2,
             what="C to find A's post")
    print(f"a post on A was searchable on C {time.monotonic() - start:.2f} s after it was sent")
    cli_post = post(a, "FINDING: the CLI posts too, key sk-abcdefghijklmnopqrstuvwx")
    assert cli_post.returncode == 0 and "scrubbed before posting: 1 api_key" in cli_post.stdout
    assert "stored text: FINDING: the CLI posts too, key [API KEY]" in cli_post.stdout
    found = post(c, "--search", "billing refactor")
    assert found.returncode == 0 and item_id in found.stdout and "alice@" in found.stdout
    assert "[EMAIL]" in found.stdout and "alice@example.com" not in found.stdout
    # B runs without --blackboard: it relays the board but its routes say how to enable them
    refused = post(b, "STATUS: from b")
    assert refused.returncode == 1 and "restart it with --blackboard" in refused.stderr
    answer = post(c, "QUESTION: who owns the invoices module?")
    question_id = answer.stdout.split()[1]
    wait_for(lambda: any(i["id"] == question_id for i in board(a)), timeout=2, what="A to see C's question")
    reply = post(a, "--reply-to", question_id, "ANSWER: carol does")
    assert reply.returncode == 0, reply.stderr
    wait_for(lambda: len(board(c)) == 4, timeout=2, what="C to see the answer")
    as_json = json.loads(post(c, "--from", "alice", "--since", "1", "-o", "json").stdout)
    assert [i["kind"] for i in as_json] == ["ANSWER", "FINDING", "STATUS"]
    assert as_json[0]["reply_to"] == question_id
    questions = json.loads(post(a, "--search", "QUESTION", "-o", "json").stdout)
    assert [q["id"] for q in questions] == [question_id] and questions[0]["replies"]


def test_a_serving_node_takes_blackboard_and_limit_reads_the_newest(mesh: Mesh, tiny_dense: Path) -> None:
    serving = mesh.start("s", "127.0.0.2", "--blackboard", "--name", "gpu-owner", models=(str(tiny_dense),))
    token = serving.token()
    client = mesh.start("c", "127.0.0.3", "--client", "--blackboard", "--join", token)
    client.token()
    ids = []
    for i in range(3):
        done = post(serving, f"STATUS: step {i} on the serving node")
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.split()[1])
    wait_for(lambda: len(board(client)) == 3, timeout=5, what="the client to hold the serving node's posts")
    newest = json.loads(post(client, "--limit", "2", "-o", "json").stdout)
    assert [i["id"] for i in newest] == ids[:0:-1] and {i["author"] for i in newest} == {"gpu-owner"}
    serving.wait_ready("tiny-dense")  # the board took nothing from serving the model
    assert alive(client) == 2


def test_a_restarted_node_gets_the_board_back(mesh: Mesh) -> None:
    a, b = start_mesh(mesh, ("--blackboard",), ("--blackboard",))
    first = post(a, "FINDING: tests in api/ need REDIS_URL").stdout.split()[1]
    wait_for(lambda: len(board(b)) == 1, timeout=5, what="B to see the first post")
    b.stop()
    (b.state_dir / "board.ydoc").unlink()  # it must come from the peer, not from B's own snapshot
    second = post(a, "STATUS: posted while B was down").stdout.split()[1]
    b.start()
    b.token()
    took = wait_for(lambda: {i["id"] for i in board(b)} == {first, second}, timeout=10,
                    what="the restarted B to get the board back")
    print(f"the restarted node had the board {took:.2f} s after its console answered")
    # the whole mesh restarts: the snapshot in the state folder brings the posts back
    for node in (a, b):
        node.stop()
    a.start()
    a.token()
    wait_for(lambda: {i["id"] for i in board(a)} == {first, second}, timeout=5, what="A's board from its snapshot")


def raw_post(node: NodeProcess, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "meshllm", "blackboard", "-", "--console", str(node.console),
                           "--state-dir", str(node.state_dir)], input=data, capture_output=True, timeout=60)


def test_bad_input_gets_clear_errors_and_loses_nothing(mesh: Mesh) -> None:
    a, b = start_mesh(mesh, ("--blackboard",), ("--blackboard",))
    kept = [post(b, f"STATUS: kept {i}").stdout.split()[1] for i in range(3)]
    cases = {
        "oversize": (post(a, "x" * 4097), "4097 bytes; a post holds at most 4096"),
        "empty": (post(a, "   "), "the text is empty"),
        "control characters": (post(a, "bin\x01ary"), "control character U+0001"),
    }
    for name, (result, message) in cases.items():
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, name
    garbage = raw_post(a, os.urandom(512) + b"\xff\xfe")
    assert garbage.returncode == 1 and b"not UTF-8" in garbage.stderr
    accepted, refused = [], []
    for i in range(12):  # a flood: the node takes 10 a minute
        result = post(a, f"STATUS: flood {i}")
        (accepted if result.returncode == 0 else refused).append(result)
    assert len(accepted) == 10 and len(refused) == 2
    assert "posted 10 times in the last 60 s (at most 10); post again in" in refused[0].stderr
    wait_for(lambda: len(board(b, limit="100")) == 13, timeout=5, what="B to hold every accepted post")
    texts = {i["text"] for i in board(b, limit="100")}
    assert texts == {f"STATUS: kept {i}" for i in range(3)} | {f"STATUS: flood {i}" for i in range(10)}
    assert {i["id"] for i in board(a, limit="100")} >= set(kept)
    assert alive(a) == 2  # the node kept serving


async def test_an_mcp_client_posts_searches_and_reads_through_a_two_node_mesh(mesh: Mesh) -> None:
    (a,) = start_mesh(mesh, ("--blackboard", "--name", "alice"))
    b_state, b_console = mesh.root / "b", free_port()
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "meshllm", "blackboard", "--mcp", "--console", str(b_console), "--state-dir", str(b_state),
              "--join", a.token(), "--port", str(free_port())],
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "USER": "agent-b"})
    with (mesh.root / "mcp-stderr.log").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == {"blackboard_post", "blackboard_search", "blackboard_feed"}
            assert tools["blackboard_post"].input_schema["required"] == ["text"]
            assert "kind" in tools["blackboard_post"].input_schema["properties"]
            posted = await session.call_tool("blackboard_post", {"text": "FINDING: the MCP path works, ping ops@example.com"})
            assert not posted.is_error, posted.content
            item = posted.structured_content["item"]
            assert item["author"] == "agent-b" and item["text"] == "FINDING: the MCP path works, ping [EMAIL]"
            await anyio.to_thread.run_sync(lambda: wait_for(lambda: any(i["id"] == item["id"] for i in board(a)),
                                                            timeout=5, what="A to see the MCP post"))
            question = post(a, "QUESTION: does search reach the MCP agent?").stdout.split()[1]

            async def search() -> list[dict[str, Any]]:
                result = await session.call_tool("blackboard_search", {"query": "search MCP agent"})
                assert not result.is_error, result.content
                found: list[dict[str, Any]] = result.structured_content["items"]
                return found

            with anyio.fail_after(5):
                while not (found := await search()) or found[0]["id"] != question:
                    await anyio.sleep(0.05)
            feed = await session.call_tool("blackboard_feed", {"limit": 5})
            assert [i["id"] for i in feed.structured_content["items"]] == [question, item["id"]]
            empty = await session.call_tool("blackboard_post", {"text": "   "})
            assert empty.is_error and "empty" in empty.content[0].text
    # the session ended: the client node the MCP server started is stopped
    await anyio.to_thread.run_sync(lambda: wait_for(lambda: not _answers(b_console), timeout=20,
                                                    what="the MCP server's node to stop"))
    # an MCP server pointed at a running node (A) uses it, and leaves it running when the session ends
    on_a = StdioServerParameters(command=sys.executable, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                                 args=["-m", "meshllm", "blackboard", "--mcp", "--console", str(a.console),
                                       "--state-dir", str(a.state_dir)])
    with (mesh.root / "mcp-a-stderr.log").open("w") as errlog:
        async with stdio_client(on_a, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            feed = await session.call_tool("blackboard_feed", {"limit": 5})
            assert [i["id"] for i in feed.structured_content["items"]] == [question, item["id"]]
    assert _answers(a.console) and a.proc is not None and a.proc.poll() is None


def _answers(console: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{console}/api/status", timeout=1)
    except httpx.HTTPError:
        return False
    return True


async def test_a_board_started_after_the_connection_still_gets_a_session() -> None:
    """Real QUIC on loopback: B's board starts after A dialled it, so A's first board stream is refused;
    A opens it again and the boards converge both ways."""
    secret = b"correct horse battery staple 32b"
    a_end, b_end = (QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), "board-mesh", secret, host="127.0.0.1")
                    for _ in range(2))
    a_board, b_board = Board(), Board()
    a_board.add(BoardItem(id="0" * 12, author="a", node=a_end.node_id, at=time.time(),
                          expires_at=time.time() + 3600, text="STATUS: from a"))
    a_gossip = BoardGossip(a_board, a_end, node_id=a_end.node_id, retry=0.2)
    b_gossip = BoardGossip(b_board, b_end, node_id=b_end.node_id)
    async with anyio.create_task_group() as tg:
        await tg.start(a_end.run)
        b_port = await tg.start(b_end.run)
        await tg.start(a_gossip.run)
        await a_end.connect("127.0.0.1", b_port)
        with anyio.fail_after(5):  # A's first board session: opened, sent its step 1, refused by B
            while a_gossip.gossip.stats.messages_sent == 0 or a_gossip.gossip.sessions:
                await anyio.sleep(0.01)
        assert len(b_board) == 0
        await tg.start(b_gossip.run)
        b_board.add(BoardItem(id="1" * 12, author="b", node=b_end.node_id, at=time.time(),
                              expires_at=time.time() + 3600, text="STATUS: from b"))
        with anyio.fail_after(10):
            while len(a_board) < 2 or len(b_board) < 2:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
