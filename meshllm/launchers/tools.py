"""What each agent reads to find the mesh, and how it is launched: Claude Code, Goose, opencode, pi.

Each tool gets the node's address, the chosen model, every model the mesh serves and the key to
present, through what that tool really reads:

- ``claude`` (Anthropic Messages API, ``/v1/messages``): ``ANTHROPIC_BASE_URL`` (the root: Claude Code
  appends ``/v1/messages``), ``ANTHROPIC_AUTH_TOKEN`` (sent as ``Authorization: Bearer``), the model for
  every alias (``ANTHROPIC_MODEL``, ``ANTHROPIC_DEFAULT_{OPUS,SONNET,HAIKU}_MODEL``, the subagents').
  ``ANTHROPIC_API_KEY`` is emptied: it would take precedence over the token. The same variables go in
  a settings file passed with ``--settings`` (0600, removed when claude exits), because the ``env`` of
  the user's own ``~/.claude/settings.json`` overrides the process environment, and the file keeps
  the key off the command line;
- ``goose``: a custom provider ``mesh`` in ``~/.config/goose/custom_providers/mesh.json`` (OpenAI
  engine, every served model; ``$GOOSE_PATH_ROOT/config`` or ``$XDG_CONFIG_HOME/goose`` when set),
  chosen with ``GOOSE_PROVIDER=mesh GOOSE_MODEL=M``; the key in ``MESHLLM_CLIENT_KEY``, which the
  provider names as its key variable. No arguments: ``goose session``;
- ``opencode``: a provider ``mesh`` (``@ai-sdk/openai-compatible``, chat completions) and the default
  model ``mesh/M`` in ``OPENCODE_CONFIG_CONTENT``, the inline config opencode merges over every
  config file. Not its built-in ``openai`` provider with ``OPENAI_BASE_URL``: that one speaks the
  Responses API;
- ``pi``: a provider ``mesh`` in ``~/.pi/agent/models.json`` (``$PI_CODING_AGENT_DIR`` when set; the
  file's other providers are kept), run as ``pi --provider mesh --model M``; its ``apiKey`` names the
  variable ``MESHLLM_CLIENT_KEY``, so the file holds no key.

The user's remaining arguments follow the launcher's own.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from meshllm.errors import MeshError
from meshllm.state.schema import ModelName

__all__ = ["CLIENT_KEY_ENV", "TOOLS", "Prepared", "Target", "Tool"]

CLIENT_KEY_ENV = "MESHLLM_CLIENT_KEY"  # the key the agent presents (not MESHLLM_API_KEY: that one sets a node's key)
PROVIDER = "mesh"
CONTEXT = 32768  # tokens the configs announce per model (a hint for the agent's compaction)
OUTPUT = 8192


@dataclass(frozen=True)
class Target:
    """Where the agent is pointed: the node's port, the model, every served model, the key."""

    port: int
    model: ModelName
    models: tuple[ModelName, ...]
    key: str

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.root}/v1"


@dataclass
class Prepared:
    """How to run the tool: its arguments, the variables set and unset, the files written for it
    (kept) and the temporary ones (removed when it exits)."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    written: list[Path] = field(default_factory=list)
    temporary: list[Path] = field(default_factory=list)


Prepare = Callable[[Target, Sequence[str], Mapping[str, str], Path], Prepared]


@dataclass(frozen=True)
class Tool:
    name: str
    binary: str
    title: str
    install: str
    prepare: Prepare


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ["HOME"]) if environ.get("HOME") else Path.home()


def _write_json(path: Path, body: object) -> None:
    """Replace ``path`` at once (never half written), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _claude(target: Target, args: Sequence[str], environ: Mapping[str, str], private: Path) -> Prepared:
    env = {"ANTHROPIC_BASE_URL": target.root, "ANTHROPIC_AUTH_TOKEN": target.key, "ANTHROPIC_API_KEY": "",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    for alias in ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
                  "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL"):
        env[alias] = target.model
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix="claude-settings-", suffix=".json", dir=private)  # 0600
    with os.fdopen(fd, "w") as f:
        json.dump({"env": env}, f)
    process_env = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    return Prepared(["--settings", name, "--model", target.model, *args], process_env, unset=("ANTHROPIC_API_KEY",),
                    temporary=[Path(name)])


