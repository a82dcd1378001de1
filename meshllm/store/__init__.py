"""The store layer: what a node keeps on its disk (identity, mesh credentials and invite tokens, known
peers, the admin token, the SQLite store of processes and manifests). The names other layers use."""

from meshllm.store.admin import load_or_create_admin_token, read_admin_token
from meshllm.store.board import load_board_snapshot, save_board_snapshot
from meshllm.store.db import AppliedManifest, NodeStore, ProcessRecord
from meshllm.store.identity import NodeIdentity, default_state_dir, load_identity
from meshllm.store.lock import hold_state_dir
from meshllm.store.mesh import (
    InviteToken,
    JOIN_ENV,
    MeshCredentials,
    join_arguments,
    key_id,
    load_or_create_mesh,
    load_peers,
    save_mesh,
    save_peers,
)
from meshllm.store.rotation import follow, seal

__all__ = [
    "AppliedManifest",
    "InviteToken",
    "JOIN_ENV",
    "MeshCredentials",
    "NodeIdentity",
    "NodeStore",
    "ProcessRecord",
    "default_state_dir",
    "follow",
    "hold_state_dir",
    "join_arguments",
    "key_id",
    "load_board_snapshot",
    "load_identity",
    "load_or_create_admin_token",
    "load_or_create_mesh",
    "load_peers",
    "read_admin_token",
    "save_board_snapshot",
    "save_mesh",
    "save_peers",
    "seal",
]
