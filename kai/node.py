"""A Kai node: storage, coordinator, memcached listener and RPC server wired together.

Owns the lifetime of everything it starts: services run in one nursery, and the storage
engine is closed only after every task that uses it has finished. Never parses protocol
bytes or touches LevelDB directly.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import attrs
import trio

from kai import __version__
from kai.config import Config
from kai.coordinator import LocalCoordinator
from kai.memcache.commands import CommandExecutor, NodeInfo
from kai.memcache.server import MemcacheServer
from kai.replica import LocalReplica
from kai.ring import NodeId, Ring
from kai.rpc.secret import load_or_create_secret
from kai.rpc.server import serve_rpc
from kai.stats import NodeStats
from kai.storage.engine import StorageEngine, open_engine

logger = logging.getLogger(__name__)

#: Metadata name of this data directory's actor id.
ACTOR_META = "actor_id"
#: Bytes in an actor id.
ACTOR_ID_SIZE = 8
#: How long connections may take to finish their current request at shutdown.
SHUTDOWN_GRACE = 10.0


def load_or_create_actor(engine: StorageEngine) -> bytes:
    """This data directory's actor id, created on first use and persisted (DESIGN §3).

    A wiped data directory gets a new id, so a node that lost its history can never reuse
    clock entries that other replicas already hold.
    """
    actor = engine.get_meta(ACTOR_META)
    if actor is None:
        actor = os.urandom(ACTOR_ID_SIZE)
        engine.put_meta(ACTOR_META, actor)
        logger.info("new data directory: actor id %s", actor.hex())
    return actor


@attrs.frozen
class NodeAddresses:
    """Where a started node listens (ports resolved when 0 was asked for)."""

    memcache: tuple[str, int]
    rpc: tuple[str, int]


class Node:
    """One Kai node. ``await nursery.start(node.run)`` returns its :class:`NodeAddresses`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = NodeStats()
        self.name = str(config.rpc)
        self._shutdown = trio.Event()
        self._server: MemcacheServer | None = None
        self.replica: LocalReplica | None = None
        self.executor: CommandExecutor | None = None
        self.started_at = time.time()

    def shut_down(self) -> None:
        """Ask the node to stop: listeners close, in-flight requests are answered."""
        self._shutdown.set()

    async def run(
        self, *, task_status: trio.TaskStatus[NodeAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the node until :meth:`shut_down` is called or the task is cancelled."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        secret = load_or_create_secret(config.secret_path)
        engine = open_engine(config.store, config.data_dir, sync=config.sync_writes)
        try:
            await self._run_with(engine, secret, task_status)
        finally:
            engine.close()
            logger.info("storage closed")

    async def _run_with(
        self,
        engine: StorageEngine,
        secret: bytes,
        task_status: trio.TaskStatus[NodeAddresses],
    ) -> None:
        config = self.config
        actor = load_or_create_actor(engine)
        replica = LocalReplica(
            engine,
            actor=actor,
            buckets=config.buckets,
            stats=self.stats,
            clock_max_entries=config.clock_max_entries,
            siblings_warning_threshold=config.siblings_warning_threshold,
            siblings_maximum=config.siblings_maximum,
            cache_bytes=config.cache_size,
        )
        started = time.monotonic()
        await trio.to_thread.run_sync(replica.count_items)
        logger.info(
            "%d items in %s (counted in %.2fs)",
            replica.items,
            config.data_dir,
            time.monotonic() - started,
        )
        self.replica = replica
        coordinator = LocalCoordinator(replica, node_name=self.name)
        info = NodeInfo(
            node=self.name,
            quorum=str(config.quorum.capped(1)),
            buckets=config.buckets,
            virtual_nodes=config.virtual_nodes,
            store=engine.name,
            max_connections=config.max_connections,
            max_item_size=config.max_item_size,
            settings=config.to_dict(),
            started_at=self.started_at,
        )
        self.executor = CommandExecutor(
            coordinator,
            self.stats,
            info,
            item_counts=lambda: (replica.items, replica.item_bytes),
            extra_stats=lambda: [
                ("kai_cache_bytes", replica.cache.size),
                ("kai_cache_entries", len(replica.cache)),
                ("kai_cache_hits", replica.cache.hits),
                ("kai_cache_misses", replica.cache.misses),
            ],
            all_siblings=config.siblings == "all",
        )
        server = MemcacheServer(
            self.executor,
            self.stats,
            max_connections=config.max_connections,
            max_item_size=config.max_item_size,
        )
        self._server = server
        for warning in config.warnings():
            logger.warning("%s", warning)
        async with trio.open_nursery() as services:
            rpc_listeners = await services.start(
                serve_rpc, config.rpc.host, config.rpc.port, secret, self._rpc_handlers()
            )
            rpc_address = rpc_listeners[0].socket.getsockname()[:2]
            if config.rpc.port == 0:  # an ephemeral port (tests): name the node by the real one
                self.name = coordinator.node_name = f"{rpc_address[0]}:{rpc_address[1]}"
                self.executor.info = attrs.evolve(info, node=self.name)
            async with trio.open_nursery() as front:
                addresses = await front.start(server.serve, config.listen.host, config.listen.port)
                memcache_address = addresses[0]
                logger.info(
                    "kai %s serving memcached on %s:%s, rpc on %s:%s (store %s, actor %s)",
                    __version__,
                    *memcache_address,
                    *rpc_address,
                    engine.name,
                    actor.hex(),
                )
                task_status.started(NodeAddresses(memcache_address, rpc_address))
                await self._shutdown.wait()
                logger.info("shutting down: closing listeners, finishing in-flight requests")
                server.shut_down()
                front.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            services.cancel_scope.cancel()

    # --- admin RPC ----------------------------------------------------------------------------

    def _rpc_handlers(self) -> dict[str, Any]:
        return {
            "status": self._rpc_status,
            "stats": self._rpc_stats,
            "members": self._rpc_members,
            "ring": self._rpc_ring,
            "locate": self._rpc_locate,
        }

    def _ring(self) -> Ring:
        return Ring(
            [NodeId.parse(self.name)],
            buckets=self.config.buckets,
            virtual_nodes=self.config.virtual_nodes,
        )

    async def _rpc_status(self) -> dict[str, object]:
        replica = self.replica
        assert replica is not None
        return {
            "node": self.name,
            "version": __version__,
            "uptime": int(time.time() - self.started_at),
            "members": [self.name],
            "quorum": str(self.config.quorum),
            "effective_quorum": str(self.config.quorum.capped(1)),
            "store": self.config.store,
            "data_dir": str(self.config.data_dir.resolve()),
            "actor": replica.actor.hex(),
            "items": replica.items,
            "bytes": replica.item_bytes,
            "connections": self.stats.curr_connections,
        }

    async def _rpc_stats(self) -> dict[str, object]:
        assert self.executor is not None
        return dict(self.executor.general_stats())

    async def _rpc_members(self) -> list[dict[str, object]]:
        return [{"node": self.name, "status": "valid", "reachable": True}]

    async def _rpc_ring(self) -> dict[str, object]:
        ring = self._ring()
        owned: dict[str, int] = {}
        for partition in range(ring.buckets):
            for node in ring.primaries(partition, self.config.quorum.n):
                owned[str(node)] = owned.get(str(node), 0) + 1
        return {
            "buckets": ring.buckets,
            "virtual_nodes": ring.virtual_nodes,
            "nodes": [str(node) for node in ring.nodes],
            "partitions_per_node": owned,
        }

    async def _rpc_locate(self, key: bytes) -> dict[str, object]:
        replica = self.replica
        assert replica is not None
        ring = self._ring()
        partition = ring.partition_for_key(key)
        siblings = replica.read(key)
        return {
            "key": key,
            "partition": partition,
            "preference_list": [str(node) for node in ring.preference_list(partition)],
            "n": self.config.quorum.capped(len(ring.nodes)).n,
            "replicas": [
                {
                    "node": self.name,
                    "holds": bool(siblings),
                    "versions": [
                        {
                            "clock": {
                                actor.hex(): counter for actor, counter, _ in v.clock.entries
                            },
                            "timestamp": v.timestamp,
                            "tombstone": v.value is None,
                            "bytes": len(v.value or b""),
                        }
                        for v in siblings
                    ],
                }
            ],
        }