def goose_config_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("GOOSE_PATH_ROOT"):
        return Path(environ["GOOSE_PATH_ROOT"]) / "config"
    if environ.get("XDG_CONFIG_HOME"):
        return Path(environ["XDG_CONFIG_HOME"]) / "goose"
    return _home(environ) / ".config" / "goose"


def _goose(target: Target, args: Sequence[str], environ: Mapping[str, str], private: Path) -> Prepared:
    provider = {"name": PROVIDER, "engine": "openai", "display_name": "meshllm",
                "description": "The models of a meshllm mesh (written by `meshllm goose`)",
                "api_key_env": CLIENT_KEY_ENV, "base_url": target.root,
                "models": [{"name": m, "context_limit": CONTEXT} for m in target.models],
                "timeout_seconds": 600, "supports_streaming": True, "requires_auth": True}
    path = goose_config_dir(environ) / "custom_providers" / f"{PROVIDER}.json"
    _write_json(path, provider)
    env = {"GOOSE_PROVIDER": PROVIDER, "GOOSE_MODEL": target.model, CLIENT_KEY_ENV: target.key}
    return Prepared(list(args) or ["session"], env, written=[path])


def _opencode(target: Target, args: Sequence[str], environ: Mapping[str, str], private: Path) -> Prepared:
    provider = {"name": "meshllm", "npm": "@ai-sdk/openai-compatible",
                "options": {"baseURL": target.openai_url, "apiKey": target.key},
                "models": {m: {"name": m, "limit": {"context": CONTEXT, "output": OUTPUT}} for m in target.models}}
    config: dict[str, Any] = {}
    try:  # the user's own inline config, if any, keeps everything but the mesh provider and the model
        given = json.loads(environ.get("OPENCODE_CONFIG_CONTENT") or "{}")
        config = given if isinstance(given, dict) else {}
    except ValueError:
        pass
    config.setdefault("$schema", "https://opencode.ai/config.json")
    config["model"] = f"{PROVIDER}/{target.model}"
    providers = config.get("provider")
    config["provider"] = {**(providers if isinstance(providers, dict) else {}), PROVIDER: provider}
    return Prepared(list(args), {"OPENCODE_CONFIG_CONTENT": json.dumps(config)})


def pi_models_file(environ: Mapping[str, str]) -> Path:
    folder = Path(environ["PI_CODING_AGENT_DIR"]) if environ.get("PI_CODING_AGENT_DIR") else \
        _home(environ) / ".pi" / "agent"
    return folder / "models.json"


def _pi(target: Target, args: Sequence[str], environ: Mapping[str, str], private: Path) -> Prepared:
    path = pi_models_file(environ)
    body: Any = {}
    if path.is_file():
        try:
            body = json.loads(path.read_text() or "{}")
        except ValueError as exc:
            raise MeshError(f"{path} is not valid JSON ({exc}); fix or remove it, and run this again") from None
    if not isinstance(body, dict) or not isinstance(body.get("providers", {}), dict):
        raise MeshError(f"{path} does not hold a JSON object with a 'providers' object; fix or remove it")
    body.setdefault("providers", {})[PROVIDER] = {
        "baseUrl": target.openai_url, "api": "openai-completions", "apiKey": CLIENT_KEY_ENV,
        "compat": {"supportsDeveloperRole": False, "supportsReasoningEffort": False, "maxTokensField": "max_tokens"},
        "models": [{"id": m, "name": f"{m} (mesh)", "contextWindow": CONTEXT, "maxTokens": OUTPUT, "input": ["text"]}
                   for m in target.models]}
    _write_json(path, body)
    return Prepared(["--provider", PROVIDER, "--model", target.model, *args], {CLIENT_KEY_ENV: target.key},
                    written=[path])


TOOLS: Mapping[str, Tool] = MappingProxyType({tool.name: tool for tool in (
    Tool("claude", "claude", "Claude Code", "npm install -g @anthropic-ai/claude-code", _claude),
    Tool("goose", "goose", "Goose",
         "curl -fsSL https://github.com/block/goose/releases/download/stable/download_cli.sh | bash", _goose),
    Tool("opencode", "opencode", "opencode", "curl -fsSL https://opencode.ai/install | bash (or npm install -g "
         "opencode-ai)", _opencode),
    Tool("pi", "pi", "pi", "npm install -g @mariozechner/pi-coding-agent", _pi),
)})
