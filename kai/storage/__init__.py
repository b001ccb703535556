"""Storage engines: LevelDB (plyvel) and the in-memory engine, behind the interface in
:mod:`kai.core.storage`, and this node's replica of the data on top of them."""

from __future__ import annotations

from pathlib import Path

from kai.core.storage import ENGINE_KINDS, StorageEngine


def open_engine(kind: str, data_dir: Path, *, sync: bool = False) -> StorageEngine:
    """Open the engine a node is configured with.

    Args:
        kind: ``"leveldb"`` (stored in ``data_dir / "db"``, created if missing) or
            ``"memory"`` (nothing on disk; everything is lost when the process ends).
        data_dir: the node's data directory.
        sync: for LevelDB, flush every write to stable storage (see `LevelDBEngine`).

    Raises:
        ValueError: ``kind`` is not one of `ENGINE_KINDS`.
        StorageError: the database cannot be opened; the message says why.
    """
    # Imported here: only kai.storage.leveldb may import plyvel, and only when it is used.
    if kind == "leveldb":
        from kai.storage.leveldb import LevelDBEngine

        return LevelDBEngine(Path(data_dir) / "db", sync=sync)
    if kind == "memory":
        from kai.storage.memory import MemoryEngine

        return MemoryEngine()
    raise ValueError(f"unknown storage engine {kind!r}; use one of {', '.join(ENGINE_KINDS)}")
