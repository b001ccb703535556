"""A data directory written in record format 1 (plain vector clocks) reads and takes writes
with today's code (see tests/fixtures/README.md for how it was made)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kai.core.stats import NodeStats
from kai.core.versions import RECORD_FORMAT, VECTOR_CLOCK_FORMAT, Payload, context_of, visible
from kai.storage.leveldb import LevelDBEngine
from kai.storage.replica import LocalReplica, load_or_create_actor

FIXTURE = Path(__file__).parent / "fixtures" / "format1-data"
NOW = 1_900_000_000.0


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[LocalReplica]:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)  # LevelDB writes to its directory: never open the fixture
    engine = LevelDBEngine(data / "db")
    try:
        yield LocalReplica(
            engine,
            actor=load_or_create_actor(engine),
            buckets=1024,
            stats=NodeStats(),
            wall_clock=lambda: NOW,
        )
    finally:
        engine.close()


def _values(replica: LocalReplica, key: bytes) -> list[bytes | None]:
    return [version.value for version in visible(replica.read(key), NOW, all_siblings=True)]


def test_every_key_of_a_format_1_directory_reads_as_it_was_written(replica: LocalReplica) -> None:
    assert replica.actor == b"fixture1"  # the data directory keeps its actor id
    for key in (b"plain", b"overwritten", b"expiring", b"deleted", b"siblings", b"descended"):
        record = replica.read_record(key)[1]
        assert record is not None
        assert record[0] == VECTOR_CLOCK_FORMAT, key
    (plain,) = replica.read(b"plain")
    assert (plain.dot, plain.flags, plain.value) == ((b"fixture1", 1), 7, b"hello")
    assert _values(replica, b"overwritten") == [b"second"]
    (expiring,) = replica.read(b"expiring")
    assert (expiring.flags, expiring.expiry, expiring.value) == (1, 4102444800, b"until 2100")
    assert [version.value for version in replica.read(b"deleted")] == [None]
    assert _values(replica, b"deleted") == []
    assert _values(replica, b"siblings") == [b"right", b"left"]
    (descended,) = replica.read(b"descended")
    assert descended.dot == (b"fixture2", 1)
    assert descended.context.counters() == {b"fixture1": 1}
    replica.count_items()
    assert replica.items == 5  # every key but the deleted one


def test_old_versions_are_superseded_by_new_writes(replica: LocalReplica) -> None:
    # A blind set over an old version, written in today's format.
    written = replica.coordinate_write(b"overwritten", Payload(0, 0, b"third"), None)
    assert written.dot == (b"fixture1", 3)  # past the counters the old clocks hold
    assert replica.read(b"overwritten") == (written,)
    record = replica.read_record(b"overwritten")[1]
    assert record is not None
    assert record[0] == RECORD_FORMAT
    # Old siblings resolve with a write in the context of a read of both.
    siblings = replica.read(b"siblings")
    resolved = replica.coordinate_write(b"siblings", Payload(0, 0, b"both"), context_of(siblings))
    assert replica.read(b"siblings") == (resolved,)
    # An old version arriving again (replication from a node not yet upgraded) stays
    # superseded.
    assert not replica.apply(b"siblings", siblings)
    assert replica.stats.kai_actor_epochs == 0
