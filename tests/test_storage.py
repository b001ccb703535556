"""Tests of the storage engines: the contract on both, LevelDB's persistence, and agreement.

`EngineAgreement` drives a MemoryEngine, a LevelDBEngine and a plain-dict model with the
same random operations and checks that all three answer every call identically, so the
memory engine is a verified fake of the LevelDB one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kai.core.errors import StorageError
from kai.core.storage import MAX_PARTITION, StorageEngine, StorageStatistics
from kai.storage import open_engine
from kai.storage.leveldb import LevelDBEngine
from kai.storage.memory import MemoryEngine


@pytest.fixture(params=["memory", "leveldb"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageEngine]:
    store: StorageEngine
    store = MemoryEngine() if request.param == "memory" else LevelDBEngine(tmp_path / "db")
    yield store
    if not store.closed:
        store.check_invariants()
    store.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db"


# -- data ------------------------------------------------------------------------------------


def test_put_get_overwrite_delete(engine: StorageEngine) -> None:
    assert engine.get(7, b"k") is None
    engine.put(7, b"k", b"one")
    assert engine.get(7, b"k") == b"one"
    engine.put(7, b"k", b"two")
    assert engine.get(7, b"k") == b"two"
    assert engine.count() == 1
    engine.delete(7, b"k")
    assert engine.get(7, b"k") is None
    assert engine.count() == 0
    engine.delete(7, b"k")  # absent: no error
    engine.delete(8, b"never")


def test_empty_record_is_not_absent(engine: StorageEngine) -> None:
    engine.put(1, b"k", b"")
    assert engine.get(1, b"k") == b""
    assert engine.scan(1) == [(b"k", b"")]
    engine.delete(1, b"k")
    assert engine.scan(1) == []


def test_partitions_are_isolated_including_prefix_keys(engine: StorageEngine) -> None:
    engine.put(1, b"a", b"1a")
    engine.put(1, b"ab", b"1ab")
    engine.put(2, b"a", b"2a")
    engine.put(0x0100, b"\x00", b"256")  # partition bytes 00 00 01 00
    engine.put(0x01, b"\x00\x00", b"1-00")
    assert engine.get(1, b"a") == b"1a"
    assert engine.get(1, b"ab") == b"1ab"
    assert engine.get(2, b"a") == b"2a"
    assert engine.get(2, b"ab") is None
    assert engine.scan(1) == [(b"\x00\x00", b"1-00"), (b"a", b"1a"), (b"ab", b"1ab")]
    assert engine.scan(2) == [(b"a", b"2a")]
    assert engine.scan(0x0100) == [(b"\x00", b"256")]
    assert engine.scan(3) == []
    engine.delete(1, b"a")
    assert engine.get(1, b"ab") == b"1ab"
    assert engine.get(2, b"a") == b"2a"


def test_first_and_last_partition(engine: StorageEngine) -> None:
    for partition in (0, MAX_PARTITION):
        engine.put(partition, b"\xff\xff", b"high")
        engine.put(partition, b"\x00", b"low")
    engine.put(MAX_PARTITION - 1, b"\xff", b"middle")
    assert engine.scan(0) == [(b"\x00", b"low"), (b"\xff\xff", b"high")]
    assert engine.scan(MAX_PARTITION) == [(b"\x00", b"low"), (b"\xff\xff", b"high")]
    assert engine.scan(MAX_PARTITION, start_after=b"\x00") == [(b"\xff\xff", b"high")]
    assert [partition for partition, _, _ in engine.scan_all()] == [
        0,
        0,
        MAX_PARTITION - 1,
        MAX_PARTITION,
        MAX_PARTITION,
    ]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 25, 100])
def test_scan_in_chunks(engine: StorageEngine, chunk: int) -> None:
    keys = sorted(bytes([i * 9 % 256]) + b"x" * (i % 3) for i in range(25))
    for key in reversed(keys):
        engine.put(5, key, key[::-1])
    engine.put(4, b"\xff", b"other")
    engine.put(6, b"\x00", b"other")
    collected: list[tuple[bytes, bytes]] = []
    start_after = None
    while True:
        page = engine.scan(5, start_after=start_after, limit=chunk)
        assert len(page) <= chunk
        collected.extend(page)
        if len(page) < chunk:
            break
        start_after = page[-1][0]
    assert collected == [(key, key[::-1]) for key in keys]
    assert engine.scan(5) == collected


def test_scan_start_after_and_limit_edges(engine: StorageEngine) -> None:
    for key in (b"b", b"d", b"f"):
        engine.put(3, key, key)
    assert engine.scan(3, limit=0) == []
    assert engine.scan(3, start_after=b"") == engine.scan(3)
    assert [k for k, _ in engine.scan(3, start_after=b"b")] == [b"d", b"f"]
    assert [k for k, _ in engine.scan(3, start_after=b"c")] == [b"d", b"f"]
    assert [k for k, _ in engine.scan(3, start_after=b"bb", limit=1)] == [b"d"]
    assert engine.scan(3, start_after=b"f") == []
    assert engine.scan(3, start_after=b"\xff" * 300) == []


def test_scan_all_order_and_snapshot(engine: StorageEngine) -> None:
    items = [(9, b"b"), (2, b"z"), (9, b"a"), (MAX_PARTITION, b"a"), (0, b"q"), (2, b"y")]
    for partition, key in items:
        engine.put(partition, key, b"%d" % partition + key)
    engine.put_meta("actor", b"id")
    engine.put_hint("10.0.0.1:11011", 2, b"h", b"hint")
    iterator = engine.scan_all()
    engine.put(1, b"late", b"not seen")
    engine.delete(0, b"q")
    expected = [(p, k, b"%d" % p + k) for p, k in sorted(items)]
    assert list(iterator) == expected
    assert engine.count() == len(items)  # after the late put and the delete


def test_scan_all_fails_after_close(engine: StorageEngine) -> None:
    engine.put(1, b"a", b"1")
    engine.put(1, b"b", b"2")
    iterator = engine.scan_all()
    assert next(iterator) == (1, b"a", b"1")
    engine.close()
    with pytest.raises(StorageError):
        next(iterator)


# -- write batches ---------------------------------------------------------------------------


def test_write_batch(engine: StorageEngine) -> None:
    engine.put(1, b"old", b"x")
    engine.put(1, b"both", b"x")
    engine.write_batch(
        [(1, b"new", b"1"), (2, b"new", b"2"), (1, b"both", b"y"), (1, b"new", b"last")],
        [(1, b"old"), (1, b"both"), (3, b"absent")],
    )
    assert engine.scan(1) == [(b"new", b"last")]
    assert engine.scan(2) == [(b"new", b"2")]
    engine.write_batch([])
    engine.write_batch((), [(2, b"new")])
    assert engine.count() == 1


def test_write_batch_with_bad_entry_writes_nothing(engine: StorageEngine) -> None:
    engine.put(1, b"keep", b"x")
    with pytest.raises(ValueError, match="key"):
        engine.write_batch([(1, b"a", b"1"), (1, b"", b"2")], [(1, b"keep")])
    with pytest.raises(ValueError, match="partition"):
        engine.write_batch([(1, b"a", b"1")], [(1, b"keep"), (-1, b"x")])

    def failing_puts() -> Iterator[tuple[int, bytes, bytes]]:
        yield 1, b"a", b"1"
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        engine.write_batch(failing_puts(), [(1, b"keep")])
    assert list(engine.scan_all()) == [(1, b"keep", b"x")]


# -- metadata and hints ----------------------------------------------------------------------


def test_meta(engine: StorageEngine) -> None:
    assert engine.get_meta("actor") is None
    engine.put_meta("actor", b"\x01\x02")
    engine.put_meta("actor.backup", b"")
    engine.put_meta("mitglieder-ä", b"view")
    assert engine.get_meta("actor") == b"\x01\x02"
    assert engine.get_meta("actor.backup") == b""
    assert engine.get_meta("mitglieder-ä") == b"view"
    engine.put_meta("actor", b"new")
    assert engine.get_meta("actor") == b"new"
    assert engine.count() == 0
    assert list(engine.scan_all()) == []


def test_hints(engine: StorageEngine) -> None:
    assert engine.hint_targets() == []
    assert engine.hints("a:1") == []
    engine.put_hint("a:11", 5, b"k", b"for a:11")
    engine.put_hint("a:1", 9, b"b", b"9b")
    engine.put_hint("a:1", 2, b"z", b"2z")
    engine.put_hint("a:1", 9, b"a", b"9a")
    engine.put_hint("a:1", 9, b"a", b"9a again")
    engine.put_hint("b", MAX_PARTITION, b"\xff", b"last")
    assert engine.hint_targets() == ["a:1", "a:11", "b"]
    assert engine.hints("a:1") == [(2, b"z", b"2z"), (9, b"a", b"9a again"), (9, b"b", b"9b")]
    assert engine.hints("a:1", limit=2) == [(2, b"z", b"2z"), (9, b"a", b"9a again")]
    assert engine.hints("a:1", limit=0) == []
    assert engine.hints("a:11") == [(5, b"k", b"for a:11")]
    assert engine.hints("b") == [(MAX_PARTITION, b"\xff", b"last")]
    assert engine.hints("a:1", start_after=(9, b"a")) == [(9, b"b", b"9b")]
    assert engine.hints("a:1", start_after=(3, b"gone")) == [
        (9, b"a", b"9a again"),
        (9, b"b", b"9b"),
    ]
    assert engine.hints("a:1", start_after=(9, b"b")) == []
    assert engine.hints("a:", start_after=(0, b"x")) == []  # never runs into "a:1"
    assert engine.get_hint("a:1", 9, b"a") == b"9a again"
    assert engine.get_hint("a:1", 9, b"c") is None
    assert engine.get_hint("nobody:1", 9, b"a") is None
    assert engine.count() == 0
    engine.delete_hint("a:1", 2, b"z")
    engine.delete_hint("a:1", 2, b"z")
    engine.delete_hint("nobody:1", 2, b"z")
    assert engine.hints("a:1") == [(9, b"a", b"9a again"), (9, b"b", b"9b")]
    engine.delete_hint("a:11", 5, b"k")
    assert engine.hint_targets() == ["a:1", "b"]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda e: e.get(-1, b"k"), ValueError),
        (lambda e: e.get(MAX_PARTITION + 1, b"k"), ValueError),
        (lambda e: e.get(1, b""), ValueError),
        (lambda e: e.get(1, "k"), TypeError),
        (lambda e: e.put(1, b"k", "v"), TypeError),
        (lambda e: e.put(1, b"k", bytearray(b"v")), TypeError),
        (lambda e: e.delete(1.0, b"k"), TypeError),
        (lambda e: e.scan(1, limit=-1), ValueError),
        (lambda e: e.scan(1, start_after="a"), TypeError),
        (lambda e: e.put_meta("", b"v"), ValueError),
        (lambda e: e.put_meta("n", "v"), TypeError),
        (lambda e: e.put_hint("", 1, b"k", b"v"), ValueError),
        (lambda e: e.put_hint("x" * 70000, 1, b"k", b"v"), ValueError),
        (lambda e: e.hints("a:1", limit=-1), ValueError),
    ],
)
def test_bad_arguments_are_refused(
    engine: StorageEngine, call: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        call(engine)
    assert engine.count() == 0
    assert engine.hint_targets() == []


# -- lifecycle -------------------------------------------------------------------------------


def test_close_is_idempotent_and_final(engine: StorageEngine) -> None:
    engine.put(1, b"k", b"v")
    engine.close()
    engine.close()
    assert engine.closed
    calls = [
        lambda: engine.get(1, b"k"),
        lambda: engine.put(1, b"k", b"v"),
        lambda: engine.delete(1, b"k"),
        lambda: engine.write_batch([(1, b"k", b"v")]),
        lambda: engine.scan(1),
        lambda: engine.scan_all(),
        lambda: engine.count(),
        lambda: engine.get_meta("m"),
        lambda: engine.put_meta("m", b""),
        lambda: engine.put_hint("a:1", 1, b"k", b"v"),
        lambda: engine.hints("a:1"),
        lambda: engine.delete_hint("a:1", 1, b"k"),
        lambda: engine.hint_targets(),
        lambda: engine.check_invariants(),
        lambda: engine.statistics(),
    ]
    for call in calls:
        with pytest.raises(StorageError, match="closed"):
            call()


def test_context_manager_closes(engine: StorageEngine) -> None:
    with engine as entered:
        assert entered is engine
        engine.put(1, b"k", b"v")
    assert engine.closed


def test_statistics(engine: StorageEngine) -> None:
    engine.put(1, b"k", b"v" * 1000)
    stats = engine.statistics()
    assert stats.engine == engine.name
    if isinstance(engine, LevelDBEngine):
        assert stats.path == str(engine.path)
        assert stats.approximate_disk_bytes is not None
        assert stats.approximate_disk_bytes > 1000
    else:
        assert stats == StorageStatistics(engine="memory")
    with pytest.raises(ValueError, match="approximate_disk_bytes"):
        StorageStatistics(engine="x", approximate_disk_bytes=-1)


# -- LevelDB on disk -------------------------------------------------------------------------


def test_leveldb_reopen_keeps_data_meta_and_hints(db_path: Path) -> None:
    with LevelDBEngine(db_path) as first:
        first.write_batch([(0, b"a", b"1"), (MAX_PARTITION, b"z", b"2")])
        first.put(7, b"k", b"3")
        first.delete(7, b"k")
        first.put_meta("actor", b"id")
        first.put_hint("10.0.0.2:11011", 4, b"h", b"hinted")
    with LevelDBEngine(db_path, create_if_missing=False) as second:
        assert list(second.scan_all()) == [(0, b"a", b"1"), (MAX_PARTITION, b"z", b"2")]
        assert second.get_meta("actor") == b"id"
        assert second.hint_targets() == ["10.0.0.2:11011"]
        assert second.hints("10.0.0.2:11011") == [(4, b"h", b"hinted")]
        second.check_invariants()


def test_leveldb_sync_writes(db_path: Path) -> None:
    with LevelDBEngine(db_path, sync=True) as store:
        store.put(1, b"k", b"v")
        store.write_batch([(1, b"j", b"w")], [(1, b"k")])
        assert store.scan(1) == [(b"j", b"w")]
        assert store.statistics().sync


def test_leveldb_locked_directory(db_path: Path) -> None:
    with LevelDBEngine(db_path) as store:
        store.put(1, b"k", b"v")
        with pytest.raises(StorageError, match="another kai running") as caught:
            LevelDBEngine(db_path)
        assert str(db_path) in str(caught.value)
        assert store.get(1, b"k") == b"v"
    with LevelDBEngine(db_path) as reopened:  # the lock went away with the first engine
        assert reopened.get(1, b"k") == b"v"


def test_leveldb_missing_database(db_path: Path) -> None:
    with pytest.raises(StorageError, match="no database here") as caught:
        LevelDBEngine(db_path, create_if_missing=False)
    assert str(db_path) in str(caught.value)
    assert not db_path.exists()


def test_leveldb_creates_parent_directories(tmp_path: Path) -> None:
    with LevelDBEngine(tmp_path / "a" / "b" / "db") as store:
        store.put(1, b"k", b"v")


def test_leveldb_refuses_newer_layout(db_path: Path) -> None:
    with LevelDBEngine(db_path) as store:
        store.put(1, b"k", b"v")
        store._db.put(b"v", b"2")  # as if written by a newer release
    for _ in range(2):  # a refused open releases the lock
        with pytest.raises(StorageError, match="layout version '2'"):
            LevelDBEngine(db_path)


def test_leveldb_refuses_database_not_written_by_kai(db_path: Path) -> None:
    with LevelDBEngine(db_path) as store:
        store.put(1, b"k", b"v")
        store._db.delete(b"v")
    with pytest.raises(StorageError, match="not written by kai"):
        LevelDBEngine(db_path)


def test_open_engine(tmp_path: Path) -> None:
    with open_engine("memory", tmp_path) as memory:
        assert isinstance(memory, MemoryEngine)
    assert not (tmp_path / "db").exists()
    with open_engine("leveldb", tmp_path / "data", sync=True) as leveldb:
        assert isinstance(leveldb, LevelDBEngine)
        assert leveldb.path == tmp_path / "data" / "db"
        assert leveldb.statistics().sync
    with pytest.raises(ValueError, match="unknown storage engine 'rocksdb'"):
        open_engine("rocksdb", tmp_path)


def test_only_the_leveldb_module_imports_plyvel() -> None:
    code = (
        "import sys, kai.core.storage, kai.storage.memory;"
        "bad = {'plyvel', 'trio'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- agreement -------------------------------------------------------------------------------

partitions = st.sampled_from([0, 1, 2, 255, 256, MAX_PARTITION - 1, MAX_PARTITION])
keys = st.lists(st.sampled_from([b"\x00", b"a", b"b", b"\xff"]), min_size=1, max_size=3).map(
    b"".join
)
records = st.binary(max_size=6)
targets = st.sampled_from(["a:1", "a:11", "10.0.0.1:11011", "b", "é:2"])
meta_names = st.sampled_from(["actor", "actor2", "members", "ä"])
limits = st.none() | st.integers(min_value=0, max_value=4)


class EngineAgreement(RuleBasedStateMachine):
    """The memory engine, the LevelDB engine and a dict model agree on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="kai-storage-test-"))
        self.memory = MemoryEngine()
        self.leveldb = LevelDBEngine(self.directory / "db")
        self.data: dict[tuple[int, bytes], bytes] = {}
        self.meta: dict[str, bytes] = {}
        self.hint_model: dict[tuple[str, int, bytes], bytes] = {}

    def teardown(self) -> None:
        self.memory.close()
        self.leveldb.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def both(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from_memory = getattr(self.memory, method)(*args, **kwargs)
        from_leveldb = getattr(self.leveldb, method)(*args, **kwargs)
        assert from_memory == from_leveldb, (method, args, kwargs)
        return from_memory

    @rule(partition=partitions, key=keys, record=records)
    def put(self, partition: int, key: bytes, record: bytes) -> None:
        self.both("put", partition, key, record)
        self.data[partition, key] = record

    @rule(partition=partitions, key=keys)
    def delete(self, partition: int, key: bytes) -> None:
        self.both("delete", partition, key)
        self.data.pop((partition, key), None)

    @rule(
        puts=st.lists(st.tuples(partitions, keys, records), max_size=6),
        deletes=st.lists(st.tuples(partitions, keys), max_size=4),
    )
    def write_batch(
        self, puts: list[tuple[int, bytes, bytes]], deletes: list[tuple[int, bytes]]
    ) -> None:
        self.both("write_batch", puts, deletes)
        for partition, key, record in puts:
            self.data[partition, key] = record
        for partition, key in deletes:
            self.data.pop((partition, key), None)

    @rule(partition=partitions, key=keys)
    def get(self, partition: int, key: bytes) -> None:
        assert self.both("get", partition, key) == self.data.get((partition, key))

    @rule(
        partition=partitions,
        start_after=st.none() | keys,
        chunk=st.integers(min_value=1, max_value=4),
        first_limit=limits,
    )
    def scan(
        self, partition: int, start_after: bytes | None, chunk: int, first_limit: int | None
    ) -> None:
        expected = sorted(
            (key, record)
            for (p, key), record in self.data.items()
            if p == partition and (start_after is None or key > start_after)
        )
        first = self.both("scan", partition, start_after=start_after, limit=first_limit)
        assert first == expected[:first_limit]
        collected: list[tuple[bytes, bytes]] = []
        cursor = start_after
        while True:
            page = self.both("scan", partition, start_after=cursor, limit=chunk)
            collected.extend(page)
            if len(page) < chunk:
                break
            cursor = page[-1][0]
        assert collected == expected

    @rule()
    def scan_all_and_count(self) -> None:
        expected = sorted((p, key, record) for (p, key), record in self.data.items())
        assert list(self.memory.scan_all()) == expected
        assert list(self.leveldb.scan_all()) == expected
        assert self.both("count") == len(self.data)

    @rule(name=meta_names, value=records)
    def put_meta(self, name: str, value: bytes) -> None:
        self.both("put_meta", name, value)
        self.meta[name] = value

    @rule(name=meta_names)
    def get_meta(self, name: str) -> None:
        assert self.both("get_meta", name) == self.meta.get(name)

    # (Hypothesis reserves the argument name "target" for bundles, hence "node".)
    @rule(node=targets, partition=partitions, key=keys, record=records)
    def put_hint(self, node: str, partition: int, key: bytes, record: bytes) -> None:
        self.both("put_hint", node, partition, key, record)
        self.hint_model[node, partition, key] = record

    @rule(node=targets, partition=partitions, key=keys)
    def delete_hint(self, node: str, partition: int, key: bytes) -> None:
        self.both("delete_hint", node, partition, key)
        self.hint_model.pop((node, partition, key), None)

    @rule(node=targets, limit=limits)
    def hints(self, node: str, limit: int | None) -> None:
        expected = sorted((p, k, r) for (t, p, k), r in self.hint_model.items() if t == node)
        assert self.both("hints", node, limit=limit) == expected[:limit]

    @rule()
    def hint_targets(self) -> None:
        assert self.both("hint_targets") == sorted({t for t, _, _ in self.hint_model})

    @rule()
    def reopen_leveldb(self) -> None:
        self.leveldb.close()
        self.leveldb = LevelDBEngine(self.directory / "db", create_if_missing=False)

    @invariant()
    def engines_are_consistent(self) -> None:
        self.memory.check_invariants()
        self.leveldb.check_invariants()


EngineAgreement.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_agreement = EngineAgreement.TestCase
