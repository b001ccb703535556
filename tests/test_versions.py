"""Sibling sets: the replica write rule, merge laws, the memcached view and the codec."""

from __future__ import annotations

from hypothesis import given, strategies as st

from kai.core.vclock import VClock
from kai.core.versions import (
    Version,
    absolute_expiry,
    apply_write,
    cas_unique,
    check_sibling_set,
    context_of,
    decode_siblings,
    encode_siblings,
    merge,
    next_clock,
    visible,
)

from .strategies import sibling_lists, versions


def _fold(items: list[Version]) -> tuple[Version, ...]:
    result: tuple[Version, ...] = ()
    for version in items:
        updated = apply_write(result, version)
        if updated is not None:
            result = updated
    return result


def _clock(**counters: int) -> VClock:
    return VClock.from_entries((name.encode(), c, c) for name, c in counters.items())


@given(sibling_lists)
def test_write_rule_keeps_only_concurrent_versions(items: list[Version]) -> None:
    siblings = _fold(items)
    check_sibling_set(siblings)
    # Every written version is either stored or dominated by (or equal to) a stored one.
    for version in items:
        assert any(stored.clock.descends(version.clock) for stored in siblings)


@given(sibling_lists, sibling_lists)
def test_merge_is_commutative(left: list[Version], right: list[Version]) -> None:
    a, b = _fold(left), _fold(right)
    assert merge(a, b) == merge(b, a)


@given(sibling_lists, sibling_lists, sibling_lists)
def test_merge_is_associative(x: list[Version], y: list[Version], z: list[Version]) -> None:
    a, b, c = _fold(x), _fold(y), _fold(z)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(sibling_lists)
def test_merge_is_idempotent(items: list[Version]) -> None:
    a = _fold(items)
    assert merge(a, a) == a
    assert merge(a, ()) == a


@given(st.permutations(list(range(6))), sibling_lists)
def test_write_order_does_not_matter(order: list[int], items: list[Version]) -> None:
    shuffled = [items[i] for i in order if i < len(items)]
    assert _fold(shuffled) == _fold(items)


def test_late_stale_write_is_dropped() -> None:
    old = Version(_clock(a=1), timestamp=1, actor=b"a", value=b"old")
    new = Version(_clock(a=2), timestamp=2, actor=b"a", value=b"new")
    stored = apply_write((), new)
    assert stored == (new,)
    # The older write arrives late: the original Kai kept it as a sibling; it must be dropped.
    assert apply_write(stored, old) is None


def test_concurrent_writes_become_siblings_and_a_context_write_resolves_them() -> None:
    left = Version(_clock(a=1), timestamp=5, actor=b"a", value=b"left")
    right = Version(_clock(b=1), timestamp=6, actor=b"b", value=b"right")
    siblings = merge((left,), (right,))
    assert set(siblings) == {left, right}
    assert [v.value for v in visible(siblings, now=0)] == [b"right"]
    assert [v.value for v in visible(siblings, now=0, all_siblings=True)] == [b"right", b"left"]
    clock, _ = next_clock(context_of(siblings), siblings, b"a", 7, max_entries=10)
    resolved = Version(clock, timestamp=7, actor=b"a", value=b"both")
    assert apply_write(siblings, resolved) == (resolved,)


def test_next_clock_moves_past_stored_counters() -> None:
    stored = (Version(_clock(a=5), timestamp=1, actor=b"a", value=b"x"),)
    clock, pruned = next_clock(_clock(a=2), stored, b"a", 9, max_entries=10)
    assert clock.counters() == {b"a": 6}
    assert pruned == 0


def test_next_clock_prunes_to_the_limit() -> None:
    context = VClock.from_entries((bytes([65 + i]), 1, i) for i in range(12))
    clock, pruned = next_clock(context, (), b"Z", 100, max_entries=10)
    assert len(clock) == 10
    assert pruned == 3
    assert clock.counter(b"Z") == 1


def test_newest_tombstone_or_expired_version_is_a_miss() -> None:
    value = Version(_clock(a=1), timestamp=1, actor=b"a", value=b"v")
    tomb = Version(_clock(b=1), timestamp=2, actor=b"b", value=None)
    assert visible((value, tomb), now=0) == []
    expiring = Version(_clock(a=1), timestamp=1, actor=b"a", expiry=100, value=b"v")
    assert visible((expiring,), now=99.9) == [expiring]
    assert visible((expiring,), now=100) == []
    assert visible((value,), now=0, flushed_before=1) == []
    assert visible((value,), now=0, flushed_before=0) == [value]


def test_cas_unique_follows_the_context() -> None:
    a1, a2 = _clock(a=1), _clock(a=2)
    assert cas_unique(a1) == cas_unique(VClock.from_entries([(b"a", 1, 999)]))
    assert cas_unique(a1) != cas_unique(a2)
    assert 0 < cas_unique(VClock()) < 2**64


@given(sibling_lists)
def test_codec_round_trips(items: list[Version]) -> None:
    siblings = _fold(items)
    assert decode_siblings(encode_siblings(siblings)) == siblings


@given(versions())
def test_codec_keeps_every_field(version: Version) -> None:
    assert decode_siblings(encode_siblings((version,))) == (version,)


def test_absolute_expiry_follows_memcached() -> None:
    now = 1_700_000_000.5
    assert absolute_expiry(0, now) == 0
    assert absolute_expiry(-1, now) == 1
    assert absolute_expiry(100, now) == 1_700_000_100
    assert absolute_expiry(2_592_000, now) == 1_700_000_000 + 2_592_000
    assert absolute_expiry(2_592_001, now) == 2_592_001  # absolute: long past, so expired
