"""Ownership transitions (DESIGN §8): where keys live while members join and leave (pure).

A view's members on the *current* ring are the valid and leaving ones: they hold the data.
Those on the *next* ring are the joining and valid ones. When the two rings differ the
cluster is in a transition, which moves data copy → switch → delete, in phases that every
node derives from its view alone:

1. :data:`COPYING`. Reads and W use the current ring; every write also goes to the next
   ring's primaries of its key. Each partition's new owners (next primaries that are not
   current ones) are sent a copy by a current owner. Copies start only once every member
   that is up has applied this phase, so every coordinator writes to both rings by then.
2. :data:`SWITCHED`. Every copy is done (the view says so: :meth:`MembershipView.completions`).
   Reads and W use the next ring; writes still go to both. Once every member that is up has
   applied it, the statuses are finalized (joining → valid, leaving → left).
3. :data:`SETTLED`. One ring. Once every member that is up has applied it, each node deletes
   the partitions it holds data of but does not own (the old owners' copies).

So a read never asks a replica that does not hold the whole partition, a write reaches every
replica that will hold it, and an old owner deletes nothing while some node may still read
from it. This module must never do I/O; the node's ownership service acts on it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from kai.core.membership import MembershipView, Status
from kai.core.ring import NodeId, Ring

#: One ring; nothing to move.
SETTLED: Final = 0
#: New owners are being sent their copies; reads use the current ring.
COPYING: Final = 1
#: Every copy is done; reads use the next ring, writes still go to both.
SWITCHED: Final = 2

PHASE_NAMES: Final = {SETTLED: "settled", COPYING: "copying", SWITCHED: "switched"}

#: Statuses of the members that hold the data now (the current ring).
CURRENT_STATUSES: Final[frozenset[Status]] = frozenset({"valid", "leaving"})
#: Statuses of the members that will (the next ring).
NEXT_STATUSES: Final[frozenset[Status]] = frozenset({"joining", "valid"})


@attrs.frozen(eq=False)
class Moves:
    """What a transition moves, from the members alone (computed once per transition).

    Attributes:
        current: the ring of the members that hold the data (valid and leaving).
        next: the ring of the members that will (joining and valid).
        owners: for each partition whose primaries change, its new owners.
        transition: the view's :meth:`~MembershipView.transition_id`.
    """

    current: Ring
    next: Ring
    owners: dict[int, tuple[NodeId, ...]]
    transition: int
    #: Whether some member is joining or leaving (and some will be left on the ring).
    changing: bool
    #: Replicas per key (the configured N).
    n: int

    @classmethod
    def of(cls, view: MembershipView, n: int, *, buckets: int, virtual_nodes: int) -> Moves:
        """The moves of ``view``'s transition for ``n`` replicas per key.

        A view with nobody on the current ring (a new cluster whose first members are all
        joining) moves nothing: there is no data yet. Nor does one with nobody on the next
        ring (everyone leaving, which a commit refuses).
        """
        current_nodes = [m.node for m in view.members if m.status in CURRENT_STATUSES]
        next_nodes = [m.node for m in view.members if m.status in NEXT_STATUSES]
        next_ring = _ring(tuple(next_nodes), buckets, virtual_nodes)
        if not current_nodes:
            current_ring = next_ring
        else:
            current_ring = _ring(tuple(current_nodes), buckets, virtual_nodes)
            if not next_nodes:
                next_ring = current_ring  # everyone leaving: refused at commit; move nothing
        owners: dict[int, tuple[NodeId, ...]] = {}
        if current_ring != next_ring:
            for partition in range(buckets):
                old = current_ring.primaries(partition, n)
                new = [node for node in next_ring.primaries(partition, n) if node not in old]
                if new:
                    owners[partition] = tuple(new)
        changing = bool(next_nodes) and any(
            m.status in ("joining", "leaving") for m in view.members
        )
        return cls(current_ring, next_ring, owners, view.transition_id(), changing, n)

    @property
    def settled(self) -> bool:
        """Whether no member is joining or leaving (no transition)."""
        return not self.changing

    def count(self) -> int:
        """How many copies the transition needs (partition and new owner pairs)."""
        return sum(len(nodes) for nodes in self.owners.values())

    def sender(self, partition: int, is_up: Callable[[NodeId], bool]) -> NodeId | None:
        """Who sends ``partition``'s copies: its first current owner that is up (None when
        none is)."""
        return next((n for n in self.current.primaries(partition, self.n) if is_up(n)), None)


@attrs.frozen(eq=False)
class Placement:
    """Where keys live now, by a view: which ring reads and W use, and which ring's
    primaries also get every write.

    Attributes:
        moves: the transition's moves.
        phase: :data:`SETTLED`, :data:`COPYING` or :data:`SWITCHED`.
        missing: the copies not done yet, as ``(partition, new owner)``, sorted.
        mark: a fingerprint of the transition and phase (what a node acknowledges).
    """

    moves: Moves
    phase: int
    missing: tuple[tuple[int, NodeId], ...]
    mark: int

    @classmethod
    def of(cls, view: MembershipView, moves: Moves) -> Placement:
        """The placement ``view`` gives, with ``moves`` computed for its transition."""
        missing: tuple[tuple[int, NodeId], ...] = ()
        phase = SETTLED
        if not moves.settled:
            done = view.completions()
            missing = tuple(
                (partition, node)
                for partition, nodes in sorted(moves.owners.items())
                for node in nodes
                if (partition, node) not in done
            )
            phase = COPYING if missing else SWITCHED
        seed = b"%d:%d" % (moves.transition, phase)
        mark = int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "big")
        return cls(moves, phase, missing, mark)

    @property
    def ring(self) -> Ring:
        """The ring reads and W use."""
        return self.moves.current if self.phase == COPYING else self.moves.next

    @property
    def also(self) -> Ring | None:
        """The ring whose primaries of a key also get every write of it (None: settled)."""
        if self.phase == SETTLED:
            return None
        return self.moves.next if self.phase == COPYING else self.moves.current

    def nodes(self) -> tuple[NodeId, ...]:
        """Every node on either ring, sorted."""
        return tuple(sorted({*self.moves.current.nodes, *self.moves.next.nodes}))

    def finalized(self, view: MembershipView) -> dict[NodeId, Status]:
        """The status changes that end a switched transition: joining → valid, leaving →
        left."""
        final: dict[str, Status] = {"joining": "valid", "leaving": "left"}
        return {m.node: final[m.status] for m in view.members if m.status in final}


@functools.lru_cache(maxsize=8)
def _ring(nodes: tuple[NodeId, ...], buckets: int, virtual_nodes: int) -> Ring:
    """One ring per member set (transitions in a row share rings, and their cached
    preference lists)."""
    return Ring(nodes, buckets=buckets, virtual_nodes=virtual_nodes)


def acknowledged(
    view: MembershipView, placement: Placement, nodes: Iterable[NodeId], phase: int
) -> bool:
    """Whether every one of ``nodes`` has applied ``placement`` at ``phase`` (as recorded
    in ``view``)."""
    if placement.phase != phase:
        return False
    generation = view.generation()
    for node in nodes:
        entry = view.applied_by(node)
        if entry is None or (entry.generation, entry.phase, entry.mark) != (
            generation,
            phase,
            placement.mark,
        ):
            return False
    return True
