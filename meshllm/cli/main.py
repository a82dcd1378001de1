"""The ``meshllm`` command line: serve models, query and change a running node, manage the engine.

Thin by design: each command parses arguments, calls the layers below, and prints. Errors meshllm
raises on purpose become one line on stderr and exit code 1.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.logging import RichHandler

from meshllm.cli import blackboard, control, discover, get, launch, rotate
from meshllm.cli import download as download_cli
from meshllm.cli.discover import relay_list
from meshllm.cli.keys import keys_app, local_keys
from meshllm.cli.engine import engine_app, ensure_engine
from meshllm.engine.capacity import parse_size
from meshllm.engine.process import DEFAULT_MAX_TOKENS, POOLING_TYPES
from meshllm.errors import MeshError
from meshllm.node import NodeConfig, bind_socket, check_model, run_node
from meshllm.node.lobby import run_lobby
from meshllm.store.identity import default_state_dir
from meshllm.store.mesh import JOIN_ENV, join_arguments

__all__ = ["app", "main"]

out = Console()
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(add_completion=False, no_args_is_help=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Pool GPUs across machines into one mesh serving LLMs on an OpenAI-compatible API.")
app.add_typer(engine_app, name="engine")
app.add_typer(keys_app, name="keys")
get.register(app)
control.register(app)
blackboard.register(app)
download_cli.register(app)
rotate.register(app)
discover.register(app)
launch.register(app)

START_HELP = """meshllm: serve LLMs from a mesh of machines on an OpenAI-compatible API.

Start serving the embedded default model:
  meshllm --model gemma-3-270m            # API on http://127.0.0.1:9337/v1
Serve a local GGUF file:
  meshllm --model ~/models/model.gguf
Offer this machine to the mesh, serving what it places here:
  meshllm --standby [--join TOKEN|@FILE]   # or the token in $MESHLLM_JOIN
Ask a running node:
  meshllm get models | meshllm get nodes | meshllm describe model NAME
  or open its console: http://127.0.0.1:3131/ (live nodes, models, chat; Prometheus at /metrics)
Change what the mesh serves:
  meshllm apply -f examples/one-model.yaml | meshllm diff -f FILE | meshllm delete -f FILE
Require API keys on every node's OpenAI API:
  meshllm keys add --name NAME | meshllm keys list | meshllm keys revoke NAME
Find and join a published mesh, or publish yours:
  meshllm discover [--model M] [--region R] | meshllm --auto [--model M] | meshllm --model M --mesh-name NAME
Run a coding agent on the mesh's models (reuses the node on --port, or starts a client node):
  meshllm claude | meshllm goose | meshllm opencode | meshllm pi   [--model M] [--join TOKEN] [-- ARGS]
Give agents a shared blackboard (no model needed):
  meshllm --client --blackboard           # then: meshllm blackboard "STATUS: ..." | --search Q | --mcp

