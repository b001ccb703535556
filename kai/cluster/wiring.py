"""One node's part of the cluster: membership, ring, failure detector and coordinator, wired.

Used by the real node (over authenticated TCP) and by the in-process test cluster (over the
fault-injecting network), so both run the same wiring. Persists the membership view in the
storage engine's metadata and rebuilds the ring when the members change. Never listens on
sockets itself.
"""

from __future__ import annotations

import hashlib
import logging
import random

import msgpack
import trio

from kai.cluster.antientropy import AntiEntropy
from kai.cluster.coordinator import Coordinator
from kai.cluster.hints import HintedHandoff, HintStore
from kai.cluster.ownership import Ownership
from kai.cluster.reaper import Reaper
from kai.cluster.transfers import Transfers
from kai.core.config import Config
from kai.core.membership import Member, MembershipView
from kai.core.ring import NodeId, Ring
from kai.core.storage import StorageEngine
from kai.core.transition import PHASE_NAMES, SETTLED, Moves, Placement
from kai.membership.detector import FailureDetector
from kai.membership.gossip import Membership
from kai.rpc.server import Handler
from kai.rpc.transport import FanOutTransport
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: Metadata name of the persisted membership view.
MEMBERSHIP_META = "membership"
#: Seconds between two steps of the ownership service when the view does not change.
OWNERSHIP_INTERVAL = 0.5


def load_view(engine: StorageEngine, self_node: NodeId, *, joining: bool = False) -> MembershipView:
    """The persisted membership view; on first start a view of this node alone, valid (a
    new cluster) or, when it has seeds to join, ``joining``."""
    raw = engine.get_meta(MEMBERSHIP_META)
    if raw is not None:
        try:
            return MembershipView.from_wire(msgpack.unpackb(raw, raw=False))
        except ValueError:
            logger.warning("persisted membership view is unreadable; starting alone")
    if joining:
        return MembershipView((Member(self_node, "joining", 1),))
    return MembershipView.single(self_node)


