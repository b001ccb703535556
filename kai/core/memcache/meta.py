"""memcached 1.6's meta commands (``mg ms md ma me mn``) as request records.

Each meta command line becomes one frozen record that validates itself
(:mod:`kai.core.memcache.meta_parser` makes them, following memcached 1.6.18); the executor
(:mod:`kai.memcache.meta_commands`) serves them. A record keeps the flags that shape the
reply in request order (``returns``: memcached answers them in that order) and typed fields
for the rest. A key sent in base64 (``b``) is kept decoded: any bytes, 1 to 250 of them.

Kai adds one flag, ``K`` (docs/dynamo-api.md): a read of every sibling with its causal
context (``mg``), a write or delete in such a context (``ms``, ``md``). Its token is kept as
sent (never decoded here); the records refuse the flags it cannot be combined with.

This module must never do I/O or parse bytes.
"""

from __future__ import annotations

import base64
from typing import Final, TypeAlias

import attrs

from kai.core.memcache.requests import (
    INT32_MAX,
    INT32_MIN,
    KEY_MAX_LENGTH,
    UINT32_MAX,
    UINT64_MAX,
    is_valid_key,
)

#: Longest ``O`` token, the ``O`` included (memcached's MFLAG_MAX_OPAQUE_LENGTH): an opaque
#: holds at most 31 bytes.
OPAQUE_TOKEN_MAX_LENGTH: Final = 32
#: A meta command line may hold at most 19 tokens (command, key, [datalen,] flags): memcached
#: counts its terminal token too and refuses more than 20.
MAX_TOKENS: Final = 19
#: The modes of ``ms`` (add, append, prepend, replace, set) and their classic names.
SET_MODES: Final = {"E": "add", "A": "append", "P": "prepend", "R": "replace", "S": "set"}

#: The flags a read with context may carry (``P`` and ``L``, proxy hints, are ignored).
WITH_CONTEXT_GET: Final = frozenset("bckOqvKPL")
WITH_CONTEXT_DELETE: Final = frozenset("bkOqKPL")

# --- Records ------------------------------------------------------------------------------

# The letters each record keeps in ``returns``: the flags that put something in the reply,
# and T and N, whose place decides what a later ``t`` shows (memcached applies them in
# request order).
GET_RETURNS: Final = frozenset("cfhklOstTNK")
SET_RETURNS: Final = frozenset("ckOK")
DELETE_RETURNS: Final = frozenset("kOK")
ARITHMETIC_RETURNS: Final = frozenset("ctTNOk")


def _check_key(key: bytes, base64_key: bool) -> None:
    if base64_key:
        if not 0 < len(key) <= KEY_MAX_LENGTH:
            raise ValueError(f"a binary key must be 1 to {KEY_MAX_LENGTH} bytes")
    elif not is_valid_key(key):
        raise ValueError(f"invalid key {key[:60]!r}")


def _check_returns(returns: str, allowed: frozenset[str]) -> None:
    if len(set(returns)) != len(returns) or not allowed.issuperset(returns):
        raise ValueError(f"return flags {returns!r} are not distinct letters of {sorted(allowed)}")


def _check_opaque(opaque: bytes | None, returns: str) -> None:
    if (opaque is None) == ("O" in returns):
        raise ValueError("an opaque is given exactly when O is among the return flags")
    if opaque is not None and (
        len(opaque) >= OPAQUE_TOKEN_MAX_LENGTH or b" " in opaque or b"\n" in opaque
    ):
        raise ValueError(f"invalid opaque {opaque[:40]!r}")


def _check_range(value: int | None, low: int, high: int, what: str) -> None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"{what} {value} is out of range")


