"""The node's place in the mesh: credentials and seeds, the QUIC endpoint, gossip, membership, tunnels.

``MeshRuntime`` owns the transport-facing parts of a node. It turns ``--join`` tokens into mesh
credentials and seed addresses, advertises where this node can be dialled, and opens or serves
HTTP tunnels so any node's API reaches a model served anywhere.

Credentials from a token are saved in the state folder once a member accepted them (so a later
start needs no token, and a mistyped token never replaces good credentials); a token every seed
refuses ends the node with one line saying why (``refusal_message``). ``adopt`` switches the node to
a rotated mesh secret (see ``node.rotation``).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from meshllm.api.openai import make_local_forward
from meshllm.api.upstream import UpstreamPool
from meshllm.api.routing import Router
from meshllm.api.tunnel import serve_tunnel
from meshllm.errors import MeshError
from meshllm.gossip.membership import JoinRefused, Membership, parse_addr
from meshllm.gossip.sync import DocGossip
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeStatus
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import (MESH_FILE, InviteToken, MeshCredentials, load_or_create_mesh, load_peers,
                                save_mesh, save_peers)
from meshllm.transport import MessageStream, PeerConnection, QuicEndpoint, Stream, StreamKind, TransportSettings
from meshllm.transport.errors import Refusal, TransportError

__all__ = ["MeshRuntime", "join_credentials", "refusal_message"]

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


@dataclass
class MeshRuntime:
    state: MeshState
    identity: NodeIdentity
    creds: MeshCredentials
    seeds: list[str]
    host: str
    port: int = 0
    endpoint: QuicEndpoint = field(init=False)
    gossip: DocGossip = field(init=False)
    membership: Membership | None = None

    def __post_init__(self) -> None:
        self.endpoint = QuicEndpoint(self.identity, self.creds.mesh_id, self.creds.secret, host=self.host,
                                     port=self.port, settings=MESH_TRANSPORT, retired=self.retired)
        self.gossip = DocGossip(self.state.doc, node_id=self.identity.node_id)

    state_dir: Path | None = None
    advertise: tuple[str, ...] = ()
    join_seeds: tuple[str, ...] = ()  # the seeds of the --join tokens (empty: the remembered peers)
    unsaved: bool = False  # credentials from a token that no member has accepted yet

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

    @classmethod
    def for_node(cls, state: MeshState, identity: NodeIdentity, *, state_dir: Path, joins: Sequence[str],
                 host: str, port: int, advertise: Sequence[str] = ()) -> MeshRuntime:
        """A runtime for the mesh the tokens name, else the mesh this state folder was in (and its peers)."""
        joining, seeds = join_credentials(joins)
        creds = load_or_create_mesh(state_dir, joining=joining)
        last_port, known = load_peers(state_dir)
        if not port and last_port and udp_port_is_free(host, last_port):
            port = last_port  # peers that knew us redial this address
        return cls(state, identity, creds, seeds + [a for a in known if a not in seeds], host, port,
                   state_dir=state_dir, advertise=tuple(advertise), join_seeds=tuple(seeds or known),
                   unsaved=joining is not None)

    async def remember_peers(self, port: int) -> None:
        """Keep the members' addresses in the state folder, so a restart can rejoin without a token."""
        assert self.state_dir is not None
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

    def token(self, me: NodeStatus | None = None) -> str:
        """An invite token to this mesh, with its current secret and this node's addresses."""
        if me is None:
            assert self.membership is not None
            me = self.membership.me
        return InviteToken(self.creds, tuple(me.addrs)).encode()

    async def start(self, tg: anyio.abc.TaskGroup, me: NodeStatus) -> NodeStatus:
        """Start the endpoint, gossip and membership; returns ``me`` with its advertised addresses."""
        port = await tg.start(self.endpoint.run)
        me = me.model_copy(update={"addrs": self.advertised(port)})
        if self.state_dir is not None:
            tg.start_soon(self.remember_peers, port)
        await tg.start(self.gossip.run)
        # remembered peers that refuse as "wrong mesh" are addresses another mesh reuses, not a sign
        # that this node's credentials are stale: only a token's seeds end the node for that
        refusals = tuple(Refusal) if self.unsaved else (Refusal.WRONG_SECRET, Refusal.RETIRED_KEY)
        self.membership = Membership(self.state, self.gossip, self.endpoint, me=me, seeds=self.seeds,
                                     join_seeds=self.join_seeds, join_refusals=refusals)
        await tg.start(self._run_membership, self.membership)
        with anyio.move_on_after(JOIN_WAIT):  # a refused join ends the node before it serves anything
            while self.membership.joining:
                await anyio.sleep(0.02)
        if (refused := self.membership.refused) is not None:
            raise MeshError(refusal_message(refused, token=self.unsaved, state_dir=self.state_dir))
        return me

    async def _run_membership(self, membership: Membership, *,
                              task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await membership.run(task_status=task_status)
        except JoinRefused as exc:
            raise MeshError(refusal_message(exc, token=self.unsaved, state_dir=self.state_dir)) from None

    def serve_tunnels(self, router: Router, upstream: UpstreamPool) -> None:
        forward = make_local_forward(router, upstream)

        async def handle(conn: PeerConnection, stream: Stream) -> None:
            await serve_tunnel(MessageStream(stream), forward)

        self.endpoint.on_stream(StreamKind.HTTP, handle)

    async def open_tunnel(self, node_id: str) -> MessageStream:
        """An HTTP stream to ``node_id``, dialling it first if no connection is up."""
        conn = await self.connect(node_id)
        return MessageStream(await conn.open_stream(StreamKind.HTTP))

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
        assert self.membership is not None
        return self.membership.me.incarnation

    async def leave(self) -> None:
        if self.membership is not None:
            await self.membership.leave()

