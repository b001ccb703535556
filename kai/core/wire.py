"""How replica data travels between nodes: keys, sibling-set records and conditional writes.

Pure code (no I/O): the RPC handlers (:mod:`kai.cluster.replica_rpc`) and the coordinator's
reads and writes use it on both ends of every replica call. Everything that comes from
another node is validated here before it is stored or believed: a confused or hostile peer
gets :class:`~kai.core.errors.RpcBadRequest`, never a malformed record on disk.
"""

from __future__ import annotations

from typing import TypeGuard

import msgpack

from kai.core.errors import (
    KaiError,
    QuorumTimeout,
    QuorumUnavailable,
    RpcBadRequest,
    RpcError,
    RpcQuorumTimeout,
    RpcQuorumUnavailable,
    RpcTooManySiblings,
    TooManySiblings,
)
from kai.core.memcache.requests import KEY_MAX_LENGTH
from kai.core.updates import (
    COMMANDS,
    META_COMMANDS,
    META_SET_MODES,
    Applied,
    MetaUpdate,
    Outcome,
    Update,
)
from kai.core.versions import MARKS, SiblingSet, Version, decode_siblings, encode_siblings

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


# --- errors a forwarded write carries back --------------------------------------------------
#
# A forwarded ``coordinate_put`` can fail on the primary in ways the client must hear about
# exactly as if the write had been coordinated where it arrived. These RPC errors carry them
# across the wire; :func:`raise_forwarded` turns them back into the coordinator's errors.


def error_to_forward(exc: KaiError) -> KaiError:
    """The RPC error a forwarded write's caller hears for a coordinator error raised here
    (the inverse of :func:`raise_forwarded`); other errors as they are."""
    if isinstance(exc, QuorumTimeout):
        return RpcQuorumTimeout(str(exc))
    if isinstance(exc, QuorumUnavailable):
        return RpcQuorumUnavailable(str(exc))
    if isinstance(exc, TooManySiblings):
        return RpcTooManySiblings(str(exc))
    return exc


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
    dot: object = version.dot
    timestamp: object = version.timestamp
    flags: object = version.flags
    expiry: object = version.expiry
    value: object = version.value
    mark: object = version.mark
    cas: object = version.cas
    if not (
        type(dot) is tuple
        and len(dot) == 2
        and type(dot[0]) is bytes
        and dot[0]
        and type(dot[1]) is int
        and dot[1] >= 1
        and type(timestamp) is int
        and timestamp >= 0
        and type(flags) is int
        and 0 <= flags <= UINT32_MAX
        and type(expiry) is int
        and (value is None or type(value) is bytes)
        and type(mark) is int
        and mark & ~MARKS == 0
        and type(cas) is int
        and 0 <= cas <= UINT64_MAX
    ):
        raise RpcBadRequest("malformed version in record")
    _check_context(version.context.entries, dot)


def _check_context(entries: object, dot: tuple[bytes, int]) -> None:
    """A context as :class:`VClock` requires it (sorted distinct actors, counters >= 1,
    timestamps >= 0), which does not cover its version's own ``dot``; one pass."""
    if type(entries) is not tuple:
        raise RpcBadRequest("malformed context in record")
    previous = b""
    for entry in entries:
        if not (
            type(entry) is tuple
            and len(entry) == 3
            and type(entry[0]) is bytes
            and type(entry[1]) is int
            and type(entry[2]) is int
        ):
            raise RpcBadRequest("malformed context in record")
        actor, counter, timestamp = entry
        if actor <= previous or counter < 1 or timestamp < 0:
            raise RpcBadRequest(f"bad context entry {entry!r} in record")
        if actor == dot[0] and counter >= dot[1]:
            raise RpcBadRequest("a version's context covers its own dot")
        previous = actor


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def key_from_wire(key: object) -> bytes:
    """Validate a key parameter.

    Raises:
        RpcBadRequest: ``key`` is not 1 to 250 bytes.
    """
    if not isinstance(key, bytes) or not 1 <= len(key) <= KEY_MAX_LENGTH:
        raise RpcBadRequest(f"a key must be 1 to {KEY_MAX_LENGTH} bytes")
    return key


#: One record of a batch: its key, its versions, and the record they were decoded from.
Record = tuple[bytes, SiblingSet, bytes]


