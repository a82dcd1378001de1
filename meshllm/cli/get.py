"""``meshllm get nodes|models|demand`` and ``meshllm describe model NAME``: what a running node knows.

kubectl's shapes, because people already read them: aligned columns with no borders (easy to grep
and awk), ``-o json|yaml`` for scripts, ``-o wide`` for more columns, and ``describe`` as labelled
sections. The node's console API (``/api/status``, ``/api/demand``, ``/api/models/NAME``) answers.
"""

from __future__ import annotations

import json
import re
import sys
import time
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer
import yaml

from meshllm.cli.client import StateDir, console_call

__all__ = ["ConsolePort", "age", "register", "table"]

ConsolePort = Annotated[int, typer.Option("--console", help="Console port of the node to ask")]


class Kind(StrEnum):
    MODELS = "models"
    NODES = "nodes"
    DEMAND = "demand"


class OutputFormat(StrEnum):
    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"


class DescribeKind(StrEnum):
    MODEL = "model"


Output = Annotated[OutputFormat, typer.Option("-o", "--output", help="Output format")]
Columns = list[tuple[str, str]]


def table(rows: list[dict[str, Any]], columns: Columns) -> str:
    """Rows as left-aligned columns under upper-case titles, three spaces apart (kubectl's look)."""
    cells = [[title for title, _ in columns]] + [[str(row.get(key, "")) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells) + "\n"


def age(then: float, *, now: float) -> str:
    """``5s``, ``3m``, ``2h``, ``4d`` since ``then``; ``-`` when never."""
    if then <= 0:
        return "-"
    seconds = max(0, int(now - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _node_names(status: dict[str, Any]) -> dict[str, str]:
    return {n["id"]: n.get("name") or n["id"] for n in status.get("nodes", [])}


def _reason(cond: dict[str, Any]) -> str:
    """The condition's reason; a download's with how far it got (``Downloading 25%``)."""
    reason = str(cond.get("reason", "-"))
    found = re.search(r"\((\d+%)\)", str(cond.get("message", ""))) if reason == "Downloading" else None
    return f"{reason} {found[1]}" if found else reason


def _model_row(model: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    cond = model.get("condition") or {}
    nodes = cond.get("nodes") or sorted({s["node"] for s in model.get("servers", [])})
    shown = ",".join(names.get(n, n) for n in nodes) or "-"
    if cond.get("workers"):  # a split: host+worker+worker
        shown = "+".join([shown, *(names.get(n, n) for n in cond["workers"])])
    return {"name": model["name"], "condition": cond.get("phase", "-"),
            "ready": f"{cond.get('ready', 0)}/{cond.get('wanted', model.get('replicas', 1))}",
            "nodes": shown, "reason": _reason(cond),
            "source": model["source"], "origin": model.get("origin", ""), "replicas": model.get("replicas", 1),
            "message": cond.get("message") or "-"}


def _node_row(node: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    served = [m["name"] for m in status["models"]
              if any(s["node"] == node["id"] and s["phase"] == "ready" for s in m["servers"])]
    return {**node, "capacity": f"{node.get('capacity_bytes', 0) / 1e9:.1f} GB",
            "models": ",".join(served) or "-", "addresses": ",".join(node.get("addrs", [])) or "-",
            "api": node.get("api_url") or "-", "version": node.get("version") or "-"}


def _demand_row(entry: dict[str, Any], names: dict[str, str], *, now: float) -> dict[str, Any]:
    return {"model": entry["model"], "node": names.get(entry["node"], entry["node"]),
            "rate": f"{entry.get('rate', 0):.1f}", "count": entry.get("count", 0),
            "active": age(entry.get("last_active", 0), now=now),
            "state": "live" if entry.get("live") else "expired", "node_id": entry["node"]}


_COLUMNS: dict[Kind, tuple[Columns, Columns]] = {
    Kind.MODELS: ([("NAME", "name"), ("CONDITION", "condition"), ("READY", "ready"), ("NODES", "nodes"),
                   ("REASON", "reason")],
                  [("SOURCE", "source"), ("ORIGIN", "origin"), ("REPLICAS", "replicas"), ("MESSAGE", "message")]),
    Kind.NODES: ([("ID", "id"), ("NAME", "name"), ("STATE", "state"), ("ROLE", "role"), ("CAPACITY", "capacity"),
                  ("MODELS", "models"), ("ADDRESSES", "addresses")],
                 [("API", "api"), ("VERSION", "version")]),
    Kind.DEMAND: ([("MODEL", "model"), ("NODE", "node"), ("REQ/MIN", "rate"), ("REQUESTS", "count"),
                   ("ACTIVE", "active"), ("STATE", "state")],
                  [("NODE-ID", "node_id")]),
}


def _emit(raw: list[dict[str, Any]], rows: list[dict[str, Any]], kind: Kind, output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        sys.stdout.write(json.dumps(raw, indent=2) + "\n")
    elif output is OutputFormat.YAML:
        sys.stdout.write(yaml.safe_dump(raw, sort_keys=False))
    elif not rows:
        print(f"No {kind.value} found.", file=sys.stderr)
    else:
        columns, wide = _COLUMNS[kind]
        sys.stdout.write(table(rows, columns + wide if output is OutputFormat.WIDE else columns))


def get(
    kind: Annotated[Kind, typer.Argument(help="What to list")],
    output: Output = OutputFormat.TABLE,
    console: ConsolePort = 3131,
    state_dir: StateDir = None,
) -> None:
    """List the models, nodes or request demand a running node knows."""
    status = console_call(console, "GET", "/api/status", state_dir=state_dir)
    names, now = _node_names(status), time.time()
    if kind is Kind.MODELS:
        _emit(status["models"], [_model_row(m, names) for m in status["models"]], kind, output)
    elif kind is Kind.NODES:
        _emit(status["nodes"], [_node_row(n, status) for n in status["nodes"]], kind, output)
    else:
        demand = console_call(console, "GET", "/api/demand", state_dir=state_dir)["demand"]
        _emit(demand, [_demand_row(e, names, now=now) for e in demand], kind, output)


def describe(
    kind: Annotated[DescribeKind, typer.Argument(help="What to describe")],
    name: Annotated[str, typer.Argument(help="Its name")],
    console: ConsolePort = 3131,
    state_dir: StateDir = None,
) -> None:
    """Show one model in detail: spec, condition, servers, leases, demand and recent events."""
    described = console_call(console, "GET", f"/api/models/{quote(name, safe='')}", state_dir=state_dir)
    names = _node_names(console_call(console, "GET", "/api/status", state_dir=state_dir))
    sys.stdout.write(describe_model(described, names=names, now=time.time()))


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes" if size else "unknown"


def _section(title: str, rows: list[dict[str, Any]], columns: Columns) -> str:
    if not rows:
        return f"{title}:\n  <none>\n"
    return f"{title}:\n" + "".join(f"  {line}\n" for line in table(rows, columns).splitlines())


def describe_model(described: dict[str, Any], *, names: dict[str, str], now: float) -> str:
    """kubectl-describe-like text of ``GET /api/models/NAME``'s answer."""
    spec, cond = described["model"], described.get("condition") or {}
    node = spec.get("node") or ""
    fields = [
        ("Name", spec["name"]), ("Source", spec["source"]), ("Origin", spec.get("origin", "")),
        ("Owner", names.get(spec.get("owner", ""), spec.get("owner", "")) or "<none>"),
        ("Replicas", spec.get("replicas", 1)), ("Context size", spec.get("ctx_size") or "model default"),
        ("Draft", spec.get("draft") or "<none>"),
        ("Placement", f"{names.get(node, node)} ({node})" if node in names else node or "<any node>"),
        ("Size", _size(spec.get("size_bytes", 0))),
        ("Created", f"{age(spec.get('created_at', 0), now=now)} ago" if spec.get("created_at") else "-"),
        ("Condition", cond.get("phase", "<unknown>")), ("  Reason", cond.get("reason", "")),
        ("  Message", cond.get("message") or "<none>"),
        ("  Ready", f"{cond.get('ready', 0)}/{cond.get('wanted', spec.get('replicas', 1))}"),
        ("  Nodes", ",".join(names.get(n, n) for n in cond.get("nodes", [])) or "<none>"),
    ]
    if spec.get("split") or cond.get("workers"):
        fields.insert(8, ("Split", "forced (split: true)" if spec.get("split") else "when no node holds it alone"))
        fields.append(("  Workers", ",".join(names.get(n, n) for n in cond.get("workers", [])) or "<none>"))
        if cond.get("split_cost"):
            fields.append(("  Split cost", cond["split_cost"]))
    if spec.get("experts"):
        fields.insert(8, ("Experts", f"{spec['experts']} per MoE layer, {spec.get('experts_used', 0)} used per token"
                                     f" (core kept by every shard: {spec.get('expert_core', 0.5):.0%})"))
    text = "".join(f"{label + ':':<15}{value}\n" for label, value in fields)
    if cond.get("shards"):
        text += "Expert shards:\n" + "".join(f"  {line}\n" for line in cond["shards"])
    servers = [{**s, "node": names.get(s["node"], s["node"]), "since": age(s.get("since", 0), now=now),
                "message": s.get("message") or "-"} for s in described.get("servers", [])]
    text += _section("Servers", servers, [("NODE", "node"), ("PHASE", "phase"), ("PORT", "port"), ("PID", "pid"),
                                          ("RESTARTS", "restarts"), ("SINCE", "since"), ("MESSAGE", "message")])
    workers = [{**w, "node": names.get(w["node"], w["node"]), "host": names.get(w["host"], w["host"]),
                "since": age(w.get("since", 0), now=now), "message": w.get("message") or "-"}
               for w in described.get("workers", [])]
    if workers:
        text += _section("Split workers", workers, [("NODE", "node"), ("HOST", "host"), ("PHASE", "phase"),
                                                    ("PORT", "port"), ("SINCE", "since"), ("MESSAGE", "message")])
    leases = [{**lease, "node": names.get(lease["node"], lease["node"]), "hot": "yes" if lease.get("hot") else "no",
               "workers": ",".join(names.get(w, w) for w in lease.get("workers", [])) or "-",
               "age": age(lease.get("at", 0), now=now)} for lease in described.get("leases", [])]
    text += _section("Leases", leases, [("SLOT", "slot"), ("NODE", "node"), ("HOT", "hot"), ("WORKERS", "workers"),
                                        ("AGE", "age")])
    demand = [_demand_row(e, names, now=now) for e in described.get("demand", [])]
    text += _section("Demand", demand, [("NODE", "node"), ("REQ/MIN", "rate"), ("REQUESTS", "count"),
                                        ("ACTIVE", "active"), ("STATE", "state")])
    events = [{"age": age(float(e.get("at") or 0), now=now), "type": e.get("type", ""),
               "reason": e.get("reason", ""), "from": names.get(str(e.get("node", "")), e.get("node", "")) or "-",
               "message": e.get("message", "")} for e in described.get("events", [])]
    return text + _section("Events", events, [("AGE", "age"), ("TYPE", "type"), ("REASON", "reason"),
                                              ("FROM", "from"), ("MESSAGE", "message")])


def register(app: typer.Typer) -> None:
    app.command("get")(get)
    app.command("describe")(describe)
