"""The local replica: new dots and actor epochs, accounting, durable flushes, and the cache of
decoded sets with their records."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from kai.core.stats import NodeStats
from kai.core.vclock import VClock
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    context_of,
    decode_siblings,
    encode_siblings,
    merge,
)
from kai.storage.memory import MemoryEngine
from kai.storage.replica import ACTOR_META, LocalReplica

from .strategies import ACTORS, sibling_sets, versions

ACTOR = b"actor-a"
#: These tests stamp versions near 1970: a grace reaching back that far refuses none of them.
EPOCH_GRACE = 2e9


def make_replica(engine: MemoryEngine | None = None, now: float = 1_700_000_000.0) -> LocalReplica:
    return LocalReplica(
        engine if engine is not None else MemoryEngine(),
        actor=ACTOR,
        buckets=1024,
        stats=NodeStats(),
        wall_clock=lambda: now,
        tombstone_grace=EPOCH_GRACE,
    )


@given(sibling_sets, st.sampled_from(ACTORS), st.binary(max_size=8))
def test_a_blind_set_supersedes_everything_stored(
    stored: SiblingSet, actor: bytes, value: bytes
) -> None:
    replica = make_replica()
    replica.actor = actor
    if stored:
        assert replica.apply(b"k", stored)
    written = replica.coordinate_write(b"k", Payload(1, 0, value), None)
    assert replica.read(b"k") == merge(stored, (written,)) == (written,)
    assert all(written.supersedes(version) for version in stored)
    assert replica.stats.kai_actor_epochs == 0


@given(sibling_sets, st.sampled_from(ACTORS))
def test_a_new_dot_is_past_every_counter_stored(stored: SiblingSet, actor: bytes) -> None:
    replica = make_replica()
    replica.actor = actor
    replica.apply(b"k", stored)
    written = replica.coordinate_write(b"k", Payload(0, 0, b"v"), VClock())
    assert written.dot[0] == actor
    for version in stored:
        assert version.dot != written.dot
        assert version.context.counter(actor) < written.dot[1]
    # An empty context supersedes nothing: every stored version stays beside the new one.
    assert set(replica.read(b"k")) == {*stored, written}


def test_two_writes_from_one_context_both_stay() -> None:
    replica = make_replica()
    read = replica.coordinate_write(b"k", Payload(0, 0, b"v1"), None)
    context = context_of((read,))
    first = replica.coordinate_write(b"k", Payload(0, 0, b"x"), context)
    second = replica.coordinate_write(b"k", Payload(0, 0, b"y"), context)
    assert [version.value for version in replica.read(b"k")] == [b"x", b"y"]
    assert first.dot[1] < second.dot[1]


def test_a_context_from_a_forgotten_past_moves_to_a_new_actor_epoch() -> None:
    # Riak's KV679: this replica lost its data (a restored backup), but a client read the
    # key's versions from the other replicas, counter 5 of this actor among them.
    engine = MemoryEngine()
    engine.put_meta(ACTOR_META, ACTOR)
    replica = make_replica(engine)
    elsewhere = Version((ACTOR, 5), VClock(), timestamp=1, value=b"acknowledged long ago")
    written = replica.coordinate_write(b"k", Payload(0, 0, b"new"), context_of((elsewhere,)))
    assert replica.stats.kai_actor_epochs == 1
    assert replica.actor != ACTOR
    assert written.dot == (replica.actor, 1)
    assert engine.get_meta(ACTOR_META) == replica.actor  # a restart keeps the new epoch
    # Had the counter been reused, (ACTOR, 1) would be covered by contexts that hold ACTOR:5.
    assert written.supersedes(elsewhere)
    # Later writes stay in the new epoch.
    again = replica.coordinate_write(b"k", Payload(0, 0, b"newer"), None)
    assert again.dot == (replica.actor, 2)
    assert replica.stats.kai_actor_epochs == 1


def test_stale_replication_is_dropped_and_reported() -> None:
    replica = make_replica()
    first = replica.coordinate_write(b"k", Payload(0, 0, b"1"), None)
    second = replica.coordinate_write(b"k", Payload(0, 0, b"2"), None)
    assert replica.apply(b"k", (first,)) is False
    assert replica.read(b"k") == (second,)


def test_item_accounting_follows_writes_and_a_recount() -> None:
    engine = MemoryEngine()
    replica = make_replica(engine)
    replica.coordinate_write(b"a", Payload(0, 0, b"xyz"), None)
    replica.coordinate_write(b"b", Payload(0, 0, b"12"), None)
    replica.coordinate_write(b"a", Payload(0, 0, b"x"), None)
    replica.coordinate_write(b"b", Payload(), None)  # delete
    assert (replica.items, replica.item_bytes) == (1, 1)
    fresh = make_replica(engine)
    fresh.count_items()
    assert (fresh.items, fresh.item_bytes) == (1, 1)


def test_flush_times_survive_a_restart() -> None:
    engine = MemoryEngine()
    now = 1_700_000_000.0
    replica = make_replica(engine, now)
    replica.flush(int((now + 60) * 1_000_000))
    restarted = make_replica(engine, now)
    assert restarted.flushed_before(now) == 0
    assert restarted.flushed_before(now + 60) == int((now + 60) * 1_000_000)


def test_writes_after_an_immediate_flush_survive_it() -> None:
    replica = make_replica()
    now_us = 1_700_000_000 * 1_000_000
    replica.flush(now_us)
    written = replica.coordinate_write(b"k", Payload(0, 0, b"v"), None)
    assert written.timestamp > now_us
    assert written.is_live(1_700_000_000.0, replica.flushed_before(1_700_000_000.0))


def test_cache_is_write_through_and_bounded() -> None:
    engine = MemoryEngine()
    replica = LocalReplica(engine, actor=ACTOR, buckets=1024, stats=NodeStats(), cache_bytes=4096)
    replica.coordinate_write(b"k", Payload(0, 0, b"one"), None)
    assert replica.read(b"k")[0].value == b"one"
    replica.coordinate_write(b"k", Payload(0, 0, b"two"), None)
    assert replica.read(b"k")[0].value == b"two"  # the write replaced the cached entry
    hits = replica.cache.hits
    replica.read(b"k")
    assert replica.cache.hits == hits + 1
    for i in range(100):  # far more than 4 KiB of entries
        replica.coordinate_write(b"key%d" % i, Payload(0, 0, b"x" * 50), None)
    assert replica.cache.size <= 4096
    assert 0 < len(replica.cache) < 100
    # Evicted keys are read back from the engine, unchanged.
    assert replica.read(b"key0")[0].value == b"x" * 50
    uncached = LocalReplica(engine, actor=ACTOR, buckets=1024, stats=NodeStats())
    for i in range(100):
        assert replica.read(b"key%d" % i) == uncached.read(b"key%d" % i)


def test_an_oversized_entry_is_not_cached() -> None:
    replica = LocalReplica(
        MemoryEngine(), actor=ACTOR, buckets=1024, stats=NodeStats(), cache_bytes=4096
    )
    replica.coordinate_write(b"big", Payload(0, 0, b"x" * 2000), None)
    assert len(replica.cache) == 0
    assert replica.read(b"big")[0].value == b"x" * 2000


@given(
    st.lists(st.lists(versions(), min_size=1, max_size=3), min_size=1, max_size=4),
    st.sampled_from([0, 1 << 20]),
)
def test_read_record_is_what_storage_holds_cached_or_not(
    applied: list[list[Version]], cache_bytes: int
) -> None:
    engine = MemoryEngine()
    replica = LocalReplica(
        engine,
        actor=ACTOR,
        buckets=1024,
        stats=NodeStats(),
        cache_bytes=cache_bytes,
        tombstone_grace=EPOCH_GRACE,
    )
    assert replica.read_record(b"k") == ((), None)
    for incoming in applied:
        # Give the peer's bytes along, as replica_apply does: whatever the merge comes to,
        # the record read back must be exactly what storage holds and decode to the set read.
        replica.apply(b"k", tuple(incoming), encode_siblings(tuple(incoming)))
        siblings, record = replica.read_record(b"k")
        assert record == engine.get(replica.partition(b"k"), b"k")
        assert record is not None
        assert decode_siblings(record) == siblings == replica.read(b"k")
    uncached = LocalReplica(engine, actor=ACTOR, buckets=1024, stats=NodeStats())
    assert uncached.read_record(b"k") == replica.read_record(b"k")


def test_a_replicated_record_is_stored_as_received_when_the_merge_is_exactly_it() -> None:
    source = make_replica()
    replica = LocalReplica(
        MemoryEngine(),
        actor=b"actor-b",
        buckets=1024,
        stats=NodeStats(),
        cache_bytes=1 << 20,
        tombstone_grace=EPOCH_GRACE,
    )
    first = source.coordinate_write(b"k", Payload(0, 0, b"1"), None)
    received = encode_siblings((first,))
    assert replica.apply(b"k", (first,), received)
    assert replica.read_record(b"k")[1] is received  # the very bytes: not encoded again
    # A merge that is not exactly the incoming set is encoded here.
    concurrent = replica.coordinate_write(b"k", Payload(0, 0, b"local"), context_of((first,)))
    second = source.coordinate_write(b"k", Payload(0, 0, b"2"), context_of((first,)))
    second_record = encode_siblings((second,))
    assert replica.apply(b"k", (second,), second_record)
    siblings, record = replica.read_record(b"k")
    assert set(siblings) == {concurrent, second}
    assert record is not second_record
    assert record == encode_siblings(siblings)


@given(sibling_sets, st.booleans())
def test_coordinate_write_record_is_the_stored_sibling_set(stored: SiblingSet, blind: bool) -> None:
    replica = make_replica()
    replica.apply(b"k", stored)
    # A blind set replaces everything; a write with an empty context may leave siblings, and
    # replication sends them along, so no replica holds the new version without them.
    context = None if blind else VClock()
    version, record = replica.coordinate_write_record(b"k", Payload(0, 0, b"new"), context)
    siblings, stored_record = replica.read_record(b"k")
    assert record is stored_record
    assert decode_siblings(record) == siblings
    assert version in siblings


@pytest.mark.parametrize("coordinators", [1, 2])
def test_writers_with_stale_contexts_leave_one_sibling_each(coordinators: int) -> None:
    # riak_test#383's scenario: two clients write in turn, each in the context of its own
    # last write (never the other's). Plain vector clocks piled up siblings; with dots each
    # write supersedes exactly its writer's previous one.
    replicas = [make_replica(), make_replica()]
    replicas[1].actor = b"actor-b"
    contexts = [VClock(), VClock()]
    for round_ in range(20):
        for client in (0, 1):
            coordinator = replicas[client % coordinators]
            written = coordinator.coordinate_write(
                b"k", Payload(0, 0, b"%d-%d" % (client, round_)), contexts[client]
            )
            contexts[client] = context_of((written,))
            replicas[0].apply(b"k", replicas[1].read(b"k"))
            replicas[1].apply(b"k", replicas[0].read(b"k"))
            assert len(replicas[0].read(b"k")) <= 2
    final = replicas[0].read(b"k")
    assert final == replicas[1].read(b"k")
    assert {version.value for version in final} == {b"0-19", b"1-19"}
