"""Vector clocks: compare is a partial order; merge is a least upper bound."""

from __future__ import annotations

import pytest
from hypothesis import given

from kai.core.vclock import Order, VClock

from .strategies import clocks


@given(clocks())
def test_compare_is_reflexive(a: VClock) -> None:
    assert a.compare(a) is Order.EQUAL
    assert a.descends(a)


@given(clocks(), clocks())
def test_compare_is_antisymmetric(a: VClock, b: VClock) -> None:
    mirrored = {
        Order.EQUAL: Order.EQUAL,
        Order.BEFORE: Order.AFTER,
        Order.AFTER: Order.BEFORE,
        Order.CONCURRENT: Order.CONCURRENT,
    }
    assert b.compare(a) is mirrored[a.compare(b)]
    if a.descends(b) and b.descends(a):
        assert a.same_as(b)


@given(clocks(), clocks(), clocks())
def test_descends_is_transitive(a: VClock, b: VClock, c: VClock) -> None:
    if a.descends(b) and b.descends(c):
        assert a.descends(c)


@given(clocks(), clocks())
def test_merge_is_commutative_and_an_upper_bound(a: VClock, b: VClock) -> None:
    merged = a.merge(b)
    assert merged == b.merge(a)
    assert merged.descends(a)
    assert merged.descends(b)


@given(clocks(), clocks(), clocks())
def test_merge_is_associative_and_least(a: VClock, b: VClock, c: VClock) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    if c.descends(a) and c.descends(b):
        assert c.descends(a.merge(b))


@given(clocks())
def test_merge_is_idempotent(a: VClock) -> None:
    assert a.merge(a) == a
    assert a.merge(VClock()) == a


@given(clocks())
def test_increment_strictly_descends(a: VClock) -> None:
    later = a.increment(b"actor-z", 5)
    assert later.compare(a) is Order.AFTER
    assert later.counter(b"actor-z") == a.counter(b"actor-z") + 1


def test_dynamo_paper_example() -> None:
    # D1 [(Sx,1)] -> D2 [(Sx,2)] -> D3 [(Sx,2),(Sy,1)] || D4 [(Sx,2),(Sz,1)] -> D5.
    d2 = VClock().increment(b"Sx", 1).increment(b"Sx", 2)
    d3 = d2.increment(b"Sy", 3)
    d4 = d2.increment(b"Sz", 4)
    assert d3.compare(d4) is Order.CONCURRENT
    d5 = d3.merge(d4).increment(b"Sx", 5)
    assert d5.counters() == {b"Sx": 3, b"Sy": 1, b"Sz": 1}
    assert d5.descends(d3)
    assert d5.descends(d4)


def test_prune_drops_oldest_entries_first() -> None:
    clock = VClock.from_entries([(b"a", 1, 30), (b"b", 4, 10), (b"c", 2, 20), (b"d", 1, 40)])
    pruned, dropped = clock.prune(2)
    assert dropped == 2
    assert pruned.counters() == {b"a": 1, b"d": 1}
    same, none_dropped = clock.prune(10)
    assert (same, none_dropped) == (clock, 0)


@pytest.mark.parametrize(
    "entries",
    [
        ((b"b", 1, 0), (b"a", 1, 0)),  # unsorted
        ((b"a", 1, 0), (b"a", 2, 0)),  # duplicate actor
        ((b"a", 0, 0),),  # zero counter
        ((b"", 1, 0),),  # empty actor
    ],
)
def test_invalid_clocks_cannot_be_built(entries: tuple[tuple[bytes, int, int], ...]) -> None:
    with pytest.raises(ValueError, match="clock"):
        VClock(entries)


def test_counters_never_move_backwards() -> None:
    clock = VClock.from_entries([(b"a", 3, 0)])
    with pytest.raises(ValueError, match="forward"):
        clock.with_counter(b"a", 2, 0)