class Cluster:
    """This node's view of the cluster: membership, ring, failure detector, coordinator."""

    def __init__(
        self,
        config: Config,
        engine: StorageEngine,
        replica: LocalReplica,
        self_node: NodeId,
        transport: FanOutTransport,
        background: trio.Nursery,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.replica = replica
        self.self_node = self_node
        self.transport = transport
        self.detector = FailureDetector()
        seeds = [NodeId(seed.host, seed.port) for seed in config.seeds]
        view = load_view(engine, self_node, joining=any(seed != self_node for seed in seeds))
        self._moves: Moves | None = None
        self._placement = self._place(view)
        self._ring = self._placement.ring
        self.membership = Membership(
            self_node,
            view,
            transport=transport,
            detector=self.detector,
            seeds=[seed for seed in seeds if seed != self_node],
            interval=config.membership_interval / 1000,
            call_timeout=max(config.membership_interval / 1000, 1.0),
            rng=rng if rng is not None else random.Random(),
            on_change=self._on_view_change,
        )
        self.coordinator = Coordinator(
            self_node=self_node,
            replica=replica,
            transport=transport,
            ring=self.ring,
            quorum=config.quorum,
            is_up=self.detector.is_up,
            on_success=self.detector.record_success,
            on_failure=self.detector.record_failure,
            request_timeout=config.request_timeout / 1000,
            on_flush=self.membership.add_flush,
            background=background,
            hints=HintStore(engine, buckets=config.buckets),
            down=self.detector.down,
            sloppy=config.sloppy_quorum,
            also=self.also,
        )
        self.reaper = Reaper(
            self_node=self_node,
            replica=replica,
            peers=self.coordinator.peers,
            ring=self.ring,
            quorum=config.quorum,
            interval=config.sync_interval / 1000,
            request_timeout=config.request_timeout / 1000,
            settled=self.settled,
        )
        self.transfers = Transfers(
            self_node=self_node,
            replica=replica,
            engine=engine,
            peers=self.coordinator.peers,
            limit=config.transfer_limit,
            rate=config.transfer_rate,
            request_timeout=config.request_timeout / 1000,
        )
        self.handoff = HintedHandoff(
            self.coordinator.hints,
            self.transfers,
            is_up=self.detector.is_up,
            transitions=self.detector.transitions,
            members=lambda: self._placement.nodes(),
            interval=config.handoff_interval / 1000,
        )
        self.anti_entropy = AntiEntropy(
            self_node=self_node,
            replica=replica,
            peers=self.coordinator.peers,
            ring=self.ring,
            quorum=config.quorum,
            is_up=self.detector.is_up,
            interval=config.sync_interval / 1000,
            request_timeout=config.request_timeout / 1000,
        )
        self.ownership = Ownership(
            self_node=self_node,
            membership=self.membership,
            placement=self.placement,
            replica=replica,
            transfers=self.transfers,
            is_up=self.detector.is_up,
            n=config.quorum.n,
            interval=OWNERSHIP_INTERVAL,
        )
        self._on_view_change(self.membership.view)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run this node's cluster services (gossip, then the healing loops) until cancelled.

        Start it with ``await nursery.start(cluster.run)``: it is started once gossip is.
        """
        async with trio.open_nursery() as services:
            await services.start(self.membership.run)
            await services.start(self.transfers.run)
            await services.start(self.ownership.run)
            await services.start(self.handoff.run)
            await services.start(self.reaper.run)
            if self.config.anti_entropy:
                await services.start(self.anti_entropy.run)
            task_status.started()

    def ring(self) -> Ring:
        """The ring reads and W use now (see :mod:`kai.core.transition`); the same object
        until it changes."""
        return self._ring

    def placement(self) -> Placement:
        """Where keys live now, by this node's view."""
        return self._placement

    def also(self) -> Ring | None:
        """The ring whose primaries also get every write during a transition, or None."""
        return self._placement.also

    def settled(self) -> bool:
        """Whether no transition is under way."""
        return self._placement.phase == SETTLED

    def _place(self, view: MembershipView) -> Placement:
        moves = self._moves
        if moves is None or moves.transition != view.transition_id():
            moves = self._moves = Moves.of(
                view,
                self.config.quorum.n,
                buckets=self.config.buckets,
                virtual_nodes=self.config.virtual_nodes,
            )
            if not moves.settled:
                logger.info(
                    "transition: %s -> %s, %d partition copies",
                    " ".join(map(str, moves.current.nodes)),
                    " ".join(map(str, moves.next.nodes)),
                    moves.count(),
                )
        return Placement.of(view, moves)

    def _on_view_change(self, view: MembershipView) -> None:
        self.engine.put_meta(MEMBERSHIP_META, msgpack.packb(view.to_wire(), use_bin_type=True))
        placement = self._place(view)
        if placement.phase != self._placement.phase or placement.moves is not self._placement.moves:
            logger.info("placement: %s", PHASE_NAMES[placement.phase])
        self._placement = placement
        ring = (
            placement.ring
            if placement.ring.nodes
            else Ring(
                (self.self_node,),
                buckets=self.config.buckets,
                virtual_nodes=self.config.virtual_nodes,
            )
        )
        if ring != self._ring:
            logger.info("members: %s", " ".join(str(node) for node in ring.nodes))
            self._ring = ring
        self.ownership.changed()
        known = set(self.replica.flush_times)
        for at in view.flush_times:
            if at not in known:
                self.replica.flush(at)

    def handlers(self) -> dict[str, Handler]:
        """The peer-to-peer RPC methods: replication, transfers and gossip."""
        return {
            **self.coordinator.handlers(),
            **self.transfers.handlers(),
            **self.reaper.handlers(),
            **self.anti_entropy.handlers(),
            "gossip": self.membership.handle_gossip,
        }

    def ring_stats(self) -> list[tuple[str, object]]:
        """``stats kai_ring``: the ring reads and writes are coordinated on, with each
        member's memcached address, so clients can send a key to one of its primaries
        (docs/dynamo-api.md)."""
        ring = self._placement.ring
        view = self.membership.view
        fingerprint = hashlib.blake2b(
            " ".join(map(str, ring.nodes)).encode(), digest_size=8, salt=b"kai-ring"
        )
        fingerprint.update(b"%d %d" % (ring.buckets, ring.virtual_nodes))
        fields: list[tuple[str, object]] = [
            ("ring", fingerprint.hexdigest()),
            ("buckets", ring.buckets),
            ("virtual_nodes", ring.virtual_nodes),
            ("replicas", min(self.config.quorum.n, len(ring.nodes))),
        ]
        for node in ring.nodes:
            endpoint = view.endpoint(node)
            fields.append(("node", f"{node} {endpoint.address() if endpoint else '-'}"))
        return fields

    def statistics(self) -> list[tuple[str, object]]:
        """The cluster services' counters, for memcached ``stats``."""
        return [
            *self.coordinator.statistics(),
            *self.ownership.statistics(),
            *self.handoff.statistics(),
            *self.transfers.statistics(),
            *self.reaper.statistics(),
            *self.anti_entropy.statistics(),
        ]
