"""Tombstone and expiry collection: the replica's reap, its refusal of stale versions it never
saw, and the reaper over the in-process cluster (nothing reaped ever comes back)."""

from __future__ import annotations

import pytest

from kai.core.stats import NodeStats
from kai.core.vclock import VClock
from kai.core.versions import Payload, Version, context_of, encode_siblings
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica

NOW = 1_700_000_000.0
GRACE = 100.0
#: A timestamp (microseconds) older than the grace, and one younger.
OLD = int((NOW - GRACE - 1) * 1_000_000)
FRESH = int((NOW - GRACE + 1) * 1_000_000)


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_replica(clock: Clock | None = None, cache_bytes: int = 1 << 20) -> LocalReplica:
    return LocalReplica(
        MemoryEngine(),
        actor=b"actor-a",
        buckets=64,
        stats=NodeStats(),
        cache_bytes=cache_bytes,
        wall_clock=clock if clock is not None else Clock(),
        tombstone_grace=GRACE,
    )


def version(actor: bytes, timestamp: int, value: bytes | None = b"v", counter: int = 1) -> Version:
    return Version((actor, counter), VClock(), timestamp, 0, 0, value)


# --- reap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_reap_deletes_only_the_identical_record(cache_bytes: int) -> None:
    replica = make_replica(cache_bytes=cache_bytes)
    changes: list[tuple[int, bytes, bytes | None, bytes | None]] = []
    replica.on_change = lambda *change: changes.append(change)
    replica.coordinate_write(b"k", Payload(0, 0, b"value"), None)
    replica.coordinate_write(b"k", Payload(), None)  # a tombstone
    _siblings, record = replica.read_record(b"k")
    assert record is not None
    changes.clear()
    assert replica.reap(b"k", record + b"x") is False
    assert replica.reap(b"k", encode_siblings((version(b"other", OLD, None),))) is False
    assert replica.read_record(b"k") == (_siblings, record)
    assert changes == []
    assert replica.stats.kai_tombstones_reaped == 0
    partition = replica.partition(b"k")
    assert replica.reap(b"k", record) is True
    assert replica.engine.get(partition, b"k") is None
    assert replica.read_record(b"k") == ((), None)
    assert changes == [(partition, b"k", record, None)]
    assert replica.stats.kai_tombstones_reaped == 1
    assert replica.reap(b"k", record) is False  # already gone
    assert replica.stats.kai_tombstones_reaped == 1


def test_reaping_an_expired_value_uncounts_it() -> None:
    replica = make_replica()
    replica.coordinate_write(b"k", Payload(0, 1, b"abc"), None)  # expired long ago
    replica.coordinate_write(b"other", Payload(0, 0, b"xy"), None)
    assert (replica.items, replica.item_bytes) == (2, 5)
    _siblings, record = replica.read_record(b"k")
    assert record is not None
    assert replica.reap(b"k", record)
    assert (replica.items, replica.item_bytes) == (1, 2)


def test_reaping_a_tombstone_leaves_the_counts() -> None:
    replica = make_replica()
    replica.coordinate_write(b"other", Payload(0, 0, b"xy"), None)
    replica.apply(b"k", (version(b"b", FRESH, None),))
    _siblings, record = replica.read_record(b"k")
    assert record is not None
    assert replica.reap(b"k", record)
    assert (replica.items, replica.item_bytes) == (1, 2)


# --- stale versions are refused ---------------------------------------------------------------


def test_an_old_version_this_replica_never_saw_is_refused_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replica = make_replica()
    old = version(b"b", OLD)
    assert replica.apply(b"k", (old,), encode_siblings((old,))) is False
    assert replica.read_record(b"k") == ((), None)
    assert replica.engine.get(replica.partition(b"k"), b"k") is None
    assert replica.stats.kai_stale_refused == 1
    assert "tombstone_grace" in caplog.text
    assert "wiped and rejoined" in caplog.text


def test_refusal_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    replica = make_replica()
    for index in range(5):
        replica.apply(b"k%d" % index, (version(b"b", OLD),))
    assert replica.stats.kai_stale_refused == 5
    assert caplog.text.count("wiped and rejoined") == 1


def test_an_old_version_already_covered_is_a_no_op() -> None:
    replica = make_replica()
    old = version(b"b", OLD)
    newer = Version((b"c", 1), context_of((old,)), FRESH, 0, 0, b"newer")
    assert replica.apply(b"k", (newer,))
    assert replica.apply(b"k", (old,)) is False
    assert replica.read(b"k") == (newer,)
    assert replica.stats.kai_stale_refused == 0


def test_an_old_version_stored_already_is_a_no_op() -> None:
    clock = Clock(NOW - 2 * GRACE)
    replica = make_replica(clock)
    old = version(b"b", OLD)
    assert replica.apply(b"k", (old,))  # not yet older than the grace
    clock.now = NOW
    assert replica.apply(b"k", (old,), encode_siblings((old,))) is False
    assert replica.read(b"k") == (old,)
    assert replica.stats.kai_stale_refused == 0


def test_a_fresh_version_is_accepted() -> None:
    replica = make_replica()
    fresh = version(b"b", FRESH)
    record = encode_siblings((fresh,))
    assert replica.apply(b"k", (fresh,), record)
    assert replica.read_record(b"k") == ((fresh,), record)
    assert replica.stats.kai_stale_refused == 0


def test_only_the_old_unseen_versions_of_a_mix_are_dropped() -> None:
    replica = make_replica()
    known_old = version(b"a", OLD - 5)
    seen = Version((b"a", 2), context_of((known_old,)), FRESH, 0, 0, b"seen")
    replica.apply(b"k", (seen,))
    fresh = version(b"b", FRESH, b"fresh")
    unseen_old = version(b"c", OLD, b"unseen")
    incoming = (known_old, fresh, unseen_old)
    # The record fast path must not store the dropped version.
    assert replica.apply(b"k", incoming, encode_siblings(incoming))
    stored, record = replica.read_record(b"k")
    assert [v.value for v in stored] == [b"seen", b"fresh"]
    assert record == encode_siblings(stored)
    assert replica.stats.kai_stale_refused == 1


def test_the_record_fast_path_is_not_used_when_a_version_was_dropped() -> None:
    replica = make_replica()
    fresh = version(b"b", FRESH, b"fresh")
    incoming = (fresh, version(b"c", OLD, b"unseen"))
    assert replica.apply(b"k", incoming, encode_siblings(incoming))
    assert replica.read_record(b"k") == ((fresh,), encode_siblings((fresh,)))
    assert replica.engine.get(replica.partition(b"k"), b"k") == encode_siblings((fresh,))


def test_writes_coordinated_here_are_not_refused() -> None:
    clock = Clock()
    replica = make_replica(clock)
    old = version(b"b", OLD, None)
    clock.now = NOW - 2 * GRACE
    replica.apply(b"k", (old,))
    clock.now = NOW
    written = replica.coordinate_write(b"k", Payload(0, 0, b"new"), context_of((old,)))
    assert replica.read(b"k") == (written,)
    assert replica.stats.kai_stale_refused == 0
