"""Versions and sibling sets: dotted version vectors, the replica write rule, merging, the
memcached view, and the record codec.

Pure code (no I/O, no trio; callers pass the current time in). DESIGN §3 is the contract:

* every version carries its *dot* (the event that created it: coordinating actor and counter)
  and the *causal context* its writer had seen (a version vector);
* a version is obsolete exactly when another version's context covers its dot; a key holds
  a *sibling set*: the versions nobody's context covers;
* merging two sibling sets is commutative and idempotent, associative for every history a
  cluster makes, and never discards a version whose dot no context covers;
* a delete is a tombstone version (``value is None``), never a physical delete on the spot.

Dots instead of plain vector clocks: one coordinator that builds two writes from one read
context gives them the dots ``(P, k+1)`` and ``(P, k+2)`` and the same context, so neither
covers the other and both stay (siblings), where the clocks ``context+{P:k+1}`` and
``context+{P:k+2}`` would have made the second look like a successor of the first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgpack

from kai.core.vclock import Dot, Entry, VClock

#: Leading byte of every stored record, so the format can evolve. Format 1 (plain vector
#: clocks) is still read; every record written is in this format, unless a version of it
#: carries a mark.
RECORD_FORMAT = 2
#: The record format before dotted version vectors.
VECTOR_CLOCK_FORMAT = 1
#: The format of a record with a marked version (:data:`STALE`, :data:`WIN_SENT`) or one with
#: an explicit cas: format 2 with each version's mark and cas after its value (records of the
#: release before explicit cas end at the mark). Records with neither never use it, so they
#: stay byte for byte what they were.
MARKED_RECORD_FORMAT = 3

#: Mark of a version that memcached's meta commands call stale (``md <key> I``, or an
#: ``ms`` with ``I`` and an outdated cas): still served, with ``X``.
STALE = 1
#: Mark of a version for which some client was told it won the right to recache it (``W``):
#: the others are told so (``Z``). Set on a version it marks without a new dot.
WIN_SENT = 2
#: Every mark a version may carry.
MARKS = STALE | WIN_SENT

#: memcached's boundary between relative and absolute expiration times (30 days).
RELATIVE_EXPTIME_LIMIT = 60 * 60 * 24 * 30


class Payload(NamedTuple):
    """What a client write carries: flags, absolute expiry, and the value (None = delete).

    Attributes:
        mark: the meta commands' marks of the new version (:data:`STALE`, :data:`WIN_SENT`).
        same_write: a version the write only re-marks: it is stored again with its own
            dot, context, timestamp and data and ``mark`` instead of its mark, so its cas
            unique stays (memcached does not change an item's cas when it hands out a
            win). The rest of the payload is ignored then.
        cas: the explicit cas unique of the new version (a meta command's ``E``); 0 for
            none.
    """

    flags: int = 0
    expiry: int = 0
    value: bytes | None = None
    mark: int = 0
    same_write: Version | None = None
    cas: int = 0


class Version(NamedTuple):
    """One version of a key's value (immutable; a named tuple, because a write builds one and
    a read of a record decodes every sibling: it is the cheapest immutable record to make).

    Attributes:
        dot: the write that created it: its coordinator's actor id and counter.
        context: what the writer had seen (never its own dot): the versions whose dots it
            covers are the ones this version supersedes.
        timestamp: wall-clock time of the write at its coordinator, in microseconds; used only
            to pick the newest sibling for the default memcached view and for flush_all.
        flags: memcached client flags (32-bit).
        expiry: absolute unix time in seconds after which the version is gone; 0 = never.
        value: the bytes, or None for a tombstone (a delete).
        mark: what memcached's meta commands know of it (:data:`STALE`, :data:`WIN_SENT`);
            0 for every version no meta command marked. Only :data:`WIN_SENT` is ever
            added to a version after it is written (same dot): copies of one write that
            differ keep the more marked one.
        cas: the cas unique a meta command's ``E`` gave it (memcached 1.6's explicit cas),
            shown while it is the key's only version (:func:`cas_of`); 0 for none.
    """

    dot: Dot
    context: VClock
    timestamp: int
    flags: int = 0
    expiry: int = 0
    value: bytes | None = None
    mark: int = 0
    cas: int = 0

    @property
    def actor(self) -> bytes:
        """The coordinator's actor id (breaks timestamp ties deterministically)."""
        return self.dot[0]

    @property
    def is_tombstone(self) -> bool:
        """Whether this version records a delete."""
        return self.value is None

    def supersedes(self, other: Version) -> bool:
        """Whether this version's writer had seen ``other`` (its context covers other's dot)."""
        return self.context.covers(other.dot)

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
        return (self.timestamp, self.dot[0])

    @property
    def is_stale(self) -> bool:
        """Whether a meta command marked it stale (``X``)."""
        return bool(self.mark & STALE)

    @property
    def win_sent(self) -> bool:
        """Whether some client was handed the win for it (``W`` once, then ``Z``)."""
        return bool(self.mark & WIN_SENT)

    def _tie_key(self) -> tuple[int, int, int, bool, bytes, tuple[Entry, ...], int, int]:
        # A total order over versions with one dot, so that merging them stays
        # deterministic: a correct cluster makes one dot twice only to add a mark (a win
        # handed out), and the more marked copy wins.
        return (
            self.timestamp,
            self.flags,
            self.expiry,
            self.value is not None,
            self.value or b"",
            self.context.entries,
            self.mark,
            self.cas,
        )


