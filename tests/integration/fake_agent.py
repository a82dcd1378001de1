"""A stand-in for claude, goose, opencode and pi in the launcher tests: it finds the mesh the way the
real tool does (its environment, its config file, its arguments), makes one real request through
it, and records what it saw in ``$FAKE_AGENT_RECORD`` (JSON). It exits with ``$FAKE_AGENT_EXIT``,
or with ``$FAKE_AGENT_HOLD`` set waits until a signal ends it (a session the user closes).

Standard library only: it runs as the agent would, outside meshllm.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROMPT = "Say hello"
PREFIXES = ("ANTHROPIC_", "CLAUDE_", "GOOSE_", "OPENCODE_", "OPENAI_", "MESHLLM_", "PI_")


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def post(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return {"url": url, "status": response.status, "body": json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        return {"url": url, "status": exc.code, "body": exc.read().decode(errors="replace")}


def chat(url: str, key: str, model: str) -> dict[str, Any]:
    return post(url, key, {"model": model, "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": PROMPT}]})


def claude(argv: list[str]) -> tuple[dict[str, Any], Any]:
    settings = json.loads(Path(_arg(argv, "--settings")).read_text())
    env = {**os.environ, **settings["env"]}  # the settings' env wins over the process's, as in Claude Code
    if env.get("ANTHROPIC_API_KEY"):
        raise SystemExit("ANTHROPIC_API_KEY would take precedence over ANTHROPIC_AUTH_TOKEN")
    url = env["ANTHROPIC_BASE_URL"].rstrip("/") + "/v1/messages"
    return post(url, env["ANTHROPIC_AUTH_TOKEN"], {"model": env["ANTHROPIC_MODEL"], "max_tokens": 8,
                                                   "temperature": 0,
                                                   "messages": [{"role": "user", "content": PROMPT}]}), settings


def goose(argv: list[str]) -> tuple[dict[str, Any], Any]:
    path = Path(os.environ["HOME"]) / ".config/goose/custom_providers" / (os.environ["GOOSE_PROVIDER"] + ".json")
    config = json.loads(path.read_text())
    model = os.environ["GOOSE_MODEL"]
    assert model in [m["name"] for m in config["models"]], config
    key = os.environ[config["api_key_env"]] if config["requires_auth"] else "none"
    return chat(config["base_url"].rstrip("/") + "/v1/chat/completions", key, model), config


def opencode(argv: list[str]) -> tuple[dict[str, Any], Any]:
    config = json.loads(os.environ["OPENCODE_CONFIG_CONTENT"])
    provider_id, model = config["model"].split("/", 1)
    options = config["provider"][provider_id]["options"]
    return chat(options["baseURL"].rstrip("/") + "/chat/completions", options["apiKey"], model), config


def pi(argv: list[str]) -> tuple[dict[str, Any], Any]:
    config = json.loads((Path(os.environ["HOME"]) / ".pi/agent/models.json").read_text())
    provider = config["providers"][_arg(argv, "--provider")]
    key = os.environ.get(provider["apiKey"], provider["apiKey"])  # a variable's name, else the key itself
    return chat(provider["baseUrl"].rstrip("/") + "/chat/completions", key, _arg(argv, "--model")), config


def main(tool: str) -> None:
    argv = sys.argv[1:]
    request, config = {"claude": claude, "goose": goose, "opencode": opencode, "pi": pi}[tool](argv)
    record = {"tool": tool, "pid": os.getpid(), "argv": argv, "config": config, "request": request,
              "env": {k: v for k, v in os.environ.items() if k.startswith(PREFIXES)}}
    Path(os.environ["FAKE_AGENT_RECORD"] + ".tmp").write_text(json.dumps(record))
    os.replace(os.environ["FAKE_AGENT_RECORD"] + ".tmp", os.environ["FAKE_AGENT_RECORD"])
    if os.environ.get("FAKE_AGENT_HOLD"):
        time.sleep(600)
    sys.exit(int(os.environ.get("FAKE_AGENT_EXIT", "0")))
