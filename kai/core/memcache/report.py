"""What a node answers to memcached's ``stats`` command, and the version it reports.

memcached's field names come first, where they mean something here, then Kai's own
(``kai_*``); ``kai-admin stats`` shows the same fields. Never touches sockets.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

import attrs

from kai import __version__
from kai.core.memcache import replies
from kai.core.stats import NodeStats

#: Fields from other parts of the node that list nodes, space-separated ("-" for none); each
#: gets a ``<name>_count`` field after it, because pymemcache's ``stats()`` and ``memcstat``
#: keep only the first word of a value.
COUNTED_NODE_LISTS = frozenset({"kai_down_nodes"})

#: The memcached version we answer with; libmemcached and memccapable need major.minor >= 1.6.
MEMCACHED_VERSION = f"1.6.21-kai-{__version__}"
VERSION_REPLY = f"VERSION {MEMCACHED_VERSION}\r\n".encode()


@attrs.frozen(slots=True, kw_only=True)
class NodeInfo:
    """Static facts about the node that ``stats`` reports."""

    node: str
    quorum: str
    buckets: int
    virtual_nodes: int
    store: str
    max_connections: int
    max_item_size: int
    settings: dict[str, object]
    started_at: float = attrs.field(factory=time.time)


class StatsReport:
    """Renders ``stats`` replies from the node's counters and facts.

    Args:
        stats: the node's counters (``stats reset`` clears them).
        info: static node facts.
        members: the cluster's members, for ``kai_curr_nodes`` and ``kai_curr_nodes_count``.
        item_counts: returns (items, bytes) for ``curr_items`` / ``bytes``.
        extra_stats: more fields from other parts of the node (storage, cache); a node list
            named in :data:`COUNTED_NODE_LISTS` is followed by its count.
        ring: the fields of ``stats kai_ring`` (where keys live, for clients that route
            requests to a key's primaries; docs/dynamo-api.md).
        wall_clock: unix time in seconds.
    """

    def __init__(
        self,
        stats: NodeStats,
        info: NodeInfo,
        *,
        members: Callable[[], list[str]],
        item_counts: Callable[[], tuple[int, int]] = lambda: (0, 0),
        extra_stats: Callable[[], list[tuple[str, object]]] = list,
        ring: Callable[[], list[tuple[str, object]]] = list,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.ring = ring
        self.info = info
        self.members = members
        self.item_counts = item_counts
        self.extra_stats = extra_stats
        self.wall_clock = wall_clock

    def reply(self, args: tuple[bytes, ...]) -> bytes:
        """The reply to ``stats`` with ``args`` (a group name, or none for the general one)."""
        if not args:
            return replies.encode_stats(self.general())
        if args == (b"settings",):
            return replies.encode_stats(self.settings())
        if args == (b"kai_ring",):
            return replies.encode_stats(self.ring())
        if args == (b"reset",):
            self.stats.reset()
            return replies.RESET
        if args == (b"sizes",):
            # memcached 1.6 answers this unless started with -o track_sizes; Kai has no sizes
            # histogram to enable.
            return replies.encode_stats([("sizes_status", "disabled")])
        if args[0] in (b"items", b"slabs", b"conns"):
            return replies.END  # Kai has no slabs; an empty listing is what clients accept
        return replies.ERROR

    def general(self) -> list[tuple[str, object]]:
        """memcached's general ``stats`` fields followed by Kai's own."""
        now = self.wall_clock()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stats = self.stats
        items, item_bytes = self.item_counts()
        members = self.members()
        fields: list[tuple[str, object]] = [
            ("pid", os.getpid()),
            ("uptime", int(now - self.info.started_at)),
            ("time", int(now)),
            ("version", MEMCACHED_VERSION),
            ("pointer_size", 64),
            ("rusage_user", f"{usage.ru_utime:.6f}"),
            ("rusage_system", f"{usage.ru_stime:.6f}"),
            ("max_connections", self.info.max_connections),
            ("curr_connections", stats.curr_connections),
            ("connection_structures", stats.curr_connections),
            ("curr_items", items),
            ("bytes", item_bytes),
            ("evictions", 0),
            ("limit_maxbytes", 0),
            ("threads", 1),
            ("accepting_conns", 1),
        ]
        fields += stats.counters()  # total/rejected connections and every request counter
        fields += [
            ("kai_node", self.info.node),
            ("kai_quorum", self.info.quorum),
            ("kai_buckets", self.info.buckets),
            ("kai_virtual_nodes", self.info.virtual_nodes),
            ("kai_store", self.info.store),
            ("kai_curr_nodes", " ".join(members)),
            ("kai_curr_nodes_count", len(members)),
        ]
        fields += stats.latency_fields()
        for name, value in self.extra_stats():
            fields.append((name, value))
            if name in COUNTED_NODE_LISTS:
                fields.append((f"{name}_count", _count_nodes(value)))
        return fields

    def settings(self) -> list[tuple[str, object]]:
        """``stats settings``: memcached's names where they apply, then Kai's settings."""
        fields: list[tuple[str, object]] = [
            ("maxconns", self.info.max_connections),
            ("item_size_max", self.info.max_item_size),
            ("evictions", "off"),
            ("cas_enabled", "yes"),
            ("num_threads", 1),
            ("udpport", 0),
        ]
        for name, value in self.info.settings.items():
            if isinstance(value, list):
                value = ",".join(str(item) for item in value) or "-"
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            fields.append((f"kai_{name}", value))
        return fields


#: The one "slab class" of ``stats cachedump``: Kai's items are not sorted into classes.
CACHEDUMP_CLASS = 1
#: memcached's slab class ids are below this (MAX_NUMBER_OF_SLAB_CLASSES).
CACHEDUMP_CLASSES = 64
#: memcached stops a cachedump reply at 2 MiB; Kai stops at the same size.
CACHEDUMP_MAX_BYTES = 2 * 1024 * 1024

_CACHEDUMP_USAGE = replies.client_error("bad command line")
_CACHEDUMP_BAD_NUMBER = replies.client_error("bad command line format")
_CACHEDUMP_BAD_CLASS = replies.client_error("Illegal slab id")


def parse_cachedump(args: tuple[bytes, ...]) -> tuple[int, int] | bytes:
    """``stats cachedump <class> <limit>``: the (class, limit) to dump, or the error reply.

    As memcached 1.6.18: fewer than two numbers is ``bad command line``, a number that is
    not a plain unsigned decimal ``bad command line format``, a class of 64 or more
    ``Illegal slab id``; tokens after the limit are ignored; a limit of 0 means no limit.
    """
    if len(args) < 3 or args[0] != b"cachedump":
        return _CACHEDUMP_USAGE
    numbers = [int(token) if token.isdigit() and len(token) <= 10 else None for token in args[1:3]]
    item_class, limit = numbers
    if item_class is None or limit is None or limit > 2**32 - 1:
        return _CACHEDUMP_BAD_NUMBER
    if item_class >= CACHEDUMP_CLASSES:
        return _CACHEDUMP_BAD_CLASS
    return item_class, limit


def encode_cachedump_item(key: bytes, size: int, expiry: int) -> bytes:
    """One line of a cachedump: ``ITEM <key> [<bytes> b; <unix expiry, 0 = never> s]``."""
    return b"ITEM %b [%d b; %d s]\r\n" % (key, size, expiry)


def _count_nodes(node_list: object) -> int:
    """How many nodes a space-separated list names; ``-`` (or nothing) names none."""
    return sum(1 for node in str(node_list).split() if node != "-")
