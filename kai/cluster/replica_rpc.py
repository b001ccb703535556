"""The RPC methods a node serves to its peers' coordinators (their encoding: :mod:`kai.core.wire`).

Five methods, all called by :class:`~kai.cluster.coordinator.Coordinator` on peers:

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
``coordinate_put(key, flags, expiry, value: bytes | None[, context: bytes]) -> bytes``
    Coordinate a ``set`` (or a delete: ``value`` nil) forwarded by a node that is not a
    primary of ``key``; with ``context`` (a token, :mod:`kai.core.contexts`) a write in the
    context of a client's read. Returns the written version as a one-version record.
``coordinate_update(key, update: list) -> list``
    Carry out a conditional write (:func:`~kai.core.wire.update_to_wire`) forwarded to this
    node as the key's coordinating primary; answers :func:`~kai.core.wire.applied_to_wire`.
``flush(at: int) -> None``
    Record a ``flush_all`` taking effect at ``at`` (unix microseconds).

Handlers validate every parameter and raise :class:`~kai.core.errors.RpcBadRequest` for bad input:
a confused or hostile peer must never store a malformed record or crash a node. They never
forward a request to another node (forwarding happens once, on the node a client talked to).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from kai.cluster.hints import HintStore
from kai.core.contexts import BadContext, decode_context
from kai.core.errors import (
    KaiError,
    RpcBadRequest,
    TooManySiblings,
)
from kai.core.pending import Pending, Step
from kai.core.ring import NodeId
from kai.core.rpc.protocol import MAX_MESSAGE_SIZE
from kai.core.updates import Applied, Update
from kai.core.vclock import VClock
from kai.core.versions import (
    Payload,
    Version,
    encode_siblings,
)
from kai.core.wire import (
    UINT32_MAX,
    UINT64_MAX,
    applied_to_wire,
    error_to_forward,
    is_int,
    key_from_wire,
    siblings_from_wire,
    update_from_wire,
)
from kai.rpc.server import Handler
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: The most keys one ``replica_read`` call may carry.
MAX_READ_BATCH = 100_000
#: How many keys a ``replica_read`` handler reads between checkpoints, so that a huge batch
#: does not stall the event loop.
READ_CHUNK = 1024
#: A ``replica_read`` answer stops adding records once they reach this many bytes (half the
#: RPC message limit, leaving room for framing); the caller asks again for the rest.
READ_REPLY_BUDGET = MAX_MESSAGE_SIZE // 2

#: Coordinates a ``set`` forwarded to this primary: ``(key, payload, context) -> version``.
CoordinateWrite = Callable[[bytes, Payload, VClock | None], Step[Version]]
#: Carries out a conditional write forwarded to this primary: ``(key, update) -> applied``.
CoordinateUpdate = Callable[[bytes, Update], Step[Applied]]


# --- handlers -------------------------------------------------------------------------------


class ReplicaRpcHandlers:
    """Serves this node's replica to peer coordinators.

    Args:
        replica: this node's replica.
        coordinate_write: coordinates a forwarded ``set`` on this node (never forwards again).
        coordinate_update: carries out a forwarded conditional write on this node (never
            forwards again).
        self_node: this node's ring identity.
        hints: the hints this node keeps (as a fallback, it answers reads with them).
        read_reply_budget: bytes of records one ``replica_read`` answer carries at most.
    """

    def __init__(
        self,
        replica: LocalReplica,
        coordinate_write: CoordinateWrite,
        coordinate_update: CoordinateUpdate,
        *,
        self_node: NodeId,
        hints: HintStore,
        read_reply_budget: int = READ_REPLY_BUDGET,
    ) -> None:
        self.replica = replica
        self._coordinate_write = coordinate_write
        self._coordinate_update = coordinate_update
        self.self_node = self_node
        self.hints = hints
        self.read_reply_budget = read_reply_budget

    def handlers(self) -> dict[str, Handler]:
        """Method name to handler, for the RPC server (the quick ones answer inline)."""
        return {
            "replica_read": self.replica_read,
            "replica_apply": self.replica_apply,
            "hint_apply": self.hint_apply,
            "coordinate_put": self.coordinate_put,
            "coordinate_update": self.coordinate_update,
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
        checked = [key_from_wire(key) for key in keys]
        if len(checked) <= READ_CHUNK:
            records: list[bytes | None] = []
            self._read_records(checked, records, 0)
            return records
        return Pending(self._read_in_chunks(checked))

    def _read_records(self, keys: Sequence[bytes], records: list[bytes | None], size: int) -> int:
        """Append the records of ``keys`` until they would pass the budget (the very first
        record always goes in); the answer's size in bytes so far."""
        read_record = self.hints.reader(self.replica.read_record)
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
        checked_key = key_from_wire(key)
        siblings = siblings_from_wire(record)
        assert isinstance(record, bytes)  # siblings_from_wire checked it
        try:
            return self.replica.apply(checked_key, siblings, record)
        except TooManySiblings as exc:
            raise RpcBadRequest(str(exc)) from exc

    def hint_apply(self, owner: object, key: object, record: object) -> bool:
        """Keep a write for ``owner`` (``"host:port"``), a primary of ``key`` that is down:
        this node stands in for it (sloppy quorum) and hands the hint off later. A write
        meant for this node itself (rings briefly disagree) is merged into its replica.

        Raises:
            RpcBadRequest: bad parameters, or the merge would leave too many siblings.
        """
        if not isinstance(owner, str):
            raise RpcBadRequest("owner must be a node address 'host:port'")
        try:
            owner_node = NodeId.parse(owner)
        except ValueError as exc:
            raise RpcBadRequest(str(exc)) from exc
        checked_key = key_from_wire(key)
        siblings = siblings_from_wire(record)
        assert isinstance(record, bytes)  # siblings_from_wire checked it
        if owner_node == self.self_node:
            return self.replica_apply(checked_key, record)
        if len(siblings) > self.replica.siblings_maximum:
            raise RpcBadRequest(f"a hint of {len(siblings)} siblings is too many")
        self.hints.add(owner_node, checked_key, record)
        return True

    def coordinate_put(
        self, key: object, flags: object, expiry: object, value: object, context: object = None
    ) -> Step[bytes]:
        """Coordinate a ``set`` that a non-primary forwarded here, in ``context`` (a token)
        when one is given; returns the written version.

        Raises:
            RpcBadRequest: bad parameters.
            RpcQuorumTimeout, RpcQuorumUnavailable, RpcTooManySiblings: the write failed here.
        """
        checked_key = key_from_wire(key)
        if not is_int(flags) or not 0 <= flags <= UINT32_MAX:
            raise RpcBadRequest("flags must be a 32-bit unsigned integer")
        if not is_int(expiry) or not 0 <= expiry <= UINT64_MAX:
            raise RpcBadRequest("expiry must be a non-negative integer")
        if value is not None and not isinstance(value, bytes):
            raise RpcBadRequest("value must be bytes or nil")
        clock = None
        if context is not None:
            if not isinstance(context, bytes):
                raise RpcBadRequest("context must be a token (bytes) or nil")
            try:
                clock = decode_context(context)
            except BadContext as exc:
                raise RpcBadRequest(str(exc)) from exc
        try:
            written = self._coordinate_write(checked_key, Payload(flags, expiry, value), clock)
        except KaiError as exc:
            raise error_to_forward(exc) from exc
        if isinstance(written, Pending):
            return Pending(_finish_put(written))
        return encode_siblings((written,))

    def coordinate_update(self, key: object, update: object) -> Step[list[object]]:
        """Carry out a conditional write forwarded to this node as the coordinating primary.

        Raises:
            RpcBadRequest: bad parameters.
            RpcQuorumTimeout, RpcQuorumUnavailable, RpcTooManySiblings: the write failed here.
        """
        checked_key = key_from_wire(key)
        checked = update_from_wire(update)
        try:
            applied = self._coordinate_update(checked_key, checked)
        except KaiError as exc:
            raise error_to_forward(exc) from exc
        if isinstance(applied, Pending):
            return Pending(_finish_update(applied))
        return applied_to_wire(applied)

    def flush(self, at: object) -> None:
        """Record a cluster-wide ``flush_all`` at unix microseconds ``at``.

        Raises:
            RpcBadRequest: ``at`` is not a non-negative integer.
        """
        if not is_int(at) or not 0 <= at <= UINT64_MAX:
            raise RpcBadRequest("flush time must be a non-negative integer (microseconds)")
        self.replica.flush(at)


async def _finish_put(written: Pending[Version]) -> bytes:
    try:
        version = await written
    except KaiError as exc:
        raise error_to_forward(exc) from exc
    return encode_siblings((version,))


async def _finish_update(applied: Pending[Applied]) -> list[object]:
    try:
        result = await applied
    except KaiError as exc:
        raise error_to_forward(exc) from exc
    return applied_to_wire(result)
