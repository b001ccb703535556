"""This node's replica of the data: sibling sets in the storage engine, the write rule applied.

Synchronous on purpose: a point read or write is one LevelDB call (microseconds), and doing
read-compute-write without an ``await`` in between makes each call atomic with respect to
every other task on this node. Never awaits, never talks to the network.

Nothing reaped comes back: :meth:`LocalReplica.apply` (the one merge path of replication,
read repair, handoff, transfers and anti-entropy) refuses versions older than
``tombstone_grace`` that this replica never saw, and :meth:`LocalReplica.reap` deletes a key
only if its record is still exactly the one the reaper found dead everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import msgpack

from kai.core.errors import TooManySiblings
from kai.core.ring import key_hash, partition_of
from kai.core.stats import NodeStats
from kai.core.storage import StorageEngine
from kai.core.vclock import VClock
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    context_of,
    decode_siblings,
    encode_siblings,
    merge,
    new_version,
    newest,
)
from kai.logs import RateLimitedLog

logger = logging.getLogger(__name__)

#: Metadata name of this data directory's actor id (its current actor epoch).
ACTOR_META = "actor_id"
#: Bytes in an actor id.
ACTOR_ID_SIZE = 8

#: Told of every change to a stored record: ``(partition, key, old record, new record)``, each
#: None when absent (anti-entropy keeps its hash trees current with it).
OnChange = Callable[[int, bytes, bytes | None, bytes | None], None]

#: Metadata name of the pending and past flush_all times.
FLUSH_META = "flush_times"
#: How many flush_all times are remembered (older ones are superseded by later ones).
MAX_FLUSH_TIMES = 16
#: Seconds between two warnings about refused stale versions (the ones between are counted).
STALE_LOG_INTERVAL = 60.0


def load_or_create_actor(engine: StorageEngine) -> bytes:
    """This data directory's actor id, created on first use and persisted (DESIGN §3).

    A wiped data directory gets a new id, so a node that lost its history can never reuse
    counters that other replicas already hold.
    """
    actor = engine.get_meta(ACTOR_META)
    if actor is None:
        actor = os.urandom(ACTOR_ID_SIZE)
        engine.put_meta(ACTOR_META, actor)
        logger.info("new data directory: actor id %s", actor.hex())
    return actor


class SiblingCache:
    """A bounded cache of decoded sibling sets and their records, evicting the oldest inserted
    entries first.

    Each entry keeps the set as stored (the record, which replica reads send and quorum reads
    compare byte for byte) next to the decoded versions (which local reads use), so neither
    path decodes or encodes. The budget counts value and record bytes plus a fixed overhead
    per version, so a few huge values cannot hold unbounded memory. Absent keys are cached too
    (as empty sets without a record), so repeated misses skip storage as well.
    """

    #: Bytes charged per cached key and per version besides the value itself.
    OVERHEAD = 256

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self.hits = 0
        self.misses = 0
        # An OrderedDict, not a dict: evicting from the front of a plain dict gets slower with
        # every eviction (iteration skips the holes left behind), popitem(last=False) does not.
        self._entries: OrderedDict[bytes, tuple[SiblingSet, bytes | None, int]] = OrderedDict()

    def _cost(self, key: bytes, siblings: SiblingSet, record: bytes | None) -> int:
        cost = self.OVERHEAD + len(key) + (len(record) if record is not None else 0)
        for version in siblings:
            cost += self.OVERHEAD + (len(version.value) if version.value is not None else 0)
        return cost

    def get(self, key: bytes) -> SiblingSet | None:
        """The cached sibling set, or None when the key is not cached."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def get_record(self, key: bytes) -> tuple[SiblingSet, bytes | None] | None:
        """The cached sibling set and its record (None for an absent key), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0], entry[1]

    def put(self, key: bytes, siblings: SiblingSet, record: bytes | None) -> None:
        """Cache (or replace) ``key``'s sibling set and its record, evicting old entries to
        fit. ``record`` must decode to ``siblings`` (None when the set is empty)."""
        if not self.budget:
            return
        entries = self._entries
        previous = entries.pop(key, None)
        if previous is not None:
            self.size -= previous[2]
        cost = self._cost(key, siblings, record)
        if cost > self.budget // 4:
            return  # one entry may not take over the cache
        while self.size + cost > self.budget and entries:
            _, (_, _, evicted_cost) = entries.popitem(last=False)  # the oldest entry
            self.size -= evicted_cost
        entries[key] = (siblings, record, cost)
        self.size += cost

    def __len__(self) -> int:
        return len(self._entries)


class LocalReplica:
    """Reads and writes this node's sibling sets.

    Args:
        engine: the storage engine holding the records.
        actor: this data directory's actor id (DESIGN §3); replaced by a new actor epoch when
            a write shows that this replica lost history (persisted in ``engine``).
        buckets: number of ring partitions (the storage key prefix).
        stats: counters to update.
        clock_max_entries: prune clocks beyond this many entries.
        siblings_warning_threshold: log a warning when a key has more siblings than this.
        siblings_maximum: refuse writes that would leave more siblings than this.
        cache_bytes: budget of the cache of decoded sibling sets (values' bytes); 0 disables.
        wall_clock: unix time in seconds (injectable for tests).
        tombstone_grace: seconds after which a dead version may be reaped; merges refuse
            versions older than this that this replica never saw (they may belong to a key
            reaped here).

    Every read and write of data records must go through this class: it keeps a
    write-through cache of recently used keys in front of the engine.
    """

    def __init__(
        self,
        engine: StorageEngine,
        *,
        actor: bytes,
        buckets: int,
        stats: NodeStats,
        clock_max_entries: int = 10,
        siblings_warning_threshold: int = 25,
        siblings_maximum: int = 100,
        cache_bytes: int = 0,
        wall_clock: Callable[[], float] = time.time,
        tombstone_grace: float = 86400.0,
    ) -> None:
        self.engine = engine
        self.actor = actor
        self.buckets = buckets
        self.stats = stats
        self.clock_max_entries = clock_max_entries
        self.siblings_warning_threshold = siblings_warning_threshold
        self.siblings_maximum = siblings_maximum
        self.wall_clock = wall_clock
        self.tombstone_grace = tombstone_grace
        self._stale_log: RateLimitedLog[str] = RateLimitedLog(
            logger, logging.WARNING, STALE_LOG_INTERVAL
        )
        self.cache = SiblingCache(cache_bytes)
        #: Told of every stored record that changes (see :data:`OnChange`); set once, by
        #: whatever keeps a summary of the data (anti-entropy's hash trees).
        self.on_change: OnChange | None = None
        self._items = 0
        self._item_bytes = 0
        self._last_timestamp = 0
        self._flush_times = self._load_flush_times()
        # The flush cutoff the item counts were made under (versions at or before it are not
        # counted), and the next flush time after it that will reset them (None: none pending).
        self._counted_after = 0
        self._next_flush: int | None = None
        self._plan_count_reset()

    # --- reads --------------------------------------------------------------------------------

    def partition(self, key: bytes) -> int:
        """The ring partition ``key`` belongs to."""
        return partition_of(key_hash(key), self.buckets)

    def read(self, key: bytes) -> SiblingSet:
        """The stored sibling set of ``key`` (empty when absent)."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        return self._fetch(self.partition(key), key)[0]

    def _load(self, partition: int, key: bytes) -> tuple[SiblingSet, bytes | None]:
        cached = self.cache.get_record(key)
        if cached is not None:
            return cached
        return self._fetch(partition, key)

    def read_record(self, key: bytes) -> tuple[SiblingSet, bytes | None]:
        """The stored sibling set of ``key`` and its record as stored (None when absent)."""
        cached = self.cache.get_record(key)
        if cached is not None:
            return cached
        return self._fetch(self.partition(key), key)

    def _fetch(self, partition: int, key: bytes) -> tuple[SiblingSet, bytes | None]:
        """Read ``key`` from storage (a cache miss) and cache it."""
        record = self.engine.get(partition, key)
        siblings = decode_siblings(record) if record is not None else ()
        self.cache.put(key, siblings, record)
        return siblings, record

    # --- writes -------------------------------------------------------------------------------

    def coordinate_write(self, key: bytes, payload: Payload, context: VClock | None) -> Version:
        """Create a new version of ``key`` as its coordinator, store it, and return it
        (see :meth:`coordinate_write_record`)."""
        return self.coordinate_write_record(key, payload, context)[0]

    def coordinate_write_record(
        self, key: bytes, payload: Payload, context: VClock | None
    ) -> tuple[Version, bytes]:
        """Create a new version of ``key`` as its coordinator and store it; return it and the
        record now stored (what replication sends: the whole sibling set, so a replica that
        gets this version also gets every sibling this one does not supersede).

        The new dot moves this actor's counter past everything stored for the key. A
        ``context`` holding a higher counter of this actor than anything stored means this
        replica lost history (a restored backup, lost data): it must not hand out those
        counters again, so it moves to a new actor epoch first (Riak's KV679).

        Args:
            key: the key.
            payload: flags, expiry and value (None writes a tombstone).
            context: the causal context the client read; None supersedes every version this
                replica stores (a memcached ``set``).

        Raises:
            TooManySiblings: the write would leave more than ``siblings_maximum`` versions.
        """
        partition = self.partition(key)
        stored, stored_record = self._load(partition, key)
        known = context_of(stored)  # every version this replica holds or has seen
        if context is None:
            context = known
        counter = known.counter(self.actor)
        if context.counter(self.actor) > counter:
            self._new_epoch(key, context.counter(self.actor), counter)
            counter = 0
        timestamp = self._timestamp()
        version, pruned = new_version(
            payload, context, (self.actor, counter + 1), timestamp, self.clock_max_entries
        )
        if pruned:
            self.stats.kai_clock_prunes += pruned
        record = self._store(partition, key, stored, stored_record, merge(stored, (version,)))
        return version, record

    def stand_in_write(
        self, key: bytes, payload: Payload, known: SiblingSet, context: VClock | None = None
    ) -> tuple[Version, SiblingSet]:
        """Create a new version of a key none of whose primaries can be reached, superseding
        ``known`` (what this node keeps of the key as hints), or exactly what ``context``
        covers when the client gave one, and return it with the sibling set to hand on;
        nothing is stored here.

        Its dot is ``(fresh actor, 1)``: an actor id used for no other event. A stand-in
        forgets the key once its hints are delivered, so a counter of its own actor could
        later be handed out again for an event that does not follow the first (Riak's
        KV679); a fresh actor cannot repeat a dot, at the price of one context entry per
        stand-in write (pruned by ``clock_max_entries`` like any other).

        Raises:
            TooManySiblings: the write would leave more than ``siblings_maximum`` versions.
        """
        version, pruned = new_version(
            payload,
            context_of(known) if context is None else context,
            (os.urandom(ACTOR_ID_SIZE), 1),
            self._timestamp(),
            self.clock_max_entries,
        )
        if pruned:
            self.stats.kai_clock_prunes += pruned
        siblings = merge(known, (version,))
        self._check_siblings(key, siblings)
        return version, siblings

    def _new_epoch(self, key: bytes, seen: int, stored: int) -> None:
        old = self.actor
        self.actor = os.urandom(ACTOR_ID_SIZE)
        self.engine.put_meta(ACTOR_META, self.actor)
        self.stats.kai_actor_epochs += 1
        logger.warning(
            "a write of %r carries counter %d of actor %s, which stores only up to %d: "
            "this replica lost history; new actor epoch %s",
            key,
            seen,
            old.hex(),
            stored,
            self.actor.hex(),
        )

    def apply(
        self,
        key: bytes,
        incoming: SiblingSet,
        record: bytes | None = None,
        *,
        from_owner: bool = False,
    ) -> bool:
        """Merge versions coordinated elsewhere (replication, read repair, handoff, transfers,
        anti-entropy). Returns True if stored.

        Versions older than ``tombstone_grace`` that this replica neither stores nor has seen
        are dropped first (counted in ``kai_stale_refused``, see :meth:`_refuse_stale`): the
        key may have been reaped here, and it must not come back.

        ``from_owner``: ``incoming`` is an owner's copy of the key, sent to this replica
        because it becomes an owner (an ownership transfer). Its old versions are not
        refused: an owner holds nothing that was reaped elsewhere, since reaping needs every
        owner to hold the same record, and this replica never held the key before.

        ``record``, if given, is what ``incoming`` was decoded from: when nothing was dropped
        and the merge comes to exactly the incoming versions (a newer write replacing what
        this replica had) it is stored as it is instead of encoding the same versions again.

        Raises:
            TooManySiblings: the merge would leave more than ``siblings_maximum`` versions.
        """
        partition = self.partition(key)
        stored, stored_record = self._load(partition, key)
        cutoff = int((self.wall_clock() - self.tombstone_grace) * 1_000_000)
        for version in () if from_owner else incoming:
            if version.timestamp < cutoff:
                kept = self._refuse_stale(key, stored, incoming, cutoff)
                if len(kept) != len(incoming):
                    incoming, record = kept, None
                break
        merged = merge(stored, incoming)
        if merged == stored:
            return False
        as_is = record if merged == incoming else None
        self._store(partition, key, stored, stored_record, merged, as_is)
        return True

    def _refuse_stale(
        self, key: bytes, stored: SiblingSet, incoming: SiblingSet, cutoff: int
    ) -> SiblingSet:
        """``incoming`` without the versions stamped before ``cutoff`` (microseconds) whose
        dots ``stored`` does not cover; counts and warns (rate-limited) about those."""
        seen = context_of(stored)
        kept = tuple(
            version
            for version in incoming
            if version.timestamp >= cutoff or seen.covers(version.dot)
        )
        refused = len(incoming) - len(kept)
        if refused:
            self.stats.kai_stale_refused += refused
            self._stale_log.log(
                "stale",
                "refused %d version(s) of %r older than tombstone_grace (%.0f s) that this "
                "replica never saw: the key may have been reaped here, and a reaped key must "
                "not come back; a node that was away longer than tombstone_grace must be "
                "wiped and rejoined",
                refused,
                key,
                self.tombstone_grace,
            )
        return kept

    def reap(self, key: bytes, record: bytes) -> bool:
        """Delete ``key`` for good if its stored record is byte for byte ``record`` (a write
        since the reaper looked wins). Returns whether it was deleted.

        Only the reaper calls this, for a record whose every version has been dead for longer
        than ``tombstone_grace`` on every primary.
        """
        if not self.forget(key, record):
            return False
        self.stats.kai_tombstones_reaped += 1
        return True

    def forget(self, key: bytes, record: bytes) -> bool:
        """Delete this replica's copy of ``key`` if its stored record is byte for byte
        ``record``; whether it was deleted. For the reaper, and for the partitions an
        ownership change took away from this node (their new owners hold them)."""
        partition = self.partition(key)
        stored_record = self.engine.get(partition, key)
        if stored_record != record:
            return False
        old = decode_siblings(record)
        on_change = self.on_change
        if on_change is not None:
            on_change(partition, key, record, None)
        self.engine.delete(partition, key)
        self.cache.put(key, (), None)
        self._count(old, -1)
        return True

    def _store(
        self,
        partition: int,
        key: bytes,
        old: SiblingSet,
        old_record: bytes | None,
        new: SiblingSet,
        record: bytes | None = None,
    ) -> bytes:
        self._check_siblings(key, new)
        if record is None:
            record = encode_siblings(new)
        on_change = self.on_change
        if on_change is not None:
            on_change(partition, key, old_record, record)
        self.engine.put(partition, key, record)
        self.cache.put(key, new, record)
        self._count(old, -1)
        self._count(new, +1)
        self.stats.total_items += 1
        return record

    def _check_siblings(self, key: bytes, siblings: SiblingSet) -> None:
        if len(siblings) > self.siblings_maximum:
            self.stats.kai_sibling_rejections += 1
            raise TooManySiblings(
                f"key {key!r} would have {len(siblings)} siblings "
                f"(maximum {self.siblings_maximum}); resolve them with gets/cas"
            )
        if len(siblings) > self.siblings_warning_threshold:
            self.stats.kai_sibling_warnings += 1
            logger.warning("key %r has %d siblings", key, len(siblings))

    def _count(self, siblings: SiblingSet, sign: int) -> None:
        if self._next_flush is not None:
            self._apply_flushes()
        latest = newest(siblings)
        if latest is not None and latest.value is not None:
            if latest.timestamp <= self._counted_after:
                return  # flushed: it was not counted
            # Never below zero: a version counted before a flush it outlived (stamped after
            # the flush time elsewhere, see docs/decisions.md) was dropped from the count.
            self._items = max(0, self._items + sign)
            self._item_bytes = max(0, self._item_bytes + sign * len(latest.value))

    def _timestamp(self) -> int:
        # Microseconds, strictly increasing on this node even if the wall clock steps back, so
        # the newest-sibling view never prefers an older local write.
        now = int(self.wall_clock() * 1_000_000)
        self._last_timestamp = max(now, self._last_timestamp + 1)
        return self._last_timestamp

    # --- item accounting ----------------------------------------------------------------------

    @property
    def items(self) -> int:
        """Keys whose newest version holds a value written after the last flush_all in effect
        (memcached's ``curr_items``; expired items count until they are overwritten)."""
        if self._next_flush is not None:
            self._apply_flushes()
        return self._items

    @property
    def item_bytes(self) -> int:
        """The value bytes of the keys :attr:`items` counts (memcached's ``bytes``)."""
        if self._next_flush is not None:
            self._apply_flushes()
        return self._item_bytes

    def count_items(self) -> None:
        """Recount ``items`` and ``item_bytes`` with a full scan (run in a thread at start)."""
        cutoff = self.flushed_before(self.wall_clock())
        items = item_bytes = 0
        for _partition, _key, record in self.engine.scan_all():
            latest = newest(decode_siblings(record))
            if latest is not None and latest.value is not None and latest.timestamp > cutoff:
                items += 1
                item_bytes += len(latest.value)
        self._items, self._item_bytes = items, item_bytes
        self._counted_after = cutoff
        self._plan_count_reset()

    def _apply_flushes(self) -> None:
        """Reset the counts once a flush_all newer than the one they were made under is in
        effect: every version counted so far was written at or before it (this node's own
        writes are stamped on its clock, and the flush is in effect by that clock)."""
        cutoff = self.flushed_before(self.wall_clock())
        if cutoff > self._counted_after:
            self._counted_after = cutoff
            self._items = self._item_bytes = 0
            self._plan_count_reset()

    def _plan_count_reset(self) -> None:
        later = [t for t in self._flush_times if t > self._counted_after]
        self._next_flush = min(later) if later else None

    # --- flush_all ----------------------------------------------------------------------------

    def _load_flush_times(self) -> list[int]:
        raw = self.engine.get_meta(FLUSH_META)
        return sorted(msgpack.unpackb(raw)) if raw else []

    def covering(self, at: int) -> int:
        """A flush time ``at`` (microseconds) that is not in the future, moved past every
        write this node made so far: a ``flush_all`` covers every write acknowledged before
        it, even those this node stamped ahead of the wall clock (its timestamps strictly
        increase, so several writes within one microsecond run ahead)."""
        if at <= int(self.wall_clock() * 1_000_000):
            return max(at, self._last_timestamp)
        return at

    def flush(self, at: int) -> None:
        """Record a flush_all taking effect at unix time ``at`` (microseconds).

        Versions written at or before ``at`` become invisible once ``at`` has passed;
        versions written later survive. Stored durably so a restart keeps the flush.
        """
        now = int(self.wall_clock() * 1_000_000)
        times = sorted({*self._flush_times, at})
        past = [t for t in times if t <= now]
        # Among flushes already in effect only the latest matters.
        kept = past[-1:] + [t for t in times if t > now]
        self._flush_times = kept[-MAX_FLUSH_TIMES:]
        self.engine.put_meta(FLUSH_META, msgpack.packb(self._flush_times))
        if at <= now:
            # Writes that follow an immediate flush must survive it, even within the same
            # microsecond: move this node's write timestamps past the flush time.
            self._last_timestamp = max(self._last_timestamp, at)
        self._plan_count_reset()

    @property
    def flush_times(self) -> tuple[int, ...]:
        """The flush_all times this replica knows (the latest past one and pending ones)."""
        return tuple(self._flush_times)

    def flushed_before(self, now: float) -> int:
        """The flush cutoff (microseconds) in effect at unix time ``now`` (0 = none).

        This node's time is never behind its own latest write stamp, so a flush that covers
        that write (:meth:`covering`) is in effect at once.
        """
        now_us = max(now * 1_000_000, self._last_timestamp)
        cutoff = 0
        for flush_time in self._flush_times:
            if flush_time <= now_us:
                cutoff = flush_time
        return cutoff
