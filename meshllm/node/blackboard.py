"""The blackboard's parts on a node: the board document (loaded from the state folder's snapshot),
its gossip over the node's QUIC endpoint, the keeper that expires and caps it, and the console
routes. ``run_node`` builds one ``NodeBlackboard`` and starts it before the mesh, so the board's
stream handler is in place when the first peer connects.
"""

from __future__ import annotations

import getpass
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus
from pycrdt import Doc

from meshllm.api.blackboard import BlackboardAPI
from meshllm.gossip.board import BoardGossip
from meshllm.node.config import NodeConfig
from meshllm.reconcile.board import BoardKeeper
from meshllm.state.board import Board, RateLimit
from meshllm.state.schema import NodeId
from meshllm.store.board import load_board_snapshot, save_board_snapshot
from meshllm.transport import QuicEndpoint

__all__ = ["NodeBlackboard", "blackboard_author"]

log = logging.getLogger(__name__)


def blackboard_author(config: NodeConfig) -> str:
    """Who this node's posts are from: ``--name``, else ``$USER``, else the login name."""
    if config.name:
        return config.name[:64]
    try:
        return (os.environ.get("USER") or getpass.getuser())[:64] or "anonymous"
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "anonymous"


def _load(config: NodeConfig) -> Board:
    doc: Doc[Any] = Doc()
    snapshot = load_board_snapshot(config.state_dir)
    if snapshot:
        try:
            doc.apply_update(snapshot)
        except Exception as exc:  # a damaged snapshot costs the saved posts, never the start
            log.warning("ignoring the blackboard snapshot in %s: %s", config.state_dir, exc)
            doc = Doc()
    return Board(doc)


@dataclass
class NodeBlackboard:
    board: Board
    gossip: BoardGossip
    keeper: BoardKeeper
    api: BlackboardAPI

    @classmethod
    def for_node(cls, config: NodeConfig, endpoint: QuicEndpoint, *, node_id: NodeId, node_name: str) -> NodeBlackboard:
        board = _load(config)
        gossip = BoardGossip(board, endpoint, node_id=node_id)
        keeper = BoardKeeper(board, save=partial(save_board_snapshot, config.state_dir))
        api = BlackboardAPI(board=board, node_id=node_id, author=blackboard_author(config), node_name=node_name,
                            enabled=config.blackboard, rate=RateLimit(limit=config.blackboard_rate),
                            stats=lambda: {**gossip.stats, "removed": keeper.removed})
        return cls(board, gossip, keeper, api)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.gossip.run)
            await tg.start(self.keeper.run)
            task_status.started()
