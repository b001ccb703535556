"""Active anti-entropy (DESIGN §8): replicas compare hash trees and merge what differs.

:class:`AntiEntropy` keeps one hash tree per partition (:mod:`kai.core.merkle`) current with
every change the replica reports (``replica.on_change``), after building the trees at start
with a chunked scan of every partition. Every ``interval`` it runs one exchange with the
next peer, rotating among the other members that the failure detector calls up and that
share at least one partition with this node:

1. ``aae_roots``: the peer's roots of every partition both are primaries of (and that are
   ready here); partitions whose roots agree, or that are not ready there, are done.
2. ``aae_leaves``: per differing partition, the peer's leaves; the differing segments.
3. ``aae_segment_keys``: the peer's ``(key, hash)`` of those segments, a page at a time (the
   peer scans its partition in chunks and says where it stopped); this node lists its own
   keys of the same key range and segments.
4. For each key that differs: ``replica_read`` the peer's record (asking again for what a
   partial answer left out), merge it here with :meth:`~LocalReplica.apply`, and send back
   every merged record the peer lacks or holds differently in one ``aae_apply`` batch,
   which the peer merges with the same write rule. Tombstones are records like any other.

RPC methods this node serves (every parameter validated; bad ones raise
:class:`~kai.core.errors.RpcBadRequest`):

``aae_roots(partitions: list[int]) -> list[int | None]``
    The root of each partition, None when its tree is not ready.
``aae_leaves(partition: int) -> bytes | None``
    The partition's leaves (:func:`~kai.core.merkle.leaves_to_bytes`), None when not ready.
``aae_segment_keys(partition, segments: list[int], start_after: bytes | None) -> list``
    ``[entries, cursor]``: ``[key, hash]`` of the partition's keys after ``start_after`` in
    ``segments``, in key order. The scan stops after :data:`LIST_SCAN_KEYS` keys or
    :data:`LIST_ENTRIES` entries; ``cursor`` is then the last key it looked at (ask again
    after it), None when it reached the partition's end.
``aae_apply(partition: int, batch: list[[key, record]]) -> int``
    Merge records of ``partition`` with the write rule; how many changed something.

Counters: ``exchanges`` counts exchanges that ended (even without differences),
``exchanges_failed`` those a peer's failure ended early; ``keys_repaired``
counts keys an exchange of this node changed, here or on the peer; ``bytes`` counts record
bytes it read from and sent to peers. :meth:`AntiEntropy.status` is what
``kai-admin aae-status`` shows.

Design choices: trees are never persisted (rebuilt at every start, by a scan that yields
after every :data:`BUILD_CHUNK` keys) and never rebuilt while running, so every change of a
stored record must reach ``replica.on_change`` (the replica's write and reap paths do). A
key whose versions the replica refuses (older than ``tombstone_grace`` and never seen)
keeps differing and is tried again by later exchanges, by design.

It must never: block the event loop for a whole partition (every scan is chunked), run two
exchanges at once, repair through anything but :meth:`~LocalReplica.apply`, trust a peer's
parameters or answers (a bad answer ends the exchange), or raise out of the exchange loop for
a peer's failure (a failed or timed-out call ends that exchange; the next interval retries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio
import trio.lowlevel

from kai.cluster.fanout import PeerCaller
from kai.cluster.transfers import merge_records
from kai.core.config import Quorum
from kai.core.errors import RpcBadRequest, TooManySiblings
from kai.core.merkle import (
    SEGMENTS,
    Entry,
    HashTrees,
    differing_keys,
    differing_segments,
    entries_in,
    entry_hash,
    leaves_from_bytes,
    leaves_to_bytes,
    segment_of,
)
from kai.core.pending import Pending, Step
from kai.core.ring import NodeId, Ring
from kai.core.wire import is_int, key_from_wire, records_from_wire, siblings_from_wire
from kai.rpc.server import Handler
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: Keys read from storage between two checkpoints while building a tree.
BUILD_CHUNK = 256
#: Keys read from storage between two checkpoints while listing segments.
SCAN_CHUNK = 512
#: Most keys one ``aae_segment_keys`` call scans before it answers with a cursor.
LIST_SCAN_KEYS = 16 * SCAN_CHUNK
#: Most entries one ``aae_segment_keys`` answer carries (a key is at most 250 bytes, so an
#: answer stays around 1 MiB, far below the RPC message limit).
LIST_ENTRIES = 4096
#: Keys asked for in one ``replica_read`` call.
READ_BATCH = 256
#: Most records one ``aae_apply`` call may carry (what a receiver accepts).
MAX_APPLY_KEYS = 1024
#: An ``aae_apply`` batch stops growing once its records reach this many bytes (the first
#: record always goes in).
APPLY_BYTES = 1 << 20


class ExchangeFailed(Exception):
    """A peer could not be reached, timed out or answered nonsense: the exchange ends."""


@attrs.define
class PartitionSync:
    """The last comparison of one partition this node made."""

    last_compared: float | None = None
    peer: NodeId | None = None
    keys_repaired: int = 0


class AntiEntropy:
    """Keeps this node's hash trees current and runs the exchanges with its peers.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica (its ``on_change`` is taken over once the build starts,
            so a node with anti-entropy off never pays for trees).
        peers: how to call peers (every call goes through it).
        ring: the current ring.
        quorum: the configured quorum; N (capped at the member count) says which nodes are
            a partition's primaries.
        is_up: the failure detector's opinion; exchanges only go to peers it calls up.
        interval: seconds between two exchanges (``sync_interval``).
        request_timeout: seconds each call to a peer may take.
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        peers: PeerCaller,
        ring: Callable[[], Ring],
        quorum: Quorum,
        is_up: Callable[[NodeId], bool],
        interval: float,
        request_timeout: float,
    ) -> None:
        self.self_node = self_node
        self.replica = replica
        self.peers = peers
        self.ring = ring
        self.quorum = quorum
        self.is_up = is_up
        self.interval = interval
        self.request_timeout = request_timeout
        self.trees = HashTrees(replica.buckets)
        self.exchanges = 0
        self.exchanges_failed = 0
        self.keys_repaired = 0
        self.bytes = 0
        self._exchanging = False
        self._turn = 0
        self._syncs: dict[int, PartitionSync] = {}

    # --- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the trees, and exchange with one peer every ``interval``, until cancelled
        (partitions still being built are skipped by the exchanges meanwhile)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.build)
            task_status.started()
            while True:
                await trio.sleep(self.interval)
                peer = self.next_peer()
                if peer is not None:
                    await self.exchange(peer)

    async def build(self) -> None:
        """Build every partition's tree by a chunked scan, concurrently with writes (once:
        :meth:`run` does it)."""
        trees, engine = self.trees, self.replica.engine
        self.replica.on_change = trees.change  # from now on: a node without it pays nothing
        trees.start()
        while (partition := trees.building) is not None:
            while True:
                pairs = engine.scan(partition, start_after=trees.cursor, limit=BUILD_CHUNK)
                trees.scanned(pairs)  # no await since the scan: the cursor rule is exact
                if len(pairs) < BUILD_CHUNK:
                    break
                await trio.lowlevel.checkpoint()
            trees.finish_partition()
            await trio.lowlevel.checkpoint()
        logger.info("anti-entropy: hash trees of %d partitions built", trees.ready_count)

    def shared_partitions(self, peer: NodeId) -> list[int]:
        """The partitions that both this node and ``peer`` are primaries of."""
        ring = self.ring()
        n = self.quorum.capped(len(ring.nodes)).n
        shared = []
        for partition in range(ring.buckets):
            primaries = ring.primaries(partition, n)
            if self.self_node in primaries and peer in primaries:
                shared.append(partition)
        return shared

    def next_peer(self) -> NodeId | None:
        """The next member (in turn) that is up and shares a partition; None if there is none."""
        others = [node for node in self.ring().nodes if node != self.self_node]
        for offset in range(len(others)):
            peer = others[(self._turn + offset) % len(others)]
            if self.is_up(peer) and self.shared_partitions(peer):
                self._turn = (self._turn + offset + 1) % len(others)
                return peer
        return None

    async def exchange(self, peer: NodeId) -> bool:
        """Compare and repair every ready partition shared with ``peer``; False (and nothing
        done) if another exchange is running."""
        if self._exchanging:
            return False
        self._exchanging = True
        try:
            partitions = [p for p in self.shared_partitions(peer) if self.trees.ready(p)]
            if partitions:
                await self._exchange(peer, partitions)
            self.exchanges += 1
        except ExchangeFailed as exc:
            self.exchanges_failed += 1
            logger.info("anti-entropy exchange with %s ended: %s", peer, exc)
        finally:
            self._exchanging = False
        return True

    async def _exchange(self, peer: NodeId, partitions: list[int]) -> None:
        roots = await self._call(peer, "aae_roots", (partitions,))
        if not isinstance(roots, list) or len(roots) != len(partitions):
            raise ExchangeFailed("aae_roots: malformed answer")
        repaired_before = self.keys_repaired
        for partition, root in zip(partitions, roots, strict=True):
            if root is None:
                continue  # not ready there
            if not is_int(root):
                raise ExchangeFailed("aae_roots: malformed root")
            if root != self.trees.root(partition):
                await self._sync_partition(peer, partition)
            sync = self._syncs.setdefault(partition, PartitionSync())
            sync.last_compared, sync.peer = self.replica.wall_clock(), peer
        if self.keys_repaired > repaired_before:
            logger.info(
                "anti-entropy with %s repaired %d keys",
                peer,
                self.keys_repaired - repaired_before,
            )

    async def _sync_partition(self, peer: NodeId, partition: int) -> None:
        raw = await self._call(peer, "aae_leaves", (partition,))
        if raw is None:
            return  # not ready there any more (it restarted)
        try:
            theirs = leaves_from_bytes(raw) if isinstance(raw, bytes) else None
        except ValueError:
            theirs = None
        if theirs is None:
            raise ExchangeFailed("aae_leaves: malformed answer")
        mine = self.trees.leaves(partition)
        assert mine is not None, "a ready partition stays ready"
        segments = differing_segments(mine, theirs)
        if not segments:
            return
        wanted = frozenset(segments)
        after: bytes | None = None
        while True:
            their_entries, cursor = await self._list_peer(peer, partition, segments, after)
            mine_entries = await self._local_entries(partition, wanted, after, cursor)
            keys = differing_keys(mine_entries, their_entries)
            if keys:
                await self._repair(peer, partition, keys, dict(their_entries))
            if cursor is None:
                return
            after = cursor

    async def _list_peer(
        self, peer: NodeId, partition: int, segments: list[int], after: bytes | None
    ) -> tuple[list[Entry], bytes | None]:
        answer = await self._call(peer, "aae_segment_keys", (partition, segments, after))
        if not isinstance(answer, list | tuple) or len(answer) != 2:
            raise ExchangeFailed("aae_segment_keys: malformed answer")
        raw_entries, cursor = answer
        if cursor is not None and (
            not isinstance(cursor, bytes) or (after is not None and cursor <= after)
        ):
            raise ExchangeFailed("aae_segment_keys: malformed cursor")
        if not isinstance(raw_entries, list) or len(raw_entries) > LIST_ENTRIES:
            raise ExchangeFailed("aae_segment_keys: malformed entries")
        return [self._entry_from_wire(entry, partition) for entry in raw_entries], cursor

    def _entry_from_wire(self, entry: object, partition: int) -> Entry:
        if not isinstance(entry, list | tuple) or len(entry) != 2 or not is_int(entry[1]):
            raise ExchangeFailed("aae_segment_keys: malformed entry")
        try:
            key = key_from_wire(entry[0])
        except RpcBadRequest as exc:
            raise ExchangeFailed(f"aae_segment_keys: {exc}") from exc
        if self.replica.partition(key) != partition:
            raise ExchangeFailed(f"aae_segment_keys: {key!r} is not of partition {partition}")
        return key, entry[1]

    async def _local_entries(
        self, partition: int, segments: frozenset[int], after: bytes | None, upto: bytes | None
    ) -> list[Entry]:
        """This node's entries of ``segments`` with keys in ``(after, upto]`` (no upper
        bound when ``upto`` is None), read in chunks."""
        entries: list[Entry] = []
        while True:
            pairs = self.replica.engine.scan(partition, start_after=after, limit=SCAN_CHUNK)
            in_range = pairs if upto is None else [pair for pair in pairs if pair[0] <= upto]
            entries.extend(entries_in(in_range, segments))
            if len(in_range) < len(pairs) or len(pairs) < SCAN_CHUNK:
                return entries
            after = pairs[-1][0]
            await trio.lowlevel.checkpoint()

    async def _repair(
        self, peer: NodeId, partition: int, keys: list[bytes], their_hashes: dict[bytes, int]
    ) -> None:
        """Merge the peer's records of ``keys`` here, then send back what it lacks."""
        sync = self._syncs.setdefault(partition, PartitionSync())
        for start in range(0, len(keys), READ_BATCH):
            batch = keys[start : start + READ_BATCH]
            records = await self._read_peer(peer, batch)
            push: list[tuple[bytes, bytes]] = []
            for key, record in zip(batch, records, strict=True):
                if record is not None and self._merge(key, record):
                    sync.keys_repaired += 1
                    self.keys_repaired += 1
                local = self.replica.read_record(key)[1]
                if local is not None and entry_hash(key, local) != their_hashes.get(key):
                    push.append((key, local))
            changed = await self._push(peer, partition, push)
            sync.keys_repaired += changed
            self.keys_repaired += changed

    def _merge(self, key: bytes, record: bytes) -> bool:
        """Merge a peer's record of ``key`` here; whether it changed something."""
        try:
            siblings = siblings_from_wire(record)
        except RpcBadRequest as exc:
            raise ExchangeFailed(f"replica_read: {exc}") from exc
        self.bytes += len(record)
        try:
            return self.replica.apply(key, siblings, record)
        except TooManySiblings as exc:
            logger.warning("anti-entropy: %r not merged: %s", key, exc)
            return False

    async def _read_peer(self, peer: NodeId, keys: list[bytes]) -> list[bytes | None]:
        """The peer's records of ``keys``, asking again for what a partial answer left out."""
        records: list[bytes | None] = []
        while len(records) < len(keys):
            rest = keys[len(records) :]
            answer = await self._call(peer, "replica_read", (rest,))
            if not isinstance(answer, list) or not 1 <= len(answer) <= len(rest):
                raise ExchangeFailed("replica_read: malformed answer")
            for record in answer:
                if record is not None and not isinstance(record, bytes):
                    raise ExchangeFailed("replica_read: malformed record")
                records.append(record)
        return records

    async def _push(self, peer: NodeId, partition: int, items: list[tuple[bytes, bytes]]) -> int:
        """Send ``items`` to the peer in bounded ``aae_apply`` batches; how many changed."""
        changed = 0
        start = 0
        while start < len(items):
            batch: list[list[bytes]] = []
            size = 0
            for key, record in items[start : start + MAX_APPLY_KEYS]:
                if batch and size + len(record) > APPLY_BYTES:
                    break
                batch.append([key, record])
                size += len(record)
            start += len(batch)
            answer = await self._call(peer, "aae_apply", (partition, batch))
            if not is_int(answer) or not 0 <= answer <= len(batch):
                raise ExchangeFailed("aae_apply: malformed answer")
            self.bytes += size
            changed += answer
        return changed

    async def _call(self, peer: NodeId, method: str, params: tuple[object, ...]) -> object:
        deadline = trio.current_time() + self.request_timeout
        answer = await self.peers.call(peer, method, params, deadline)
        if answer.timed_out:
            raise ExchangeFailed(f"{method} timed out")
        if answer.error is not None:
            raise ExchangeFailed(f"{method} failed: {answer.error}")
        return answer.result

    # --- serving peers ------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods peers' exchanges call."""
        return {
            "aae_roots": self.aae_roots,
            "aae_leaves": self.aae_leaves,
            "aae_segment_keys": self.aae_segment_keys,
            "aae_apply": self.aae_apply,
        }

    def _partition_from_wire(self, partition: object) -> int:
        if not is_int(partition) or not 0 <= partition < self.replica.buckets:
            raise RpcBadRequest(f"partition must be an integer in 0..{self.replica.buckets - 1}")
        return partition

    def aae_roots(self, partitions: object) -> list[int | None]:
        """The root of each partition asked (None when not ready).

        Raises:
            RpcBadRequest: ``partitions`` is not a list of at most ``buckets`` partitions.
        """
        if not isinstance(partitions, list) or len(partitions) > self.replica.buckets:
            raise RpcBadRequest(f"partitions must be a list of at most {self.replica.buckets}")
        checked = [self._partition_from_wire(partition) for partition in partitions]
        return [self.trees.root(partition) for partition in checked]

    def aae_leaves(self, partition: object) -> bytes | None:
        """The leaves of ``partition`` (None when not ready).

        Raises:
            RpcBadRequest: ``partition`` is not a partition.
        """
        leaves = self.trees.leaves(self._partition_from_wire(partition))
        return None if leaves is None else leaves_to_bytes(leaves)

    def aae_segment_keys(
        self, partition: object, segments: object, start_after: object
    ) -> Pending[list[object]]:
        """``[entries, cursor]`` of ``partition``'s keys after ``start_after`` in
        ``segments`` (see the module docstring).

        Raises:
            RpcBadRequest: a parameter is malformed.
        """
        checked = self._partition_from_wire(partition)
        if not isinstance(segments, list) or not 1 <= len(segments) <= SEGMENTS:
            raise RpcBadRequest(f"segments must be a list of 1 to {SEGMENTS} segments")
        if not all(is_int(segment) and 0 <= segment < SEGMENTS for segment in segments):
            raise RpcBadRequest(f"a segment must be an integer in 0..{SEGMENTS - 1}")
        after = None if start_after is None else key_from_wire(start_after)
        return Pending(self._list_segments(checked, frozenset(segments), after))

    async def _list_segments(
        self, partition: int, segments: frozenset[int], after: bytes | None
    ) -> list[object]:
        entries: list[list[object]] = []
        scanned = 0
        while True:
            pairs = self.replica.engine.scan(partition, start_after=after, limit=SCAN_CHUNK)
            for key, record in pairs:
                scanned += 1
                if segment_of(key) in segments:
                    entries.append([key, entry_hash(key, record)])
                if len(entries) >= LIST_ENTRIES or scanned >= LIST_SCAN_KEYS:
                    return [entries, key]
            if len(pairs) < SCAN_CHUNK:
                return [entries, None]
            after = pairs[-1][0]
            await trio.lowlevel.checkpoint()

    def aae_apply(self, partition: object, batch: object) -> Step[int]:
        """Merge a batch of ``partition``'s records; how many changed something.

        Raises:
            RpcBadRequest: a parameter is malformed, or a key is not of ``partition``
                (nothing of the batch is merged).
        """
        checked = self._partition_from_wire(partition)
        records = records_from_wire(batch, MAX_APPLY_KEYS)
        for key, _siblings, _record in records:
            if self.replica.partition(key) != checked:
                raise RpcBadRequest(f"key {key!r} is not of partition {checked}")
        return merge_records(self.replica, records, "anti-entropy")

    # --- observability ------------------------------------------------------------------------

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats``."""
        return [
            ("kai_aae_exchanges", self.exchanges),
            ("kai_aae_exchanges_failed", self.exchanges_failed),
            ("kai_aae_keys_repaired", self.keys_repaired),
            ("kai_aae_bytes", self.bytes),
            ("kai_aae_trees_ready", self.trees.ready_count),
        ]

    def status(self) -> dict[str, object]:
        """What ``kai-admin aae-status`` shows, as JSON-able values.

        ``{"node", "exchanges", "exchanges_failed", "keys_repaired", "bytes", "trees_ready",
        "buckets", "building" (partition being built, or None), "exchanging" (bool),
        "partitions": [...]}``, one entry per partition this node is a primary of:
        ``{"partition", "ready", "keys" (in its tree), "last_compared" (unix time or None),
        "peer" ("host:port" or None), "keys_repaired"}``.
        """
        ring = self.ring()
        n = self.quorum.capped(len(ring.nodes)).n
        partitions = []
        for partition in range(ring.buckets):
            if self.self_node not in ring.primaries(partition, n):
                continue
            sync = self._syncs.get(partition, PartitionSync())
            partitions.append(
                {
                    "partition": partition,
                    "ready": self.trees.ready(partition),
                    "keys": self.trees.keys(partition),
                    "last_compared": sync.last_compared,
                    "peer": None if sync.peer is None else str(sync.peer),
                    "keys_repaired": sync.keys_repaired,
                }
            )
        return {
            "node": str(self.self_node),
            "exchanges": self.exchanges,
            "exchanges_failed": self.exchanges_failed,
            "keys_repaired": self.keys_repaired,
            "bytes": self.bytes,
            "trees_ready": self.trees.ready_count,
            "buckets": ring.buckets,
            "building": self.trees.building,
            "exchanging": self._exchanging,
            "partitions": partitions,
        }
