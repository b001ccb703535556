"""Parsing of memcached 1.6's meta command lines into :mod:`kai.core.memcache.meta` records.

Follows memcached 1.6.18 (``proto_text.c``) byte for byte: the same token-count rules (plain
``ERROR``), the same ``CLIENT_ERROR`` strings in the same order of precedence, flags of one
character whose tokens follow them (``T30``, ``Oopaque``), every flag at most once, the
tokens after the first character ignored where a flag takes none (``vq`` is ``v``), and the
data block of an ``ms`` whose flags are wrong swallowed (a wrong key or length leaves it to
be parsed as commands). memcached 1.6.18 has no ``E`` flag; neither has Kai. ``K`` (Kai's,
docs/dynamo-api.md) is checked for where it may stand; its token is kept as sent.

Pure code: no I/O, no trio. :mod:`kai.core.memcache.protocol` calls these functions and owns
the data block of ``ms`` (the machinery it shares with the classic storage commands).
"""

from __future__ import annotations

from typing import Final, TypeAlias

import attrs

from kai.core.memcache.meta import (
    ARITHMETIC_RETURNS,
    DELETE_RETURNS,
    GET_RETURNS,
    MAX_TOKENS,
    NOOP,
    OPAQUE_TOKEN_MAX_LENGTH,
    SET_MODES,
    SET_RETURNS,
    WITH_CONTEXT_DELETE,
    WITH_CONTEXT_GET,
    MetaArithmetic,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaSet,
    MetaValueTooLarge,
)
from kai.core.memcache.numbers import parse_int32, parse_unsigned
from kai.core.memcache.requests import (
    INT32_MAX,
    KEY_MAX_LENGTH,
    UINT32_MAX,
    UINT64_MAX,
    Invalid,
    is_valid_key,
)

# --- Replies of the parser, memcached's strings ---------------------------------------------

ERROR: Final = Invalid(b"ERROR\r\n")
BAD_FORMAT: Final = Invalid(b"CLIENT_ERROR bad command line format\r\n")
INVALID_FLAG: Final = Invalid(b"CLIENT_ERROR invalid flag\r\n")
DUPLICATE_FLAG: Final = Invalid(b"CLIENT_ERROR duplicate flag\r\n")
BAD_TOKEN: Final = Invalid(b"CLIENT_ERROR bad token in command line format\r\n")
ERROR_DECODING_KEY: Final = Invalid(b"CLIENT_ERROR error decoding key\r\n")
BAD_MODE_LENGTH: Final = Invalid(b"CLIENT_ERROR incorrect length for M token\r\n")
BAD_INITIAL: Final = Invalid(b"CLIENT_ERROR invalid numeric initial value\r\n")
BAD_DELTA: Final = Invalid(b"CLIENT_ERROR invalid numeric delta value\r\n")
OPAQUE_TOO_LONG: Final = Invalid(b"CLIENT_ERROR opaque token too long\r\n")
BAD_SET_MODE: Final = Invalid(b"CLIENT_ERROR invalid mode for ms M token\r\n")
BAD_ARITHMETIC_MODE: Final = Invalid(b"CLIENT_ERROR invalid mode for ma M token\r\n")
#: What ``md`` and ``ma`` answer to any wrong flag.
INVALID_OR_DUPLICATE: Final = Invalid(b"CLIENT_ERROR invalid or duplicate flag\r\n")
#: ``mg`` says "are too long", the others "too long".
GET_FLAGS_TOO_LONG: Final = Invalid(b"CLIENT_ERROR options flags are too long\r\n")
FLAGS_TOO_LONG: Final = Invalid(b"CLIENT_ERROR options flags too long\r\n")

# --- Flags --------------------------------------------------------------------------------

# The letters memcached 1.6.18 knows, for every meta command (each command ignores the ones
# it has no use for, as memcached does), and E, which later releases know. K is Kai's, known
# to mg, ms and md only.
_KNOWN_FLAGS: Final = frozenset(b"bNTRlOPLkstcfvhuqFCMJDIE")
_K: Final = ord("K")
_FIRST_NON_ASCII: Final = 127
_BASE64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_VALUES: Final = {symbol: value for value, symbol in enumerate(_BASE64_ALPHABET)} | {
    ord("="): 0
}


def decode_base64_key(token: bytes) -> bytes | None:
    """A ``b`` key as memcached's decoder reads it, or None where it fails.

    Bytes outside the alphabet are skipped; the symbols left (``=`` included) must be a
    non-empty multiple of four; decoding stops after the first group holding ``=``, which
    may hold one or two of them.
    """
    symbols = [_BASE64_VALUES[byte] for byte in token if byte in _BASE64_VALUES]
    pads = [byte == 0x3D for byte in token if byte in _BASE64_VALUES]
    if not symbols or len(symbols) % 4:
        return None
    decoded = bytearray()
    for start in range(0, len(symbols), 4):
        first, second, third, fourth = symbols[start : start + 4]
        decoded += bytes(
            (
                (first << 2 | second >> 4) & 0xFF,
                (second << 4 | third >> 2) & 0xFF,
                (third << 6 | fourth) & 0xFF,
            )
        )
        padding = sum(pads[start : start + 4])
        if padding:
            if padding > 2:
                return None
            del decoded[-padding:]
            break
    return bytes(decoded)


