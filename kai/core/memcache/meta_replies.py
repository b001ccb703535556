"""The replies of memcached 1.6's meta commands, byte for byte as memcached 1.6.18 writes them.

Pure functions of a request record (:mod:`kai.core.memcache.meta`), the version it found or
wrote and the time: the executor (:mod:`kai.memcache.meta_commands`) decides, these write.
Return flags come in the order the request sent them; ``T`` and ``N`` take effect where they
stand (a ``t`` before a ``T`` shows the TTL the item had). This module must never do I/O.
"""

from __future__ import annotations

from typing import Final, TypeAlias

from kai.core.memcache.meta import (
    MetaArithmetic,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaSet,
    shown_key,
)
from kai.core.versions import Version, absolute_expiry

NOOP: Final = b"MN\r\n"
MISS: Final = b"EN\r\n"
NON_NUMERIC: Final = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
OUT_OF_MEMORY: Final = b"SERVER_ERROR out of memory storing object\r\n"
#: The size memcached 1.6 gives an item (64-bit build): header and cas, key and a NUL,
#: value and CRLF, and 4 bytes of client flags when they are not 0.
_ITEM_OVERHEAD: Final = 48 + 8 + 1 + 2
_U32: Final = 2**32

_Echoing: TypeAlias = MetaGet | MetaSet | MetaDelete | MetaArithmetic


def echo(request: _Echoing, letter: str) -> bytes:
    """The reply token of a flag that echoes the request: ``O`` and ``k`` (else nothing).
    A key sent in base64 is shown in base64, followed by ``b``."""
    if letter == "O":
        assert request.opaque is not None
        return b" O" + request.opaque
    if letter == "k":
        key = b" k" + shown_key(request.key, request.base64_key)
        return key + b" b" if request.base64_key else key
    return b""


def status(code: bytes, request: _Echoing) -> bytes:
    """A reply line with nothing but its code and the ``O`` and ``k`` tokens (``EN``,
    ``NF``, ``EX``, ``HD`` of ``md``)."""
    return code + b"".join(echo(request, letter) for letter in request.returns) + b"\r\n"


def expiry_of(exptime: int | None, now: float) -> int:
    """An exptime flag (``T``, ``N``) as an absolute expiry; 0 when it was not sent."""
    return 0 if exptime is None else absolute_expiry(exptime, now)


def expiry_after(
    letter: str, request: MetaGet | MetaArithmetic, expiry: int, now: float, *, created: bool
) -> int:
    """The item's expiry once ``letter`` of ``request`` is applied to ``expiry``: memcached
    applies ``T`` and ``N`` (``N`` only to an item the request created) in request order."""
    if letter == "T":
        return expiry_of(request.touch_exptime, now)
    if letter == "N" and created:
        return expiry_of(request.vivify_exptime, now)
    return expiry


def created_expiry(request: MetaGet | MetaArithmetic, now: float) -> int:
    """The expiry of an item ``request`` creates (the later of its ``T`` and ``N`` wins)."""
    expiry = 0
    for letter in request.returns:
        expiry = expiry_after(letter, request, expiry, now, created=True)
    return expiry


def ttl(expiry: int, now: float) -> int:
    """``t``: seconds left, -1 for none; as memcached's unsigned 32-bit subtraction, so an
    expiry in the past shows as a huge number."""
    if expiry == 0:
        return -1
    return (expiry - int(now)) % _U32


def hit(
    request: MetaGet,
    version: Version,
    cas: int,
    now: float,
    *,
    expiry_before: int,
    hit_before: bool,
    idle: int,
    won: bool = False,
    created: bool = False,
) -> bytes:
    """``VA``/``HD`` for an ``mg`` of ``version`` (as this request left it).

    Args:
        expiry_before: what a ``t`` before any ``T`` shows (the item's expiry before this
            request; a created item had none).
        hit_before, idle: ``h`` and ``l`` as they were before this request.
        won: this request won the recache (``W``); otherwise a win already handed out
            shows ``Z``.
        created: this request made the item (``N`` on a miss).
    """
    value = version.value
    assert value is not None
    parts = [b"VA %d" % len(value) if request.value else b"HD"]
    expiry = 0 if created else expiry_before
    for letter in request.returns:
        if letter == "t":
            parts.append(b" t%d" % ttl(expiry, now))
        elif letter in "TN":
            expiry = expiry_after(letter, request, expiry, now, created=created)
        elif letter == "s":
            parts.append(b" s%d" % len(value))
        elif letter == "c":
            parts.append(b" c%d" % cas)
        elif letter == "f":
            parts.append(b" f%d" % version.flags)
        elif letter == "l":
            parts.append(b" l%d" % idle)
        elif letter == "h":
            parts.append(b" h1" if hit_before else b" h0")
        else:
            parts.append(echo(request, letter))
    # memcached's order: Z (a win was handed out before), X (stale), W (this one won).
    if version.win_sent and not won:
        parts.append(b" Z")
    if version.is_stale:
        parts.append(b" X")
    if won:
        parts.append(b" W")
    parts.append(b"\r\n")
    if request.value:
        parts += (value, b"\r\n")
    return b"".join(parts)


def miss(request: MetaGet) -> bytes:
    """``EN`` for an ``mg`` (nothing with ``q``)."""
    return b"" if request.quiet else status(b"EN", request)


def set_line(code: bytes, request: MetaSet, cas: int) -> bytes:
    """An ``ms`` reply: ``code`` (``HD NS EX NF``) with ``c`` (0 unless stored), ``k``, ``O``."""
    parts = [code]
    for letter in request.returns:
        parts.append(b" c%d" % cas if letter == "c" else echo(request, letter))
    parts.append(b"\r\n")
    return b"".join(parts)


def counted(
    request: MetaArithmetic,
    number: bytes,
    cas: int,
    now: float,
    *,
    expiry_before: int,
    created: bool,
) -> bytes:
    """``VA``/``HD`` for an ``ma`` that left the counter at ``number``."""
    parts = [b"VA %d" % len(number) if request.value else b"HD"]
    expiry = 0 if created else expiry_before
    for letter in request.returns:
        if letter == "t":
            parts.append(b" t%d" % ttl(expiry, now))
        elif letter in "TN":
            expiry = expiry_after(letter, request, expiry, now, created=created)
        elif letter == "c":
            parts.append(b" c%d" % cas)
        else:
            parts.append(echo(request, letter))
    parts.append(b"\r\n")
    if request.value:
        parts += (number, b"\r\n")
    return b"".join(parts)


def debug(
    request: MetaDebug, version: Version, cas: int, now: float, *, fetched: bool, idle: int
) -> bytes:
    """memcached's ``ME`` line. ``exp`` is memcached's "now minus expiry" (negative while
    the item lives, -1 for none); ``size`` what memcached would take for the item."""
    value = version.value
    assert value is not None
    size = _ITEM_OVERHEAD + len(request.key) + len(value) + (4 if version.flags else 0)
    return b"ME %b exp=%d la=%d cas=%d fetch=%b cls=1 size=%d\r\n" % (
        shown_key(request.key, request.base64_key),
        -1 if version.expiry == 0 else int(now) - version.expiry,
        idle,
        cas,
        b"yes" if fetched else b"no",
        size,
    )