#: The versions of one key that no other version of it supersedes, in canonical (dot) order.
SiblingSet = tuple[Version, ...]


def merge(left: SiblingSet, right: SiblingSet) -> SiblingSet:
    """The join of two sibling sets: every version of either that no context covers.

    The replica write rule is the merge with a set of one: an incoming version is dropped
    when a stored version's context covers its dot (or it is stored already), and otherwise
    stored in place of every stored version whose dot its context covers. Versions with one
    dot are one write: a copy is kept (deterministically, should copies ever differ).
    """
    if not right or right == left:
        return left
    if not left:
        return right
    union = (*left, *right)
    # Some context covers a dot exactly when the join of them all does: one pass builds it.
    seen: dict[bytes, int] = {}
    for version in union:
        for actor, counter, _ in version.context.entries:
            if counter > seen.get(actor, 0):
                seen[actor] = counter
    kept = [version for version in union if seen.get(version.dot[0], 0) < version.dot[1]]
    if len(kept) > 1:
        kept.sort(key=_dot_of)
        kept = _one_per_dot(kept)
    merged = tuple(kept)
    return right if merged == right else merged


def _one_per_dot(versions: list[Version]) -> list[Version]:
    """``versions`` (in dot order) with one version per dot: the greatest by tie key."""
    unique = [versions[0]]
    for version in versions[1:]:
        last = unique[-1]
        if version.dot != last.dot:
            unique.append(version)
        elif last._tie_key() < version._tie_key():
            unique[-1] = version
    return unique


def _dot_of(version: Version) -> Dot:
    return version.dot


def context_of(siblings: Iterable[Version]) -> VClock:
    """The causal context of a read: every sibling's context and dot, joined.

    A write made with it supersedes exactly the versions read (and what they superseded).
    """
    context: VClock | None = None
    for version in siblings:
        seen = version.context.including(version.dot, version.timestamp)
        context = seen if context is None else context.merge(seen)
    return VClock() if context is None else context


def cas_unique(key: bytes, context: VClock) -> int:
    """memcached's 64-bit cas unique of ``key`` whose read's causal context is ``context``.

    A digest of the key and the context's counters, so every node derives the same token for
    the same state, siblings share it, any write to the key changes it, and different keys
    get different tokens. Never 0 (some clients treat 0 as "no cas").
    """
    hasher = hashlib.blake2b(key, digest_size=8)
    for actor, counter, _ in context.entries:
        hasher.update(len(actor).to_bytes(1, "big"))
        hasher.update(actor)
        hasher.update(counter.to_bytes(8, "big"))
    return int.from_bytes(hasher.digest(), "big") or 1


def cas_of(key: bytes, siblings: Sequence[Version]) -> int:
    """memcached's cas unique of ``key`` whose sibling set (as read) is ``siblings``.

    The explicit cas of its version when it has one version that a meta command's ``E``
    gave one; otherwise :func:`cas_unique` of the read's context. Any write without ``E``
    makes a version without one, so it changes the token as before.
    """
    if len(siblings) == 1 and siblings[0].cas:
        return siblings[0].cas
    return cas_unique(key, context_of(siblings))


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