@attrs.frozen(slots=True)
class MetaGet:
    """``mg <key> <flags>*``.

    Attributes:
        key: the key (decoded from base64 when ``base64_key``: any bytes then).
        returns: the return flags (``c f h k l O s t`` and ``K``) in request order, with
            ``T`` and ``N`` where they were sent.
        base64_key: ``b``: the key was sent in base64; a ``k`` answer is base64 plus ``b``.
        opaque: ``O``: the bytes after the O, echoed back.
        value: ``v``: send the value (``VA``) rather than ``HD``.
        quiet: ``q``: no ``EN`` on a miss.
        no_bump: ``u``: this access does not count for ``h``/``l`` (and ``me``'s fetch/la).
        touch_exptime: ``T``: the new exptime of a hit.
        vivify_exptime: ``N``: on a miss, create an empty item with this exptime (a win).
        recache_exptime: ``R``: win when the remaining TTL is below this.
        new_cas: ``E``: the cas unique of an item this mg creates or touches.
        with_context: ``K`` (Kai): every sibling with the read's causal context.
    """

    key: bytes
    returns: str = ""
    base64_key: bool = False
    opaque: bytes | None = None
    value: bool = False
    quiet: bool = False
    no_bump: bool = False
    touch_exptime: int | None = None
    vivify_exptime: int | None = None
    recache_exptime: int | None = None
    new_cas: int | None = None
    with_context: bool = False

    def __attrs_post_init__(self) -> None:
        _check_key(self.key, self.base64_key)
        _check_returns(self.returns, GET_RETURNS)
        _check_opaque(self.opaque, self.returns)
        for exptime, letter in (
            (self.touch_exptime, "T"),
            (self.vivify_exptime, "N"),
        ):
            if (exptime is None) == (letter in self.returns):
                raise ValueError(f"{letter} is among the return flags exactly when it is set")
            _check_range(exptime, INT32_MIN, INT32_MAX, "exptime")
        _check_range(self.recache_exptime, INT32_MIN, INT32_MAX, "recache exptime")
        _check_range(self.new_cas, 0, UINT64_MAX, "cas")
        if ("K" in self.returns) != self.with_context:
            raise ValueError("K is among the return flags exactly for a read with context")
        if self.with_context and (
            not WITH_CONTEXT_GET.issuperset(self.returns)
            or self.no_bump
            or self.recache_exptime is not None
            or self.new_cas is not None
        ):
            raise ValueError("a read with context takes only the flags b c k O q v")


@attrs.frozen(slots=True)
class MetaSet:
    """``ms <key> <datalen> <flags>*`` with its data block.

    Attributes:
        returns: the return flags (``c k O`` and ``K``) in request order.
        flags: ``F``: the client flags to store.
        exptime: ``T``: as a classic exptime (0 never expires).
        mode: ``M``: one of :data:`SET_MODES` (``S`` when not given).
        compare_cas: ``C``: store only if the cas unique matches (0 never matches).
        new_cas: ``E``: the cas unique of the value stored.
        invalidate: ``I``: with ``C``, a cas that does not match still stores, marked stale.
        context: ``K`` (Kai): the causal-context token as sent (not decoded).
    """

    key: bytes
    value: bytes
    returns: str = ""
    base64_key: bool = False
    opaque: bytes | None = None
    quiet: bool = False
    flags: int = 0
    exptime: int = 0
    mode: str = "S"
    compare_cas: int | None = None
    new_cas: int | None = None
    invalidate: bool = False
    context: bytes | None = None

    def __attrs_post_init__(self) -> None:
        _check_key(self.key, self.base64_key)
        if not isinstance(self.value, bytes):
            raise TypeError(f"value must be bytes, not {type(self.value).__name__}")
        _check_returns(self.returns, SET_RETURNS)
        _check_opaque(self.opaque, self.returns)
        _check_range(self.flags, 0, UINT32_MAX, "flags")
        _check_range(self.exptime, INT32_MIN, INT32_MAX, "exptime")
        _check_range(self.compare_cas, 0, UINT64_MAX, "cas")
        _check_range(self.new_cas, 0, UINT64_MAX, "cas")
        if self.mode not in SET_MODES:
            raise ValueError(f"unknown ms mode {self.mode!r}")
        _check_context(self.context, self.returns)
        if self.context is not None and (
            self.compare_cas is not None
            or self.new_cas is not None
            or self.invalidate
            or self.mode != "S"
        ):
            raise ValueError("a write in context takes no C, E, I or mode other than S")


@attrs.frozen(slots=True)
class MetaValueTooLarge:
    """An ``ms`` whose data block was longer than ``max_item_size``; the block was swallowed.

    Reply ``SERVER_ERROR object too large for cache`` (always, ``q`` or not) and, as
    memcached does in every mode, drop the key's value; a write in context (``context``)
    drops nothing.
    """

    key: bytes
    base64_key: bool = False
    context: bytes | None = None

    def __attrs_post_init__(self) -> None:
        _check_key(self.key, self.base64_key)


