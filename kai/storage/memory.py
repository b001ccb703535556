"""An in-memory storage engine: the verified fake that tests and ``--store memory`` use.

It must behave exactly like the LevelDB engine for every sequence of calls (a Hypothesis
state machine in ``tests/test_storage.py`` checks that), and it must never touch the disk:
everything it holds is lost when the process ends. It never imports trio or plyvel.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Generic, TypeVar

from kai.core.errors import StorageError
from kai.core.storage import MAX_PARTITION, StorageEngine, StorageStatistics

_K = TypeVar("_K", bytes, tuple[int, bytes])


class _SortedTable(Generic[_K]):
    """A dict plus its keys in sorted order: O(1) reads, ordered range reads by bisection."""

    __slots__ = ("keys", "values")

    def __init__(self) -> None:
        self.values: dict[_K, bytes] = {}
        self.keys: list[_K] = []

    def put(self, key: _K, value: bytes) -> None:
        if key not in self.values:
            bisect.insort(self.keys, key)
        self.values[key] = value

    def delete(self, key: _K) -> None:
        if self.values.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]

    def after(self, start_after: _K | None, limit: int | None) -> list[tuple[_K, bytes]]:
        start = 0 if start_after is None else bisect.bisect_right(self.keys, start_after)
        stop = None if limit is None else start + limit
        values = self.values
        return [(key, values[key]) for key in self.keys[start:stop]]

    def check_invariants(self, where: str) -> None:
        if len(self.keys) != len(self.values) or set(self.keys) != self.values.keys():
            raise AssertionError(f"{where}: sorted index and dict disagree")
        if any(a >= b for a, b in zip(self.keys, self.keys[1:], strict=False)):
            raise AssertionError(f"{where}: keys are not strictly increasing")
        if not self.keys:
            raise AssertionError(f"{where}: empty table was not dropped")
        for value in self.values.values():
            if not isinstance(value, bytes):
                raise AssertionError(f"{where}: a value is {type(value).__name__}, not bytes")


class MemoryEngine(StorageEngine):
    """A `StorageEngine` that keeps everything in dictionaries.

    Point operations are O(1) (plus O(n) list insertion for a new key, a memmove); scans
    bisect into a sorted key list. Each call is atomic under the GIL; `scan_all` copies the
    index when called so that it reads a snapshot, as LevelDB's iterators do.
    """

    name = "memory"

    def __init__(self) -> None:
        self._data: dict[int, _SortedTable[bytes]] = {}
        self._meta: dict[str, bytes] = {}
        self._hint_tables: dict[str, _SortedTable[tuple[int, bytes]]] = {}

    def _get(self, partition: int, key: bytes) -> bytes | None:
        table = self._data.get(partition)
        return None if table is None else table.values.get(key)

    def _put(self, partition: int, key: bytes, record: bytes) -> None:
        table = self._data.get(partition)
        if table is None:
            table = self._data[partition] = _SortedTable()
        table.put(key, record)

    def _delete(self, partition: int, key: bytes) -> None:
        table = self._data.get(partition)
        if table is not None:
            table.delete(key)
            if not table.keys:
                del self._data[partition]

    def _write_batch(
        self, puts: list[tuple[int, bytes, bytes]], deletes: list[tuple[int, bytes]]
    ) -> None:
        # Arguments are validated already and nothing below can fail, so this is atomic.
        for partition, key, record in puts:
            self._put(partition, key, record)
        for partition, key in deletes:
            self._delete(partition, key)

    def _scan(
        self, partition: int, start_after: bytes | None, limit: int | None
    ) -> list[tuple[bytes, bytes]]:
        table = self._data.get(partition)
        return [] if table is None else table.after(start_after, limit)

    def _scan_all(self) -> Iterator[tuple[int, bytes, bytes]]:
        # Copying the index (not the records, which are immutable) makes this a snapshot.
        snapshot = [
            (partition, list(self._data[partition].keys), dict(self._data[partition].values))
            for partition in sorted(self._data)
        ]
        return self._iterate_snapshot(snapshot)

    def _iterate_snapshot(
        self, snapshot: list[tuple[int, list[bytes], dict[bytes, bytes]]]
    ) -> Iterator[tuple[int, bytes, bytes]]:
        for partition, keys, records in snapshot:
            for key in keys:
                if self._closed:
                    raise StorageError("the memory storage engine was closed during a scan")
                yield partition, key, records[key]

    def _count(self) -> int:
        return sum(len(table.keys) for table in self._data.values())

    def _get_meta(self, name: str) -> bytes | None:
        return self._meta.get(name)

    def _put_meta(self, name: str, value: bytes) -> None:
        self._meta[name] = value

    def _put_hint(self, target: str, partition: int, key: bytes, record: bytes) -> None:
        table = self._hint_tables.get(target)
        if table is None:
            table = self._hint_tables[target] = _SortedTable()
        table.put((partition, key), record)

    def _hints(
        self, target: str, start_after: tuple[int, bytes] | None, limit: int | None
    ) -> list[tuple[int, bytes, bytes]]:
        table = self._hint_tables.get(target)
        if table is None:
            return []
        return [
            (partition, key, record) for (partition, key), record in table.after(start_after, limit)
        ]

    def _get_hint(self, target: str, partition: int, key: bytes) -> bytes | None:
        table = self._hint_tables.get(target)
        return None if table is None else table.values.get((partition, key))

    def _delete_hint(self, target: str, partition: int, key: bytes) -> None:
        table = self._hint_tables.get(target)
        if table is not None:
            table.delete((partition, key))
            if not table.keys:
                del self._hint_tables[target]

    def _hint_targets(self) -> list[str]:
        return sorted(self._hint_tables)

    def _close(self) -> None:
        self._data.clear()
        self._meta.clear()
        self._hint_tables.clear()

    def _check_invariants(self) -> None:
        for partition, table in self._data.items():
            if not 0 <= partition <= MAX_PARTITION:
                raise AssertionError(f"bad partition id {partition!r}")
            table.check_invariants(f"partition {partition}")
            if not all(table.keys):
                raise AssertionError(f"partition {partition}: a key is empty")
        for target, hint_table in self._hint_tables.items():
            if not target:
                raise AssertionError("empty hint target")
            hint_table.check_invariants(f"hints for {target}")
            if not all(0 <= p <= MAX_PARTITION and key for p, key in hint_table.keys):
                raise AssertionError(f"hints for {target}: bad partition or empty key")
        if not all(self._meta):
            raise AssertionError("empty metadata name")

    def _statistics(self) -> StorageStatistics:
        return StorageStatistics(engine=self.name)
