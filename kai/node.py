"""A Kai node: storage, coordinator, memcached listener and RPC server wired together.

Owns the lifetime of everything it starts: services run in one nursery, and the storage
engine is closed only after every task that uses it has finished. Never parses protocol
bytes or touches LevelDB directly.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from pathlib import Path

import attrs
import trio

from kai import __version__
from kai.admin.handlers import AdminHandlers
from kai.cluster.wiring import Cluster
from kai.core.config import Address, Config
from kai.core.errors import ConfigError
from kai.core.memcache.report import NodeInfo
from kai.core.ring import NodeId
from kai.core.stats import NodeStats
from kai.core.storage import StorageEngine
from kai.memcache.commands import CommandExecutor
from kai.memcache.server import MemcacheServer
from kai.metrics import StatsCollector, metrics_registry, serve_metrics
from kai.rpc.secret import load_node_secret
from kai.rpc.server import Handler, serve_rpc
from kai.rpc.transport import RpcTransport
from kai.storage import open_engine
from kai.storage.replica import LocalReplica, load_or_create_actor

logger = logging.getLogger(__name__)

#: How long connections may take to finish their current request at shutdown.
SHUTDOWN_GRACE = 10.0


@attrs.frozen
class NodeAddresses:
    """Where a started node listens (ports resolved when 0 was asked for)."""

    memcache: tuple[str, int]
    rpc: tuple[str, int]
    #: The Prometheus listener, if ``metrics`` is set.
    metrics: tuple[str, int] | None = None


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
        self.cluster: Cluster | None = None
        self.started_at = time.time()

    def shut_down(self) -> None:
        """Ask the node to stop: listeners close, in-flight requests are answered."""
        self._shutdown.set()

    async def run(
        self, *, task_status: trio.TaskStatus[NodeAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the node until :meth:`shut_down` is called or the task is cancelled.

        Raises:
            ConfigError: before anything is opened, an operator mistake, in one line naming
                the path or address: the data directory cannot be made, the secret file is
                missing where it must not be created (a node joining seeds) or its
                directory is, or a listener's address cannot be bound.
        """
        config = self.config
        # Operator mistakes are found before anything is opened or logged, and each is one
        # ConfigError line (kai exits with status 2).
        _make_data_dir(config.data_dir)
        seeds = [str(seed) for seed in config.seeds if seed != config.rpc]
        secret = load_node_secret(config.secret_path, seeds=seeds)
        _check_can_listen(config.rpc, "rpc")
        _check_can_listen(config.listen, "listen")
        if config.metrics is not None:
            _check_can_listen(config.metrics, "metrics")
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
            tombstone_grace=config.tombstone_grace / 1000,
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
        for warning in config.warnings():
            logger.warning("%s", warning)
        handlers: dict[str, Handler] = {}
        async with trio.open_nursery() as services:
            # The RPC address is the node's identity: bind it first (port 0 picks one).
            try:
                rpc_listeners = await services.start(
                    serve_rpc, config.rpc.host, config.rpc.port, secret, handlers
                )
            except OSError as exc:
                raise _listen_error(config.rpc, "rpc", exc) from exc
            rpc_address = rpc_listeners[0].socket.getsockname()[:2]
            self_node = NodeId(rpc_address[0], rpc_address[1])
            self.name = str(self_node)
            transport = RpcTransport(secret, services)
            cluster = Cluster(config, engine, replica, self_node, transport, services)
            self.cluster = cluster
            handlers.update(cluster.handlers())
            handlers.update(AdminHandlers(self, cluster).handlers())
            executor = self._executor(cluster, engine)
            self.executor = executor
            server = MemcacheServer(
                executor,
                self.stats,
                max_connections=config.max_connections,
                max_item_size=config.max_item_size,
            )
            self._server = server
            await services.start(cluster.run)
            metrics_address = await self._start_metrics(services, cluster, executor)
            async with trio.open_nursery() as front:
                try:
                    addresses = await front.start(
                        server.serve, config.listen.host, config.listen.port
                    )
                except OSError as exc:
                    raise _listen_error(config.listen, "listen", exc) from exc
                memcache_address = addresses[0]
                logger.info(
                    "kai %s serving memcached on %s:%s, rpc on %s (store %s, actor %s)",
                    __version__,
                    *memcache_address,
                    self_node,
                    engine.name,
                    actor.hex(),
                )
                task_status.started(NodeAddresses(memcache_address, rpc_address, metrics_address))
                await self._shutdown.wait()
                logger.info("shutting down: closing listeners, finishing in-flight requests")
                server.shut_down()
                front.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            services.cancel_scope.cancel()

    async def _start_metrics(
        self, services: trio.Nursery, cluster: Cluster, executor: CommandExecutor
    ) -> tuple[str, int] | None:
        """Start the Prometheus listener if ``metrics`` is set; where it listens."""
        address = self.config.metrics
        if address is None:
            return None
        detector = cluster.detector

        def fields() -> list[tuple[str, object]]:
            return [
                *executor.report.general(),
                ("kai_peer_transitions", detector.transitions()),
            ]

        def peers() -> dict[str, bool]:
            # Members never called yet count as up, as the detector says of them.
            states = dict.fromkeys(cluster.coordinator.members(), True)
            states.update((str(node), up) for node, up in detector.statuses().items())
            states.pop(self.name, None)
            return states

        collector = StatsCollector(
            fields,
            latencies=lambda: {"get": self.stats.get_latency, "set": self.stats.set_latency},
            peers=peers,
        )
        try:
            listeners = await services.start(
                serve_metrics, address.host, address.port, metrics_registry(collector)
            )
        except OSError as exc:
            raise _listen_error(address, "metrics", exc) from exc
        host, port = listeners[0].socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        logger.info("serving Prometheus metrics on http://%s:%s/metrics", shown, port)
        return host, port

    def _executor(self, cluster: Cluster, engine: StorageEngine) -> CommandExecutor:
        config = self.config
        replica = cluster.replica
        info = NodeInfo(
            node=self.name,
            quorum=str(config.quorum),
            buckets=config.buckets,
            virtual_nodes=config.virtual_nodes,
            store=engine.name,
            max_connections=config.max_connections,
            max_item_size=config.max_item_size,
            settings=config.to_dict(),
            started_at=self.started_at,
        )
        return CommandExecutor(
            cluster.coordinator,
            self.stats,
            info,
            item_counts=lambda: (replica.items, replica.item_bytes),
            extra_stats=lambda: [
                ("kai_cache_bytes", replica.cache.size),
                ("kai_cache_entries", len(replica.cache)),
                ("kai_cache_hits", replica.cache.hits),
                ("kai_cache_misses", replica.cache.misses),
                ("kai_down_nodes", " ".join(map(str, cluster.detector.down_nodes())) or "-"),
                *cluster.statistics(),
            ],
            all_siblings=config.siblings == "all",
        )


def _make_data_dir(path: Path) -> None:
    """Create the data directory if needed; a ConfigError naming it if that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"data directory {path} exists but is not a directory; set another data_dir"
            " (--data-dir)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create data directory {path}: {exc.strerror}") from exc


def _check_can_listen(address: Address, setting: str) -> None:
    """Fail early, before LevelDB is opened and items counted, if ``address`` cannot be bound.

    Binds and closes a socket for every address the host resolves to (never listening, so
    nothing can connect). The real bind later may still fail if another process takes the
    port meanwhile; :func:`_listen_error` words that failure the same way.
    """
    if address.port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, sockaddr in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
    except OSError as exc:  # socket.gaierror included
        raise _listen_error(address, setting, exc) from exc


def _listen_error(address: Address, setting: str, error: OSError) -> ConfigError:
    """What the operator is told when ``address`` (the ``setting`` option) cannot be bound."""
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        reason += " (is another kai or memcached running there?)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason += " (no interface of this host has that address)"
    elif error.errno == errno.EACCES:
        reason += " (ports below 1024 need privileges)"
    return ConfigError(f"cannot listen on {address} ({setting}, --{setting}): {reason}")
