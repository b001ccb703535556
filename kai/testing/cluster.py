"""An in-process Kai cluster for fast, deterministic tests.

Several nodes run in one trio run: each has an in-memory storage engine, the same cluster
wiring as a real node (:class:`kai.cluster.wiring.Cluster`: gossip, failure detector,
quorum coordinator) and a memcached command executor, and they talk over
:class:`kai.testing.network.FakeNetwork`, which can drop, delay, duplicate and partition
with a seeded RNG. Use it under trio's ``autojump_clock`` so every timeout and gossip round
happens in virtual time. Never opens sockets.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from kai.cluster.wiring import Cluster
from kai.core.config import Address, Config, Quorum
from kai.core.memcache.report import NodeInfo
from kai.core.ring import NodeId
from kai.core.stats import NodeStats
from kai.memcache.commands import CommandExecutor
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica
from kai.testing.memcache import execute_raw
from kai.testing.network import FakeNetwork, Faults

#: Partitions of the harness's ring unless ``settings`` say otherwise: few, so that a cluster
#: forms (every join is an ownership transition over every partition) in milliseconds.
HARNESS_BUCKETS = 64

#: The virtual unix time the harness's wall clock starts at.
EPOCH = 1_700_000_000.0


@attrs.define(eq=False)
class HarnessNode:
    """One node of the in-process cluster."""

    node_id: NodeId
    engine: MemoryEngine
    cluster: Cluster
    executor: CommandExecutor
    all_siblings_executor: CommandExecutor
    scope: trio.CancelScope

    @property
    def replica(self) -> LocalReplica:
        """This node's local replica."""
        return self.cluster.replica


class InProcessCluster:
    """Nodes 127.0.0.1:11011, :11012, … joined through the first one as a seed."""

    def __init__(
        self, network: FakeNetwork, nursery: trio.Nursery, config: Config, seed: int
    ) -> None:
        self.network = network
        self.nursery = nursery
        self.config = config
        self.rng = random.Random(seed)
        self.nodes: list[HarnessNode] = []
        self._engines: dict[NodeId, MemoryEngine] = {}

    @classmethod
    @asynccontextmanager
    async def running(
        cls,
        size: int,
        *,
        quorum: Quorum | None = None,
        seed: int = 0,
        faults: Faults | None = None,
        request_timeout_ms: int = 1000,
        membership_interval_ms: int = 200,
        settings: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[InProcessCluster]:
        """Start ``size`` nodes, wait until every one sees them all, and stop them after.

        ``settings`` overrides any other :class:`~kai.core.config.Config` field (by name);
        the ring has :data:`HARNESS_BUCKETS` partitions unless it sets ``buckets``.
        """
        config = Config(
            quorum=quorum if quorum is not None else Quorum(3, 2, 2),
            request_timeout=request_timeout_ms,
            membership_interval=membership_interval_ms,
            store="memory",
            cache_size=0,
            buckets=HARNESS_BUCKETS,
        )
        if settings:
            config = attrs.evolve(config, **settings)
        async with (
            FakeNetwork.running(random.Random(seed), faults) as network,
            trio.open_nursery() as nursery,
        ):
            harness = cls(network, nursery, config, seed)
            for index in range(size):
                await harness.start_node(index)
            with trio.fail_after(60):
                await harness.wait_converged()
            yield harness
            nursery.cancel_scope.cancel()

    def node_id(self, index: int) -> NodeId:
        """The address of node ``index``."""
        return NodeId("127.0.0.1", 11011 + index)

    async def start_node(self, index: int) -> HarnessNode:
        """Start (or restart, keeping its engine: its data survives) node ``index``."""
        node_id = self.node_id(index)
        engine = self._engines.setdefault(node_id, MemoryEngine())
        seeds = () if index == 0 else (self.node_id(0),)
        config = attrs.evolve(
            self.config,
            rpc=Address(node_id.host, node_id.port),
            seeds=tuple(Address(seed.host, seed.port) for seed in seeds),
        )
        stats = NodeStats()
        replica = LocalReplica(
            engine,
            actor=b"actor-%d-%d" % (index, self.rng.randrange(1 << 30)),
            buckets=config.buckets,
            stats=stats,
            wall_clock=self.wall_clock,
            tombstone_grace=config.tombstone_grace / 1000,
        )
        replica.count_items()
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[HarnessNode]) -> None:
            with scope:
                async with trio.open_nursery() as background:
                    cluster = Cluster(
                        config,
                        engine,
                        replica,
                        node_id,
                        self.network.transport_for(node_id),
                        background,
                        rng=random.Random(self.rng.random()),
                    )
                    self.network.register(node_id, cluster.handlers())
                    info = NodeInfo(
                        node=str(node_id),
                        quorum=str(config.quorum),
                        buckets=config.buckets,
                        virtual_nodes=config.virtual_nodes,
                        store="memory",
                        max_connections=config.max_connections,
                        max_item_size=config.max_item_size,
                        settings={},
                        started_at=self.wall_clock(),
                    )
                    newest_view, all_view = (
                        CommandExecutor(
                            cluster.coordinator,
                            stats,
                            info,
                            all_siblings=all_siblings,
                            wall_clock=self.wall_clock,
                        )
                        for all_siblings in (False, True)
                    )
                    await background.start(cluster.run)
                    task_status.started(
                        HarnessNode(node_id, engine, cluster, newest_view, all_view, scope)
                    )
                    await trio.sleep_forever()

        node: HarnessNode = await self.nursery.start(run)
        if index < len(self.nodes):
            self.nodes[index] = node
        else:
            self.nodes.append(node)
        return node

    def crash(self, index: int) -> None:
        """Stop node ``index`` at once (its in-memory data is kept for a restart)."""
        node = self.nodes[index]
        self.network.unregister(node.node_id)
        node.scope.cancel()

    def wall_clock(self) -> float:
        """Unix time that follows trio's (virtual) clock."""
        return EPOCH + trio.current_time()

    async def wait_converged(self) -> None:
        """Wait until every running node's ring holds every node and no transition is under
        way (callers set a deadline)."""
        everyone = tuple(sorted(node.node_id for node in self.nodes))
        # Rings change inside gossip callbacks; polling in virtual time costs nothing.
        while any(  # noqa: ASYNC110
            node.cluster.ring().nodes != everyone or not node.cluster.settled()
            for node in self.nodes
        ):
            await trio.sleep(0.05)

    def partition(self, *groups: Sequence[int]) -> None:
        """Cut the network between groups of node indexes."""
        self.network.partition(*[[self.node_id(index) for index in group] for group in groups])

    def heal(self) -> None:
        """Remove every partition."""
        self.network.heal()

    async def request(self, index: int, raw: bytes, *, all_siblings: bool = False) -> bytes:
        """Send memcached protocol bytes to node ``index``; the concatenated replies."""
        node = self.nodes[index]
        executor = node.all_siblings_executor if all_siblings else node.executor
        return await execute_raw(executor, raw)
