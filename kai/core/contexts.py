"""Causal-context tokens: a read's version vector as the opaque token clients carry.

The Dynamo API over memcached (docs/dynamo-api.md) hands a client the causal context of a
read as a token, and takes it back with a write "in that context"; forwarded writes carry
the same token between nodes. A token is URL-safe base64 (no padding) of a format byte and
the msgpack of the context's entries. Pure code: no I/O, no trio. It must never trust a
token: every one is decoded with bounds and validated before a write can use it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

import msgpack

from kai.core.vclock import VClock

#: Leading byte of every token's payload, so the format can evolve.
TOKEN_FORMAT: Final = 1
#: The most entries a token may carry (a stored context holds at most
#: ``clock_max_entries``, at most 1000).
MAX_TOKEN_ENTRIES: Final = 1000
#: The longest actor id a token may name (Kai's are 8 bytes).
MAX_ACTOR_BYTES: Final = 64
#: The longest token accepted, in bytes (longer cannot have come from Kai).
MAX_TOKEN_BYTES: Final = 64 * 1024

_U64: Final = 2**64


class BadContext(ValueError):
    """A token that is not a causal context Kai handed out (reply ``CLIENT_ERROR``)."""


def encode_context(context: VClock) -> bytes:
    """The token for ``context`` (ASCII bytes, never empty)."""
    packed: bytes = msgpack.packb([list(entry) for entry in context.entries], use_bin_type=True)
    return base64.urlsafe_b64encode(bytes((TOKEN_FORMAT,)) + packed).rstrip(b"=")


def decode_context(token: bytes) -> VClock:
    """The context a token encodes.

    Raises:
        BadContext: the token is malformed, too large, or not a valid version vector.
    """
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise BadContext("a causal context token must be 1 to 65536 bytes")
    try:
        raw = base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadContext("a causal context token is URL-safe base64") from exc
    if not raw or raw[0] != TOKEN_FORMAT:
        raise BadContext("unknown causal context format")
    try:
        entries = msgpack.unpackb(
            raw[1:],
            raw=True,
            use_list=False,
            max_array_len=MAX_TOKEN_ENTRIES,
            max_bin_len=MAX_ACTOR_BYTES,
            max_str_len=0,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadContext(f"malformed causal context: {exc}") from exc
    if type(entries) is not tuple:
        raise BadContext("malformed causal context")
    for entry in entries:
        if not (
            type(entry) is tuple
            and len(entry) == 3
            and type(entry[0]) is bytes
            and type(entry[1]) is int
            and type(entry[2]) is int
            and 0 < len(entry[0]) <= MAX_ACTOR_BYTES
            and 1 <= entry[1] < _U64
            and 0 <= entry[2] < _U64
        ):
            raise BadContext("malformed causal context entry")
    try:
        return VClock(entries)
    except ValueError as exc:
        raise BadContext(f"invalid causal context: {exc}") from exc
