"""``meshllm keys add|list|revoke|purge``: the API keys every node's OpenAI API (:9337) accepts.

The node's console (``/api/keys``, see ``meshllm.api.keys``) generates a key, stores only its hash in
the replicated state, and answers with the key once: ``add`` prints it on stdout (alone, for scripts)
and how to use it on stderr. ``list`` never shows a key, only its id, name, first characters and who
created it when. ``revoke`` takes an id, a name or the key itself; every node refuses the key within
seconds, as fast as the state replicates.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from meshllm.api.keys import check_local_key
from meshllm.cli.client import StateDir, console_call
from meshllm.cli.get import ConsolePort, age, table

__all__ = ["keys_app", "local_keys"]

keys_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       help="API keys for the OpenAI API of every node in the mesh.")

Json = Annotated[bool, typer.Option("--json", help="Print the node's JSON answer")]


def local_keys(flags: Iterable[str], env: str | None) -> tuple[str, ...]:
    """The node's own keys: every ``--api-key`` and ``MESHLLM_API_KEY``, checked, without duplicates."""
    keys = [*flags, *([env] if env else [])]
    return tuple(dict.fromkeys(check_local_key(key) for key in keys))


@keys_app.command("add")
def add(name: Annotated[str, typer.Option("--name", help="What the key is for (who holds it)")] = "",
        console: ConsolePort = 3131, state_dir: StateDir = None, as_json: Json = False) -> None:
    """Create a key every node accepts; it is printed once, here, and never again."""
    answer = console_call(console, "POST", "/api/keys", body={"name": name}, state_dir=state_dir)
    if as_json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return
    print(answer["key"])
    print(f"key/{answer['id']}{_named(answer)} created: it is shown only now, store it. Clients send it as "
          "`Authorization: Bearer KEY` (OpenAI: api_key=KEY) or `x-api-key: KEY`; "
          f"`meshllm keys revoke {answer['id']}` withdraws it.", file=sys.stderr)


@keys_app.command("list")
def list_keys(console: ConsolePort = 3131, state_dir: StateDir = None, as_json: Json = False) -> None:
    """The mesh's keys (never the keys themselves): id, name, first characters, created, revoked."""
    answer = console_call(console, "GET", "/api/keys", state_dir=state_dir)
    if as_json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return
    now = time.time()
    rows = [{**key, "name": key["name"] or "-", "hint": f"{key['hint']}…", "age": age(key["created_at"], now=now),
             "status": f"revoked {age(key['revoked_at'], now=now)} ago" if key["revoked_at"] else "active"}
            for key in answer["keys"]]
    if rows:
        sys.stdout.write(table(rows, [("ID", "id"), ("NAME", "name"), ("KEY", "hint"), ("AGE", "age"),
                                      ("CREATED BY", "created_by"), ("STATUS", "status")]))
    local = f"; and {answer['local']} --api-key key(s) on this node" if answer["local"] else ""
    state = "open: it requires no key" if answer["open"] else "requires a key"
    print(f"{sum(not k['revoked_at'] for k in answer['keys'])} active mesh key(s){local}. "
          f"This node's OpenAI API {state}.", file=sys.stderr)


@keys_app.command("revoke")
def revoke(key: Annotated[str, typer.Argument(help="The key's id or name (or the key itself)")],
           console: ConsolePort = 3131, state_dir: StateDir = None) -> None:
    """Withdraw a key: every node refuses it within seconds."""
    answer = console_call(console, "POST", "/api/keys/revoke", body={"key": key}, state_dir=state_dir)
    revoked = answer["revoked"]
    print(f"key/{revoked['id']}{_named(revoked)} {'was already revoked' if answer['already'] else 'revoked'}")
    if not answer["active"]:
        print("Warning: no active mesh key is left: every node's OpenAI API now refuses every request but "
              "those with the node's own --api-key. `meshllm keys add` creates a key; `meshllm keys purge` "
              "forgets the revoked ones, which opens the API again on nodes without --api-key.", file=sys.stderr)


@keys_app.command("purge")
def purge(console: ConsolePort = 3131, state_dir: StateDir = None) -> None:
    """Forget the revoked keys. With no active key left, nodes without --api-key open their API again."""
    answer = console_call(console, "POST", "/api/keys/purge", body={}, state_dir=state_dir)
    print(f"{len(answer['purged'])} revoked key(s) forgotten")
    if answer["open"]:
        print("Warning: this node's OpenAI API now accepts requests without a key.", file=sys.stderr)


def _named(key: dict[str, Any]) -> str:
    return f" ({key['name']})" if key.get("name") else ""