def records_from_wire(batch: object, most: int) -> list[Record]:
    """Validate a batch of ``[key, record]`` pairs, 1 to ``most`` of them (transfers,
    anti-entropy, reaping).

    Raises:
        RpcBadRequest: ``batch`` is not such a list, or a key or a record is malformed.
    """
    if not isinstance(batch, list | tuple) or not 1 <= len(batch) <= most:
        raise RpcBadRequest(f"a batch must be a list of 1 to {most} [key, record] pairs")
    records = []
    for item in batch:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise RpcBadRequest("a batch item must be [key, record]")
        key, record = key_from_wire(item[0]), item[1]
        siblings = siblings_from_wire(record)
        assert isinstance(record, bytes)  # siblings_from_wire checked it
        records.append((key, siblings, record))
    return records


# --- conditional writes ---------------------------------------------------------------------


def update_to_wire(update: Update) -> list[object]:
    """A conditional write as it travels to the coordinating primary: 8 fields, and a 9th
    with the flags of a meta command (10 of them; 9 from the release before ``E``)."""
    fields: list[object] = [
        update.command,
        update.flags,
        update.expiry,
        update.value,
        update.cas,
        update.delta,
        update.all_siblings,
        update.max_size,
    ]
    meta = update.meta
    if meta is not None:
        fields.append(
            [
                meta.mode,
                meta.has_cas,
                meta.invalidate,
                meta.touch,
                meta.vivify,
                meta.vivify_expiry,
                meta.recache_before,
                meta.initial,
                meta.incr,
                meta.new_cas,
            ]
        )
    return fields


def _meta_update_from_wire(raw: object) -> MetaUpdate:
    if not isinstance(raw, list | tuple) or len(raw) not in (9, 10):
        raise RpcBadRequest("a meta update must be a list of 10 fields")
    mode, has_cas, invalidate, touch, vivify, vivify_expiry, recache_before, initial, incr = raw[:9]
    new_cas = raw[9] if len(raw) == 10 else 0
    if not (
        mode in META_SET_MODES
        and all(isinstance(flag, bool) for flag in (has_cas, invalidate, touch, vivify, incr))
        and all(
            is_int(number) and 0 <= number <= UINT64_MAX
            for number in (vivify_expiry, recache_before, initial, new_cas)
        )
    ):
        raise RpcBadRequest("malformed meta update")
    return MetaUpdate(
        mode,
        has_cas,
        invalidate,
        touch,
        vivify,
        vivify_expiry,
        recache_before,
        initial,
        incr,
        new_cas,
    )


def update_from_wire(raw: object) -> Update:
    """Parse :func:`update_to_wire`'s output.

    Raises:
        RpcBadRequest: ``raw`` is not a valid update.
    """
    if not isinstance(raw, list | tuple) or len(raw) not in (8, 9):
        raise RpcBadRequest("an update must be a list of 8 or 9 fields")
    command, flags, expiry, value, cas, delta, all_siblings, max_size = raw[:8]
    if command not in COMMANDS:
        raise RpcBadRequest(f"unknown update command {command!r}")
    if (command in META_COMMANDS) != (len(raw) == 9):
        raise RpcBadRequest(f"an update {command!r} carries meta flags exactly if it is one")
    meta = _meta_update_from_wire(raw[8]) if len(raw) == 9 else None
    if not (
        is_int(flags)
        and 0 <= flags <= UINT32_MAX
        and is_int(expiry)
        and 0 <= expiry <= UINT64_MAX
        and isinstance(value, bytes)
        and is_int(cas)
        and 0 <= cas <= UINT64_MAX
        and is_int(delta)
        and 0 <= delta <= UINT64_MAX
        and isinstance(all_siblings, bool)
        and is_int(max_size)
        and max_size >= 0
    ):
        raise RpcBadRequest("malformed update")
    return Update(command, flags, expiry, value, cas, delta, all_siblings, max_size, meta)


def applied_to_wire(applied: Applied) -> list[object]:
    """What the coordinating primary answers for a forwarded update."""
    record = None if applied.version is None else encode_siblings((applied.version,))
    return [applied.outcome.value, record, applied.cas]


def applied_from_wire(raw: object) -> Applied:
    """Parse :func:`applied_to_wire`'s output.

    Raises:
        RpcBadRequest: ``raw`` is not a valid answer.
    """
    if not isinstance(raw, list | tuple) or len(raw) != 3:
        raise RpcBadRequest("an update's answer must be a list of 3 fields")
    outcome, record, cas = raw
    try:
        checked = Outcome(outcome)
    except ValueError as exc:
        raise RpcBadRequest(f"unknown update outcome {outcome!r}") from exc
    if not is_int(cas) or not 0 <= cas <= UINT64_MAX:
        raise RpcBadRequest("malformed cas in an update's answer")
    version = None
    if record is not None:
        versions = siblings_from_wire(record)
        if len(versions) != 1:
            raise RpcBadRequest("an update's answer must carry one version")
        version = versions[0]
    return Applied(checked, version, cas)
