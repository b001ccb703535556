"""Hinted handoff (DESIGN §5): writes kept for a replica that could not take them, and their
delivery once it is back.

A write whose primary is down is stored by a fallback as a *hint* naming that primary
(sloppy quorum), and a coordinator whose replication to a primary failed keeps one itself
when no fallback took it. Hints live under the storage engine's own prefix, keyed by
``(owner, partition, key)``, so they survive restarts; each is the sibling set meant for the
owner, merged with any earlier hint for the same key (two writes meant for one owner are
both kept). :class:`HintedHandoff` offers each owner that is up its hints as a transfer
(:mod:`kai.cluster.transfers`), and a hint is deleted only once the owner has merged it, and
only if it did not change meanwhile.

It must never drop a hint the owner did not acknowledge, store a hint in the data records
(a fallback is not a replica of the key), or deliver to a node other than the owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import trio

from kai.cluster.transfers import Cursor, Item, Transfers
from kai.core.ring import NodeId, key_hash, partition_of
from kai.core.storage import StorageEngine
from kai.core.versions import SiblingSet, decode_siblings, encode_siblings, merge

logger = logging.getLogger(__name__)

#: Reads a key's sibling set and its record as stored (None when absent).
RecordRead = Callable[[bytes], tuple[SiblingSet, bytes | None]]

#: How often (seconds) the handoff loop looks for owners that came back up.
UP_CHECK = 0.5


class HintStore:
    """The hints this node keeps, with counts kept in memory.

    Args:
        engine: the storage engine (hints namespace).
        buckets: ring partitions (a hint's storage key starts with its key's partition).
    """

    def __init__(self, engine: StorageEngine, *, buckets: int) -> None:
        self.engine = engine
        self.buckets = buckets
        self._pending: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        #: Hints stored since start (a repeat hint for the same key counts again).
        self.stored = 0
        #: Hints the owner acknowledged (and that were deleted here).
        self.delivered = 0
        self._count()

    def _count(self) -> None:
        for target in self.engine.hint_targets():
            after: Cursor | None = None
            while batch := self.engine.hints(target, start_after=after, limit=4096):
                self._pending[target] = self._pending.get(target, 0) + len(batch)
                self._bytes[target] = self._bytes.get(target, 0) + sum(len(r) for *_, r in batch)
                after = batch[-1][0], batch[-1][1]

    @property
    def kept(self) -> bool:
        """Whether this node keeps any hint."""
        return bool(self._pending)

    @property
    def pending(self) -> int:
        """Hints kept, for every owner."""
        return sum(self._pending.values())

    def owners(self) -> list[NodeId]:
        """The owners this node keeps hints for."""
        owners = []
        for target in self._pending:
            try:
                owners.append(NodeId.parse(target))
            except ValueError:
                logger.warning("hints for %r, which is not a node address, are kept", target)
        return owners

    def pending_for(self, owner: NodeId) -> tuple[int, int]:
        """Hints and their bytes kept for ``owner``."""
        target = str(owner)
        return self._pending.get(target, 0), self._bytes.get(target, 0)

    def add(self, owner: NodeId, key: bytes, record: bytes) -> None:
        """Keep ``record`` (a sibling set) for ``owner``, merged with any hint already kept
        for ``key``."""
        target, partition = str(owner), partition_of(key_hash(key), self.buckets)
        kept = self.engine.get_hint(target, partition, key)
        if kept is None:
            self._pending[target] = self._pending.get(target, 0) + 1
        elif kept != record:
            merged = merge(decode_siblings(kept), decode_siblings(record))
            record = encode_siblings(merged)
            self._bytes[target] = self._bytes.get(target, 0) - len(kept)
        else:
            return
        self._bytes[target] = self._bytes.get(target, 0) + len(record)
        self.engine.put_hint(target, partition, key, record)
        self.stored += 1

    def record_for(self, key: bytes) -> bytes | None:
        """Every version the hints kept for ``key`` hold, for any owner, as one record
        (None when there is none)."""
        if not self._pending:
            return None
        partition = partition_of(key_hash(key), self.buckets)
        records = []
        for target in self._pending:
            record = self.engine.get_hint(target, partition, key)
            if record is not None:
                records.append(record)
        if len(records) < 2:
            return records[0] if records else None
        merged: SiblingSet = ()
        for record in records:
            merged = merge(merged, decode_siblings(record))
        return encode_siblings(merged)

    def reader(self, read_record: RecordRead) -> RecordRead:
        """``read_record`` as it is when no hint is kept; else one that answers from the
        hints for a key it holds no data of (a fallback standing in for a primary)."""
        if not self._pending:
            return read_record

        def read(key: bytes) -> tuple[SiblingSet, bytes | None]:
            siblings, record = read_record(key)
            if record is None:
                record = self.record_for(key)
                if record is not None:
                    siblings = decode_siblings(record)
            return siblings, record

        return read

    def source(self, owner: NodeId) -> HintSource:
        """The hints for ``owner``, as a transfer source."""
        return HintSource(self, owner)

    def remove_delivered(self, owner: NodeId, items: list[Item]) -> None:
        """Delete the hints ``owner`` acknowledged, unless they changed since they were read
        (a later write's hint: sent in a later transfer)."""
        target = str(owner)
        for (partition, key), _key, record in items:
            if self.engine.get_hint(target, partition, key) != record:
                continue
            self.engine.delete_hint(target, partition, key)
            self.delivered += 1
            self._bytes[target] = self._bytes.get(target, 0) - len(record)
            left = self._pending.get(target, 0) - 1
            if left > 0:
                self._pending[target] = left
            else:
                self._pending.pop(target, None)
                self._bytes.pop(target, None)


class HintSource:
    """The hints kept for one owner, in storage order, as a transfer source."""

    kind: str = "hints"
    partition: int | None = None

    def __init__(self, store: HintStore, owner: NodeId) -> None:
        self.store = store
        self.owner = owner

    def remaining(self) -> tuple[int, int]:
        """Hints and bytes kept for the owner."""
        return self.store.pending_for(self.owner)

    def read(self, after: Cursor | None, keys: int, size: int) -> list[Item]:
        """The next hints after ``after``, up to ``keys`` of them and about ``size`` bytes."""
        hints = self.store.engine.hints(str(self.owner), start_after=after, limit=keys)
        items: list[Item] = []
        total = 0
        for partition, key, record in hints:
            if items and total + len(record) > size:
                break
            items.append(((partition, key), key, record))
            total += len(record)
        return items

    def delivered(self, items: list[Item]) -> None:
        """The owner merged ``items``: delete those hints."""
        self.store.remove_delivered(self.owner, items)


class HintedHandoff:
    """Offers every owner that is up the hints kept for it, as transfers.

    Args:
        store: the hints.
        transfers: the transfer service the handoffs run in.
        is_up: the failure detector's opinion of a node.
        transitions: the failure detector's count of up/down changes (a change means an
            owner may be back: offer at once instead of at the next ``interval``).
        members: the ring's current members (hints for a node that left are kept, not sent).
        interval: seconds between offers to owners that are up.
    """

    def __init__(
        self,
        store: HintStore,
        transfers: Transfers,
        *,
        is_up: Callable[[NodeId], bool],
        transitions: Callable[[], int],
        members: Callable[[], Collection[NodeId]],
        interval: float,
    ) -> None:
        self.store = store
        self.transfers = transfers
        self.is_up = is_up
        self.transitions = transitions
        self.members = members
        self.interval = interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Offer hints every ``interval``, and soon after any node comes back up."""
        task_status.started()
        seen = self.transitions()
        next_offer = trio.current_time()
        while True:
            now = trio.current_time()
            changes = self.transitions()
            if now >= next_offer or changes != seen:
                seen = changes
                next_offer = now + self.interval
                self.offer()
            await trio.sleep(min(UP_CHECK, self.interval))

    def offer(self) -> int:
        """Start a handoff to every owner with hints that is up and a member; how many
        started (the rest wait for a free transfer slot or for the owner)."""
        members = self.members()
        started = 0
        for owner in self.store.owners():
            if owner not in members or not self.is_up(owner):
                continue
            if self.transfers.offer(f"hints:{owner}", owner, self.store.source(owner)):
                started += 1
        return started

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats``."""
        return [
            ("kai_hints_pending", self.store.pending),
            ("kai_hints_stored", self.store.stored),
            ("kai_hints_delivered", self.store.delivered),
        ]
