"""What one node was asked to do, from the command line (or a test)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meshllm.api.cors import DEFAULT_CORS_ORIGINS
from meshllm.api.openai import DEFAULT_MAX_BODY
from meshllm.engine.process import DEFAULT_MAX_TOKENS
from meshllm.store.identity import default_state_dir

__all__ = ["NodeConfig"]


@dataclass(frozen=True)
class NodeConfig:
    models: tuple[str, ...] = ()
    port: int = 9337
    console_port: int = 3131
    listen_all: bool = False
    state_dir: Path = field(default_factory=default_state_dir)
    max_vram: int | None = None
    device: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY
    threads: int = 0
    name: str = ""
    joins: tuple[str, ...] = ()
    client: bool = False
    bind_host: str = ""
    bind_port: int = 0
    advertise: tuple[str, ...] = ()
    split: bool = False  # split this node's --model models by layers even when one node holds them
    rpc_direct: bool = False  # split RPC straight over plain TCP, key-authenticated, unencrypted (trusted networks)
    rpc_tunnel: bool = False  # split RPC only through the QUIC tunnel (rpc-servers on loopback)
    allow_models: tuple[str, ...] = ()  # folders (or files) manifests may name, beside the models folder
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # --api-key / MESHLLM_API_KEY: this node only
    blackboard: bool = False  # open the blackboard's routes on this node (every node relays the board)
    blackboard_rate: int = 10  # posts a minute this node accepts (benches raise it)
    draft: str = ""  # --draft: draft model (path or name) of the --model models; empty: the catalog's pairing
    no_draft: bool = False  # --no-draft: no speculative decoding, even where the catalog pairs a draft
    max_tokens_default: int = DEFAULT_MAX_TOKENS  # generation limit of a request that sets none (-1: none)
    # the --model models' spec (state.schema.ModelSpec): --alias (one model), --ctx-size, --embeddings, --pooling,
    # --rerank, --chat-template
    alias: str = ""
    ctx_size: int = 0
    embeddings: bool = False
    pooling: str = ""
    rerank: bool = False
    chat_template: str = ""
    cors_origins: str = DEFAULT_CORS_ORIGINS  # --cors-origins: browser origins the OpenAI API answers (api.cors)
    # discovery (node.discovery): --publish, --mesh-name, --region, --max-clients, --auto, --relay, --no-mdns
    publish: bool = False
    mesh_name: str = ""
    region: str = ""
    max_clients: int = 0  # delist while this many clients are connected; 0: no limit
    auto: bool = False
    want_model: str = ""  # --client --auto --model M: join a mesh serving M (a client serves nothing itself)
    relays: tuple[str, ...] | None = None  # None: discovery.directory.DEFAULT_RELAYS
    mdns: bool = True
    listing_ttl: float = 300.0  # seconds a published listing lives unless re-published
    relay_timeout: float = 5.0
    mdns_wait: float = 3.0  # seconds --auto and --mesh-name browse the LAN before they choose

    @property
    def host(self) -> str:
        """Where the HTTP APIs listen."""
        return "0.0.0.0" if self.listen_all else "127.0.0.1"

    @property
    def quic_host(self) -> str:
        """Where the QUIC endpoint listens: ``--bind-host``, else as the APIs."""
        return self.bind_host or self.host
