"""Dotted version vectors: the replica write rule, merge laws, the memcached view, the codec."""

from __future__ import annotations

import msgpack
from hypothesis import given, strategies as st

from kai.core.vclock import VClock
from kai.core.versions import (
    VECTOR_CLOCK_FORMAT,
    Payload,
    SiblingSet,
    Version,
    absolute_expiry,
    cas_unique,
    check_sibling_set,
    context_of,
    decode_siblings,
    encode_siblings,
    merge,
    new_version,
    visible,
)

from .strategies import History, histories, versions


def _clock(**counters: int) -> VClock:
    return VClock.from_entries((name.encode(), c, c) for name, c in counters.items())


def _version(
    actor: str, counter: int, value: bytes | None, timestamp: int = 1, **seen: int
) -> Version:
    return Version((actor.encode(), counter), _clock(**seen), timestamp, value=value)


def _fold(items: tuple[Version, ...] | list[Version]) -> SiblingSet:
    result: SiblingSet = ()
    for version in items:
        result = merge(result, (version,))
    return result


def _three_states(history: History, data: st.DataObject) -> tuple[SiblingSet, ...]:
    pick = st.sampled_from(history.states)
    return data.draw(pick), data.draw(pick), data.draw(pick)


@given(histories())
def test_replica_states_are_sibling_sets(history: History) -> None:
    for state in history.states:
        check_sibling_set(state)


@given(histories(), st.data())
def test_merge_is_commutative(history: History, data: st.DataObject) -> None:
    a, b, _ = _three_states(history, data)
    assert merge(a, b) == merge(b, a)


@given(histories(), st.data())
def test_merge_is_associative(history: History, data: st.DataObject) -> None:
    a, b, c = _three_states(history, data)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(histories(), st.data())
def test_merge_is_idempotent(history: History, data: st.DataObject) -> None:
    a, b, _ = _three_states(history, data)
    assert merge(a, a) == a
    assert merge(a, ()) == a == merge((), a)
    assert merge(merge(a, b), b) == merge(a, b)


@given(histories())
def test_the_write_rule_drops_exactly_the_covered_versions(history: History) -> None:
    # Every version ever written is either still held once all replicas have merged, or the
    # context of some version written later covers its dot: nothing unseen is ever dropped.
    everything = _fold(history.written)
    for state in history.states:
        everything = merge(everything, state)
    check_sibling_set(everything)
    for version in history.written:
        covered = any(other.supersedes(version) for other in history.written)
        assert (version in everything) != covered, version


@given(histories(), st.permutations(list(range(10))))
def test_arrival_order_does_not_matter(history: History, order: list[int]) -> None:
    shuffled = [history.written[i] for i in order if i < len(history.written)]
    assert _fold(shuffled) == _fold(history.written)


@given(histories())
def test_pruning_contexts_never_loses_a_version(history: History) -> None:
    # The same writes with contexts pruned to two entries cover less: every version that
    # survives with full contexts survives pruned, perhaps beside more siblings.
    full = {version.dot for version in _fold(history.written)}
    pruned = {version.dot for version in _fold(history.pruned)}
    assert full <= pruned


def test_one_coordinator_writing_twice_from_one_context_keeps_both() -> None:
    # The false-dominance case of plain vector clocks: two writes built by one primary from
    # one read context must both survive (context+{P:k+1} vs context+{P:k+2} did not).
    read = (_version("p", 1, b"v1"),)
    context = context_of(read)
    first = _version("p", 2, b"x", timestamp=2, p=1)
    second = _version("p", 3, b"y", timestamp=3, p=1)
    assert context == first.context == second.context
    state = merge(merge(read, (first,)), (second,))
    assert [version.value for version in state] == [b"x", b"y"]
    # A client that read both resolves them with one write.
    resolved = _version("q", 1, b"x+y", timestamp=4, p=3)
    assert merge(state, (resolved,)) == (resolved,)


def test_late_stale_write_is_dropped() -> None:
    old = _version("a", 1, b"old")
    new = _version("a", 2, b"new", timestamp=2, a=1)
    stored = merge((), (new,))
    assert stored == (new,)
    # The older write arrives late: the original Kai kept it as a sibling; it must be dropped.
    assert merge(stored, (old,)) == stored


