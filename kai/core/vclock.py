"""Version vectors: the causal contexts of dotted version vectors (DESIGN §3).

Pure values: no I/O, no trio, no wall-clock reads (callers pass timestamps in). A clock maps
actor ids (random per data directory and actor epoch, see DESIGN §3) to counters: ``{a: n}``
says that the events ``(a, 1)`` … ``(a, n)`` were seen. Each entry also carries the time of
its latest event, used only to prune the oldest entries (Dynamo §4.4), never to order
versions. A version's *dot* is one such event (:data:`Dot`); :meth:`VClock.covers` says
whether a context has seen it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

#: One clock entry: (actor id, counter >= 1, timestamp in microseconds).
Entry = tuple[bytes, int, int]
#: One event: (actor id, counter >= 1), the write that created a version.
Dot = tuple[bytes, int]


class Order(enum.Enum):
    """How two clocks relate."""

    EQUAL = "equal"
    BEFORE = "before"  # the left clock is an ancestor of the right one
    AFTER = "after"  # the left clock descends from the right one
    CONCURRENT = "concurrent"


def _check_entries(_instance: object, _attribute: object, entries: tuple[Entry, ...]) -> None:
    previous: bytes | None = None
    for actor, counter, timestamp in entries:
        if not actor:
            raise ValueError(f"clock actor must be non-empty bytes, not {actor!r}")
        if previous is not None and actor <= previous:
            raise ValueError("clock entries must be sorted by actor without duplicates")
        if counter < 1 or timestamp < 0:
            raise ValueError(f"bad clock entry {(actor, counter, timestamp)!r}")
        previous = actor


@attrs.frozen(slots=True)
class VClock:
    """An immutable vector clock. Entries are sorted by actor; counters are >= 1."""

    entries: tuple[Entry, ...] = attrs.field(default=(), validator=_check_entries)

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> VClock:
        """Build a clock from entries in any order (validated)."""
        return cls(tuple(sorted(entries)))

    @classmethod
    def _trusted(cls, entries: tuple[Entry, ...]) -> VClock:
        # Entries produced by this module's own operations are sorted and valid by
        # construction; skip re-validation on these hot paths.
        clock = object.__new__(cls)
        object.__setattr__(clock, "entries", entries)
        return clock

    def __len__(self) -> int:
        return len(self.entries)

    def counter(self, actor: bytes) -> int:
        """The counter of ``actor`` (0 when absent)."""
        for entry_actor, counter, _ in self.entries:
            if entry_actor == actor:
                return counter
        return 0

    def covers(self, dot: Dot) -> bool:
        """Whether this context has seen the event ``dot``."""
        actor, counter = dot
        for entry_actor, entry_counter, _ in self.entries:
            if entry_actor == actor:
                return entry_counter >= counter
        return False

    def including(self, dot: Dot, timestamp: int) -> VClock:
        """This context joined with one event (its entry moves up to the dot if behind)."""
        actor, counter = dot
        entries = self.entries
        for index, (entry_actor, entry_counter, _) in enumerate(entries):
            if entry_actor == actor:
                if entry_counter >= counter:
                    return self
                entry = (actor, counter, timestamp)
                return VClock._trusted((*entries[:index], entry, *entries[index + 1 :]))
        return VClock._trusted(tuple(sorted((*entries, (actor, counter, timestamp)))))

    def counters(self) -> dict[bytes, int]:
        """The clock as a plain ``{actor: counter}`` mapping (timestamps dropped)."""
        return {actor: counter for actor, counter, _ in self.entries}

    def descends(self, other: VClock) -> bool:
        """Whether this clock is equal to or a descendant of ``other``."""
        theirs = other.entries
        if not theirs:
            return True
        mine = self.entries
        if len(theirs) > len(mine):
            return False  # other has an actor this clock lacks
        if len(mine) <= 4:
            # Clocks hold about N entries: a scan beats building a dict.
            for actor, counter, _ in theirs:
                for my_actor, my_counter, _ in mine:
                    if my_actor == actor:
                        if my_counter < counter:
                            return False
                        break
                else:
                    return False
            return True
        counters = self.counters()
        return all(counters.get(actor, 0) >= counter for actor, counter, _ in theirs)

    def compare(self, other: VClock) -> Order:
        """The order between this clock (left) and ``other`` (right)."""
        forward = self.descends(other)
        backward = other.descends(self)
        if forward and backward:
            return Order.EQUAL
        if forward:
            return Order.AFTER
        if backward:
            return Order.BEFORE
        return Order.CONCURRENT

    def same_as(self, other: VClock) -> bool:
        """Equal as clocks: the same counters (timestamps are not part of the order)."""
        return self.counters() == other.counters()

    def merge(self, other: VClock) -> VClock:
        """The least upper bound: per actor the larger counter (then the later timestamp)."""
        if not other.entries:
            return self
        if not self.entries:
            return other
        merged: dict[bytes, tuple[int, int]] = {}
        for actor, counter, timestamp in (*self.entries, *other.entries):
            seen = merged.get(actor)
            if seen is None or (counter, timestamp) > seen:
                merged[actor] = (counter, timestamp)
        return VClock._trusted(tuple(sorted((a, c, t) for a, (c, t) in merged.items())))

    def with_counter(self, actor: bytes, counter: int, timestamp: int) -> VClock:
        """This clock with ``actor``'s entry set to ``counter`` (which must not decrease)."""
        if counter < self.counter(actor):
            raise ValueError("a clock entry may only move forward")
        entries = [entry for entry in self.entries if entry[0] != actor]
        entries.append((actor, counter, timestamp))
        entries.sort()
        return VClock._trusted(tuple(entries))

    def increment(self, actor: bytes, timestamp: int) -> VClock:
        """This clock with ``actor``'s counter advanced by one."""
        return self.with_counter(actor, self.counter(actor) + 1, timestamp)

    def prune(self, max_entries: int) -> tuple[VClock, int]:
        """Drop the oldest entries (by timestamp, then actor) beyond ``max_entries``.

        Returns the pruned clock and how many entries were dropped. Pruning can make a later
        version look concurrent with an ancestor (a false sibling), never the reverse, so it
        never loses a write; it is counted in stats so operators can see it happen.
        """
        excess = len(self.entries) - max_entries
        if excess <= 0:
            return self, 0
        oldest_first = sorted(self.entries, key=lambda entry: (entry[2], entry[0]))
        kept = sorted(oldest_first[excess:])
        return VClock._trusted(tuple(kept)), excess
