"""Ownership transitions from views alone (pure): phases, moves, rings, acknowledgements."""

from __future__ import annotations

from hypothesis import given, strategies as st

from kai.core.membership import Member, MembershipView, Status
from kai.core.ring import NodeId, Ring
from kai.core.transition import (
    COPYING,
    SETTLED,
    SWITCHED,
    Moves,
    Placement,
    acknowledged,
)

NODES = [NodeId("127.0.0.1", 11011 + index) for index in range(6)]
BUCKETS = 32


def view_of(statuses: dict[NodeId, Status]) -> MembershipView:
    return MembershipView(tuple(Member(node, statuses[node], 1) for node in sorted(statuses)))


def placement_of(view: MembershipView, n: int = 3) -> Placement:
    return Placement.of(view, Moves.of(view, n, buckets=BUCKETS, virtual_nodes=8))


def test_a_view_with_nobody_joining_or_leaving_is_settled_on_one_ring() -> None:
    placement = placement_of(view_of(dict.fromkeys(NODES[:3], "valid")))
    assert placement.phase == SETTLED
    assert placement.ring.nodes == tuple(NODES[:3])
    assert placement.also is None
    assert placement.missing == ()


def test_a_join_copies_first_then_switches_once_every_copy_is_recorded() -> None:
    view = view_of({**dict.fromkeys(NODES[:3], "valid"), NODES[3]: "joining"})
    copying = placement_of(view)
    assert copying.phase == COPYING
    # Reads stay on the members holding the data; writes reach the joiner's partitions too.
    assert copying.ring.nodes == tuple(NODES[:3])
    assert copying.also is not None
    assert copying.also.nodes == tuple(NODES[:4])
    assert copying.missing
    assert {node for _partition, node in copying.missing} == {NODES[3]}
    half = view.with_completions(copying.missing[:-1])
    assert placement_of(half).phase == COPYING
    assert placement_of(half).missing == copying.missing[-1:]
    switched = placement_of(view.with_completions(copying.missing))
    assert switched.phase == SWITCHED
    assert switched.ring.nodes == tuple(NODES[:4])
    assert switched.also is not None
    assert switched.also.nodes == tuple(NODES[:3])
    assert switched.finalized(view) == {NODES[3]: "valid"}


def test_completions_of_another_transition_do_not_count() -> None:
    view = view_of({**dict.fromkeys(NODES[:3], "valid"), NODES[3]: "joining"})
    missing = placement_of(view).missing
    done = view.with_completions(missing)
    # Another change (a second joiner) is a new transition: every copy is owed again.
    again = done.with_status(NODES[4], "joining")
    assert placement_of(again).phase == COPYING
    assert placement_of(again).missing
    assert not again.completions()


def test_a_leave_moves_the_leavers_partitions_to_the_others() -> None:
    view = view_of({**dict.fromkeys(NODES[:3], "valid"), NODES[3]: "leaving"})
    placement = placement_of(view)
    assert placement.phase == COPYING
    assert placement.ring.nodes == tuple(NODES[:4])
    assert NODES[3] not in {node for _p, node in placement.missing}
    switched = placement_of(view.with_completions(placement.missing))
    assert switched.ring.nodes == tuple(NODES[:3])
    assert switched.finalized(view) == {NODES[3]: "left"}


def test_a_new_cluster_whose_members_all_join_moves_nothing() -> None:
    placement = placement_of(view_of(dict.fromkeys(NODES[:3], "joining")))
    assert placement.phase == SWITCHED
    assert placement.missing == ()
    assert placement.ring.nodes == tuple(NODES[:3])


def test_everyone_leaving_leaves_the_ring_as_it_is() -> None:
    placement = placement_of(view_of(dict.fromkeys(NODES[:3], "leaving")))
    assert placement.phase == SETTLED
    assert placement.ring.nodes == tuple(NODES[:3])


@given(
    before=st.sets(st.sampled_from(NODES), min_size=1, max_size=5),
    after=st.sets(st.sampled_from(NODES), min_size=1, max_size=5),
    n=st.integers(1, 3),
)
def test_moves_are_exactly_the_new_primaries_of_each_partition(
    before: set[NodeId], after: set[NodeId], n: int
) -> None:
    statuses: dict[NodeId, Status] = {}
    for node in before | after:
        if node in before and node in after:
            statuses[node] = "valid"
        else:
            statuses[node] = "leaving" if node in before else "joining"
    moves = Moves.of(view_of(statuses), n, buckets=BUCKETS, virtual_nodes=8)
    old = Ring(before, buckets=BUCKETS, virtual_nodes=8)
    new = Ring(after, buckets=BUCKETS, virtual_nodes=8)
    expected = {}
    if before != after:
        for partition in range(BUCKETS):
            owners = [
                x for x in new.primaries(partition, n) if x not in old.primaries(partition, n)
            ]
            if owners:
                expected[partition] = tuple(owners)
    assert moves.owners == expected
    assert moves.settled == (before == after)


def test_a_phase_is_acknowledged_only_when_every_node_applied_that_very_state() -> None:
    view = view_of({**dict.fromkeys(NODES[:3], "valid"), NODES[3]: "joining"})
    placement = placement_of(view)
    nodes = NODES[:4]
    for node in nodes[:-1]:
        view = view.with_applied(node, placement.phase, placement.mark)
    assert not acknowledged(view, placement, nodes, COPYING)
    assert acknowledged(view, placement, nodes[:-1], COPYING)
    view = view.with_applied(nodes[-1], placement.phase, placement.mark ^ 1)  # another state
    assert not acknowledged(view, placement, nodes, COPYING)
    view = view.with_applied(nodes[-1], placement.phase, placement.mark)
    assert not acknowledged(view, placement, nodes, COPYING)  # a lower mark does not win
    fresh = view_of({**dict.fromkeys(NODES[:3], "valid"), NODES[3]: "joining"})
    for node in nodes:
        fresh = fresh.with_applied(node, placement.phase, placement.mark)
    assert acknowledged(fresh, placement, nodes, COPYING)
    assert not acknowledged(fresh, placement, nodes, SWITCHED)