def test_a_write_is_stored_once_however_often_it_arrives() -> None:
    version = _version("a", 1, b"v")
    assert merge((version,), (version,)) == (version,)


def test_concurrent_writes_become_siblings_and_a_context_write_resolves_them() -> None:
    left = _version("a", 1, b"left", timestamp=5)
    right = _version("b", 1, b"right", timestamp=6)
    siblings = merge((left,), (right,))
    assert set(siblings) == {left, right}
    assert [v.value for v in visible(siblings, now=0)] == [b"right"]
    assert [v.value for v in visible(siblings, now=0, all_siblings=True)] == [b"right", b"left"]
    context = context_of(siblings)
    assert context.counters() == {b"a": 1, b"b": 1}
    resolved, _ = new_version(Payload(value=b"both"), context, (b"a", 2), 7, max_entries=10)
    assert merge(siblings, (resolved,)) == (resolved,)


def test_the_context_of_a_read_holds_every_dot_and_context_read() -> None:
    stored = (_version("a", 5, b"x", c=1), _version("b", 2, b"y", a=7))
    assert context_of(stored).counters() == {b"a": 7, b"b": 2, b"c": 1}
    assert context_of(()) == VClock()


def test_new_version_prunes_the_oldest_context_entries() -> None:
    context = VClock.from_entries((bytes([65 + i]), 1, i) for i in range(12))
    version, pruned = new_version(Payload(value=b"v"), context, (b"Z", 1), 100, max_entries=10)
    assert len(version.context) == 10
    assert pruned == 2
    assert version.dot == (b"Z", 1)
    assert not version.context.covers((b"A", 1))  # the oldest went first


def test_newest_tombstone_or_expired_version_is_a_miss() -> None:
    value = _version("a", 1, b"v", timestamp=1)
    tomb = _version("b", 1, None, timestamp=2)
    assert visible((value, tomb), now=0) == []
    expiring = Version((b"a", 1), VClock(), timestamp=1, expiry=100, value=b"v")
    assert visible((expiring,), now=99.9) == [expiring]
    assert visible((expiring,), now=100) == []
    assert visible((value,), now=0, flushed_before=1) == []
    assert visible((value,), now=0, flushed_before=0) == [value]


def test_cas_unique_follows_the_key_and_its_context() -> None:
    a1, a2 = _clock(a=1), _clock(a=2)
    assert cas_unique(b"k", a1) == cas_unique(b"k", VClock.from_entries([(b"a", 1, 999)]))
    assert cas_unique(b"k", a1) != cas_unique(b"k", a2)
    # Two keys written once by one node have equal contexts, but not equal tokens.
    assert cas_unique(b"k", a1) != cas_unique(b"l", a1)
    assert 0 < cas_unique(b"k", VClock()) < 2**64


@given(histories())
def test_codec_round_trips(history: History) -> None:
    for state in history.states:
        assert decode_siblings(encode_siblings(state)) == state


@given(versions())
def test_codec_keeps_every_field(version: Version) -> None:
    assert decode_siblings(encode_siblings((version,))) == (version,)


def test_a_vector_clock_record_reads_as_dotted_versions() -> None:
    # Format 1, as written before dotted version vectors: [clock, timestamp, actor, flags,
    # expiry, value] per version; the coordinator's own entry in the clock is the write.
    payload = [
        [((b"a", 2, 20), (b"b", 1, 10)), 20, b"a", 3, 0, b"left"],
        [((b"c", 1, 30),), 30, b"c", 0, 0, None],
    ]
    record = bytes((VECTOR_CLOCK_FORMAT,)) + msgpack.packb(payload, use_bin_type=True)
    left, right = decode_siblings(record)
    assert left == Version((b"a", 2), VClock(((b"a", 1, 20), (b"b", 1, 10))), 20, 3, 0, b"left")
    assert right == Version((b"c", 1), VClock(), 30, 0, 0, None)
    check_sibling_set((left, right))


def test_absolute_expiry_follows_memcached() -> None:
    now = 1_700_000_000.5
    assert absolute_expiry(0, now) == 0
    assert absolute_expiry(-1, now) == 1
    assert absolute_expiry(100, now) == 1_700_000_100
    assert absolute_expiry(2_592_000, now) == 1_700_000_000 + 2_592_000
    assert absolute_expiry(2_592_001, now) == 2_592_001  # absolute: long past, so expired
