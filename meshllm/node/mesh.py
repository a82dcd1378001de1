"""The node's place in the mesh: credentials and seeds, the QUIC endpoint, gossip and membership.

``MeshRuntime`` owns the transport-facing parts of a node. It turns ``--join`` tokens into mesh
credentials and seed addresses, runs the endpoint, the document's gossip and membership, advertises
where this node can be dialled, dials peers for the parts that need a connection (``connect``), and
announces the node's departure when it stops. What the node serves on the endpoint (the tunnels) is
registered by the node (``node.node``), not here.
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
from meshllm.gossip.membership import Membership, parse_addr
from meshllm.gossip.sync import DocGossip
from meshllm.node.lifecycle import Lifecycle
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import InviteToken, MeshCredentials, load_or_create_mesh, load_peers, save_peers
from meshllm.transport import PeerConnection, QuicEndpoint, TransportSettings
from meshllm.transport.errors import TransportError

__all__ = ["MESH_TRANSPORT", "MeshRuntime", "join_credentials"]

# Detection budget: the transport reports a silent peer after ``peer_timeout`` (pings every
# ``ping_interval``); membership then tries one redial before declaring it dead.
MESH_TRANSPORT = TransportSettings(ping_interval=1.0, peer_timeout=2.5)


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
                 advertise: Sequence[str] = ()) -> None:
        self.state = state
        self.identity = identity
        self.creds = creds
        self.host = host
        self.state_dir = state_dir
        self.advertise = tuple(advertise)
        self.endpoint = QuicEndpoint(identity, creds.mesh_id, creds.secret, host=host, port=port,
                                     settings=MESH_TRANSPORT)
        self.gossip = DocGossip(state.doc, node_id=identity.node_id)
        self.membership = Membership(state, self.gossip, self.endpoint, me=me, seeds=seeds)

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
                   port=port, state_dir=state_dir, advertise=advertise)

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
                await parts.start("membership", self.membership.run)
                task_status.started(self.me)
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    if "membership" in parts.names:
                        await self.membership.leave()
                    await parts.stop()

    async def remember_peers(self, port: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the members' addresses in the state folder, so a restart can rejoin without a token."""
        assert self.state_dir is not None
        task_status.started()
        saved: list[str] | None = None
        while True:
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

    async def connect(self, node_id: str) -> PeerConnection:
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
