"""The RPC methods a node serves to its peers' coordinators, and their wire encoding.

Four methods, all called by :class:`~kai.cluster.coordinator.ClusterCoordinator` on peers:

``replica_read(keys: list[bytes]) -> list[bytes | None]``
    The stored sibling set of each key as a record (:func:`~kai.core.versions.encode_siblings`),
    None when the key is absent. One call carries every key of a multi-get that the peer holds.
    The answer may cover only the first keys (at least one): records stop once they reach
    :data:`READ_REPLY_BUDGET` bytes, and the caller asks again for the rest, so a multi-get of
    large values never needs a message over the RPC size limit.
``replica_apply(key: bytes, record: bytes) -> bool``
    Merge versions coordinated elsewhere (replication, read repair) under the replica write
    rule; True when something was stored, False when the versions were already known or
    superseded (a late, stale write is dropped).
``coordinate_put(key, flags, expiry, value: bytes | None, context) -> bytes``
    Coordinate a write forwarded by a node that is not a primary of ``key``; ``context`` is
    None or a list of ``[actor: bytes, counter: int, timestamp: int]``. Returns the written
    version as a one-version record.
``flush(at: int) -> None``
    Record a ``flush_all`` taking effect at ``at`` (unix microseconds).

Handlers validate every parameter and raise :class:`~kai.core.errors.RpcBadRequest` for bad input:
a confused or hostile peer must never store a malformed record or crash a node. They never
forward a request to another node (forwarding happens once, on the node a client talked to).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeGuard

import msgpack
import trio

from kai.core.errors import (
    QuorumTimeout,
    QuorumUnavailable,
    RpcBadRequest,
    RpcError,
    RpcQuorumTimeout,
    RpcQuorumUnavailable,
    RpcTooManySiblings,
    TooManySiblings,
)
from kai.core.pending import Pending, Step, waits
from kai.core.rpc.protocol import MAX_MESSAGE_SIZE
from kai.core.vclock import VClock
from kai.core.versions import SiblingSet, Version, decode_siblings, encode_siblings
from kai.rpc.server import Handler
from kai.storage.replica import LocalReplica, Payload

logger = logging.getLogger(__name__)

#: The longest key memcached (and so Kai) accepts.
KEY_MAX_LENGTH = 250
#: The most keys one ``replica_read`` call may carry.
MAX_READ_BATCH = 100_000
#: How many keys a ``replica_read`` handler reads between checkpoints, so that a huge batch
#: does not stall the event loop.
READ_CHUNK = 1024
#: A ``replica_read`` answer stops adding records once they reach this many bytes (half the
#: RPC message limit, leaving room for framing); the caller asks again for the rest.
READ_REPLY_BUDGET = MAX_MESSAGE_SIZE // 2
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1

#: A write forwarded to a primary: ``coordinate_write(key, payload, context) -> Version``.
CoordinateWrite = Callable[[bytes, Payload, VClock | None], Awaitable[Version]]


# --- errors a forwarded write carries back --------------------------------------------------
#
# A forwarded ``coordinate_put`` can fail on the primary in ways the client must hear about
# exactly as if the write had been coordinated where it arrived. These RPC errors carry them
# across the wire; :func:`raise_forwarded` turns them back into the coordinator's errors.


def raise_forwarded(error: RpcError) -> None:
    """Re-raise the coordinator error a primary sent back for a forwarded write, if it is one.

    Raises:
        QuorumTimeout, QuorumUnavailable, TooManySiblings: what the primary raised.
    """
    if isinstance(error, RpcQuorumTimeout):
        raise QuorumTimeout(f"forwarded write: {error}") from error
    if isinstance(error, RpcQuorumUnavailable):
        raise QuorumUnavailable(f"forwarded write: {error}") from error
    if isinstance(error, RpcTooManySiblings):
        raise TooManySiblings(str(error)) from error


# --- wire encoding --------------------------------------------------------------------------


def context_to_wire(context: VClock | None) -> list[list[object]] | None:
    """A causal context as it travels: a list of ``[actor, counter, timestamp]`` or None."""
    if context is None:
        return None
    return [[actor, counter, timestamp] for actor, counter, timestamp in context.entries]


def context_from_wire(raw: object) -> VClock | None:
    """Parse :func:`context_to_wire`'s output.

    Raises:
        RpcBadRequest: ``raw`` is not a valid context.
    """
    if raw is None:
        return None
    if not isinstance(raw, list | tuple):
        raise RpcBadRequest(f"context must be a list or nil, not {type(raw).__name__}")
    entries: list[tuple[bytes, int, int]] = []
    for entry in raw:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise RpcBadRequest("each context entry must be [actor, counter, timestamp]")
        actor, counter, timestamp = entry
        if not isinstance(actor, bytes) or not _is_int(counter) or not _is_int(timestamp):
            raise RpcBadRequest("each context entry must be [bytes, int, int]")
        entries.append((actor, counter, timestamp))
    try:
        return VClock.from_entries(entries)
    except ValueError as exc:
        raise RpcBadRequest(f"bad context: {exc}") from exc


def siblings_from_wire(record: object) -> SiblingSet:
    """Decode and validate a sibling-set record that came from another node.

    Raises:
        RpcBadRequest: ``record`` is not a well-formed record.
    """
    if not isinstance(record, bytes):
        raise RpcBadRequest(f"record must be bytes, not {type(record).__name__}")
    try:
        siblings = decode_siblings(record)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RpcBadRequest(f"malformed record: {exc}") from exc
    for version in siblings:
        _check_version(version)
    return siblings


def _check_version(version: Version) -> None:
    # decode_siblings trusts its input (it reads this node's own storage); a peer's record is
    # checked field by field before anything is stored. The fields are typed as what they
    # should be, so look at them as plain objects.
    entries: object = version.clock.entries
    if not isinstance(entries, tuple) or not all(_is_entry(entry) for entry in entries):
        raise RpcBadRequest("malformed clock in record")
    try:
        VClock(entries)
    except ValueError as exc:
        raise RpcBadRequest(f"bad clock in record: {exc}") from exc
    timestamp: object = version.timestamp
    actor: object = version.actor
    flags: object = version.flags
    expiry: object = version.expiry
    value: object = version.value
    if not (
        _is_int(timestamp)
        and timestamp >= 0
        and isinstance(actor, bytes)
        and actor
        and _is_int(flags)
        and 0 <= flags <= _UINT32_MAX
        and _is_int(expiry)
        and (value is None or isinstance(value, bytes))
    ):
        raise RpcBadRequest("malformed version in record")


def _is_entry(entry: object) -> bool:
    return (
        isinstance(entry, tuple)
        and len(entry) == 3
        and isinstance(entry[0], bytes)
        and _is_int(entry[1])
        and _is_int(entry[2])
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_key(key: object) -> bytes:
    """Validate a key parameter.

    Raises:
        RpcBadRequest: ``key`` is not 1 to 250 bytes.
    """
    if not isinstance(key, bytes) or not 1 <= len(key) <= KEY_MAX_LENGTH:
        raise RpcBadRequest(f"a key must be 1 to {KEY_MAX_LENGTH} bytes")
    return key


# --- handlers -------------------------------------------------------------------------------


class ReplicaRpcHandlers:
    """Serves this node's replica to peer coordinators.

    Args:
        replica: this node's replica.
        coordinate_write: coordinates a forwarded write on this node (never forwards again).
    """

    def __init__(
        self,
        replica: LocalReplica,
        coordinate_write: CoordinateWrite,
        *,
        read_reply_budget: int = READ_REPLY_BUDGET,
    ) -> None:
        self.replica = replica
        self.coordinate_write = coordinate_write
        self.read_reply_budget = read_reply_budget

    def handlers(self) -> dict[str, Handler]:
        """Method name to handler, for the RPC server (the quick ones answer inline)."""
        return {
            "replica_read": self.replica_read,
            "replica_apply": self.replica_apply,
            "coordinate_put": self.coordinate_put,
            "flush": self.flush,
        }

    def replica_read(self, keys: object) -> Step[list[bytes | None]]:
        """The record of each key (None when absent), in the order asked; possibly only for
        the first keys, once the records reach :attr:`read_reply_budget` bytes.

        Up to :data:`READ_CHUNK` keys are read at once (inline in the RPC server); a larger
        batch is read chunk by chunk as a task, letting other work run in between.

        Raises:
            RpcBadRequest: ``keys`` is not a list of valid keys.
        """
        if not isinstance(keys, list | tuple) or len(keys) > MAX_READ_BATCH:
            raise RpcBadRequest(f"keys must be a list of at most {MAX_READ_BATCH} keys")
        checked = [check_key(key) for key in keys]
        if len(checked) <= READ_CHUNK:
            records: list[bytes | None] = []
            self._read_records(checked, records, 0)
            return records
        return Pending(self._read_in_chunks(checked))

    def _read_records(self, keys: Sequence[bytes], records: list[bytes | None], size: int) -> int:
        """Append the records of ``keys`` until they would pass the budget (the very first
        record always goes in); the answer's size in bytes so far."""
        read_record = self.replica.read_record
        budget = self.read_reply_budget
        for key in keys:
            _siblings, record = read_record(key)
            if record is None:
                records.append(None)
                continue
            if records and size + len(record) > budget:
                break
            records.append(record)
            size += len(record)
        return size

    async def _read_in_chunks(self, keys: Sequence[bytes]) -> list[bytes | None]:
        records: list[bytes | None] = []
        size = 0
        for start in range(0, len(keys), READ_CHUNK):
            if start:
                await trio.lowlevel.checkpoint()
            size = self._read_records(keys[start : start + READ_CHUNK], records, size)
            if len(records) < min(start + READ_CHUNK, len(keys)):
                break  # the budget is reached
        return records

    def replica_apply(self, key: object, record: object) -> bool:
        """Merge a peer's versions of ``key`` into the local replica.

        Raises:
            RpcBadRequest: bad parameters, or the merge would leave too many siblings.
        """
        checked_key = check_key(key)
        siblings = siblings_from_wire(record)
        assert isinstance(record, bytes)  # siblings_from_wire checked it
        try:
            return self.replica.apply(checked_key, siblings, record)
        except TooManySiblings as exc:
            raise RpcBadRequest(str(exc)) from exc

    @waits
    async def coordinate_put(
        self, key: object, flags: object, expiry: object, value: object, context: object
    ) -> bytes:
        """Coordinate a write that a non-primary forwarded here; returns the written version.

        Raises:
            RpcBadRequest: bad parameters.
            RpcQuorumTimeout, RpcQuorumUnavailable, RpcTooManySiblings: the write failed here.
        """
        checked_key = check_key(key)
        if not _is_int(flags) or not 0 <= flags <= _UINT32_MAX:
            raise RpcBadRequest("flags must be a 32-bit unsigned integer")
        if not _is_int(expiry) or not 0 <= expiry <= _UINT64_MAX:
            raise RpcBadRequest("expiry must be a non-negative integer")
        if value is not None and not isinstance(value, bytes):
            raise RpcBadRequest("value must be bytes or nil")
        clock = context_from_wire(context)
        payload = Payload(flags, expiry, value)
        try:
            version = await self.coordinate_write(checked_key, payload, clock)
        except QuorumTimeout as exc:
            raise RpcQuorumTimeout(str(exc)) from exc
        except QuorumUnavailable as exc:
            raise RpcQuorumUnavailable(str(exc)) from exc
        except TooManySiblings as exc:
            raise RpcTooManySiblings(str(exc)) from exc
        return encode_siblings((version,))

    def flush(self, at: object) -> None:
        """Record a cluster-wide ``flush_all`` at unix microseconds ``at``.

        Raises:
            RpcBadRequest: ``at`` is not a non-negative integer.
        """
        if not _is_int(at) or not 0 <= at <= _UINT64_MAX:
            raise RpcBadRequest("flush time must be a non-negative integer (microseconds)")
        self.replica.flush(at)
