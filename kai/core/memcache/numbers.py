"""The decimal numbers of the memcached text protocol, parsed the one way every command uses.

Shared by the classic command parser (:mod:`kai.core.memcache.protocol`) and the meta
command parser (:mod:`kai.core.memcache.meta`). Pure functions of bytes: never I/O. Kai
accepts plain decimals only (an optional ``-`` for signed numbers), where memcached's
``strtol`` would also take a ``+`` or leading blanks; nothing a client library sends differs.
"""

from __future__ import annotations

from typing import Final

from kai.core.memcache.requests import INT32_MAX, INT32_MIN

# Longer numeric tokens are rejected before int() sees them (int() refuses huge digit strings).
_MAX_NUMBER_TOKEN_LENGTH: Final = 64


def parse_unsigned(token: bytes, maximum: int) -> int | None:
    """Parse a plain decimal (digits only) no larger than ``maximum``, else ``None``."""
    if len(token) > _MAX_NUMBER_TOKEN_LENGTH or not token.isdigit():
        return None
    value = int(token)
    return value if value <= maximum else None


def parse_int32(token: bytes) -> int | None:
    """Parse an optionally negative decimal that fits a signed 32-bit int, else ``None``."""
    digits = token[1:] if token.startswith(b"-") else token
    if len(digits) > _MAX_NUMBER_TOKEN_LENGTH or not digits.isdigit():
        return None
    value = int(token)
    return value if INT32_MIN <= value <= INT32_MAX else None


def parse_ratio(token: bytes) -> float | None:
    """Parse a non-negative decimal fraction such as ``0.8`` (digits and one dot), else None."""
    whole, _, fraction = token.partition(b".")
    if len(token) > _MAX_NUMBER_TOKEN_LENGTH or not (whole + fraction).isdigit():
        return None
    return float(token)