See `meshllm --help` for every option."""


def _size(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option("--model", help="Model to serve: a name or a .gguf path (repeatable)")] = None,
    port: Annotated[int, typer.Option(help="OpenAI API port")] = 9337,
    console: Annotated[int, typer.Option("--console", help="Console / management API port")] = 3131,
    max_vram: Annotated[str | None, typer.Option("--max-vram", help="Cap memory advertised to the mesh (e.g. 24, 8GB, 512MB)")] = None,
    device: Annotated[str, typer.Option(help="GPU device for llama-server (e.g. CUDA0); default: llama.cpp's choice")] = "",
    listen_all: Annotated[bool, typer.Option("--listen-all", help="Bind the APIs to 0.0.0.0 instead of 127.0.0.1")] = False,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Node state folder (identity, logs)")] = default_state_dir(),
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body the API accepts")] = "16MiB",
    threads: Annotated[int, typer.Option(help="CPU threads per llama-server (0: llama.cpp's default)")] = 0,
    name: Annotated[str, typer.Option(help="Display name of this node, and of its posts on the blackboard (default: the host name; on the blackboard $USER)")] = "",
    join: Annotated[list[str] | None, typer.Option("--join", help="Join the mesh of this invite token, or @FILE: the token in that file (repeatable; default: $MESHLLM_JOIN)")] = None,
    client: Annotated[bool, typer.Option("--client", help="API-only node: serves no model, offers no capacity")] = False,
    standby: Annotated[bool, typer.Option("--standby", help="Serve only what the mesh places here (applied manifests, demand)")] = False,
    bind_port: Annotated[int, typer.Option("--bind-port", help="Pin the QUIC mesh endpoint to this UDP port (0: any)")] = 0,
    bind_host: Annotated[str, typer.Option("--bind-host", help="Address of the QUIC endpoint (default: as the APIs)")] = "",
    advertise: Annotated[list[str] | None, typer.Option("--advertise", help="host:port peers should dial (NAT, relays); repeatable")] = None,
    split: Annotated[bool, typer.Option("--split", help="Force a pipeline split of the --model models across nodes, even when one node holds them")] = False,
    max_tokens_default: Annotated[int, typer.Option("--max-tokens-default", help="Tokens a request that sets no max_tokens may generate (-1: until the context is full)")] = DEFAULT_MAX_TOKENS,
    allow_models: Annotated[list[str] | None, typer.Option("--allow-models", help="A folder (or file) manifests applied to this node may name as a model source, beside the models folder and the --model files (repeatable)")] = None,
    board: Annotated[bool, typer.Option("--blackboard", help="Enable the blackboard on this node: agents post status, findings and questions to the mesh (works with --client, no model needed)")] = False,
    board_rate: Annotated[int, typer.Option("--blackboard-rate", hidden=True, min=1, help="Posts a minute this node accepts (benches)")] = 10,
    rpc_direct: Annotated[bool, typer.Option("--rpc-direct", help="Split RPC straight between llama-server and the workers' rpc-servers, authenticated with a key from the mesh secret but not encrypted (trusted networks); by default it is encrypted too")] = False,
    rpc_tunnel: Annotated[bool, typer.Option("--rpc-tunnel", help="Split RPC only through the QUIC mesh (slower): workers' rpc-servers listen on loopback, for networks where nodes cannot reach each other over TCP")] = False,
    draft: Annotated[str, typer.Option("--draft", metavar="PATH|NAME", help="Draft model for speculative decoding of the --model models (default: the catalog's pairing)")] = "",
    no_draft: Annotated[bool, typer.Option("--no-draft", help="No speculative decoding, even where the catalog pairs a draft")] = False,
    auto: Annotated[bool, typer.Option("--auto", help="Join the best published mesh (see `meshllm discover`); start one if none fits")] = False,
    publish: Annotated[bool, typer.Option("--publish", help="List this mesh on the Nostr relays and the LAN: anyone who reads the listing can join it")] = False,
    mesh_name: Annotated[str, typer.Option("--mesh-name", help="Name the mesh and publish it (implies --publish); with it, nodes join the mesh of that name if one is listed")] = "",
    region: Annotated[str, typer.Option("--region", help="Region tag of the listing, and the region --auto prefers (AU, US-West, EU-West, ...)")] = "",
    max_clients: Annotated[int, typer.Option("--max-clients", min=0, help="Delist the mesh while this many clients are connected (0: no limit)")] = 0,
    relay: Annotated[list[str] | None, typer.Option("--relay", metavar="URL", help="Nostr relay of the mesh directory (repeatable; replaces the default list; 'none': LAN only)")] = None,
    mdns: Annotated[bool, typer.Option("--mdns/--no-mdns", help="Publish and discover meshes on the LAN by mDNS too")] = True,
    listing_ttl: Annotated[float, typer.Option("--listing-ttl", hidden=True, min=2, help="Seconds a listing lives unless re-published (tests)")] = 300.0,
    alias: Annotated[str, typer.Option("--alias", help="Name clients use for the --model model (one model; it also answers to its file's name)")] = "",
    ctx_size: Annotated[int, typer.Option("--ctx-size", min=0, help="Context length of the --model models (0: the model's default)")] = 0,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Serve the --model models for embeddings (/v1/embeddings; embedding models)")] = False,
    pooling: Annotated[str, typer.Option("--pooling", metavar="none|mean|cls|last|rank", help="Pooling of the embeddings (default: the model's)")] = "",
    rerank: Annotated[bool, typer.Option("--rerank", help="Serve the --model models for reranking (/v1/rerank; reranker models)")] = False,
    chat_template: Annotated[str, typer.Option("--chat-template", metavar="NAME|JINJA", help="Chat template of the --model models: a llama.cpp built-in (chatml, gemma, llama3, ...) or a jinja template (default: the model's)")] = "",
    cors_origins: Annotated[str, typer.Option("--cors-origins", metavar="ORIGINS", help="Browser origins the OpenAI API answers: '*' (any, as llama-server), 'localhost', or a comma-separated list")] = "*",
    api_key: Annotated[list[str] | None, typer.Option("--api-key", metavar="KEY", help="Require this key on this node's OpenAI API (repeatable; MESHLLM_API_KEY adds one and keeps it off the command line); see `meshllm keys` for keys every node accepts")] = None,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    join = join_arguments(join or (), os.environ)
    os.environ.pop(JOIN_ENV, None)  # not handed down to the engine processes (nor MESHLLM_API_KEY, below)
    if not model and not join and not client and not standby and not auto and not mesh_name:
        out.print(START_HELP, highlight=False)
        _lobby(NodeConfig(console_port=console, listen_all=listen_all, max_vram=_size(max_vram), name=name,
                          relays=relay_list(relay), mdns=mdns))
        raise typer.Exit(0)
    want_model = ""
    if client and auto and model and len(model) == 1 and not standby:
        want_model, model = model[0], None  # --client --auto --model M: join a mesh serving M, serve nothing
    if rpc_direct and rpc_tunnel:
        raise MeshError("--rpc-direct and --rpc-tunnel exclude each other: pick one way for split RPC")
    if pooling and pooling not in POOLING_TYPES:
        raise typer.BadParameter(f"{pooling!r} is not one of {', '.join(POOLING_TYPES)}", param_hint="--pooling")
    if client and (standby or model):
        raise MeshError("--client nodes serve nothing; drop --client, or drop --standby and --model")
    config = NodeConfig(models=tuple(model or ()), port=port, console_port=console, listen_all=listen_all,
                        state_dir=state_dir.expanduser(), max_vram=_size(max_vram), device=device,
                        max_body_bytes=_size(max_body) or 0, threads=threads, name=name,
                        joins=tuple(join or ()), client=client, bind_host=bind_host, bind_port=bind_port,
                        advertise=tuple(advertise or ()), split=split, rpc_direct=rpc_direct, rpc_tunnel=rpc_tunnel,
                        allow_models=tuple(allow_models or ()), draft=draft, no_draft=no_draft,
                        blackboard=board, blackboard_rate=board_rate,
                        api_keys=local_keys(api_key or (), os.environ.pop("MESHLLM_API_KEY", None)),
                        max_tokens_default=max_tokens_default,
                        auto=auto, publish=publish, mesh_name=mesh_name, region=region, max_clients=max_clients,
                        want_model=want_model, relays=relay_list(relay), mdns=mdns,
                        listing_ttl=listing_ttl, alias=alias, ctx_size=ctx_size, embeddings=embeddings,
                        pooling=pooling, rerank=rerank, chat_template=chat_template, cors_origins=cors_origins)
    _setup_logging()
    for source in (*config.models, *((config.draft,) if config.draft and config.models else ())):
        check_model(source)  # a bad --model or --draft fails now, not after a long engine build
    for port, what in ((config.port, "OpenAI API"), (config.console_port, "console API")):
        bind_socket(config.host, port, what=what).close()  # so does a port another program holds
    if not client:
        ensure_engine()
    _run(config)


def _lobby(config: NodeConfig) -> None:
    """No arguments: the console, read-only, until Ctrl-C (unless a node already serves one there)."""
    try:
        bind_socket(config.host, config.console_port, what="console").close()
    except MeshError:
        out.print(f"\nA console already answers on port {config.console_port}: "
                  f"http://127.0.0.1:{config.console_port}/", highlight=False)
        return
    _setup_logging()
    out.print("")
    try:
        anyio.run(lambda: run_lobby(config, hint=START_HELP, announce=lambda text: out.print(text, highlight=False)))
    except KeyboardInterrupt:
        pass


def _setup_logging() -> None:
    handler = RichHandler(console=err, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("meshllm").setLevel(logging.INFO)


def _run(config: NodeConfig) -> None:
    def announce(text: str) -> None:
        err.print(text, highlight=False, markup=False)

    try:
        import uvloop  # noqa: F401  (optional: a faster event loop when installed)
        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    try:
        anyio.run(lambda: run_node(config, announce=announce), backend_options=options)
    except BaseExceptionGroup as group:  # a MeshError from one of the node's tasks: its one line
        raise _first_mesh_error(group) or group from None


def _first_mesh_error(group: BaseExceptionGroup) -> MeshError | None:
    for exc in group.exceptions:
        found = _first_mesh_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, MeshError):
            return found
    return None


def main() -> None:
    try:
        app()  # click handles usage errors (exit 2), --help and Ctrl-C itself
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
