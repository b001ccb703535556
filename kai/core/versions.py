"""Versions and sibling sets: the replica write rule, merging, the memcached view, the codec.

Pure code (no I/O, no trio; callers pass the current time in). DESIGN §3 is the contract:

* a key holds a *sibling set*: the versions that no other stored version descends from;
* replica write rule: an incoming version is dropped if a stored version descends from or
  equals it; otherwise it is stored and every stored version it descends from is removed;
* merging two sibling sets is commutative, associative and idempotent;
* a delete is a tombstone version (``value is None``), never a physical delete on the spot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import attrs
import msgpack

from kai.core.vclock import VClock

#: Leading byte of every stored record, so the format can evolve.
RECORD_FORMAT = 1

#: memcached's boundary between relative and absolute expiration times (30 days).
RELATIVE_EXPTIME_LIMIT = 60 * 60 * 24 * 30


@attrs.frozen(slots=True)
class Version:
    """One version of a key's value.

    Attributes:
        clock: the causal history of this version.
        timestamp: wall-clock time of the write at its coordinator, in microseconds; used only
            to pick the newest sibling for the default memcached view and for flush_all.
        actor: the coordinator's actor id; breaks timestamp ties deterministically.
        flags: memcached client flags (32-bit).
        expiry: absolute unix time in seconds after which the version is gone; 0 = never.
        value: the bytes, or None for a tombstone (a delete).
    """

    clock: VClock
    timestamp: int
    actor: bytes
    flags: int = 0
    expiry: int = 0
    value: bytes | None = None

    @property
    def is_tombstone(self) -> bool:
        """Whether this version records a delete."""
        return self.value is None

    def is_live(self, now: float, flushed_before: int = 0) -> bool:
        """Whether memcached clients can see this version at unix time ``now``.

        Args:
            now: the current unix time in seconds.
            flushed_before: versions written at or before this time (microseconds) were
                flushed; 0 means no flush.
        """
        if self.value is None or self.timestamp <= flushed_before:
            return False
        return self.expiry == 0 or now < self.expiry

    def sort_key(self) -> tuple[int, bytes]:
        """Order for picking the newest sibling: (timestamp, actor)."""
        return (self.timestamp, self.actor)

    def _tie_key(self) -> tuple[int, bytes, int, int, bool, bytes]:
        # A total order over versions, used only when two versions carry equal clocks (which a
        # correct cluster never produces) so that merging stays deterministic.
        return (
            self.timestamp,
            self.actor,
            self.flags,
            self.expiry,
            self.value is not None,
            self.value or b"",
        )


#: The versions of one key that no other version of it descends from, in canonical order.
SiblingSet = tuple[Version, ...]


def _canonical(versions: Iterable[Version]) -> SiblingSet:
    return tuple(sorted(versions, key=lambda version: version.clock.entries))


def apply_write(stored: SiblingSet, incoming: Version) -> SiblingSet | None:
    """The replica write rule. Returns the new sibling set, or None if ``incoming`` is dropped.

    ``incoming`` is dropped when a stored version descends from it (a late, stale write) or
    carries an equal clock; otherwise every stored version that ``incoming`` descends from is
    replaced by it and concurrent versions stay as siblings.
    """
    kept: list[Version] = []
    for version in stored:
        if version.clock.descends(incoming.clock):
            if not incoming.clock.descends(version.clock):
                return None  # strictly newer version already stored
            # Equal clocks: the same write seen twice. Keep one, chosen deterministically.
            if incoming._tie_key() <= version._tie_key():
                return None
            continue
        if incoming.clock.descends(version.clock):
            continue  # superseded by incoming
        kept.append(version)
    kept.append(incoming)
    return _canonical(kept)


def merge(left: SiblingSet, right: SiblingSet) -> SiblingSet:
    """The union of two sibling sets under the write rule (a least upper bound)."""
    merged = left
    for version in right:
        updated = apply_write(merged, version)
        if updated is not None:
            merged = updated
    return merged


def context_of(siblings: Iterable[Version]) -> VClock:
    """The causal context of a read: the merge of every sibling's clock."""
    context = VClock()
    for version in siblings:
        context = context.merge(version.clock)
    return context


def cas_unique(context: VClock) -> int:
    """memcached's 64-bit cas unique for a key whose merged causal context is ``context``.

    A digest of the clock's counters, so every node derives the same token for the same
    state, and any write to the key changes it. Never 0 (some clients treat 0 as "no cas").
    """
    hasher = hashlib.blake2b(digest_size=8)
    for actor, counter, _ in context.entries:
        hasher.update(len(actor).to_bytes(1, "big"))
        hasher.update(actor)
        hasher.update(counter.to_bytes(8, "big"))
    return int.from_bytes(hasher.digest(), "big") or 1


