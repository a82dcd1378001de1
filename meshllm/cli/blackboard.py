"""``meshllm blackboard``: post to, read and search the mesh's blackboard through the local node, run the
MCP server for agents (``--mcp``), or install the agent skill (``install-skill``).

    meshllm blackboard "STATUS: [org/repo branch:main] refactoring billing"   post (``-`` reads stdin)
    meshllm blackboard                                                        the latest posts
    meshllm blackboard --search "billing refactor"                            ranked search
    meshllm blackboard --from alice --since 6 --limit 50 -o json              filtered, as JSON
    meshllm blackboard --mcp                                                  MCP server on stdio
    meshllm blackboard install-skill [--agent claude|pi|goose|all] [--dir D]  the agent skill

The node composes the post (checks, scrubs, limits the rate); this command prints what it stored and
what was scrubbed, or the node's error as one line with exit code 1.
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from meshllm.cli.client import StateDir, console_call
from meshllm.cli.get import ConsolePort
from meshllm.cli.skill import SkillAgent, install_skill, skill_dirs
from meshllm.errors import MeshError
from meshllm.state.board import PostKind

__all__ = ["blackboard", "feed_params", "format_item", "register"]

INSTALL_SKILL = "install-skill"


class Output(StrEnum):
    TEXT = "text"
    JSON = "json"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_item(item: dict[str, Any], *, now: float) -> str:
    """One post as the feed prints it: id, age, author@node, text (indented when it has several lines)."""
    who = f"{item['author']}@{item.get('node_name') or item['node'][:8]}"
    extra = []
    if item.get("reply_to"):
        extra.append(f"reply to {item['reply_to']}")
    if item.get("replies"):
        extra.append(f"{len(item['replies'])} repl{'y' if len(item['replies']) == 1 else 'ies'}")
    tail = f"  ({', '.join(extra)})" if extra else ""
    text = str(item["text"]).replace("\n", "\n" + " " * 16)
    return f"{item['id']}  {_age(now - float(item['at'])):>9}  {who}{tail}\n{' ' * 16}{text}"


def _read_text(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MeshError("stdin is not UTF-8 text (binary data?); the blackboard takes plain text") from None


def _post(text: str, kind: PostKind | None, reply_to: str, console: int, state_dir: Path | None,
          output: Output) -> None:
    body: dict[str, Any] = {"text": _read_text(text)}
    if kind is not None:
        body["kind"] = kind.value
    if reply_to:
        body["reply_to"] = reply_to
    answer = console_call(console, "POST", "/api/blackboard", body=body, state_dir=state_dir)
    if output == Output.JSON:
        print(json.dumps(answer, indent=2))
        return
    item = answer["item"]
    print(f"posted {item['id']} as {item['author']} (kept 48 h)")
    if answer.get("notice"):
        print(answer["notice"])
        print("stored text: " + str(item["text"]))


def feed_params(search: str, author: str, since: float | None, limit: int) -> dict[str, str]:
    """The query of ``GET /api/blackboard`` (the CLI's and the MCP server's reads)."""
    params = {"limit": str(limit)}
    if search:
        params["q"] = search
    if author:
        params["from"] = author
    if since is not None:
        params["since"] = str(since)
    return params


def _read(search: str, author: str, since: float | None, limit: int, console: int, state_dir: Path | None,
          output: Output) -> None:
    answer = console_call(console, "GET", "/api/blackboard", params=feed_params(search, author, since, limit),
                          state_dir=state_dir)
    if output == Output.JSON:
        print(json.dumps(answer["items"], indent=2))
        return
    items = answer["items"]
    if not items:
        print("no posts match" if search or author or since is not None else
              "the blackboard is empty; post with: meshllm blackboard \"STATUS: what you are doing\"")
        return
    now = float(answer.get("now") or time.time())
    for item in items:
        print(format_item(item, now=now))


def blackboard(
    text: Annotated[str | None, typer.Argument(help="Text to post (STATUS:, FINDING:, QUESTION: or ANSWER: first); - reads stdin; install-skill installs the agent skill")] = None,
    search: Annotated[str, typer.Option("--search", "-s", help="Search the posts: ranked by matching words, then recency")] = "",
    author: Annotated[str, typer.Option("--from", help="Only posts by this author (--name of the posting node)")] = "",
    since: Annotated[float | None, typer.Option("--since", help="Only posts from the last HOURS hours", min=0)] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many posts", min=1, max=500)] = 20,
    kind: Annotated[PostKind | None, typer.Option("--kind", case_sensitive=False, help="Kind of the post, when the text has no KIND: prefix")] = None,
    reply_to: Annotated[str, typer.Option("--reply-to", help="Id of the post this one answers")] = "",
    output: Annotated[Output, typer.Option("-o", "--output", help="Output format")] = Output.TEXT,
    mcp: Annotated[bool, typer.Option("--mcp", help="Run as an MCP server on stdio (tools blackboard_post, blackboard_search, blackboard_feed)")] = False,
    join: Annotated[list[str] | None, typer.Option("--join", help="--mcp: when no node runs, the client node it starts joins this mesh")] = None,
    port: Annotated[int, typer.Option("--port", help="--mcp: OpenAI API port of the client node it starts when none runs")] = 9337,
    agent: Annotated[SkillAgent, typer.Option("--agent", help="install-skill: which agent's skill folder")] = SkillAgent.ALL,
    skill_dir: Annotated[Path | None, typer.Option("--dir", help="install-skill: write into this skills folder instead")] = None,
    console: ConsolePort = 3131,
    state_dir: StateDir = None,
) -> None:
    """Post to, read or search the mesh's blackboard; --mcp serves it to agents; install-skill teaches them."""
    if text == INSTALL_SKILL:
        for path in install_skill([skill_dir] if skill_dir else skill_dirs(agent)):
            print(f"wrote {path}")
        return
    if mcp:
        if text is not None or search:
            raise MeshError("--mcp takes no text or --search: the agent posts and searches through the tools")
        from meshllm.cli.mcp import serve_mcp  # the MCP SDK loads only for --mcp

        serve_mcp(console=console, state_dir=state_dir, joins=tuple(join or ()), port=port)
        return
    if text is not None:
        if search:
            raise MeshError("give either TEXT to post or --search, not both")
        _post(text, kind, reply_to, console, state_dir, output)
        return
    _read(search, author, since, limit, console, state_dir, output)


def register(app: typer.Typer) -> None:
    app.command("blackboard")(blackboard)
