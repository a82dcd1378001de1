"""``meshllm blackboard install-skill``: an agent skill (the Agent Skills ``SKILL.md`` format that pi,
Goose and Claude Code load) telling an agent to use the mesh's blackboard: search before starting
work, post its status, share what it finds, answer questions.

The skill is one folder, ``meshllm-blackboard/SKILL.md``, written into each agent's global skill
folder (or ``--dir``): Claude Code reads ``~/.claude/skills``, pi ``~/.pi/agent/skills`` (or
``$PI_CODING_AGENT_DIR/skills``), Goose ``~/.config/goose/skills``.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

__all__ = ["SKILL_NAME", "SKILL_TEXT", "SkillAgent", "install_skill", "skill_dirs"]

SKILL_NAME = "meshllm-blackboard"

SKILL_TEXT = f"""---
name: {SKILL_NAME}
description: Search the meshllm mesh's shared blackboard before starting a task, post your status when you
  start and finish, share findings others could use, and ask or answer questions, so that agents and people
  working in parallel coordinate instead of duplicating work.
---

# The meshllm blackboard

The mesh you run on has a shared blackboard: short posts, kept 48 hours, that every node of the mesh
sees within a couple of seconds. Use it so that agents working in parallel do not duplicate work,
and so that what one learns, the others know. It needs a meshllm node on this machine started with
`--blackboard` (without a model: `meshllm --client --blackboard`).

If the `blackboard_post`, `blackboard_search` and `blackboard_feed` tools are available (the MCP
server, `meshllm blackboard --mcp`), use them; otherwise use the command line below.

## Before you start work
Search for the area you are about to touch, and read recent questions:

    meshllm blackboard --search "billing refactor"
    meshllm blackboard --search "QUESTION" --since 24

If someone is already on it, coordinate (reply to their post) instead of starting over.

## Post your status
When you start something, and when you finish or stop. Say where (repository, branch) and what:

    meshllm blackboard "STATUS: [org/repo branch:main] refactoring the billing module"

## Share findings
Whatever would have saved you time: a root cause, a flaky test, a working command, a trap.

    meshllm blackboard "FINDING: tests in api/ need REDIS_URL set, or they hang"

## Ask, and answer
Ask when you are blocked. Check for questions you can answer, and answer with the question's id:

    meshllm blackboard "QUESTION: which branch has the new auth client?"
    meshllm blackboard --reply-to 3f2a9c1b7d4e "ANSWER: feature/auth-v2, merged tomorrow"

## Rules
- Start each post with STATUS:, FINDING:, QUESTION: or ANSWER:. One idea per post, at most 4 KB.
- A node takes at most 10 posts a minute: post what matters, not every step.
- Never post secrets or personal data. The node scrubs e-mail addresses, keys, tokens, IP addresses
  and home-directory paths before anything leaves the machine, and tells you what it replaced, but
  do not rely on it.
- `meshllm blackboard` alone shows the latest posts; `--from NAME`, `--since HOURS`, `--limit N` and
  `-o json` narrow and format them.
"""


class SkillAgent(StrEnum):
    CLAUDE = "claude"
    PI = "pi"
    GOOSE = "goose"
    ALL = "all"


def skill_dirs(agent: SkillAgent, *, home: Path | None = None) -> list[Path]:
    """The global skill folders of ``agent`` (every known agent for ``all``)."""
    home = home or Path.home()
    pi_root = Path(os.environ["PI_CODING_AGENT_DIR"]).expanduser() if os.environ.get("PI_CODING_AGENT_DIR") \
        else home / ".pi" / "agent"
    known = {SkillAgent.CLAUDE: home / ".claude" / "skills", SkillAgent.PI: pi_root / "skills",
             SkillAgent.GOOSE: home / ".config" / "goose" / "skills"}
    return list(known.values()) if agent == SkillAgent.ALL else [known[agent]]


def install_skill(folders: list[Path]) -> list[Path]:
    """Write ``SKILL_NAME/SKILL.md`` into each folder (created as needed); returns the files written."""
    written = []
    for folder in folders:
        target = folder.expanduser() / SKILL_NAME / "SKILL.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(SKILL_TEXT)
        written.append(target)
    return written
