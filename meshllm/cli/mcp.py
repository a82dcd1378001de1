"""``meshllm blackboard --mcp``: the blackboard as an MCP server on stdio, for agents (pi, Goose, Claude
Code, any MCP client), built on the official ``mcp`` SDK.

Three tools, each a thin client of the local node's console routes (``api.blackboard``), so posts
are checked, scrubbed and rate-limited by the node exactly as from the command line:

- ``blackboard_post``: share a status, finding, question or answer (returns the stored post and what
  was scrubbed);
- ``blackboard_search``: ranked search of the posts;
- ``blackboard_feed``: the latest posts.

The server reaches the node whose console listens on ``--console`` with the admin token of
``--state-dir``. When no node answers there it starts one as a client (``meshllm --client
--blackboard``, no model, no GPU; ``--join`` passes it an invite token) and stops it when the MCP
session ends. Node errors come back as tool errors the agent can read; stdout carries only the
protocol (the started node logs to ``mcp-node.log`` in its state folder).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from meshllm.cli.blackboard import feed_params
from meshllm.cli.client import console_call
from meshllm.errors import MeshError, NodeUnreachable
from meshllm.state.board import PostKind
from meshllm.store.identity import default_state_dir

__all__ = ["build_server", "local_node", "serve_mcp"]

START_TIMEOUT = 60.0
INSTRUCTIONS = ("The mesh's shared blackboard: short posts (kept 48 h) that every agent and person on the "
                "meshllm mesh sees within seconds. Search it before starting work, post your status when you "
                "start and finish, share findings others could use, ask when blocked, and answer questions "
                "(reply_to the question's id). Never post secrets; the node scrubs what it recognises.")

Since = Annotated[float | None, Field(default=None, ge=0, le=48, description="Only posts from the last this many hours (the board keeps 48)")]
Author = Annotated[str, Field(default="", max_length=64, description="Only posts by this author name (empty: anyone)")]
Limit = Annotated[int, Field(default=20, ge=1, le=500, description="At most this many posts")]


class _Node:
    """Calls to the local node's blackboard routes, off the event loop (the CLI's HTTP client is sync)."""

    def __init__(self, console: int, state_dir: Path | None) -> None:
        self.console, self.state_dir = console, state_dir

    async def call(self, method: str, *, body: object = None, params: dict[str, str] | None = None) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            return console_call(self.console, method, "/api/blackboard", body=body, params=params,
                                state_dir=self.state_dir)
        try:
            return await anyio.to_thread.run_sync(call)
        except MeshError as exc:
            raise ToolError(str(exc)) from None


def build_server(console: int, state_dir: Path | None) -> MCPServer:
    """The MCP server with the three blackboard tools, reaching the node at 127.0.0.1:``console``."""
    node = _Node(console, state_dir)
    server: MCPServer = MCPServer(name="meshllm-blackboard", instructions=INSTRUCTIONS)

    @server.tool(name="blackboard_post", description=(
        "Post to the mesh's blackboard. Start the text with STATUS: (what you are doing, where: repo and "
        "branch), FINDING: (something others could use), QUESTION: (when blocked) or ANSWER: (with reply_to "
        "set to the question's id). One idea per post, plain text, at most 4 KB; at most 10 posts a minute "
        "per node. Secrets and personal data are scrubbed before the post leaves the machine; the result "
        "says what was replaced."))
    async def blackboard_post(
        text: Annotated[str, Field(min_length=1, max_length=4096, description="The post, e.g. 'STATUS: [org/repo branch:main] refactoring billing'")],
        kind: Annotated[PostKind | None, Field(default=None, description="STATUS, FINDING, QUESTION or ANSWER, when the text has no such prefix")] = None,
        reply_to: Annotated[str, Field(default="", pattern=r"^([0-9a-f]{12})?$", description="Id of the post this answers (12 hex digits)")] = "",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "reply_to": reply_to}
        if kind is not None:
            body["kind"] = kind.value
        return await node.call("POST", body=body)

    @server.tool(name="blackboard_search", description=(
        "Search the blackboard before starting work: has anyone done, found or asked this? Words are matched "
        "in the text, kind and author (a word also matches longer words it starts); results are ranked by how "
        "many words match, then by recency. Search 'QUESTION' to find questions to answer."))
    async def blackboard_search(
        query: Annotated[str, Field(min_length=1, max_length=500, description="Words to look for, e.g. 'billing refactor'")],
        author: Author = "", since_hours: Since = None, limit: Limit = 20,
    ) -> dict[str, Any]:
        return await node.call("GET", params=feed_params(query, author, since_hours, limit))

    @server.tool(name="blackboard_feed", description=(
        "The latest posts on the blackboard, newest first: what the other agents and people on the mesh are "
        "doing, finding and asking. Each post has its id (for reply_to), author, node, time and text."))
    async def blackboard_feed(author: Author = "", since_hours: Since = None, limit: Limit = 20) -> dict[str, Any]:
        return await node.call("GET", params=feed_params("", author, since_hours, limit))

    return server


def _answers(console: int, state_dir: Path | None) -> bool:
    try:
        console_call(console, "GET", "/api/blackboard/stats", state_dir=state_dir, timeout=3)
    except NodeUnreachable:
        return False
    except MeshError:
        return True  # a node answers (maybe without --blackboard: the tools will say so)
    return True


@contextmanager
def local_node(*, console: int, state_dir: Path | None, joins: tuple[str, ...] = (),
               port: int = 9337) -> Iterator[subprocess.Popen[bytes] | None]:
    """The node at ``console``: the running one, or a client node started now and stopped on exit."""
    if _answers(console, state_dir):
        yield None
        return
    folder = (state_dir or default_state_dir()).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "meshllm", "--client", "--blackboard", "--console", str(console),
            "--port", str(port), "--state-dir", str(folder), *(a for t in joins for a in ("--join", t))]
    with (folder / "mcp-node.log").open("ab") as log:
        # in this process's group: an MCP client that ends the server's group (SIGTERM) stops the node too
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(console, state_dir):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MeshError(f"the client node started for the MCP server did not come up; see "
                                f"{folder / 'mcp-node.log'}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_mcp(*, console: int, state_dir: Path | None, joins: tuple[str, ...] = (), port: int = 9337) -> None:
    """Serve the blackboard tools on stdin/stdout until the client closes the session."""
    with local_node(console=console, state_dir=state_dir, joins=joins, port=port):
        anyio.run(build_server(console, state_dir).run_stdio_async)
