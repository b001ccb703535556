"""The storage engine contract: opaque records per (partition, key), plus metadata and hints.

An engine stores bytes and gives them back; it never interprets a record (the sibling-set
codec lives in `kai.core.versions`) and never decides what to keep (tombstones, GC and conflict
resolution belong to the layers above). It is synchronous: point reads and writes take
microseconds and are called straight from the event loop, and long scans are chunked by the
caller with ``scan(..., start_after=..., limit=...)``. This module must never import trio or
plyvel.

Three namespaces live in one engine:

- **data**: ``(partition, key) -> record``; a partition is an integer in ``0 .. 2**32 - 1``
  and a key is non-empty bytes. One partition is one ordered range (transfer, anti-entropy).
- **metadata**: ``name -> bytes`` for small node-local state (actor id, membership view).
- **hints**: ``(target, partition, key) -> record``, the hinted-handoff store, grouped by the
  node (``"host:port"``) the record is meant for.

Invalid arguments (a partition out of range, an empty key, a record that is not `bytes`) are
programming errors and raise `ValueError` or `TypeError` before anything is written. Failures
of the engine itself, and any use after `StorageEngine.close`, raise `kai.core.errors.StorageError`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Self

import attrs

from kai.core.errors import StorageError

#: The largest partition id; partitions are stored as 4 bytes, big-endian.
MAX_PARTITION = 2**32 - 1

#: The longest hint target, in UTF-8 bytes (it is stored with a 2-byte length prefix).
MAX_TARGET_BYTES = 2**16 - 1

#: Engine kinds accepted by `open_engine`.
ENGINE_KINDS = ("leveldb", "memory")


def _non_negative_or_none(
    _instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0 or None, not {value}")


@attrs.frozen
class StorageStatistics:
    """A cheap snapshot of an engine's state, for ``stats`` and ``kai-admin``.

    Attributes:
        engine: the engine's `StorageEngine.name` (``"leveldb"`` or ``"memory"``).
        path: the database directory, or None for an engine without one.
        sync: whether every write is flushed to stable storage before it returns.
        approximate_disk_bytes: bytes the database occupies on disk, or None if not on disk.
    """

    engine: str = attrs.field(validator=attrs.validators.min_len(1))
    path: str | None = None
    sync: bool = False
    approximate_disk_bytes: int | None = attrs.field(default=None, validator=_non_negative_or_none)


def check_partition(partition: int) -> None:
    """Raise if ``partition`` is not an integer in ``0 .. MAX_PARTITION``."""
    if not isinstance(partition, int):
        raise TypeError(f"partition must be an int, not {type(partition).__name__}")
    if not 0 <= partition <= MAX_PARTITION:
        raise ValueError(f"partition must be in 0..{MAX_PARTITION}, not {partition}")


def check_key(key: bytes) -> None:
    """Raise if ``key`` is not non-empty `bytes` (its length limit is enforced above us)."""
    if not isinstance(key, bytes):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")


def check_bytes(what: str, value: bytes) -> None:
    """Raise if ``value`` (a record or metadata value, possibly empty) is not `bytes`."""
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")


def check_name(what: str, name: str, max_bytes: int | None = None) -> None:
    """Raise if ``name`` (a metadata name or hint target) is not a non-empty `str`."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if max_bytes is not None and len(name.encode()) > max_bytes:
        raise ValueError(f"{what} must be at most {max_bytes} UTF-8 bytes, not {name!r}")


def check_limit(limit: int | None) -> None:
    """Raise if ``limit`` is neither None nor a non-negative integer."""
    if limit is None:
        return
    if not isinstance(limit, int):
        raise TypeError(f"limit must be None or an int, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be None or >= 0, not {limit}")


