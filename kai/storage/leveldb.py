"""The LevelDB storage engine (plyvel): where a node's records, metadata and hints persist.

This is the only module in Kai that may import plyvel. It stores opaque bytes and must never
interpret them, never await, and never let a plyvel exception escape: every failure becomes a
`kai.core.errors.StorageError` that names the database path and what the operator should do.

On-disk layout (one LevelDB database, ordered bytewise):

- ``b"d" + partition (4 bytes, big-endian) + key`` -> record. One partition is one range,
  and partitions sort numerically.
- ``b"m" + name (UTF-8)`` -> metadata value.
- ``b"h" + len(target) (2 bytes, big-endian) + target (UTF-8) + partition (4 bytes) + key``
  -> hinted record. The length prefix keeps one target's hints from running into another's.
- ``b"v"`` -> layout version (`LAYOUT_VERSION`), written when the database is created; an
  existing database with another version, or with data but no version, is refused.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import plyvel

from kai.core.errors import StorageError
from kai.core.storage import MAX_PARTITION, StorageEngine, StorageStatistics

#: The layout version this module reads and writes.
LAYOUT_VERSION = b"1"

_DATA = b"d"
_DATA_END = b"e"
_META = b"m"
_HINT = b"h"
_HINT_END = b"i"
_LAYOUT = b"v"

#: Bits per key of the bloom filter: most writes first read a key that is often absent.
_BLOOM_FILTER_BITS = 10


def _partition_prefix(partition: int) -> bytes:
    return _DATA + partition.to_bytes(4, "big")


def _partition_end(partition: int) -> bytes:
    return _DATA_END if partition == MAX_PARTITION else _partition_prefix(partition + 1)


def _target_prefix(target: str) -> bytes:
    encoded = target.encode()
    return _HINT + len(encoded).to_bytes(2, "big") + encoded


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("a prefix of only 0xff bytes has no upper bound")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _parse_hint_key(db_key: bytes) -> tuple[str, int, bytes]:
    """Split a hint key into (target, partition, key); raise `ValueError` if malformed."""
    length = int.from_bytes(db_key[1:3], "big")
    target_end = 3 + length
    if length == 0 or len(db_key) < target_end + 5:
        raise ValueError(f"malformed hint key {db_key!r}")
    target = db_key[3:target_end].decode()
    partition = int.from_bytes(db_key[target_end : target_end + 4], "big")
    return target, partition, db_key[target_end + 4 :]


def _detail(exc: BaseException) -> str:
    """The text of a plyvel error (plyvel puts LevelDB's status message in bytes)."""
    if exc.args and isinstance(exc.args[0], bytes):
        return exc.args[0].decode(errors="replace")
    return str(exc)


class LevelDBEngine(StorageEngine):
    """A `StorageEngine` on a LevelDB database directory, through plyvel.

    Durability: with ``sync=False`` (the default) a write returns once it is in LevelDB's
    log in the operating system's page cache. That survives a crash of the process (checked
    with ``kill -9`` after 50 000 writes: none lost) but not a power loss or kernel crash,
    which may lose the last writes; replication to N nodes is what protects those. With
    ``sync=True`` every write is fsynced before it returns, which is much slower.

    Reads and point writes go straight to plyvel. Each ``scan``/``scan_all``/``count``
    iterator reads a consistent snapshot. The engine is safe to call from several threads
    (LevelDB is), but `close` must only be called once no other thread is using it.
    """

    name = "leveldb"

    def __init__(
        self,
        path: Path,
        *,
        sync: bool = False,
        create_if_missing: bool = True,
        block_cache_size: int = 8 * 1024 * 1024,
        write_buffer_size: int = 4 * 1024 * 1024,
    ) -> None:
        """Open (and, by default, create) the database in directory ``path``.

        Args:
            path: the LevelDB directory, usually ``<data-dir>/db``.
            sync: fsync every write before returning (see the class docstring).
            create_if_missing: create the directory and an empty database if absent;
                otherwise a missing database is an error.
            block_cache_size: bytes of LevelDB's block cache for uncompressed blocks.
            write_buffer_size: bytes of writes LevelDB buffers before writing a table file.

        Raises:
            StorageError: the database cannot be opened: it is locked by another process
                (most likely another kai on the same data directory), missing, unreadable,
                corrupt, or not a Kai database.
        """
        self._path = Path(path)
        self._sync = sync
        if not create_if_missing and not (self._path / "CURRENT").is_file():
            # Checked here because LevelDB would create the directory before failing.
            raise StorageError(
                f"cannot open the LevelDB database in {self._path}: there is no database "
                "here; check the --data-dir path"
            )
        if create_if_missing:
            try:
                self._path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create the database directory {self._path}: {exc}; "
                    "check the --data-dir path and its permissions"
                ) from exc
        try:
            self._db: Any = plyvel.DB(
                str(self._path),
                create_if_missing=create_if_missing,
                lru_cache_size=block_cache_size,
                write_buffer_size=write_buffer_size,
                bloom_filter_bits=_BLOOM_FILTER_BITS,
            )
        except plyvel.Error as exc:
            raise self._open_error(exc) from exc
        try:
            self._check_layout()
        except BaseException:
            self._db.close()
            raise

    @property
    def path(self) -> Path:
        """The database directory."""
        return self._path

    def _open_error(self, exc: BaseException) -> StorageError:
        detail = _detail(exc)
        if isinstance(exc, plyvel.IOError) and "lock" in detail.lower():
            advice = (
                "is another kai running on this data directory? "
                "Stop it, or give this node its own --data-dir"
            )
        elif isinstance(exc, plyvel.CorruptionError):
            advice = (
                "the database is corrupt; move the data directory aside and restart the node "
                "empty so that it re-replicates from its peers"
            )
        elif "does not exist" in detail or "NotFound" in detail:
            advice = "there is no database here; check the --data-dir path"
        else:
            advice = "check that the directory is readable and writable and the disk is not full"
        return StorageError(f"cannot open the LevelDB database in {self._path}: {detail}; {advice}")

    def _failure(self, action: str, exc: BaseException) -> NoReturn:
        advice = (
            "the database is corrupt; move the data directory aside and restart the node empty"
            if isinstance(exc, plyvel.CorruptionError)
            else "check the disk (space, permissions, errors in the kernel log)"
        )
        raise StorageError(
            f"LevelDB {action} failed in {self._path}: {_detail(exc)}; {advice}"
        ) from exc

    def _check_layout(self) -> None:
        try:
            version = self._db.get(_LAYOUT)
            if version is None:
                with self._db.iterator(include_value=False) as iterator:
                    first = next(iterator, None)
                if first is not None:
                    raise StorageError(
                        f"the LevelDB database in {self._path} holds keys but no Kai layout "
                        "version; it was not written by kai. Use another --data-dir"
                    )
                self._db.put(_LAYOUT, LAYOUT_VERSION, sync=True)
            elif version != LAYOUT_VERSION:
                raise StorageError(
                    f"the LevelDB database in {self._path} has layout version "
                    f"{version.decode(errors='replace')!r}, but this kai reads version "
                    f"{LAYOUT_VERSION.decode()}; run a kai release that matches the data"
                )
        except plyvel.Error as exc:
            self._failure("open", exc)

    # -- data ------------------------------------------------------------------------------

    def _get(self, partition: int, key: bytes) -> bytes | None:
        try:
            record: bytes | None = self._db.get(_partition_prefix(partition) + key)
        except plyvel.Error as exc:
            self._failure("read", exc)
        return record

    def _put(self, partition: int, key: bytes, record: bytes) -> None:
        try:
            self._db.put(_partition_prefix(partition) + key, record, sync=self._sync)
        except plyvel.Error as exc:
            self._failure("write", exc)

    def _delete(self, partition: int, key: bytes) -> None:
        try:
            self._db.delete(_partition_prefix(partition) + key, sync=self._sync)
        except plyvel.Error as exc:
            self._failure("delete", exc)

    def _write_batch(
        self, puts: list[tuple[int, bytes, bytes]], deletes: list[tuple[int, bytes]]
    ) -> None:
        try:
            with self._db.write_batch(transaction=True, sync=self._sync) as batch:
                for partition, key, record in puts:
                    batch.put(_partition_prefix(partition) + key, record)
                for partition, key in deletes:
                    batch.delete(_partition_prefix(partition) + key)
        except plyvel.Error as exc:
            self._failure("batch write", exc)

    def _scan(
        self, partition: int, start_after: bytes | None, limit: int | None
    ) -> list[tuple[bytes, bytes]]:
        prefix = _partition_prefix(partition)
        start = prefix if start_after is None else prefix + start_after
        skip = len(prefix)
        try:
            with self._db.iterator(
                start=start, include_start=start_after is None, stop=_partition_end(partition)
            ) as iterator:
                return [
                    (db_key[skip:], record) for db_key, record in itertools.islice(iterator, limit)
                ]
        except plyvel.Error as exc:
            self._failure("scan", exc)

    def _scan_all(self) -> Iterator[tuple[int, bytes, bytes]]:
        # Created here, not in the generator, so that the snapshot is taken now.
        try:
            iterator = self._db.iterator(start=_DATA, stop=_DATA_END)
        except plyvel.Error as exc:
            self._failure("scan", exc)
        return self._iterate_data(iterator)

    def _iterate_data(self, iterator: Any) -> Iterator[tuple[int, bytes, bytes]]:
        try:
            with iterator:
                for db_key, record in iterator:
                    yield int.from_bytes(db_key[1:5], "big"), db_key[5:], record
        except plyvel.Error as exc:
            self._failure("scan", exc)
        except RuntimeError as exc:
            # plyvel raises RuntimeError once the database is closed under an iterator.
            raise StorageError(
                f"the LevelDB database in {self._path} was closed during a scan"
            ) from exc

    def _count(self) -> int:
        try:
            with self._db.iterator(start=_DATA, stop=_DATA_END, include_value=False) as keys:
                return sum(1 for _ in keys)
        except plyvel.Error as exc:
            self._failure("scan", exc)

    # -- metadata --------------------------------------------------------------------------

    def _get_meta(self, name: str) -> bytes | None:
        try:
            value: bytes | None = self._db.get(_META + name.encode())
        except plyvel.Error as exc:
            self._failure("read", exc)
        return value

    def _put_meta(self, name: str, value: bytes) -> None:
        try:
            self._db.put(_META + name.encode(), value, sync=self._sync)
        except plyvel.Error as exc:
            self._failure("write", exc)

    # -- hints -----------------------------------------------------------------------------

    def _put_hint(self, target: str, partition: int, key: bytes, record: bytes) -> None:
        db_key = _target_prefix(target) + partition.to_bytes(4, "big") + key
        try:
            self._db.put(db_key, record, sync=self._sync)
        except plyvel.Error as exc:
            self._failure("write", exc)

    def _hints(
        self, target: str, start_after: tuple[int, bytes] | None, limit: int | None
    ) -> list[tuple[int, bytes, bytes]]:
        prefix = _target_prefix(target)
        skip = len(prefix)
        after = b""
        if start_after is not None:
            after = prefix + start_after[0].to_bytes(4, "big") + start_after[1]
        try:
            if start_after is None:
                iterator = self._db.iterator(prefix=prefix)
            else:
                iterator = self._db.iterator(start=after, stop=_prefix_end(prefix))
            with iterator:
                entries = (entry for entry in iterator if entry[0] != after)
                return [
                    (int.from_bytes(db_key[skip : skip + 4], "big"), db_key[skip + 4 :], record)
                    for db_key, record in itertools.islice(entries, limit)
                ]
        except plyvel.Error as exc:
            self._failure("scan", exc)

    def _get_hint(self, target: str, partition: int, key: bytes) -> bytes | None:
        db_key = _target_prefix(target) + partition.to_bytes(4, "big") + key
        try:
            value: bytes | None = self._db.get(db_key)
        except plyvel.Error as exc:
            self._failure("read", exc)
        return value

    def _delete_hint(self, target: str, partition: int, key: bytes) -> None:
        db_key = _target_prefix(target) + partition.to_bytes(4, "big") + key
        try:
            self._db.delete(db_key, sync=self._sync)
        except plyvel.Error as exc:
            self._failure("delete", exc)

    def _hint_targets(self) -> list[str]:
        # Jump from one target to the next instead of reading every hint.
        targets = []
        try:
            with self._db.iterator(start=_HINT, stop=_HINT_END, include_value=False) as keys:
                for db_key in keys:
                    target, _partition, _key = _parse_hint_key(db_key)
                    targets.append(target)
                    keys.seek(_prefix_end(_target_prefix(target)))
        except plyvel.Error as exc:
            self._failure("scan", exc)
        except ValueError as exc:
            raise StorageError(
                f"the LevelDB database in {self._path} holds a malformed hint ({exc}); "
                "it may be corrupt"
            ) from exc
        return sorted(targets)

    # -- lifecycle and introspection -------------------------------------------------------

    def _close(self) -> None:
        try:
            self._db.close()
        except plyvel.Error as exc:
            self._failure("close", exc)

    def _check_invariants(self) -> None:
        try:
            with self._db.iterator() as iterator:
                for db_key, value in iterator:
                    self._check_entry(db_key, value)
        except plyvel.Error as exc:
            self._failure("scan", exc)

    @staticmethod
    def _check_entry(db_key: bytes, value: bytes) -> None:
        kind = db_key[:1]
        if kind == _DATA:
            if len(db_key) < 6:
                raise AssertionError(f"data key too short: {db_key!r}")
        elif kind == _HINT:
            try:
                _parse_hint_key(db_key)
            except ValueError as exc:  # also UnicodeDecodeError
                raise AssertionError(f"malformed hint key {db_key!r}: {exc}") from exc
        elif kind == _META:
            try:
                name = db_key[1:].decode()
            except UnicodeDecodeError as exc:
                raise AssertionError(f"metadata name is not UTF-8: {db_key!r}") from exc
            if not name:
                raise AssertionError("empty metadata name")
        elif db_key == _LAYOUT:
            if value != LAYOUT_VERSION:
                raise AssertionError(f"layout version changed to {value!r}")
        else:
            raise AssertionError(f"key outside every namespace: {db_key!r}")

    def _statistics(self) -> StorageStatistics:
        try:
            disk_bytes: int | None = sum(
                entry.stat().st_size for entry in os.scandir(self._path) if entry.is_file()
            )
        except OSError:
            disk_bytes = None
        return StorageStatistics(
            engine=self.name,
            path=str(self._path),
            sync=self._sync,
            approximate_disk_bytes=disk_bytes,
        )