@attrs.define(slots=True)
class _Flags:
    """What the flag tokens of one line said (memcached's ``_meta_flag_preparse``)."""

    key: bytes
    letters: str = ""
    base64_key: bool = False
    numbers: dict[str, int] = attrs.Factory(dict)
    opaque: bytes | None = None
    mode: bytes | None = None
    context: bytes | None = None

    def returns(self, allowed: frozenset[str]) -> str:
        return "".join(letter for letter in self.letters if letter in allowed)

    @property
    def opaque_too_long(self) -> bool:
        return self.opaque is not None and len(self.opaque) >= OPAQUE_TOKEN_MAX_LENGTH


def _scan_flags(tokens: list[bytes], start: int, *, with_k: bool) -> _Flags | Invalid:
    """Read the flags of a meta line: every token from ``start`` on.

    A letter seen twice or unknown ends the scan at once; a malformed token is remembered
    and the scan goes on (a later malformed token's error wins, and ``F`` has none of its
    own), as memcached does.
    """
    flags = _Flags(tokens[1])
    seen: set[int] = set()
    letters: list[str] = []
    error: Invalid | None = None
    failed = False
    numbers = flags.numbers
    for token in tokens[start:]:
        first = token[0]
        if first >= _FIRST_NON_ASCII or first in seen:
            return DUPLICATE_FLAG
        seen.add(first)
        letter = chr(first)
        rest = token[1:]
        if first == _K and with_k:
            flags.context = rest
        elif first not in _KNOWN_FLAGS:
            return INVALID_FLAG
        elif letter == "b":
            decoded = decode_base64_key(flags.key)
            flags.base64_key = True
            if decoded is None:
                error, failed = ERROR_DECODING_KEY, True
            else:
                flags.key = decoded
        elif letter in "NTR":
            number = parse_int32(rest)
            if number is None:
                error, failed = BAD_TOKEN, True
            else:
                numbers[letter] = number
        elif letter == "F":
            number = parse_unsigned(rest, UINT32_MAX)
            if number is None:
                failed = True
            else:
                numbers[letter] = number
        elif letter in "CEJD":
            number = parse_unsigned(rest, UINT64_MAX)
            if number is None:
                error, failed = _NUMBER_ERRORS[letter], True
            else:
                numbers[letter] = number
        elif letter == "M":
            if len(token) != 2:
                error, failed = BAD_MODE_LENGTH, True
            else:
                flags.mode = rest
        elif letter == "O":
            flags.opaque = rest
        letters.append(letter)
    if failed:
        return error or BAD_FORMAT
    flags.letters = "".join(letters)
    return flags


_NUMBER_ERRORS: Final = {"C": BAD_TOKEN, "E": BAD_TOKEN, "J": BAD_INITIAL, "D": BAD_DELTA}


def _key_is_acceptable(tokens: list[bytes], flags_start: int) -> bool:
    """memcached's key rule (at most 250 bytes as sent), and Kai's: a key not sent in base64
    (no ``b`` flag) has no control bytes."""
    key = tokens[1]
    if len(key) > KEY_MAX_LENGTH:
        return False
    if any(token[:1] == b"b" for token in tokens[flags_start:]):
        return True
    return is_valid_key(key)


def _line_flags(
    tokens: list[bytes], too_long: Invalid, *, with_k: bool, scan_error: Invalid | None = None
) -> _Flags | Invalid:
    """The flags of a meta line without a data length (``mg md ma``), or its error: plain
    ``ERROR`` without a key, a bad key, ``too_long`` for too many tokens, then what the flags
    are wrong with (``scan_error`` instead, where the command has one answer for them all)."""
    if len(tokens) < 2:
        return ERROR
    if not _key_is_acceptable(tokens, 2):
        return BAD_FORMAT
    if len(tokens) > MAX_TOKENS:
        return too_long
    flags = _scan_flags(tokens, 2, with_k=with_k)
    if isinstance(flags, Invalid) and scan_error is not None:
        return scan_error
    return flags


def parse_get(tokens: list[bytes]) -> MetaGet | Invalid:
    """``mg``: a :class:`MetaGet`, or the error to answer."""
    flags = _line_flags(tokens, GET_FLAGS_TOO_LONG, with_k=True)
    if isinstance(flags, Invalid):
        return flags
    if flags.opaque_too_long:
        return OPAQUE_TOO_LONG
    letters, numbers = flags.letters, flags.numbers
    if flags.context is not None and (flags.context or not WITH_CONTEXT_GET.issuperset(letters)):
        return INVALID_FLAG
    return MetaGet(
        flags.key,
        flags.returns(GET_RETURNS),
        flags.base64_key,
        flags.opaque,
        value="v" in letters,
        quiet="q" in letters,
        no_bump="u" in letters,
        touch_exptime=numbers.get("T"),
        vivify_exptime=numbers.get("N"),
        recache_exptime=numbers.get("R"),
        new_cas=numbers.get("E"),
        with_context=flags.context is not None,
    )


