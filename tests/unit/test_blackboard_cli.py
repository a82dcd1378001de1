"""``meshllm blackboard`` without a node: the agent skill it installs, how it prints a post, its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from meshllm.cli.blackboard import format_item
from meshllm.cli.skill import SKILL_NAME, SkillAgent, skill_dirs
from tests.conftest import free_port


def meshllm(*args: str, stdin: bytes | None = None, home: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = None
    if home is not None:
        env = {**os.environ, "HOME": str(home)}
        env.pop("PI_CODING_AGENT_DIR", None)
    return subprocess.run([sys.executable, "-m", "meshllm", *args], input=stdin, capture_output=True, timeout=60,
                          env=env)


def test_install_skill_writes_a_skill_every_agent_can_load(tmp_path: Path) -> None:
    done = meshllm("blackboard", "install-skill", home=tmp_path)
    assert done.returncode == 0, done.stderr
    written = sorted(tmp_path.rglob("SKILL.md"))
    assert [p.relative_to(tmp_path).parts[:-2] for p in written] == [
        (".claude", "skills"), (".config", "goose", "skills"), (".pi", "agent", "skills")]
    text = written[0].read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["name"] == SKILL_NAME == written[0].parent.name
    assert "search" in front["description"].lower() and len(front["description"]) < 1024
    for instruction in ('meshllm blackboard --search', 'meshllm blackboard "STATUS:', "FINDING:", "QUESTION:",
                        "--reply-to", "blackboard_post"):
        assert instruction in text
    assert done.stdout.decode().count("wrote ") == 3


def test_install_skill_into_one_agent_or_a_folder(tmp_path: Path) -> None:
    assert skill_dirs(SkillAgent.PI, home=tmp_path) == [tmp_path / ".pi" / "agent" / "skills"]
    done = meshllm("blackboard", "install-skill", "--dir", str(tmp_path / "mine"), home=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "mine" / SKILL_NAME / "SKILL.md").is_file()
    assert not (tmp_path / ".claude").exists()


def test_a_post_prints_with_its_age_author_and_replies() -> None:
    item = {"id": "0123456789ab", "author": "alice", "node": "f" * 16, "node_name": "gpu-box", "at": 1000.0,
            "text": "QUESTION: two\nlines", "replies": ["aaaaaaaaaaaa"]}
    assert format_item(item, now=1000.0 + 2 * 3600) == (
        "0123456789ab   2.0h ago  alice@gpu-box  (1 reply)\n" + " " * 16 + "QUESTION: two\n" + " " * 16 + "lines")


def test_without_a_node_it_says_how_to_start_one() -> None:
    done = meshllm("blackboard", "STATUS: hi", "--console", str(free_port()))
    assert done.returncode == 1 and b"no meshllm node answers" in done.stderr


def test_binary_stdin_is_refused_before_asking_the_node() -> None:
    done = meshllm("blackboard", "-", "--console", str(free_port()), stdin=b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert done.returncode == 1 and b"not UTF-8 text" in done.stderr


def test_text_and_search_together_is_an_error() -> None:
    done = meshllm("blackboard", "STATUS: x", "--search", "x", "--console", str(free_port()))
    assert done.returncode == 1 and b"either TEXT to post or --search" in done.stderr
