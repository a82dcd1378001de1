"""``meshllm discover``: the published meshes (Nostr relays and the LAN), as a table; ``--auto`` joins the best.

    meshllm discover                          every live listing: name, models, nodes, clients, region, age
    meshllm discover --model M --region EU    only meshes serving (or wanting) M; EU ranked first
    meshllm discover --auto [--client] [-- NODE OPTIONS]   pick the best as a node's --auto would, run a node joining
                                              it (none fits: a node founding a mesh, serving --model unless --client)
    meshllm discover -o json                  the listings as JSON

Listings are verified (signature, expiry, token bound to the mesh) before they are shown; see
``discovery.listing`` for the score ``--auto`` uses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.table import Table

from meshllm.discovery.directory import DEFAULT_RELAYS, Directory
from meshllm.discovery.listing import Listing, choose, score
from meshllm.discovery.mdns import MdnsDirectory
from meshllm.state.schema import ModelName

__all__ = ["listing_rows", "register", "relay_list"]

out = Console()
err = Console(stderr=True)


def relay_list(given: list[str] | None) -> tuple[str, ...] | None:
    """``--relay`` values: None (the default list) when none is given, () for ``--relay none``."""
    if not given:
        return None
    return tuple(r for r in given if r.lower() != "none")


def _age(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def listing_rows(listings: list[Listing], *, now: float) -> list[list[str]]:
    """The table's rows: name, mesh id, models (wanted ones marked), nodes, clients, region, free, age, source."""
    rows = []
    for entry in listings:
        c = entry.content
        models = ", ".join([*c.served, *(f"{m} (wanted)" for m in c.wanted)]) or "-"
        rows.append([c.name or "-", c.mesh, models, str(c.nodes), str(c.clients), c.region or "-",
                     f"{c.free_bytes / 1e9:.1f} GB", _age(entry.age(now)), entry.source])
    return rows


def discover(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="Only meshes serving (or wanting) this model")] = "",
    region: Annotated[str, typer.Option("--region", help="Rank meshes of this region first")] = "",
    relay: Annotated[list[str] | None, typer.Option("--relay", metavar="URL", help="Nostr relay to read (repeatable; replaces the default list; 'none': LAN only)")] = None,
    mdns: Annotated[bool, typer.Option("--mdns/--no-mdns", help="Look on the LAN by mDNS too")] = True,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Seconds to browse the LAN")] = 2.0,
    auto: Annotated[bool, typer.Option("--auto", help="Join the best mesh: run a node with its token")] = False,
    client: Annotated[bool, typer.Option("--client", help="With --auto: join as an API-only client")] = False,
    output: Annotated[str, typer.Option("-o", "--output", help="text or json")] = "text",
) -> None:
    """List the meshes published on the Nostr relays and the LAN; --auto joins the best one (options after
    ``--`` go to that node: ``meshllm discover --auto --client -- --port 9400``)."""
    relays = relay_list(relay)
    directory = Directory(relays=DEFAULT_RELAYS if relays is None else relays,
                          lan=MdnsDirectory(instance="discover") if mdns else None)
    listings = anyio.run(lambda: directory.find(wait=wait))
    now, ttl, wanted = time.time(), 300.0, ModelName(model)
    shown = [e for e in listings if score(e, model=wanted, region=region, now=now, ttl=ttl) is not None]
    shown.sort(key=lambda e: -(score(e, model=wanted, region=region, now=now, ttl=ttl) or 0.0))
    if output == "json":
        print(json.dumps([{**e.content.model_dump(exclude={"token"}), "age_s": round(e.age(now)), "source": e.source}
                          for e in shown], indent=2))
    elif not shown:
        err.print("no published mesh found" + (f" serving {model}" if model else ""))
    else:
        table = Table("NAME", "MESH", "MODELS", "NODES", "CLIENTS", "REGION", "FREE", "AGE", "SOURCE", box=None)
        for row in listing_rows(shown, now=now):
            table.add_row(*row)
        out.print(table)
    if auto:
        _run_node(choose(shown, model=wanted, region=region, now=now, ttl=ttl), model=model, client=client,
                  extra=ctx.args)


def _run_node(best: Listing | None, *, model: str, client: bool, extra: list[str]) -> None:
    """Replace this process by a node joining ``best``; none fits: a node founding a mesh (serving ``--model``
    unless ``--client``), as the node's own ``--auto`` does."""
    role = ["--client"] if client else []
    if best is None:
        serve = ["--model", model] if model and not client else []
        err.print("no published mesh fits; starting a new mesh")
        os.execv(sys.executable, [sys.executable, "-m", "meshllm", *role, *serve, *extra])
    err.print(f"joining {best.content.name or best.mesh_id} ({best.mesh_id})")
    os.execv(sys.executable, [sys.executable, "-m", "meshllm", "--join", best.content.token, *role, *extra])


def register(app: typer.Typer) -> None:
    app.command("discover", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(discover)