class StorageEngine(abc.ABC):
    """A synchronous ordered key-value engine holding data records, metadata and hints.

    Public methods validate their arguments, refuse to run after `close`, and delegate to the
    underscore methods that subclasses implement; so every engine rejects the same bad input
    in the same way. Writes are atomic per call: `put` writes one record, `write_batch` writes
    all of its puts and deletes or none of them.

    Engines may be used as context managers; leaving the ``with`` block closes them.
    """

    #: Short engine name, shown as ``kai_store`` in ``stats``.
    name: str

    _closed: bool = False

    # -- data ------------------------------------------------------------------------------

    def get(self, partition: int, key: bytes) -> bytes | None:
        """The record stored under ``(partition, key)``, or None if there is none."""
        self._check_open()
        check_partition(partition)
        check_key(key)
        return self._get(partition, key)

    def put(self, partition: int, key: bytes, record: bytes) -> None:
        """Store ``record`` under ``(partition, key)``, replacing any previous record."""
        self._check_open()
        check_partition(partition)
        check_key(key)
        check_bytes("record", record)
        self._put(partition, key, record)

    def delete(self, partition: int, key: bytes) -> None:
        """Physically remove ``(partition, key)``; nothing happens if it is absent.

        This is not how a client delete works (that writes a tombstone record); it is for
        garbage collection and for dropping a partition after ownership transfer.
        """
        self._check_open()
        check_partition(partition)
        check_key(key)
        self._delete(partition, key)

    def write_batch(
        self,
        puts: Iterable[tuple[int, bytes, bytes]],
        deletes: Iterable[tuple[int, bytes]] = (),
    ) -> None:
        """Apply ``puts`` (partition, key, record) and ``deletes`` (partition, key) atomically.

        Either every operation lands or none does. Puts are applied in order (the last put of
        a key wins), then deletes; so a key that is both put and deleted ends up absent. All
        arguments are validated before anything is written.
        """
        self._check_open()
        put_list = list(puts)
        delete_list = list(deletes)
        for partition, key, record in put_list:
            check_partition(partition)
            check_key(key)
            check_bytes("record", record)
        for partition, key in delete_list:
            check_partition(partition)
            check_key(key)
        self._write_batch(put_list, delete_list)

    def scan(
        self, partition: int, *, start_after: bytes | None = None, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` ``(key, record)`` pairs of one partition, in key order.

        Args:
            partition: the partition to read.
            start_after: only keys strictly greater than this (bytewise) are returned; pass
                the last key of the previous chunk to resume a chunked scan.
            limit: the most pairs to return; None means all of them.
        """
        self._check_open()
        check_partition(partition)
        if start_after is not None:
            check_bytes("start_after", start_after)
        check_limit(limit)
        if limit == 0:
            return []
        return self._scan(partition, start_after, limit)

    def scan_all(self) -> Iterator[tuple[int, bytes, bytes]]:
        """Every ``(partition, key, record)``, in partition then key order.

        The iterator reads a consistent snapshot taken when this method is called; writes
        made while it is consumed are not seen. It raises `StorageError` if the engine is
        closed before it is exhausted. This is a long scan: run it in a worker thread.
        """
        self._check_open()
        return self._scan_all()

    def count(self) -> int:
        """The number of data records (metadata and hints excluded). May scan everything."""
        self._check_open()
        return self._count()

    # -- metadata --------------------------------------------------------------------------

    def get_meta(self, name: str) -> bytes | None:
        """The metadata value stored under ``name``, or None."""
        self._check_open()
        check_name("metadata name", name)
        return self._get_meta(name)

    def put_meta(self, name: str, value: bytes) -> None:
        """Store a metadata value under ``name``, replacing any previous value."""
        self._check_open()
        check_name("metadata name", name)
        check_bytes("metadata value", value)
        self._put_meta(name, value)

    # -- hints -----------------------------------------------------------------------------

    def put_hint(self, target: str, partition: int, key: bytes, record: bytes) -> None:
        """Keep ``record`` for node ``target`` (``"host:port"``) until it can be handed off.

        There is at most one hint per ``(target, partition, key)``; a later hint replaces an
        earlier one, so the caller merges sibling sets before storing.
        """
        self._check_open()
        check_name("hint target", target, MAX_TARGET_BYTES)
        check_partition(partition)
        check_key(key)
        check_bytes("record", record)
        self._put_hint(target, partition, key, record)

    def hints(
        self,
        target: str,
        *,
        start_after: tuple[int, bytes] | None = None,
        limit: int | None = None,
    ) -> list[tuple[int, bytes, bytes]]:
        """Up to ``limit`` hints for ``target`` as ``(partition, key, record)``, in that order,
        starting after ``(partition, key)`` ``start_after`` if given."""
        self._check_open()
        check_name("hint target", target, MAX_TARGET_BYTES)
        check_limit(limit)
        if start_after is not None:
            check_partition(start_after[0])
            check_key(start_after[1])
        if limit == 0:
            return []
        return self._hints(target, start_after, limit)

    def get_hint(self, target: str, partition: int, key: bytes) -> bytes | None:
        """The hint kept for ``target`` under ``(partition, key)``, or None."""
        self._check_open()
        check_name("hint target", target, MAX_TARGET_BYTES)
        check_partition(partition)
        check_key(key)
        return self._get_hint(target, partition, key)

    def delete_hint(self, target: str, partition: int, key: bytes) -> None:
        """Forget the hint for ``(target, partition, key)``; nothing happens if it is absent."""
        self._check_open()
        check_name("hint target", target, MAX_TARGET_BYTES)
        check_partition(partition)
        check_key(key)
        self._delete_hint(target, partition, key)

    def hint_targets(self) -> list[str]:
        """The targets that have at least one hint, sorted."""
        self._check_open()
        return self._hint_targets()

    # -- lifecycle and introspection -------------------------------------------------------

    def close(self) -> None:
        """Release the engine. Idempotent; any later use raises `StorageError`."""
        if self._closed:
            return
        self._closed = True
        self._close()

    @property
    def closed(self) -> bool:
        """Whether `close` has been called."""
        return self._closed

    def check_invariants(self) -> None:
        """Check the engine's internal consistency; raise `AssertionError` if it is broken.

        This may read everything; it is for tests and offline verification.
        """
        self._check_open()
        self._check_invariants()

    def statistics(self) -> StorageStatistics:
        """A cheap snapshot of the engine's state (it never scans the data)."""
        self._check_open()
        return self._statistics()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"the {self.name} storage engine is closed")

    # -- implemented by engines (arguments are already validated) --------------------------

    @abc.abstractmethod
    def _get(self, partition: int, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def _put(self, partition: int, key: bytes, record: bytes) -> None: ...

    @abc.abstractmethod
    def _delete(self, partition: int, key: bytes) -> None: ...

    @abc.abstractmethod
    def _write_batch(
        self, puts: list[tuple[int, bytes, bytes]], deletes: list[tuple[int, bytes]]
    ) -> None: ...

    @abc.abstractmethod
    def _scan(
        self, partition: int, start_after: bytes | None, limit: int | None
    ) -> list[tuple[bytes, bytes]]: ...

    @abc.abstractmethod
    def _scan_all(self) -> Iterator[tuple[int, bytes, bytes]]:
        """Take the snapshot now (not lazily) and return an iterator over it."""

    @abc.abstractmethod
    def _count(self) -> int: ...

    @abc.abstractmethod
    def _get_meta(self, name: str) -> bytes | None: ...

    @abc.abstractmethod
    def _put_meta(self, name: str, value: bytes) -> None: ...

    @abc.abstractmethod
    def _put_hint(self, target: str, partition: int, key: bytes, record: bytes) -> None: ...

    @abc.abstractmethod
    def _hints(
        self, target: str, start_after: tuple[int, bytes] | None, limit: int | None
    ) -> list[tuple[int, bytes, bytes]]: ...

    @abc.abstractmethod
    def _get_hint(self, target: str, partition: int, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def _delete_hint(self, target: str, partition: int, key: bytes) -> None: ...

    @abc.abstractmethod
    def _hint_targets(self) -> list[str]: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    @abc.abstractmethod
    def _check_invariants(self) -> None: ...

    @abc.abstractmethod
    def _statistics(self) -> StorageStatistics: ...
