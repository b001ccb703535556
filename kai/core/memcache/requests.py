"""The memcached requests a client can make, as validated records, and the key rules.

:mod:`kai.core.memcache.protocol` parses bytes into these records and the command executor serves
them; every record checks its own fields when it is made, so no request can hold a key or a
number that memcached would have refused. This module must never do I/O or parse bytes.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

import attrs

#: Longest key memcached accepts, in bytes.
KEY_MAX_LENGTH: Final = 250
#: Storage command names, as carried in :attr:`Store.command`.
STORE_COMMANDS: Final = frozenset({"set", "add", "replace", "append", "prepend", "cas"})
#: Bounds of the protocol's numbers: flags and verbosity levels are unsigned 32-bit, cas
#: tokens and deltas unsigned 64-bit, exptimes and delays signed 32-bit.
UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1

# Bytes never allowed in a key (Kai is stricter than memcached, which only splits on " ").
_FORBIDDEN_KEY_BYTE: Final = re.compile(rb"[\x00-\x20\x7f]")


def is_valid_key(key: bytes) -> bool:
    """Whether ``key`` is 1 to 250 bytes long with no space, control byte or DEL."""
    return 0 < len(key) <= KEY_MAX_LENGTH and _FORBIDDEN_KEY_BYTE.search(key) is None


def _check_key(key: bytes) -> None:
    if not is_valid_key(key):
        raise ValueError(f"invalid key {key[:60]!r}")


def _check_keys(keys: tuple[bytes, ...]) -> None:
    if len(keys) == 1:
        if is_valid_key(keys[0]):
            return
    # C-speed checks for multi-gets, which may carry many thousands of keys.
    elif (
        keys
        and b"" not in keys
        and max(map(len, keys)) <= KEY_MAX_LENGTH
        and _FORBIDDEN_KEY_BYTE.search(b"".join(keys)) is None
    ):
        return
    raise ValueError(f"invalid key list {keys[:3]!r}...")


def _check_int32(value: int, what: str) -> None:
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{what} {value} is not a signed 32-bit integer")


@attrs.frozen(slots=True)
class Get:
    """``get``/``gets``: fetch each key (duplicates included), ``with_cas`` for ``gets``."""

    keys: tuple[bytes, ...]
    with_cas: bool = False

    def __attrs_post_init__(self) -> None:
        _check_keys(self.keys)


@attrs.frozen(slots=True)
class GetAndTouch:
    """``gat``/``gats``: set each key's exptime and fetch it."""

    exptime: int
    keys: tuple[bytes, ...]
    with_cas: bool = False

    def __attrs_post_init__(self) -> None:
        _check_int32(self.exptime, "exptime")
        _check_keys(self.keys)


@attrs.frozen(slots=True)
class Store:
    """A storage command with its data block.

    Attributes:
        command: one of :data:`STORE_COMMANDS`.
        exptime: as sent: 0 never expires, negative is already expired, up to 30 days is
            relative, larger is a Unix time.
        cas_unique: the token to compare, present exactly when ``command`` is ``"cas"``.
    """

    command: str
    key: bytes
    flags: int
    exptime: int
    value: bytes
    noreply: bool = False
    cas_unique: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.command not in STORE_COMMANDS:
            raise ValueError(f"unknown storage command {self.command!r}")
        _check_key(self.key)
        if not 0 <= self.flags <= UINT32_MAX:
            raise ValueError(f"flags {self.flags} is not an unsigned 32-bit integer")
        _check_int32(self.exptime, "exptime")
        if not isinstance(self.value, bytes):
            raise TypeError(f"value must be bytes, not {type(self.value).__name__}")
        if (self.cas_unique is None) != (self.command != "cas"):
            raise ValueError("cas_unique is required for cas and allowed only there")
        if self.cas_unique is not None and not 0 <= self.cas_unique <= UINT64_MAX:
            raise ValueError(f"cas unique {self.cas_unique} is not an unsigned 64-bit integer")


