"""The coordinator interface the memcached front end talks to, and its single-node form.

The front end only ever calls :class:`Coordinator`: reads return sibling sets with their
causal context, writes carry a context. The cluster coordinator (quorum fan-out, forwarding,
read repair) implements the same interface, so the protocol code never changes.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence

from kai.core.vclock import VClock
from kai.core.versions import SiblingSet, Version, cas_unique, context_of
from kai.storage.replica import LocalReplica, Payload


class ReadResult:
    """What a read found for one key: every sibling, and the causal context to write with.

    The context is computed on first use: a plain ``get`` never needs it.
    """

    __slots__ = ("_context", "siblings")

    def __init__(self, siblings: SiblingSet, context: VClock | None = None) -> None:
        self.siblings = siblings
        self._context = context

    @classmethod
    def of(cls, siblings: SiblingSet) -> ReadResult:
        """Wrap a sibling set."""
        return cls(siblings)

    @property
    def context(self) -> VClock:
        """The merged clock of every sibling read."""
        if self._context is None:
            self._context = context_of(self.siblings)
        return self._context

    @property
    def cas_unique(self) -> int:
        """memcached's cas token for this read."""
        return cas_unique(self.context)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadResult):
            return NotImplemented
        return self.siblings == other.siblings

    def __hash__(self) -> int:
        return hash(self.siblings)

    def __repr__(self) -> str:
        return f"ReadResult({self.siblings!r})"


class Coordinator(abc.ABC):
    """Reads and writes keys on behalf of clients, wherever the replicas are.

    Errors: :class:`~kai.core.errors.CoordinatorError` when a quorum cannot be met (the client sees
    ``SERVER_ERROR``), :class:`~kai.core.errors.TooManySiblings` when a write is refused.
    """

    @abc.abstractmethod
    async def get(self, key: bytes) -> ReadResult:
        """Read ``key``'s siblings and causal context."""

    async def get_many(self, keys: Sequence[bytes]) -> list[ReadResult]:
        """Read several keys (a multi-get); results are in the order of ``keys``."""
        return [await self.get(key) for key in keys]

    @abc.abstractmethod
    async def put(self, key: bytes, payload: Payload, *, context: VClock | None) -> Version:
        """Write ``payload`` as a new version of ``key``.

        Args:
            key: the key.
            payload: flags, absolute expiry and value (None deletes with a tombstone).
            context: the causal context of a previous read (the new version supersedes
                exactly that); None supersedes every version the coordinator knows.
        """

    def get_at_once(self, key: bytes) -> ReadResult | None:
        """What :meth:`get` returns, when no other node takes part in the read (a cluster of
        one); None when the read must go through :meth:`get`. Never waits."""
        return None

    def put_at_once(
        self, key: bytes, payload: Payload, *, context: VClock | None
    ) -> Version | None:
        """What :meth:`put` does and returns, when no other node takes part in the write; None
        (having written nothing) when the write must go through :meth:`put`. Never waits.

        Raises:
            TooManySiblings: as :meth:`put`.
        """
        return None

    @abc.abstractmethod
    async def flush_all(self, at: int) -> None:
        """Make every version written before unix time ``at`` (microseconds) invisible."""

    @abc.abstractmethod
    def flushed_before(self, now: float) -> int:
        """The flush cutoff (microseconds) in effect at unix time ``now``."""

    @abc.abstractmethod
    def members(self) -> list[str]:
        """The cluster's members as ``host:rpc_port``, sorted."""


class LocalCoordinator(Coordinator):
    """A cluster of one: every key lives in this node's replica.

    Reads and writes are single synchronous storage calls, so each one is atomic on this node.
    """

    def __init__(
        self,
        replica: LocalReplica,
        *,
        node_name: str,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.replica = replica
        self.node_name = node_name
        self.wall_clock = wall_clock

    async def get(self, key: bytes) -> ReadResult:
        """Read from the local replica."""
        return ReadResult.of(self.replica.read(key))

    def get_at_once(self, key: bytes) -> ReadResult | None:
        """Read from the local replica."""
        return ReadResult.of(self.replica.read(key))

    async def get_many(self, keys: Sequence[bytes]) -> list[ReadResult]:
        """Read every key from the local replica without yielding in between."""
        read = self.replica.read
        return [ReadResult.of(read(key)) for key in keys]

    async def put(self, key: bytes, payload: Payload, *, context: VClock | None) -> Version:
        """Write to the local replica."""
        return self.replica.coordinate_write(key, payload, context)

    def put_at_once(
        self, key: bytes, payload: Payload, *, context: VClock | None
    ) -> Version | None:
        """Write to the local replica."""
        return self.replica.coordinate_write(key, payload, context)

    async def flush_all(self, at: int) -> None:
        """Record the flush locally."""
        self.replica.flush(at)

    def flushed_before(self, now: float) -> int:
        """The local flush cutoff."""
        return self.replica.flushed_before(now)

    def members(self) -> list[str]:
        """Just this node."""
        return [self.node_name]
