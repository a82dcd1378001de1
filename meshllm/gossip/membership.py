"""Membership: which peers this node talks to, and who is alive.

Every node writes its own ``NodeStatus`` (addresses, capacity, role, incarnation) into the state
document. Each node keeps QUIC connections to a bounded set of peers: the seeds it joined through
until it knows the mesh, then the overlay's links (``overlay.links``: the ``ring`` nearest nodes on
each side of the hash ring and a few long "finger" links, so a small mesh is fully connected and a
large one stays at a constant degree and a diameter of a few hops). A gossip session runs on each
connection (the dialer opens the stream).

Failure detection rides on the connections: the transport pings every peer and reports a peer down
when it stops answering (``peer_timeout``). The node then tries once to dial it again; if that fails
it writes a ``NodeDeath`` for the peer's current incarnation, which gossip spreads, and every node
clears the dead node's servers from the document. Both limits widen while this node's own event
loop runs late (the endpoint's ``LoopHealth``; the dial also while its handshakes run slow), and a
confirmation dial that ran while the loop was stalled is tried again rather than believed (for at
most ``RECONFIRM_WITHIN`` seconds): a starved node is the likeliest cause of its own missed
answers. A node that sees its own death while alive (a false suspicion or a healed partition)
refutes it with a newer incarnation; dead peers keep being redialled slowly, which is how
partitions heal.

A node that joins through seeds whose credentials are wrong must not sit alone in silence: when
every one of its ``join_seeds`` refused it on authentication (``join_refusals``: by default wrong
mesh, wrong secret or retired key) and it has met no member yet, ``run`` raises ``JoinRefused``.
Seeds that only time out or cannot be reached are dialled again as before; once this node met a
member it never gives up this way.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.abc import TaskGroup, TaskStatus

from meshllm.errors import MeshError
from meshllm.gossip.overlay import FINGERS, links, ring_neighbours
from meshllm.gossip.sync import DocGossip
from meshllm.state.document import MeshState
from meshllm.state.schema import NodeDeath, NodeId, NodeStatus
from meshllm.transport import (DialPriority, MessageStream, PeerConnection, PeerEvent, QuicEndpoint, Stream,
                               StreamKind)
from meshllm.transport.errors import AuthError, ErrorCode, Refusal, TransportError

__all__ = ["JoinRefused", "Membership", "confirm_limit", "parse_addr", "ring_neighbours"]

log = logging.getLogger(__name__)


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {text!r}")
    return host.strip("[]"), int(port)


def _pruned(conn: PeerConnection) -> bool:
    """Whether the connection was closed (by either side) as no longer needed: no suspicion."""
    error = conn.close_error
    return error is not None and error.code == ErrorCode.NOT_NEEDED


def confirm_limit(base: float, *, multiplier: float, handshake_s: float) -> float:
    """The limit on a death-confirmation dial: ``base`` on an unloaded node, wider while this node's
    loop runs late (``multiplier``) or its handshakes have lately been slow (a loaded node takes
    longer to finish any handshake, a live peer's too), never more than ``CONFIRM_CAP`` times."""
    return min(max(base * multiplier, HANDSHAKE_MARGIN * handshake_s), base * CONFIRM_CAP)


class JoinRefused(MeshError):
    """Every seed this node joins through refused its credentials, and it knows no member."""

    def __init__(self, addr: str, refusal: Refusal) -> None:
        super().__init__(f"the mesh at {addr} refused this node's credentials: {refusal}")
        self.addr, self.refusal = addr, refusal


@dataclass
class _Dial:
    next_at: float = 0.0
    delay: float = 0.5


PRUNE_AFTER = 10.0  # seconds a connection outside the links is kept (a seed link, an idle tunnel)
RTT_DRIFT_MS = 5.0  # an RTT change smaller than this (and than half the old value) is not news
RTT_REFRESH = 300.0  # seconds between republications for drift alone
DEAD_DIALS = 2  # dials to dead nodes in flight at once: healing needs a few, not one per dead node
RTT_SETTLE = 3.0  # a new connection's first samples include its handshake: published once it settled
RECONFIRM_WITHIN = 3.0  # seconds after a suspicion a stalled confirmation dial may be tried again
CONFIRM_CAP = 4.0  # a confirmation dial's limit grows to at most this many times confirm_timeout
HANDSHAKE_MARGIN = 2.0  # ... to give a live peer this many times this node's recent handshake time


class Membership:
    """Keeps this node in the mesh: its entry, its connections, and the verdicts on lost peers."""

    def __init__(self, state: MeshState, gossip: DocGossip, endpoint: QuicEndpoint, *, me: NodeStatus,
                 seeds: Sequence[str] = (), join_seeds: Sequence[str] = (),
                 join_refusals: Collection[Refusal] = tuple(Refusal), ring: int = 2,
                 fingers: Sequence[float] = FINGERS,
                 tick: float = 0.25, confirm_timeout: float = 0.75,
                 dial_timeout: float = 4.0,
                 dead_redial: float = 3.0, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.state = state
        self.gossip = gossip
        self.endpoint = endpoint
        self.me = me
        self.seeds = list(seeds)
        self.join_seeds = [s for s in join_seeds if s in self.seeds]  # whose refusals end the join
        self.join_refusals = frozenset(join_refusals)
        self._refusals: dict[str, Refusal] = {}  # join seeds that refused this node, while it met nobody
        self._met_member = False
        self._warned: set[tuple[str, Refusal]] = set()
        self.ring = ring
        self.fingers = tuple(fingers)
        self._links: tuple[frozenset[NodeId], set[NodeId]] = (frozenset(), set())
        self.tick = tick
        self.confirm_timeout = confirm_timeout
        self.dial_timeout = dial_timeout
        self.dead_redial = dead_redial
        self.clock = clock
        self.rng = rng or random.Random()
        self._suspects: dict[NodeId, float] = {}
        self._dials: dict[str, _Dial] = {}
        self._dialing: set[str] = set()
        self._dead_dialing: set[str] = set()
        self._seeds_known: set[str] = set()  # seeds listed by a node, or that led to one
        self._rtt_published = self._rtt_checked = 0.0
        self._changed = True
        self._last_dial_scan = 0.0

    @property
    def node_id(self) -> NodeId:
        return self.me.id

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[PeerEvent](1024)

        def on_peer(event: PeerEvent) -> None:
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                log.warning("peer event queue full; dropping %s", event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # membership is shutting down

        def on_change() -> None:
            self._changed = True

        self.endpoint.on_stream(StreamKind.GOSSIP, self._accept_gossip)
        unsubscribe = self.endpoint.on_peer(on_peer)
        subscriptions = self.state.observe(on_change)
        self.state.put_node(self.me)
        refused: JoinRefused | None = None
        try:
            async with send, receive, anyio.create_task_group() as tg:
                tg.start_soon(self._peer_events, tg, receive)
                task_status.started()
                while (refused := self._refused()) is None:
                    await self._round(tg)
                    await anyio.sleep(self.tick)
                tg.cancel_scope.cancel()
        finally:
            unsubscribe()
            send.close()  # after unsubscribing: no peer event is sent into it any more
            self.state.unobserve(subscriptions)
        assert refused is not None  # run ends only this way: JoinRefused, raised outside the task group
        raise refused

    async def leave(self) -> None:
        """Announce a clean departure, so peers need not wait for the failure detector."""
        self.state.put_death(NodeDeath(node=self.node_id, incarnation=self.me.incarnation, by=self.node_id,
                                       at=self.clock()))
        with anyio.move_on_after(1.0):
            while any(s.outbox.statistics().current_buffer_used for s in self.gossip.sessions.values()):
                await anyio.sleep(0.02)
            await anyio.sleep(0.1)

    # -- connections ------------------------------------------------------------------------
    async def _accept_gossip(self, conn: PeerConnection, stream: Stream) -> None:
        await self.gossip.attach(MessageStream(stream))

    @property
    def joining(self) -> bool:
        """Whether this node still waits on its join seeds: none let it in yet, and not all refused it."""
        return bool(self.join_seeds) and not self._met_member and self._refused() is None

    @property
    def refused(self) -> JoinRefused | None:
        """Why every join seed refused this node, while it has met no member (``run`` then raises it)."""
        return self._refused()

    def _refused(self) -> JoinRefused | None:
        """``JoinRefused`` once every join seed refused this node while it met no member."""
        if self._met_member or not self.join_seeds:
            return None
        if self.endpoint.peers or self.state.nodes().keys() - {self.node_id}:
            self._met_member = True
            return None
        pending = [s for s in self.join_seeds if s not in self.me.addrs]
        if pending and all(s in self._refusals for s in pending):
            return JoinRefused(pending[0], self._refusals[pending[0]])
        return None

    def _note_refusal(self, addr: str, exc: AuthError) -> None:
        if exc.refusal is None:
            return
        if not self._met_member and addr in self.join_seeds and exc.refusal in self.join_refusals:
            self._refusals[addr] = exc.refusal
        elif (addr, exc.refusal) not in self._warned:  # e.g. the mesh key rotated while this node was away
            self._warned.add((addr, exc.refusal))
            log.warning("the node at %s refused this node: %s", addr, exc.refusal)

    async def _peer_events(self, tg: TaskGroup, events: anyio.abc.ObjectReceiveStream[PeerEvent]) -> None:
        async for event in events:
            peer = event.node_id
            if event.up:
                self._met_member = True
                self._suspects.pop(peer, None)
                self._dials.pop(peer, None)
                if event.connection.is_dialer:
                    tg.start_soon(self._dial_gossip, event.connection)
            elif self.endpoint.peer(peer) is None and not _pruned(event.connection):
                self._suspects.setdefault(peer, self.clock())

    async def _dial_gossip(self, conn: PeerConnection) -> None:
        try:
            stream = await conn.open_stream(StreamKind.GOSSIP)
        except TransportError:
            return
        await self.gossip.attach(MessageStream(stream))

    def _ring(self, alive: dict[NodeId, NodeStatus]) -> set[NodeId]:
        """The peers this node wants among the ``alive`` nodes: ring neighbours and fingers
        (computed again only when the alive set changes)."""
        members = frozenset(alive) - {self.node_id}
        if members != self._links[0]:
            wanted = links(self.node_id, sorted(members), ring=self.ring, offsets=self.fingers)
            self._links = (members, wanted)
        return self._links[1]

    def _wanted_addrs(self, alive: dict[NodeId, NodeStatus], ring: set[NodeId]) -> dict[str, list[str]]:
        """Peers to be connected to, by dial key: node id (seeds ``seed:<address>`` until their id is known).

        A seed is known once some node's entry, alive or dead, lists its address, or once a dial to
        it reached a member; from then on it is dialled as that node (a neighbour, or a dead node
        redialled slowly), never again as a seed: when a seed is held dead, every node that joined
        through it would otherwise dial it at once and keep that connection (seen at 100 nodes: 82
        connections to the seed)."""
        wanted: dict[str, list[str]] = {nid: alive[nid].addrs for nid in ring}
        pending = [s for s in self.seeds if s not in self._seeds_known and s not in self.me.addrs]
        if pending:
            known = {a for node in self.state.nodes().values() for a in node.addrs}
            for seed in pending:
                if seed in known:
                    self._seeds_known.add(seed)
                else:
                    wanted[f"seed:{seed}"] = [seed]
        now = self.clock()
        for nid, node in self.state.nodes().items():
            if nid not in alive and nid != self.node_id and self._dials.get(nid, _Dial()).next_at <= now:
                self._dials.setdefault(nid, _Dial(delay=self.dead_redial))
                wanted[nid] = node.addrs  # dead ones too, slowly: that is how a partition heals
        return wanted

    async def _round(self, tg: TaskGroup) -> None:
        now = self.clock()
        if self._changed:  # the document changed: verdicts and neighbours may have too
            self._changed = False
            self._refute()
            self._clear_dead()
        elif now - self._last_dial_scan < 1.0 and not self._suspects:
            return
        self._last_dial_scan = now
        self._judge_suspects(tg, now)  # first: a suspect gets the short confirmation dial
        alive = self.state.alive_nodes()
        ring = self._ring(alive)
        wanted = list(self._wanted_addrs(alive, ring).items())
        self.rng.shuffle(wanted)  # dead nodes past the cap below take turns
        for key, addrs in wanted:
            if key in self._dialing or not self._unconnected(key) or not addrs:
                continue
            dead = key not in ring and not key.startswith("seed:")
            if dead and len(self._dead_dialing) >= DEAD_DIALS:
                continue
            dial = self._dials.setdefault(key, _Dial())
            if dial.next_at <= now:
                self._dialing.add(key)
                if dead:  # mostly a dial into silence: kept short, and behind the others
                    self._dead_dialing.add(key)
                    tg.start_soon(self._dial, key, addrs, self._confirm_limit(), DialPriority.BACKGROUND,
                                  partial(self._still_dead, key))
                else:
                    tg.start_soon(self._dial, key, addrs, self.dial_timeout * self.endpoint.health.multiplier,
                                  DialPriority.NORMAL, None if key.startswith("seed:") else partial(self._still_a_link, key))
        self._prune(alive, ring)
        self._publish_rtt(now, ring)

    def _prune(self, alive: dict[NodeId, NodeStatus], ring: set[NodeId]) -> None:
        """Close connections this node dialled and no longer wants: not among its links, idle of
        tunnels, and older than ``PRUNE_AFTER``. These are the links to the seed a node joined
        through (without pruning, the first member of a mesh keeps one to every node that ever
        joined) and fingers that moved. The dialer decides because links are not symmetric: a
        node does not know who has it as a finger, so closing an accepted link could close one
        the peer wants, which it would dial again. Only once this node's own links are
        connected, so a new node is never cut off from the mesh."""
        if len(alive) - (self.node_id in alive) <= 2 * self.ring:
            return
        peers = self.endpoint.peers
        if not ring <= set(peers):
            return
        for nid, conn in peers.items():
            if nid not in ring and nid in alive and conn.is_dialer and conn.idle_for > PRUNE_AFTER:
                log.debug("closing the connection to %s: not one of this node's links", nid)
                conn.close(ErrorCode.NOT_NEEDED, "not one of the dialer's links")

    def _unconnected(self, key: str) -> bool:
        """No connection to the dial key's node (a ``seed:`` key names none: never connected)."""
        return self.endpoint.peer(NodeId(key)) is None

    def _still_a_link(self, key: str) -> bool:
        return self._unconnected(key) and key in self._links[1]

    def _still_dead(self, key: str) -> bool:
        return self._unconnected(key) and key not in self.state.alive_nodes()

    async def _dial(self, key: str, addrs: list[str], timeout: float,
                    priority: DialPriority = DialPriority.NORMAL,
                    needed: Callable[[], bool] | None = None) -> PeerConnection | None:
        """Connect to ``key`` at the first address that answers within ``timeout`` each (counted
        from when the endpoint's handshake budget lets the dial start; dropped there if
        ``needed()`` turned false while it waited). Joining and keeping neighbours allow a
        handshake time to finish even on a loaded node (abandoning one and dialling again only
        adds load); confirming a death allows far less, and goes first."""
        try:
            for addr in addrs:
                try:
                    conn = await self.endpoint.connect(*parse_addr(addr), timeout=timeout, priority=priority,
                                                       needed=needed)
                    self._dials[key] = _Dial(next_at=self.clock() + 2.0)  # a seed stays dialled a while
                    if key.startswith("seed:"):
                        # it led to a member, even if no node lists this address (a relay, a port
                        # forward): dialling it again would only replace a working link
                        self._seeds_known.add(addr)
                    return conn
                except TransportError as exc:
                    if exc.code == ErrorCode.NOT_NEEDED:
                        return None
                    if isinstance(exc, AuthError):
                        self._note_refusal(addr, exc)
                    log.debug("dial %s at %s failed: %s", key, addr, exc)
                except (OSError, TimeoutError, ValueError) as exc:
                    log.debug("dial %s at %s failed: %s", key, addr, exc)
            dial = self._dials.setdefault(key, _Dial())
            dial.next_at = self.clock() + dial.delay * self.rng.uniform(0.8, 1.2)
            dial.delay = min(dial.delay * 2, 5.0)
            return None
        finally:
            self._dialing.discard(key)
            self._dead_dialing.discard(key)

    # -- verdicts ---------------------------------------------------------------------------
    def _judge_suspects(self, tg: TaskGroup, now: float) -> None:
        for peer, since in list(self._suspects.items()):
            if self.endpoint.peer(peer) is not None:
                del self._suspects[peer]
            elif peer not in self._dialing:
                del self._suspects[peer]
                self._dialing.add(peer)
                tg.start_soon(self._confirm_death, peer, since)

    async def _confirm_death(self, peer: NodeId, suspected_at: float) -> None:
        node = self.state.nodes().get(peer)
        health = self.endpoint.health
        started = health.clock()
        timeout = self._confirm_limit()
        conn = await self._dial(peer, node.addrs if node else [], timeout, DialPriority.URGENT,
                                partial(self._unconnected, peer))
        if conn is not None or node is None or self.endpoint.peer(peer) is not None:
            return  # reached, or it dialled us meanwhile
        if health.stalled_since(started) > timeout / 2 and self.clock() - suspected_at < RECONFIRM_WITHIN:
            log.info("the dial confirming %s's death ran while this node's loop was stalled: again", peer)
            self._suspects.setdefault(peer, suspected_at)
            return
        death = self.state.deaths().get(peer)
        if death is None or death.incarnation < node.incarnation:
            log.warning("node %s is unreachable: declaring it dead", peer)
            self.state.put_death(NodeDeath(node=peer, incarnation=node.incarnation, by=self.node_id,
                                           at=self.clock()))

    def _confirm_limit(self) -> float:
        return confirm_limit(self.confirm_timeout, multiplier=self.endpoint.health.multiplier,
                             handshake_s=self.endpoint.handshake_s)

    def _refute(self) -> None:
        """Keep this node's entry true: refute a death verdict, and rewrite the entry when a merge
        lost it. A restarted node writes its entry into an empty document, concurrently with the
        entry of its previous run that the mesh still holds; the CRDT keeps one of the two by client
        id, so the old one can win. Rewriting field by field on top of the winner is causally
        later and sticks."""
        death = self.state.deaths().get(self.node_id)
        if death is not None and death.incarnation >= self.me.incarnation and death.by != self.node_id:
            log.warning("this node was declared dead by %s; refuting", death.by)
            self.me = self.me.model_copy(update={"incarnation": max(self.clock(), death.incarnation + 0.001)})
            self.state.put_node(self.me)
        elif self.state.nodes().get(self.node_id) != self.me:
            self.state.put_node(self.me)

    def _clear_dead(self) -> None:
        alive = self.state.alive_nodes()
        stale = [key for key, s in self.state.servers().items() if s.node not in alive]
        gone = [key for key, w in self.state.workers().items() if w.node not in alive]
        if stale or gone:
            with self.state.transaction():
                for key in stale:
                    self.state.remove_server(key)
                for key in gone:
                    self.state.remove_worker(key)

    def _publish_rtt(self, now: float, ring: set[NodeId]) -> None:
        """Publish RTTs when the set of connected ring neighbours changed, or (at most every
        ``RTT_REFRESH`` s) when one drifted a lot. Every publication rewrites this node's entry on
        every replica, so republishing jitter (a 1 ms path reading 2 ms) would be most of the
        mesh's steady traffic; the split planner only needs to tell near peers from far ones."""
        if now - self._rtt_checked < 5.0:
            return
        self._rtt_checked = now
        rtts = {nid: round(conn.rtt * 1000, 1) for nid, conn in self.endpoint.peers.items()
                if conn.rtt and conn.connected_for >= RTT_SETTLE}
        old = self.me.rtt_ms
        drifted = any(abs(ms - old[nid]) > max(0.5 * old[nid], RTT_DRIFT_MS) for nid, ms in rtts.items()
                      if nid in old)
        if set(rtts) & ring != set(old) & ring or (drifted and now - self._rtt_published >= RTT_REFRESH):
            self._rtt_published = now
            self.me = self.me.model_copy(update={"rtt_ms": rtts})
            self.state.put_node(self.me)