def new_version(
    payload: Payload,
    context: VClock,
    dot: Dot,
    timestamp: int,
    max_entries: int,
) -> tuple[Version, int]:
    """The version a coordinator writes: ``payload`` at ``dot``, superseding ``context``.

    The context is pruned to ``max_entries`` entries, oldest first (Dynamo §4.4): a pruned
    context covers less, so pruning can only leave more siblings, never lose a write.
    Returns the version and how many context entries pruning dropped.
    """
    if payload.same_write is not None:
        return payload.same_write._replace(mark=payload.mark), 0
    pruned_context, pruned = context.prune(max_entries)
    version = Version(
        dot,
        pruned_context,
        timestamp,
        payload.flags,
        payload.expiry,
        payload.value,
        payload.mark,
        payload.cas,
    )
    return version, pruned


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
    for version in siblings:
        if version.mark or version.cas:
            return _encode_marked(siblings)
    payload = [
        [
            version.dot[0],
            version.dot[1],
            version.context.entries,
            version.timestamp,
            version.flags,
            version.expiry,
            version.value,
        ]
        for version in siblings
    ]
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes((RECORD_FORMAT,)) + packed


def _encode_marked(siblings: SiblingSet) -> bytes:
    payload = [
        [
            version.dot[0],
            version.dot[1],
            version.context.entries,
            version.timestamp,
            version.flags,
            version.expiry,
            version.value,
            version.mark,
            version.cas,
        ]
        for version in siblings
    ]
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes((MARKED_RECORD_FORMAT,)) + packed


def decode_siblings(record: bytes) -> SiblingSet:
    """Parse a record written by :func:`encode_siblings` (format 2 or 3), or one in format 1.

    Raises:
        ValueError: the record is not in a known format.
    """
    if not record:
        raise ValueError("empty record")
    payload = msgpack.unpackb(record[1:], raw=False, use_list=False)
    if record[0] == RECORD_FORMAT:
        # With use_list=False the context entries already are (actor, counter, timestamp)
        # tuples, written sorted by encode_siblings: use them as they are.
        return tuple(
            [
                Version(
                    (actor, counter),
                    VClock._trusted(entries),
                    timestamp,
                    flags,
                    expiry,
                    value,
                )
                for actor, counter, entries, timestamp, flags, expiry, value in payload
            ]
        )
    if record[0] == MARKED_RECORD_FORMAT:
        return tuple([_marked_version(fields) for fields in payload])
    if record[0] == VECTOR_CLOCK_FORMAT:
        return tuple(
            sorted(
                [_from_vector_clock(*fields) for fields in payload],
                key=_dot_of,
            )
        )
    raise ValueError(f"unknown record format {record[0]}")


def _marked_version(fields: tuple[Any, ...]) -> Version:
    """A version of a format-3 record: nine fields, or eight (no cas) as the release before
    explicit cas wrote them."""
    if len(fields) not in (8, 9):
        raise ValueError(f"a version in record format 3 has 8 or 9 fields, not {len(fields)}")
    actor, counter, entries, *rest = fields
    return Version((actor, counter), VClock._trusted(entries), *rest)


def _from_vector_clock(
    entries: tuple[Entry, ...],
    timestamp: int,
    actor: bytes,
    flags: int,
    expiry: int,
    value: bytes | None,
) -> Version:
    """A format-1 version (a plain vector clock) as a dotted version.

    Its coordinator's entry in the clock is the write's own event: that is the dot, and the
    rest of the clock (with that entry one lower) is what the writer had seen. Two format-1
    versions of one key never descend one another, and converted, neither covers the other.
    """
    counter = 1
    context: list[Entry] = []
    for entry_actor, entry_counter, entry_timestamp in entries:
        if entry_actor == actor:
            counter = entry_counter
            if entry_counter > 1:
                context.append((entry_actor, entry_counter - 1, entry_timestamp))
        else:
            context.append((entry_actor, entry_counter, entry_timestamp))
    return Version(
        (actor, counter), VClock._trusted(tuple(context)), timestamp, flags, expiry, value
    )


def check_sibling_set(siblings: SiblingSet) -> None:
    """Assert the invariants of a stored sibling set (used by tests).

    Raises:
        AssertionError: a version supersedes another, two share a dot, or the order is not
            canonical.
    """
    for left in siblings:
        for right in siblings:
            if left is not right:
                assert left.dot != right.dot, (left, right)
                assert not left.supersedes(right), (left, right)
    assert list(siblings) == sorted(siblings, key=_dot_of), "sibling set is not canonical"
