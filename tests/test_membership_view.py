"""The membership view: merge is a join-semilattice, the wire form round-trips and is checked."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, strategies as st

from kai.core.membership import (
    MAX_FLUSH_TIMES,
    STATUSES,
    Applied,
    Completion,
    Endpoint,
    Member,
    MembershipView,
    Status,
)
from kai.core.ring import NodeId

# A small pool, so generated views often share nodes and the merge has ties to break.
NODES = [NodeId("127.0.0.1", port) for port in (11011, 11012, 11013)] + [
    NodeId("10.0.0.2", 11011),
    NodeId("10.0.0.10", 7000),
]

nodes = st.sampled_from(NODES)
statuses: st.SearchStrategy[Status] = st.sampled_from(STATUSES)


@st.composite
def views(draw: st.DrawFn) -> MembershipView:
    entries = draw(st.dictionaries(nodes, st.tuples(statuses, st.integers(1, 4))))
    members = tuple(Member(node, *entries[node]) for node in sorted(entries))
    # Up to 20 distinct times, so keeping only the latest 16 is exercised.
    times = sorted(draw(st.sets(st.integers(0, 40), max_size=20)))[-MAX_FLUSH_TIMES:]
    # Completions of one generation (a view keeps only its highest), from a small pool so
    # merges meet equal and lower generations; acknowledgements of members.
    generation = draw(st.integers(1, 3))
    done = draw(st.sets(st.tuples(st.integers(0, 2), st.integers(0, 3), nodes), max_size=6))
    completed = frozenset(Completion(generation, t, p, node) for t, p, node in done)
    acks = draw(
        st.dictionaries(
            st.sampled_from(sorted(entries) or NODES[:1]),
            st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(0, 2)),
        )
    )
    applied = tuple(Applied(node, *acks[node]) for node in sorted(acks) if node in entries)
    # Memcached addresses published by members, from small pools so merges meet ties.
    published = draw(
        st.dictionaries(
            st.sampled_from(sorted(entries) or NODES[:1]),
            st.tuples(
                st.integers(0, 3),
                st.sampled_from(["127.0.0.1", "10.0.0.2"]),
                st.integers(11211, 11213),
            ),
        )
    )
    endpoints = tuple(
        Endpoint(node, *published[node]) for node in sorted(published) if node in entries
    )
    return MembershipView(members, tuple(times), completed, applied, endpoints)


def dominates(upper: MembershipView, lower: MembershipView) -> bool:
    """Whether ``upper`` is at or above ``lower`` in the lattice (written out independently)."""
    rank = {status: index for index, status in enumerate(STATUSES)}
    for member in lower.members:
        mine = upper.member(member.node)
        if mine is None or (mine.version, rank[mine.status]) < (
            member.version,
            rank[member.status],
        ):
            return False
    latest = sorted(set(upper.flush_times) | set(lower.flush_times))[-MAX_FLUSH_TIMES:]
    if list(upper.flush_times) != latest:
        return False
    for entry in lower.applied:
        acked = upper.applied_by(entry.node)
        if acked is None or (acked.generation, acked.phase, acked.mark) < (
            entry.generation,
            entry.phase,
            entry.mark,
        ):
            return False
    for endpoint in lower.endpoints:
        mine_endpoint = upper.endpoint(endpoint.node)
        if mine_endpoint is None or (
            mine_endpoint.epoch,
            mine_endpoint.host,
            mine_endpoint.port,
        ) < (endpoint.epoch, endpoint.host, endpoint.port):
            return False
    # Completions: the upper view keeps the lower's unless it holds a higher generation.
    top = max((done.generation for done in upper.completed), default=0)
    return all(done in upper.completed or done.generation < top for done in lower.completed)


@given(views(), views())
def test_merge_is_commutative(a: MembershipView, b: MembershipView) -> None:
    assert a.merge(b) == b.merge(a)


@given(views(), views(), views())
def test_merge_is_associative(a: MembershipView, b: MembershipView, c: MembershipView) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@given(views())
def test_merge_is_idempotent(a: MembershipView) -> None:
    assert a.merge(a) == a
    assert a.merge(MembershipView()) == a


@given(views(), views())
def test_merge_is_a_least_upper_bound(a: MembershipView, b: MembershipView) -> None:
    merged = a.merge(b)
    merged.check_invariants()
    assert dominates(merged, a)
    assert dominates(merged, b)
    # Least: every entry and flush time of the merge comes from one of the inputs.
    for member in merged.members:
        assert member in a.members or member in b.members
    assert set(merged.flush_times) <= set(a.flush_times) | set(b.flush_times)
    assert set(merged.endpoints) <= set(a.endpoints) | set(b.endpoints)
    # Merging something already dominated changes nothing.
    assert merged.merge(a) == merged


@given(views(), nodes, statuses)
def test_with_status_increases_the_version(
    view: MembershipView, node: NodeId, status: Status
) -> None:
    before = view.member(node)
    updated = view.with_status(node, status)
    updated.check_invariants()
    after = updated.member(node)
    assert after is not None
    assert after.status == status
    assert after.version == (1 if before is None else before.version + 1)
    # The change wins against the old view, whichever side it is merged from.
    assert view.merge(updated) == updated
    assert updated.merge(view) == updated
    assert [m for m in updated.members if m.node != node] == [
        m for m in view.members if m.node != node
    ]


@given(views(), st.integers(0, 60))
def test_with_flush_keeps_the_latest_times(view: MembershipView, at: int) -> None:
    updated = view.with_flush(at)
    updated.check_invariants()
    assert list(updated.flush_times) == sorted({*view.flush_times, at})[-MAX_FLUSH_TIMES:]


@given(views())
def test_wire_form_round_trips(view: MembershipView) -> None:
    assert MembershipView.from_wire(view.to_wire()) == view
    packed = msgpack.packb(view.to_wire())
    assert MembershipView.from_wire(msgpack.unpackb(packed, raw=False)) == view


junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["127.0.0.1", "members", "flush_times", *STATUSES]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["members", "flush_times", "x"]) | st.text(max_size=5), inner
        )
    ),
    max_leaves=30,
)


@given(junk)
def test_from_wire_of_junk_raises_only_value_error(data: object) -> None:
    try:
        view = MembershipView.from_wire(data)
    except ValueError:
        return
    view.check_invariants()


@given(views(), st.data())
def test_from_wire_of_damaged_views_raises_only_value_error(
    view: MembershipView, data: st.DataObject
) -> None:
    wire = view.to_wire()
    entries = [list(entry) for entry in wire["members"]]  # type: ignore[attr-defined]
    if entries:
        entry = data.draw(st.sampled_from(entries))
        entry[data.draw(st.integers(0, 3))] = data.draw(junk)
    damaged = {"members": entries, "flush_times": [*view.flush_times, data.draw(junk)]}
    try:
        MembershipView.from_wire(damaged)
    except ValueError:
        return


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a map"),
        ({"flush_times": []}, "'members' list"),
        ({"members": []}, "'flush_times' list"),
        ({"members": [["127.0.0.1", 1, "valid"]], "flush_times": []}, "must be \\[host"),
        ({"members": [["127.0.0.1", 1, "gone", 1]], "flush_times": []}, "status must be one of"),
        ({"members": [["127.0.0.1", 1, "valid", 0]], "flush_times": []}, "version must be"),
        ({"members": [["127.0.0.1", True, "valid", 1]], "flush_times": []}, "int port"),
        ({"members": [["localhost", 1, "valid", 1]], "flush_times": []}, "IPv4"),
        (
            {"members": [["127.0.0.1", 2, "valid", 1], ["127.0.0.1", 1, "valid", 1]]}
            | {"flush_times": []},
            "sorted by node",
        ),
        ({"members": [], "flush_times": [2, 1]}, "sorted without repeats"),
        ({"members": [], "flush_times": list(range(17))}, "at most 16"),
        ({"members": [], "flush_times": [-1]}, "integer >= 0"),
        ({"members": [], "flush_times": ["1"]}, "must be integers"),
    ],
)
def test_from_wire_explains_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MembershipView.from_wire(data)


def test_from_wire_ignores_unknown_keys() -> None:
    view = MembershipView.single(NODES[0]).with_flush(5)
    assert MembershipView.from_wire({**view.to_wire(), "future": [1, 2]}) == view


def test_single_is_one_valid_member_at_version_one() -> None:
    view = MembershipView.single(NODES[1])
    assert view.members == (Member(NODES[1], "valid", 1),)
    assert view.flush_times == ()
    assert view.member(NODES[0]) is None
    view.check_invariants()


@pytest.mark.parametrize(("lower", "higher"), [("joining", "valid"), ("valid", "leaving")])
def test_equal_versions_break_ties_by_later_status(lower: Status, higher: Status) -> None:
    a = MembershipView((Member(NODES[0], lower, 3),))
    b = MembershipView((Member(NODES[0], higher, 3),))
    assert a.merge(b) == b.merge(a) == b


def test_higher_version_wins_over_later_status() -> None:
    left = MembershipView((Member(NODES[0], "left", 2),))
    rejoined = MembershipView((Member(NODES[0], "valid", 3),))
    assert left.merge(rejoined) == rejoined.merge(left) == rejoined


def test_ring_nodes_are_every_member_that_has_not_left() -> None:
    view = MembershipView(
        tuple(
            Member(node, status, 1)
            for node, status in zip(sorted(NODES), [*STATUSES, "valid"], strict=True)
        )
    )
    expected = tuple(node for node in sorted(NODES) if view.member(node).status != "left")  # type: ignore[union-attr]
    assert view.ring_nodes() == expected
    assert len(expected) == len(NODES) - 1


def test_construction_refuses_invalid_views() -> None:
    a, b = sorted(NODES)[:2]
    with pytest.raises(ValueError, match="sorted by node"):
        MembershipView((Member(b, "valid", 1), Member(a, "valid", 1)))
    with pytest.raises(ValueError, match="sorted by node"):
        MembershipView((Member(a, "valid", 1), Member(a, "left", 2)))
    with pytest.raises(ValueError, match="version must be"):
        Member(a, "valid", 0)
    with pytest.raises(ValueError, match="status must be one of"):
        Member(a, "dead", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer >= 0"):
        MembershipView().with_flush(-5)


@given(views(), nodes, st.integers(0, 5))
def test_a_later_endpoint_wins_and_an_earlier_one_changes_nothing(
    view: MembershipView, node: NodeId, epoch: int
) -> None:
    if view.member(node) is None:
        view = view.with_status(node, "joining")  # a node publishes once it is a member
    published = view.with_endpoint(node, "127.0.0.9", 12345, epoch + 10)
    endpoint = published.endpoint(node)
    assert endpoint is not None
    assert endpoint.address() == "127.0.0.9:12345"
    assert view.merge(published) == published.merge(view) == published
    assert published.with_endpoint(node, "127.0.0.8", 1, epoch) == published
    assert MembershipView.from_wire(published.to_wire()) == published


def test_a_view_without_endpoints_from_an_older_node_still_parses() -> None:
    view = MembershipView.single(NODES[0]).with_endpoint(NODES[0], "127.0.0.1", 11211, 7)
    wire = view.to_wire()
    del wire["endpoints"]
    assert MembershipView.from_wire(wire) == MembershipView.single(NODES[0])


@pytest.mark.parametrize(
    "entry",
    [
        ["127.0.0.1", 11011, -1, "127.0.0.1", 11211],
        ["127.0.0.1", 11011, 1, "", 11211],
        ["127.0.0.1", 11011, 1, "127.0.0.1", 0],
        ["127.0.0.1", 11011, 1, "127.0.0.1", 70000],
        ["127.0.0.1", 11011, 1, "127.0.0.1"],
    ],
)
def test_malformed_endpoints_are_refused(entry: list[object]) -> None:
    wire = MembershipView.single(NODES[0]).to_wire()
    wire["endpoints"] = [entry]
    with pytest.raises(ValueError, match="endpoint"):
        MembershipView.from_wire(wire)
