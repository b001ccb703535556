"""How replica data travels between nodes: keys, causal contexts and sibling-set records.

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
from kai.core.vclock import VClock
from kai.core.versions import SiblingSet, Version, decode_siblings

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
        if not isinstance(actor, bytes) or not is_int(counter) or not is_int(timestamp):
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
        is_int(timestamp)
        and timestamp >= 0
        and isinstance(actor, bytes)
        and actor
        and is_int(flags)
        and 0 <= flags <= UINT32_MAX
        and is_int(expiry)
        and (value is None or isinstance(value, bytes))
    ):
        raise RpcBadRequest("malformed version in record")


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