@attrs.frozen(slots=True)
class ValueTooLarge:
    """A storage command whose value exceeded ``max_item_size``; its data was swallowed.

    Reply :data:`OBJECT_TOO_LARGE` (unless ``noreply``); for ``set`` also delete the old
    value, as memcached does.
    """

    command: str
    key: bytes
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        if self.command not in STORE_COMMANDS:
            raise ValueError(f"unknown storage command {self.command!r}")
        _check_key(self.key)


@attrs.frozen(slots=True)
class Delete:
    """``delete <key> [0] [noreply]``."""

    key: bytes
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        _check_key(self.key)


@attrs.frozen(slots=True)
class Arithmetic:
    """``incr``/``decr <key> <delta> [noreply]``; ``incr`` tells which."""

    key: bytes
    delta: int
    incr: bool
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        _check_key(self.key)
        if not 0 <= self.delta <= UINT64_MAX:
            raise ValueError(f"delta {self.delta} is not an unsigned 64-bit integer")


@attrs.frozen(slots=True)
class Touch:
    """``touch <key> <exptime> [noreply]``."""

    key: bytes
    exptime: int
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        _check_key(self.key)
        _check_int32(self.exptime, "exptime")


@attrs.frozen(slots=True)
class FlushAll:
    """``flush_all [delay] [noreply]``; ``delay`` 0 (or negative) means now."""

    delay: int = 0
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        _check_int32(self.delay, "delay")


@attrs.frozen(slots=True)
class Stats:
    """``stats [args...]``: ``()`` for the general group; the server rejects unknown groups."""

    args: tuple[bytes, ...] = ()

    def __attrs_post_init__(self) -> None:
        if any(not arg or b" " in arg for arg in self.args):
            raise ValueError(f"invalid stats arguments {self.args!r}")


@attrs.frozen(slots=True)
class Version:
    """``version`` (extra tokens are ignored, as in memcached 1.6)."""


@attrs.frozen(slots=True)
class Verbosity:
    """``verbosity <level> [noreply]``."""

    level: int
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.level <= UINT32_MAX:
            raise ValueError(f"verbosity level {self.level} is not an unsigned 32-bit integer")


@attrs.frozen(slots=True)
class SlabsAutomove:
    """``slabs automove <0|1|2> [noreply]`` or ``slabs automove ratio <r>`` (``level`` None).

    Accepted and ignored, as :class:`Verbosity` is: Kai has no slabs to move.
    """

    level: int | None
    noreply: bool = False

    def __attrs_post_init__(self) -> None:
        if self.level is not None and not 0 <= self.level <= 2:
            raise ValueError(f"slabs automove level {self.level} is not 0, 1 or 2")


@attrs.frozen(slots=True)
class Quit:
    """``quit``: close the connection without a reply."""


@attrs.frozen(slots=True)
class Invalid:
    """Input the parser rejected, with exactly what to do about it.

    Attributes:
        reply: the bytes to send; ``b""`` when ``noreply`` silenced the error.
        close: whether to close the connection after sending ``reply`` (framing is lost or
            the peer does not speak this protocol). The parser returns :data:`CLOSED` next.
    """

    reply: bytes
    close: bool = False

    def __attrs_post_init__(self) -> None:
        if self.reply and not self.reply.endswith(b"\r\n"):
            raise ValueError(f"a reply must end with CRLF: {self.reply!r}")


#: The classic commands' requests (:mod:`kai.core.memcache.meta` has the meta commands'; the
#: parser's ``Request`` is both).
ClassicRequest: TypeAlias = (
    Get
    | GetAndTouch
    | Store
    | ValueTooLarge
    | Delete
    | Arithmetic
    | Touch
    | FlushAll
    | Stats
    | Version
    | Verbosity
    | SlabsAutomove
    | Quit
)
