"""When this node last served each key to a meta get: memcached's ``h``, ``l`` and ``me``'s
``fetch``/``la``.

memcached keeps "fetched before?" and "last access" in each item and updates them on every
read. Kai never writes on a read (a read is a quorum of replicas), so it keeps them per
node, in memory, for at most :data:`DEFAULT_CAPACITY` keys (the least recently served are
forgotten first): a key this node has not served since its current version was written
shows "not fetched" and the time since that write, as memcached does for an item never
read. Each entry names the version it was served for (its dot), so a new write of the key
starts over. Pure code: callers pass the time in; never I/O.
"""

from __future__ import annotations

from typing import Final

from kai.core.vclock import Dot
from kai.core.versions import Version

#: The most keys remembered (about 20 MB at most with 250-byte keys).
DEFAULT_CAPACITY: Final = 65_536


class AccessLog:
    """The last time this node served each key's version, for at most ``capacity`` keys."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        # key -> (dot of the version served, unix time); insertion order = least recent first.
        self._served: dict[bytes, tuple[Dot, float]] = {}

    def before(self, key: bytes, version: Version, now: float) -> tuple[bool, int]:
        """Whether ``version`` of ``key`` was served here before, and the whole seconds since
        it was last served (or, if never, since it was written)."""
        # Whole seconds of the clock, as memcached's clock ticks (a write at 10.9 s is one
        # second old at 11.0 s).
        served = self._served.get(key)
        if served is not None and served[0] == version.dot:
            return True, max(int(now) - int(served[1]), 0)
        return False, max(int(now) - version.timestamp // 1_000_000, 0)

    def served(self, key: bytes, version: Version, now: float) -> None:
        """Remember that ``version`` of ``key`` was served at ``now``."""
        served = self._served
        served.pop(key, None)
        served[key] = (version.dot, now)
        if len(served) > self.capacity:
            del served[next(iter(served))]

    def __len__(self) -> int:
        return len(self._served)

    def check_invariants(self) -> None:
        """Assert the log holds no more than its capacity (used by tests)."""
        assert len(self._served) <= self.capacity, (len(self._served), self.capacity)