#: What :func:`parse_set` found: the event (or the record awaiting its data block) and how
#: many data bytes follow the line (None: no data block is read for it).
SetLine: TypeAlias = tuple[MetaSet | MetaValueTooLarge | Invalid, int | None]


def parse_set(tokens: list[bytes], max_item_size: int) -> SetLine:
    """``ms``: the record (its value still empty) with the length of its data block; or an
    error, with the length of the data block to swallow before it is answered (None: the
    block, if any, will be parsed as commands, as memcached does)."""
    if len(tokens) < 2:
        return ERROR, None
    if not _key_is_acceptable(tokens, 3) or len(tokens) == 2:
        return BAD_FORMAT, None
    if len(tokens) > MAX_TOKENS:
        return FLAGS_TOO_LONG, None
    length = parse_int32(tokens[2])
    if length is None or not 0 <= length <= INT32_MAX - 2:
        return BAD_FORMAT, None
    flags = _scan_flags(tokens, 3, with_k=True)
    if isinstance(flags, Invalid):
        return flags, length
    mode = "S" if flags.mode is None else flags.mode.decode("latin-1")
    if mode not in SET_MODES:
        return BAD_SET_MODE, length
    if flags.opaque_too_long:
        return OPAQUE_TOO_LONG, length
    letters, numbers = flags.letters, flags.numbers
    if flags.context is not None and (
        "C" in letters or "E" in letters or "I" in letters or "N" in letters or mode != "S"
    ):
        return INVALID_FLAG, length
    if length > max_item_size:
        return MetaValueTooLarge(flags.key, flags.base64_key, flags.context), length
    header = MetaSet(
        flags.key,
        b"",
        flags.returns(SET_RETURNS),
        flags.base64_key,
        flags.opaque,
        quiet="q" in letters,
        flags=numbers.get("F", 0),
        exptime=numbers.get("T", 0),
        mode=mode,
        compare_cas=numbers.get("C"),
        new_cas=numbers.get("E"),
        invalidate="I" in letters,
        context=flags.context,
    )
    return header, length


def parse_delete(tokens: list[bytes]) -> MetaDelete | Invalid:
    """``md``: a :class:`MetaDelete`, or the error to answer."""
    flags = _line_flags(tokens, FLAGS_TOO_LONG, with_k=True, scan_error=INVALID_OR_DUPLICATE)
    if isinstance(flags, Invalid):
        return flags
    if flags.opaque_too_long:
        return OPAQUE_TOO_LONG
    letters, numbers = flags.letters, flags.numbers
    if flags.context is not None and not WITH_CONTEXT_DELETE.issuperset(letters):
        return INVALID_OR_DUPLICATE  # md's answer to every flag it refuses
    return MetaDelete(
        flags.key,
        flags.returns(DELETE_RETURNS),
        flags.base64_key,
        flags.opaque,
        quiet="q" in letters,
        compare_cas=numbers.get("C"),
        new_cas=numbers.get("E"),
        invalidate="I" in letters,
        exptime=numbers.get("T"),
        context=flags.context,
    )


_ARITHMETIC_MODES: Final = {None: True, b"I": True, b"+": True, b"D": False, b"-": False}


def parse_arithmetic(tokens: list[bytes]) -> MetaArithmetic | Invalid:
    """``ma``: a :class:`MetaArithmetic`, or the error to answer."""
    flags = _line_flags(tokens, FLAGS_TOO_LONG, with_k=False, scan_error=INVALID_OR_DUPLICATE)
    if isinstance(flags, Invalid):
        return flags
    incr = _ARITHMETIC_MODES.get(flags.mode)
    if incr is None:
        return BAD_ARITHMETIC_MODE
    if flags.opaque_too_long:
        return OPAQUE_TOO_LONG
    letters, numbers = flags.letters, flags.numbers
    return MetaArithmetic(
        flags.key,
        flags.returns(ARITHMETIC_RETURNS),
        flags.base64_key,
        flags.opaque,
        quiet="q" in letters,
        incr=incr,
        delta=numbers.get("D", 1),
        initial=numbers.get("J", 0),
        vivify_exptime=numbers.get("N"),
        touch_exptime=numbers.get("T"),
        compare_cas=numbers.get("C"),
        new_cas=numbers.get("E"),
        value="v" in letters,
    )


def parse_debug(tokens: list[bytes]) -> MetaDebug | Invalid:
    """``me <key> [b]``: a :class:`MetaDebug`, or the error to answer. Only a ``b`` right
    after the key counts; every other token is ignored, as memcached does."""
    if len(tokens) < 2 or len(tokens[1]) > KEY_MAX_LENGTH:
        return BAD_FORMAT
    key = tokens[1]
    if len(tokens) > 2 and tokens[2] == b"b":
        decoded = decode_base64_key(key)
        return BAD_FORMAT if decoded is None else MetaDebug(decoded, base64_key=True)
    return MetaDebug(key) if is_valid_key(key) else BAD_FORMAT


def parse_noop(tokens: list[bytes]) -> MetaNoop:
    """``mn``: always :class:`MetaNoop`."""
    return NOOP
