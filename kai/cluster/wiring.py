"""One node's part of the cluster: membership, ring, failure detector and coordinator, wired.

Used by the real node (over authenticated TCP) and by the in-process test cluster (over the
fault-injecting network), so both run the same wiring. Persists the membership view in the
storage engine's metadata and rebuilds the ring when the members change. Never listens on
sockets itself.
"""

from __future__ import annotations

import logging
import random

import msgpack
import trio

from kai.cluster.antientropy import AntiEntropy
from kai.cluster.coordinator import Coordinator
from kai.cluster.hints import HintedHandoff, HintStore
from kai.cluster.reaper import Reaper
from kai.cluster.transfers import Transfers
from kai.core.config import Config
from kai.core.membership import MembershipView
from kai.core.ring import NodeId, Ring
from kai.core.storage import StorageEngine
from kai.membership.detector import FailureDetector
from kai.membership.gossip import Membership
from kai.rpc.server import Handler
from kai.rpc.transport import FanOutTransport
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: Metadata name of the persisted membership view.
MEMBERSHIP_META = "membership"


def load_view(engine: StorageEngine, self_node: NodeId) -> MembershipView:
    """The persisted membership view, or a view of this node alone on first start."""
    raw = engine.get_meta(MEMBERSHIP_META)
    if raw is None:
        return MembershipView.single(self_node)
    try:
        return MembershipView.from_wire(msgpack.unpackb(raw, raw=False))
    except ValueError:
        logger.warning("persisted membership view is unreadable; starting alone")
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
        view = load_view(engine, self_node)
        self._ring = Ring(
            view.ring_nodes() or (self_node,),
            buckets=config.buckets,
            virtual_nodes=config.virtual_nodes,
        )
        seeds = [NodeId(seed.host, seed.port) for seed in config.seeds]
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
        )
        self.reaper = Reaper(
            self_node=self_node,
            replica=replica,
            peers=self.coordinator.peers,
            ring=self.ring,
            quorum=config.quorum,
            interval=config.sync_interval / 1000,
            request_timeout=config.request_timeout / 1000,
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
            members=lambda: self._ring.nodes,
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
        self._on_view_change(self.membership.view)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run this node's cluster services (gossip, then the healing loops) until cancelled.

        Start it with ``await nursery.start(cluster.run)``: it is started once gossip is.
        """
        async with trio.open_nursery() as services:
            await services.start(self.membership.run)
            await services.start(self.transfers.run)
            await services.start(self.handoff.run)
            await services.start(self.reaper.run)
            if self.config.anti_entropy:
                await services.start(self.anti_entropy.run)
            task_status.started()

    def ring(self) -> Ring:
        """The current ring (rebuilt whenever the members change)."""
        return self._ring

    def _on_view_change(self, view: MembershipView) -> None:
        self.engine.put_meta(MEMBERSHIP_META, msgpack.packb(view.to_wire(), use_bin_type=True))
        nodes = view.ring_nodes() or (self.self_node,)
        if nodes != self._ring.nodes:
            logger.info("members: %s", " ".join(str(node) for node in nodes))
            self._ring = Ring(
                nodes, buckets=self._ring.buckets, virtual_nodes=self._ring.virtual_nodes
            )
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

    def statistics(self) -> list[tuple[str, object]]:
        """The cluster services' counters, for memcached ``stats``."""
        return [
            *self.coordinator.statistics(),
            *self.handoff.statistics(),
            *self.transfers.statistics(),
            *self.reaper.statistics(),
            *self.anti_entropy.statistics(),
        ]
