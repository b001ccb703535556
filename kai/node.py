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
from kai.core.errors import ConfigError, StorageError
from kai.core.memcache.report import NodeInfo
from kai.core.ring import NodeId
from kai.core.stats import NodeStats
from kai.core.storage import StorageEngine
from kai.memcache.commands import CommandExecutor
from kai.memcache.dynamo import DynamoCommands
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
#: Metadata name of the RPC address (``host:port``) a data directory's node was created
#: with: its identity in the cluster, which must never change under the same data.
NODE_ID_META = "node_id"


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
            ConfigError: before anything is served, an operator mistake, in one line naming
                the path or address: the data directory cannot be made, the secret file is
                missing where it must not be created (a node joining seeds) or its
                directory is, a listener's address cannot be bound, or the data directory
                belongs to a node of another RPC address.
            StorageError: the database cannot be opened, or its node identity is unreadable.
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
            # Before anything reads or writes the data: a data directory started under
            # another address would be a second member holding the first one's data.
            remembered = _remembered_identity(engine, config.data_dir)
            rpc = _rpc_address_to_bind(config.rpc, remembered, config.data_dir)
            if rpc != config.rpc:
                _check_can_listen(rpc, "rpc", data_dir=config.data_dir)
        except BaseException:
            engine.close()
            raise
        try:
            await self._run_with(engine, secret, rpc, remembered, task_status)
        finally:
            engine.close()
            logger.info("storage closed")

    async def _run_with(
        self,
        engine: StorageEngine,
        secret: bytes,
        rpc: Address,
        remembered: NodeId | None,
        task_status: trio.TaskStatus[NodeAddresses],
    ) -> None:
        config = self.config
        if rpc != config.rpc:
            logger.info("rpc port 0: reusing port %d, this data directory's identity", rpc.port)
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
            # The RPC address is the node's identity: bind it first (port 0 picks one), and
            # remember it before any other node can learn it.
            try:
                rpc_listeners = await services.start(
                    serve_rpc, rpc.host, rpc.port, secret, handlers
                )
            except OSError as exc:
                reused_from = config.data_dir if rpc != config.rpc else None
                raise _listen_error(rpc, "rpc", exc, data_dir=reused_from) from exc
            rpc_address = rpc_listeners[0].socket.getsockname()[:2]
            self_node = NodeId(rpc_address[0], rpc_address[1])
            self.name = str(self_node)
            if remembered is None:
                engine.put_meta(NODE_ID_META, str(self_node).encode("ascii"))
                logger.info("data directory %s: node identity %s", config.data_dir, self_node)
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
                cluster.membership.publish_endpoint(
                    _advertised_host(memcache_address[0], self_node), memcache_address[1]
                )
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
            # Members on either ring (a joining one too) never called yet count as up, as
            # the detector says of them.
            states = dict.fromkeys((str(node) for node in cluster.placement().nodes()), True)
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
            ring=cluster.ring_stats,
            all_siblings=config.siblings == "all",
            extension=DynamoCommands(cluster.coordinator, self.stats).execute,
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


def _remembered_identity(engine: StorageEngine, data_dir: Path) -> NodeId | None:
    """The RPC address this data directory's node was created with, or None if it has none.

    None for a fresh data directory, one from before identities were kept, and the memory
    engine (which starts empty every time). Never writes.

    Raises:
        StorageError: the stored identity is not ``host:port``.
    """
    raw = engine.get_meta(NODE_ID_META)
    if raw is None:
        return None
    try:
        return NodeId.parse(raw.decode("ascii"))
    except ValueError:  # UnicodeDecodeError included
        raise StorageError(
            f"data directory {data_dir}: its node identity ({raw!r}) is unreadable, so the"
            " database may be corrupt: restore it from a backup, or start a fresh node and"
            " move this one with `kai-admin replace OLD NEW`"
        ) from None


def _rpc_address_to_bind(configured: Address, remembered: NodeId | None, data_dir: Path) -> Address:
    """Where the RPC listener must bind: ``configured``, or, when its port is 0, the port of
    the identity this data directory remembers on that host.

    Never lets a data directory serve under another address than the one it was created
    with: restarted elsewhere, its node would come back as a new member while its old
    address stayed in every view, down forever, still owning partitions.

    Raises:
        ConfigError: ``configured`` is not the remembered identity; the message names both
            and says how to start the node, or how to move it.
    """
    if remembered is None:
        return configured
    if configured.host == remembered.host and configured.port in (0, remembered.port):
        return Address(remembered.host, remembered.port)
    if configured.port:
        where = new = str(configured)
    else:  # the port is not known until a fresh node binds one
        where, new = "the new address", "NEW"
    raise ConfigError(
        f"data directory {data_dir} belongs to node {remembered}, not {configured}: start it"
        f" with --rpc {remembered}, or move the node: start a fresh node (a new data"
        f" directory) at {where} and run `kai-admin replace {remembered} {new}`"
    )


def _check_can_listen(address: Address, setting: str, *, data_dir: Path | None = None) -> None:
    """Fail early, before LevelDB is opened and items counted, if ``address`` cannot be bound.

    Binds and closes a socket for every address the host resolves to (never listening, so
    nothing can connect). The real bind later may still fail if another process takes the
    port meanwhile; :func:`_listen_error` words that failure the same way. ``data_dir`` is
    set when the port is the one that data directory remembers (rpc port 0).
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
        raise _listen_error(address, setting, exc, data_dir=data_dir) from exc


def _listen_error(
    address: Address, setting: str, error: OSError, *, data_dir: Path | None = None
) -> ConfigError:
    """What the operator is told when ``address`` (the ``setting`` option) cannot be bound;
    ``data_dir`` when its port is the one that data directory remembers (rpc port 0)."""
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        reason += " (is another kai or memcached running there?)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason += " (no interface of this host has that address)"
    elif error.errno == errno.EACCES:
        reason += " (ports below 1024 need privileges)"
    if data_dir is not None:
        reason += f"; port 0 reuses the port data directory {data_dir} was created with"
    return ConfigError(f"cannot listen on {address} ({setting}, --{setting}): {reason}")


#: Listen hosts that mean "every address": clients are told the node's RPC host instead.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _advertised_host(listen_host: str, self_node: NodeId) -> str:
    """The host clients should use for this node's memcached port."""
    return self_node.host if listen_host in _WILDCARD_HOSTS else listen_host