def newest(siblings: Sequence[Version]) -> Version | None:
    """The newest version by (timestamp, actor), tombstones included."""
    if len(siblings) == 1:
        return siblings[0]  # the common case: no concurrent versions
    return max(siblings, key=Version.sort_key, default=None)


def visible(
    siblings: Sequence[Version], now: float, flushed_before: int = 0, *, all_siblings: bool = False
) -> list[Version]:
    """What a memcached ``get`` returns for a key.

    Default view: the newest version if it is live (a newest tombstone or expired version is
    a miss). With ``all_siblings`` every live sibling, newest first (the original Kai's view).
    """
    if all_siblings:
        live = [version for version in siblings if version.is_live(now, flushed_before)]
        live.sort(key=Version.sort_key, reverse=True)
        return live
    latest = newest(siblings)
    if latest is None or not latest.is_live(now, flushed_before):
        return []
    return [latest]


def next_clock(
    context: VClock,
    stored: Iterable[Version],
    actor: bytes,
    timestamp: int,
    max_entries: int,
) -> tuple[VClock, int]:
    """The clock of a new write coordinated by ``actor`` with causal ``context``.

    The actor's counter moves past both the context and everything this replica stored, so
    two writes by one coordinator never share a clock. Returns the clock and how many
    entries pruning dropped.
    """
    counter = context.counter(actor)
    for version in stored:
        counter = max(counter, version.clock.counter(actor))
    clock = context.with_counter(actor, counter + 1, timestamp)
    return clock.prune(max_entries)


class ReadResult:
    """What a read found for one key: every sibling, and the causal context to write with.

    The context is computed on first use: a plain ``get`` never needs it.
    """

    __slots__ = ("_context", "siblings")

    def __init__(self, siblings: SiblingSet, context: VClock | None = None) -> None:
        self.siblings = siblings
        self._context = context

    @property
    def context(self) -> VClock:
        """The merged clock of every sibling read."""
        if self._context is None:
            self._context = context_of(self.siblings)
        return self._context

    @property
    def cas_unique(self) -> int:
        """memcached's cas token for this read."""
        return cas_unique(self.context)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadResult):
            return NotImplemented
        return self.siblings == other.siblings

    def __hash__(self) -> int:
        return hash(self.siblings)

    def __repr__(self) -> str:
        return f"ReadResult({self.siblings!r})"


def absolute_expiry(exptime: int, now: float) -> int:
    """Convert a memcached exptime to absolute unix seconds (0 = never, negative = expired).

    Up to 30 days it is relative to ``now``; beyond that it is already a unix time.
    """
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1  # any time after the epoch: already expired
    if exptime <= RELATIVE_EXPTIME_LIMIT:
        return int(now) + exptime
    return exptime


# --- codec -----------------------------------------------------------------------------------


def encode_siblings(siblings: SiblingSet) -> bytes:
    """Serialise a sibling set as one storage record (msgpack behind a format byte)."""
    payload = [
        [
            version.clock.entries,
            version.timestamp,
            version.actor,
            version.flags,
            version.expiry,
            version.value,
        ]
        for version in siblings
    ]
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes((RECORD_FORMAT,)) + packed


def decode_siblings(record: bytes) -> SiblingSet:
    """Parse a record written by :func:`encode_siblings`.

    Raises:
        ValueError: the record is not in a known format.
    """
    if not record or record[0] != RECORD_FORMAT:
        raise ValueError("unknown record format")
    payload = msgpack.unpackb(record[1:], raw=False, use_list=False)
    # With use_list=False the clock entries already are (actor, counter, timestamp) tuples,
    # written sorted by encode_siblings: use them as they are.
    return tuple(
        [
            Version(VClock._trusted(entries), timestamp, actor, flags, expiry, value)
            for entries, timestamp, actor, flags, expiry, value in payload
        ]
    )


def check_sibling_set(siblings: SiblingSet) -> None:
    """Assert the invariants of a stored sibling set (used by tests).

    Raises:
        AssertionError: two versions are ordered, or the order is not canonical.
    """
    for index, left in enumerate(siblings):
        for right in siblings[index + 1 :]:
            assert left.clock.compare(right.clock).value == "concurrent", (left, right)
    assert siblings == _canonical(siblings), "sibling set is not in canonical order"
