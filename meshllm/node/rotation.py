"""Mesh key rotation on a running node: make one (``meshllm rotate-key``), and follow the mesh's.

``KeyRotation.rotate`` draws a new secret (same mesh id, new key id), writes it into the replicated
document sealed under the current one (``store.rotation``), and adopts it; gossip carries the entry
over the authenticated connections to every member, whose ``KeyRotation.run`` opens it and adopts it
too. Adopting (the injected ``Adopt``) switches the QUIC endpoint to the new secret for every new
handshake, saves it in the state folder, and restarts the node's split processes, whose RPC key
derives from the secret (``rekey_splits``). Connections already up stay, so gossip, tunnels and the
models they serve carry on; from then on members refuse anyone proving the old secret ("retired
key"), so every invite token made before stops working. A member that was offline during the
rotation cannot come back with the old secret either: it needs a new token.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol

import anyio
from anyio.abc import TaskStatus
from starlette.routing import Route

from meshllm.api.rotation import Rotated, rotation_routes
from meshllm.engine.rpc_auth import rpc_key
from meshllm.node.mesh import MeshRuntime
from meshllm.reconcile.supervisor import Supervisor
from meshllm.reconcile.workers import RPC_RECORD_PREFIX, WorkerController
from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import KeyRotation as RotationEntry, NodeId
from meshllm.store.mesh import MeshCredentials
from meshllm.store.rotation import follow, seal
from meshllm.tunnels.rpc import RpcTunnelClient

__all__ = ["Adopt", "KeyRotation", "node_rotation", "rekey_splits"]

log = logging.getLogger(__name__)


class Adopt(Protocol):
    """Switch this node to new mesh credentials (endpoint, state folder, derived keys)."""

    async def __call__(self, creds: MeshCredentials, /) -> None: ...


class KeyRotation:
    """Follows the chain of key rotations in the document from the credentials this node started with."""

    def __init__(self, state: MeshState, *, node_id: NodeId, creds: MeshCredentials, adopt: Adopt,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.node_id = node_id
        self.origin = self.current = creds  # the chain is followed from where this node started
        self._adopt = adopt
        self._clock = clock
        self._lock = anyio.Lock()
        self._seen: dict[str, RotationEntry] | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        wake = anyio.Event()

        def changed(changes: list[Changed]) -> None:
            if any(change.table == "rotations" for change in changes):
                wake.set()

        handle = self.state.observe_changes(changed)
        try:
            await self.sync()
            task_status.started()
            while True:
                await wake.wait()
                wake = anyio.Event()
                await self.sync()
        finally:
            self.state.unobserve(handle)

    async def sync(self) -> MeshCredentials:
        """Adopt the newest secret the document's rotations lead to; returns the current credentials."""
        async with self._lock:
            rotations = self.state.rotations()
            if rotations == self._seen:
                return self.current
            self._seen = rotations
            newest = follow(self.origin, rotations)
            if newest != self.current:
                log.warning("the mesh key was rotated (key %s -> %s): switching to the new secret",
                            self.current.key_id, newest.key_id)
                await self._adopt(newest)
                self.current = newest
            elif self.current.key_id in rotations:
                log.error("the rotation of this node's mesh key %s does not open with it; keeping the key",
                          self.current.key_id)
            return self.current

    async def rotate(self) -> MeshCredentials:
        """Give the mesh a new secret: seal it under the current one for every member, and adopt it."""
        current = await self.sync()
        new = MeshCredentials(mesh_id=current.mesh_id, secret=secrets.token_bytes(32))
        self.state.put_rotation(seal(current, new, by=self.node_id, at=self._clock()))
        return await self.sync()


def rekey_splits(secret: bytes, *, state: MeshState, node_id: NodeId, tunnels: RpcTunnelClient,
                 workers: WorkerController | None, supervisor: Supervisor | None) -> list[str]:
    """Split processes hold the RPC key derived from the old secret: give the new key to whatever starts
    them next and stop the running ones (this node's rpc-servers and the llama-servers of the splits it
    hosts); their controllers start them again with the new key. Keeping them would leave the old
    key, which holders of the old token can derive, good for workers that ``--rpc-direct`` exposes on
    the network. Returns the supervisor keys stopped."""
    key = rpc_key(secret)
    tunnels.key = key
    if workers is None or supervisor is None:
        return []
    workers.key = key
    hosts = {s.model for s in state.servers().values() if s.node == node_id and s.workers}
    stopping = sorted(k for k in supervisor.keys() if k.startswith(RPC_RECORD_PREFIX) or k in hosts)
    for name in stopping:
        supervisor.stop(name, reason="the mesh key was rotated: restarting with the new RPC key")
    if stopping:
        log.warning("the mesh key was rotated: restarting %s with the new RPC key", ", ".join(stopping))
    return stopping


def node_rotation(mesh: MeshRuntime, *, tunnels: RpcTunnelClient, workers: WorkerController | None,
                  supervisor: Supervisor | None) -> tuple[KeyRotation, list[Route]]:
    """A node's key rotation, wired to its mesh and split processes, and its console route."""
    async def adopt(creds: MeshCredentials, /) -> None:
        await mesh.adopt(creds)
        rekey_splits(creds.secret, state=mesh.state, node_id=mesh.identity.node_id, tunnels=tunnels,
                     workers=workers, supervisor=supervisor)

    rotation = KeyRotation(mesh.state, node_id=mesh.identity.node_id, creds=mesh.creds, adopt=adopt)

    async def rotate() -> Rotated:
        before = (await rotation.sync()).key_id
        after = await rotation.rotate()
        return Rotated(token=mesh.token(), mesh_id=after.mesh_id, key_id=after.key_id, previous_key_id=before)

    return rotation, rotation_routes(rotate)