@attrs.frozen(slots=True)
class MetaDelete:
    """``md <key> <flags>*``.

    Attributes:
        returns: the return flags (``k O`` and ``K``) in request order.
        compare_cas: ``C``: act only if the cas unique matches.
        new_cas: ``E``: with ``I``, the item's new cas unique.
        invalidate: ``I``: mark the item stale (and give it a new cas) instead of deleting it.
        exptime: ``T``: with ``I``, the item's new exptime.
        context: ``K`` (Kai): the causal-context token as sent (not decoded).
    """

    key: bytes
    returns: str = ""
    base64_key: bool = False
    opaque: bytes | None = None
    quiet: bool = False
    compare_cas: int | None = None
    new_cas: int | None = None
    invalidate: bool = False
    exptime: int | None = None
    context: bytes | None = None

    def __attrs_post_init__(self) -> None:
        _check_key(self.key, self.base64_key)
        _check_returns(self.returns, DELETE_RETURNS)
        _check_opaque(self.opaque, self.returns)
        _check_range(self.compare_cas, 0, UINT64_MAX, "cas")
        _check_range(self.new_cas, 0, UINT64_MAX, "cas")
        _check_range(self.exptime, INT32_MIN, INT32_MAX, "exptime")
        _check_context(self.context, self.returns)
        if self.context is not None and (
            self.compare_cas is not None
            or self.new_cas is not None
            or self.invalidate
            or self.exptime is not None
        ):
            raise ValueError("a delete in context takes only the flags b k O q")


@attrs.frozen(slots=True)
class MetaArithmetic:
    """``ma <key> <flags>*``.

    Attributes:
        returns: the return flags (``c k O t``) in request order, with ``T`` and ``N``.
        incr: ``M``: increment (``I`` or ``+``, the default), else decrement (``D``, ``-``).
        delta: ``D``: the amount (1 when not given).
        initial: ``J``: the value a vivified counter starts at.
        vivify_exptime: ``N``: on a miss, create the counter with this exptime.
        touch_exptime: ``T``: the counter's new exptime.
        compare_cas: ``C``: act only if the cas unique matches (0: no check, as memcached).
        new_cas: ``E``: the cas unique of the counter's new value.
        value: ``v``: answer ``VA`` with the new number.
    """

    key: bytes
    returns: str = ""
    base64_key: bool = False
    opaque: bytes | None = None
    quiet: bool = False
    incr: bool = True
    delta: int = 1
    initial: int = 0
    vivify_exptime: int | None = None
    touch_exptime: int | None = None
    compare_cas: int | None = None
    new_cas: int | None = None
    value: bool = False

    def __attrs_post_init__(self) -> None:
        _check_key(self.key, self.base64_key)
        _check_returns(self.returns, ARITHMETIC_RETURNS)
        _check_opaque(self.opaque, self.returns)
        _check_range(self.delta, 0, UINT64_MAX, "delta")
        _check_range(self.initial, 0, UINT64_MAX, "initial value")
        _check_range(self.compare_cas, 0, UINT64_MAX, "cas")
        _check_range(self.new_cas, 0, UINT64_MAX, "cas")
        for exptime, letter in ((self.touch_exptime, "T"), (self.vivify_exptime, "N")):
            if (exptime is None) == (letter in self.returns):
                raise ValueError(f"{letter} is among the return flags exactly when it is set")
            _check_range(exptime, INT32_MIN, INT32_MAX, "exptime")


@attrs.frozen(slots=True)
class MetaDebug:
    """``me <key> [b]``: the item's metadata, human readable."""

    key: bytes
    base64_key: bool = False

    def __attrs_post_init__(self) -> None:
        _check_key(self.key, self.base64_key)


@attrs.frozen(slots=True)
class MetaNoop:
    """``mn``: answers ``MN`` (extra tokens are ignored, as in memcached)."""


def _check_context(context: bytes | None, returns: str) -> None:
    if (context is None) == ("K" in returns):
        raise ValueError("K is among the return flags exactly when a context is given")
    if context is not None and (b" " in context or b"\n" in context):
        raise ValueError("a context token is one token")


MetaRequest: TypeAlias = (
    MetaGet | MetaSet | MetaValueTooLarge | MetaDelete | MetaArithmetic | MetaDebug | MetaNoop
)


#: The one :class:`MetaNoop`.
NOOP: Final = MetaNoop()


def shown_key(key: bytes, base64_key: bool) -> bytes:
    """How a reply shows a key (a ``k`` flag, ``me``): as it is, or base64 (padded) for a
    key that was sent in base64."""
    return base64.b64encode(key) if base64_key else key
