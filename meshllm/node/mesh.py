"""The node's place in the mesh: credentials and seeds, the QUIC endpoint, gossip and membership.

``MeshRuntime`` owns the transport-facing parts of a node. It turns ``--join`` tokens into mesh
credentials and seed addresses, runs the endpoint, the document's gossip and membership, advertises
where this node can be dialled, dials peers for the parts that need a connection (``connect``), and
announces the node's departure when it stops. What the node serves on the endpoint (the tunnels) is
registered by the node (``node.node``), not here.

Credentials from a token are saved in the state folder once a member accepted them (so a later
start needs no token, and a mistyped token never replaces good credentials); a token every seed
refuses ends the node, before it serves anything, with one line saying why (``refusal_message``).
``adopt`` switches the node to a rotated mesh secret (see ``node.rotation``).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from meshllm.errors import MeshError
from meshllm.gossip.membership import JoinRefused, Membership, parse_addr
from meshllm.gossip.sync import DocGossip
from meshllm.node.lifecycle import Lifecycle
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeId, NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import (MESH_FILE, InviteToken, MeshCredentials, load_or_create_mesh, load_peers,
                                save_mesh, save_peers)
from meshllm.transport import PeerConnection, QuicEndpoint, TransportSettings
from meshllm.transport.errors import Refusal, TransportError

__all__ = ["MESH_TRANSPORT", "MeshRuntime", "join_credentials", "refusal_message"]

# Detection budget: the transport reports a silent peer after ``peer_timeout`` (pings every
# ``ping_interval``); membership then tries one redial before declaring it dead.
MESH_TRANSPORT = TransportSettings(ping_interval=1.0, peer_timeout=2.5)
JOIN_WAIT = 2.0  # seconds a starting node waits for its seeds to let it in (or refuse it) before serving


def join_credentials(tokens: Sequence[str]) -> tuple[MeshCredentials | None, list[str]]:
    """The mesh the ``--join`` tokens lead to, and the addresses to dial first."""
    if not tokens:
        return None, []
    decoded = []
    for text in tokens:
        try:
            decoded.append(InviteToken.decode(text))
        except ValueError as exc:
            raise MeshError(f"--join: {exc}") from None
    creds = decoded[0].credentials
    if any(t.credentials != creds for t in decoded[1:]):
        raise MeshError("--join: the tokens belong to different meshes; join one mesh at a time")
    return creds, [addr for t in decoded for addr in t.addrs]


_TOKEN_HINTS = {
    Refusal.WRONG_SECRET: "the token is stale or mistyped; ask a member for a new one: meshllm token",
    Refusal.RETIRED_KEY: "the mesh key was rotated since this token was made; ask a member for a new one: "
                         "meshllm token",
    Refusal.WRONG_MESH: "a node of another mesh answers there; ask a member of your mesh for a token: "
                        "meshllm token",
}
_SAVED_HINT = "ask a member for a new token (meshllm token) and start this node with --join"


def refusal_message(refused: JoinRefused, *, token: bool, state_dir: Path | None = None) -> str:
    """One line for an operator whose node every seed refused: which check failed, and what to do."""
    if token:
        return (f"--join: the mesh at {refused.addr} refused this token: {refused.refusal} "
                f"({_TOKEN_HINTS[refused.refusal]})")
    saved = state_dir / MESH_FILE if state_dir is not None else MESH_FILE
    why = {Refusal.RETIRED_KEY: "the mesh key was rotated while this node was away",
           Refusal.WRONG_SECRET: "the mesh key changed", Refusal.WRONG_MESH: "another mesh answers there"}
    return (f"the mesh at {refused.addr} refused the credentials saved in {saved}: {refused.refusal} "
            f"({why[refused.refusal]}; {_SAVED_HINT})")


def interface_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (advertised with --listen-all)."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        addr = socket.inet_ntoa(packed[20:24])
        if not addr.startswith("127."):
            found.append(addr)
    return found


def udp_port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class MeshRuntime:
    """Endpoint, gossip and membership of one node; ``run`` joins the mesh, and leaves it when cancelled."""

    def __init__(self, state: MeshState, identity: NodeIdentity, creds: MeshCredentials, *, me: NodeStatus,
                 seeds: Sequence[str] = (), host: str, port: int = 0, state_dir: Path | None = None,
                 advertise: Sequence[str] = (), join_seeds: Sequence[str] = (), unsaved: bool = False) -> None:
        """``join_seeds``: the seeds whose refusal ends the node (the token's, else the remembered peers);
        ``unsaved``: ``creds`` come from a token no member has accepted yet (saved once one does)."""
        self.state = state
        self.identity = identity
        self.creds = creds
        self.host = host
        self.state_dir = state_dir
        self.advertise = tuple(advertise)
        self.unsaved = unsaved
        self.endpoint = QuicEndpoint(identity, creds.mesh_id, creds.secret, host=host, port=port,
                                     settings=MESH_TRANSPORT, retired=self.retired)
        self.gossip = DocGossip(state.doc, node_id=identity.node_id)
        # remembered peers that refuse as "wrong mesh" are addresses another mesh reuses, not a sign
        # that this node's credentials are stale: only a token's seeds end the node for that
        refusals = tuple(Refusal) if unsaved else (Refusal.WRONG_SECRET, Refusal.RETIRED_KEY)
        self.membership = Membership(state, self.gossip, self.endpoint, me=me, seeds=seeds, join_seeds=join_seeds,
                                     join_refusals=refusals)

    @classmethod
    def for_node(cls, state: MeshState, identity: NodeIdentity, *, me: NodeStatus, state_dir: Path,
                 joins: Sequence[str], host: str, port: int, advertise: Sequence[str] = ()) -> MeshRuntime:
        """A runtime for the mesh the tokens name, else the mesh this state folder was in (and its peers)."""
        joining, seeds = join_credentials(joins)
        creds = load_or_create_mesh(state_dir, joining=joining)
        last_port, known = load_peers(state_dir)
        if not port and last_port and udp_port_is_free(host, last_port):
            port = last_port  # peers that knew us redial this address
        return cls(state, identity, creds, me=me, seeds=seeds + [a for a in known if a not in seeds], host=host,
                   port=port, state_dir=state_dir, advertise=advertise, join_seeds=seeds or known,
                   unsaved=joining is not None)

    def retired(self, kid: str) -> bool:
        """Whether a rotation of the mesh key retired ``kid`` (peers proving it are refused)."""
        return kid in self.state.rotations()

    async def adopt(self, creds: MeshCredentials) -> None:
        """Prove and demand ``creds`` from now on (a rotated mesh key), and keep them in the state folder."""
        self.creds = creds
        self.endpoint.switch_secret(creds.secret)
        if self.state_dir is not None:
            self.unsaved = False
            await anyio.to_thread.run_sync(save_mesh, self.state_dir, creds)

    @property
    def me(self) -> NodeStatus:
        """This node's entry as the mesh sees it (addresses once ``run`` started, current incarnation)."""
        return self.membership.me

    async def run(self, *, task_status: TaskStatus[NodeStatus] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the endpoint, gossip and membership and report this node's entry with its advertised
        addresses. When cancelled, tell the mesh this node leaves while gossip still carries it, then
        stop membership, gossip and the endpoint."""
        async with anyio.create_task_group() as tg:
            parts = Lifecycle(tg)
            try:
                port = await parts.start("QUIC endpoint", self.endpoint.run)
                self.membership.me = self.me.model_copy(update={"addrs": self.advertised(port)})
                if self.state_dir is not None:
                    await parts.start("peer list", partial(self.remember_peers, port))
                await parts.start("gossip", self.gossip.run)
                await parts.start("membership", self._run_membership)
                await self._joined()
                task_status.started(self.me)
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    if "membership" in parts.names:
                        await self.membership.leave()
                    await parts.stop()

    async def _run_membership(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.membership.run(task_status=task_status)
        except JoinRefused as exc:
            raise MeshError(refusal_message(exc, token=self.unsaved, state_dir=self.state_dir)) from None

    async def _joined(self) -> None:
        """Wait a moment for the join seeds to let this node in; raise if they all refused it, so a
        refused node ends before it serves anything (later refusals end it from membership)."""
        with anyio.move_on_after(JOIN_WAIT):
            while self.membership.joining:
                await anyio.sleep(0.02)
        if (refused := self.membership.refused) is not None:
            raise MeshError(refusal_message(refused, token=self.unsaved, state_dir=self.state_dir))

    async def remember_peers(self, port: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the members' addresses in the state folder, so a restart can rejoin without a token."""
        assert self.state_dir is not None
        task_status.started()
        saved: list[str] | None = None
        while True:
            if self.unsaved and self.endpoint.peers:  # a member accepted the token's credentials: keep them
                self.unsaved = False
                await anyio.to_thread.run_sync(save_mesh, self.state_dir, self.creds)
            addrs = sorted(a for nid, node in self.state.alive_nodes().items() if nid != self.identity.node_id
                           for a in node.addrs)
            if addrs != saved and (addrs or saved is None):  # the port at once, then each new set of peers
                await anyio.to_thread.run_sync(save_peers, self.state_dir, port, addrs)
                saved = addrs
            await anyio.sleep(0.5)

    def advertised(self, port: int) -> list[str]:
        if self.advertise:
            return list(self.advertise)
        hosts = interface_addresses() if self.host == "0.0.0.0" else [self.host]
        return [f"{h}:{port}" for h in hosts or ["127.0.0.1"]]

    def token(self) -> str:
        """The invite token others join this mesh with: its credentials and this node's addresses."""
        return InviteToken(self.creds, tuple(self.me.addrs)).encode()

    async def connect(self, node_id: NodeId) -> PeerConnection:
        """The connection to ``node_id``, dialling its advertised addresses if none is up."""
        conn = self.endpoint.peer(node_id)
        if conn is None:
            node = self.state.nodes().get(node_id)
            for addr in node.addrs if node else []:
                try:
                    with anyio.fail_after(3):
                        conn = await self.endpoint.connect(*parse_addr(addr))
                    break
                except (TransportError, OSError, TimeoutError):
                    continue
        if conn is None:
            raise TransportError(f"node {node_id} is unreachable")
        return conn

    def incarnation(self) -> float:
        """This node's current incarnation (it changes when the node refutes a death verdict)."""
        return self.me.incarnation
