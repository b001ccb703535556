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
from kai.core.updates import COMMANDS, Applied, Outcome, Update
from kai.core.vclock import VClock
from kai.core.versions import SiblingSet, Version, decode_siblings, encode_siblings

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
    entries: object = version.context.entries
    if not isinstance(entries, tuple) or not all(_is_entry(entry) for entry in entries):
        raise RpcBadRequest("malformed context in record")
    try:
        context = VClock(entries)
    except ValueError as exc:
        raise RpcBadRequest(f"bad context in record: {exc}") from exc
    dot: object = version.dot
    timestamp: object = version.timestamp
    flags: object = version.flags
    expiry: object = version.expiry
    value: object = version.value
    if not (
        isinstance(dot, tuple)
        and len(dot) == 2
        and isinstance(dot[0], bytes)
        and dot[0]
        and is_int(dot[1])
        and dot[1] >= 1
        and is_int(timestamp)
        and timestamp >= 0
        and is_int(flags)
        and 0 <= flags <= UINT32_MAX
        and is_int(expiry)
        and (value is None or isinstance(value, bytes))
    ):
        raise RpcBadRequest("malformed version in record")
    if context.covers(version.dot):
        raise RpcBadRequest("a version's context covers its own dot")


def _is_entry(entry: object) -> bool:
    return (
        isinstance(entry, tuple)
        and len(entry) == 3
        and isinstance(entry[0], bytes)
        and is_int(entry[1])
        and is_int(entry[2])
    )


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


# --- conditional writes ---------------------------------------------------------------------


def update_to_wire(update: Update) -> list[object]:
    """A conditional write as it travels to the coordinating primary."""
    return [
        update.command,
        update.flags,
        update.expiry,
        update.value,
        update.cas,
        update.delta,
        update.all_siblings,
        update.max_size,
    ]


def update_from_wire(raw: object) -> Update:
    """Parse :func:`update_to_wire`'s output.

    Raises:
        RpcBadRequest: ``raw`` is not a valid update.
    """
    if not isinstance(raw, list | tuple) or len(raw) != 8:
        raise RpcBadRequest("an update must be a list of 8 fields")
    command, flags, expiry, value, cas, delta, all_siblings, max_size = raw
    if command not in COMMANDS:
        raise RpcBadRequest(f"unknown update command {command!r}")
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
    return Update(command, flags, expiry, value, cas, delta, all_siblings, max_size)


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
