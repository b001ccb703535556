"""Sans-IO memcached text protocol: request parser and reply encoder.

This module turns the bytes a memcached client sends into request records and turns results
into reply bytes. It must never do I/O, import trio or plyvel, or know about storage: the
connection loop feeds it bytes with :meth:`MemcacheParser.receive_data`, takes requests out
with :meth:`MemcacheParser.next_event`, and writes the bytes the encoders return.

Parsing follows memcached 1.6.18 (``proto_text.c``) so that existing clients work unchanged:
the same token-count rules (plain ``ERROR``), the same ``CLIENT_ERROR`` strings, ``noreply``
taken from the last token and silencing errors too, the data block of a rejected storage line
left to be parsed as a command, and an over-long value swallowed. Where Kai is stricter
(keys with control bytes, over-long complete lines) the docstrings say so.

Typical use::

    parser = MemcacheParser()
    parser.receive_data(chunk)  # b"" at end of file
    while True:
        event = parser.next_event()
        if event is NEED_DATA or event is CLOSED:
            break
        ...  # Invalid: send event.reply, close if event.close; otherwise serve the request
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

import attrs

__all__ = [
    "CLOSED",
    "DELETED",
    "END",
    "ERROR",
    "EXISTS",
    "KEY_MAX_LENGTH",
    "NEED_DATA",
    "NOT_FOUND",
    "NOT_STORED",
    "OBJECT_TOO_LARGE",
    "OK",
    "RESET",
    "STORED",
    "STORE_COMMANDS",
    "TOUCHED",
    "Arithmetic",
    "Delete",
    "Event",
    "FlushAll",
    "Get",
    "GetAndTouch",
    "Invalid",
    "MemcacheParser",
    "Quit",
    "Request",
    "Stats",
    "Store",
    "Touch",
    "ValueTooLarge",
    "Verbosity",
    "Version",
    "client_error",
    "encode_stats",
    "encode_value",
    "is_valid_key",
    "server_error",
]

#: Longest key memcached accepts, in bytes.
KEY_MAX_LENGTH: Final = 250
#: Storage command names, as carried in :attr:`Store.command`.
STORE_COMMANDS: Final = frozenset({"set", "add", "replace", "append", "prepend", "cas"})

_UINT32_MAX: Final = 2**32 - 1
_UINT64_MAX: Final = 2**64 - 1
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
# memcached rejects a declared value length above INT_MAX - 2 (the "+2" for the "\r\n").
_MAX_DECLARED_LENGTH: Final = _INT32_MAX - 2
# Longer numeric tokens are rejected before int() sees them (int() refuses huge digit strings).
_MAX_NUMBER_TOKEN_LENGTH: Final = 64

# --- Replies --------------------------------------------------------------------------------

STORED: Final = b"STORED\r\n"
NOT_STORED: Final = b"NOT_STORED\r\n"
EXISTS: Final = b"EXISTS\r\n"
NOT_FOUND: Final = b"NOT_FOUND\r\n"
DELETED: Final = b"DELETED\r\n"
TOUCHED: Final = b"TOUCHED\r\n"
END: Final = b"END\r\n"
OK: Final = b"OK\r\n"
RESET: Final = b"RESET\r\n"
ERROR: Final = b"ERROR\r\n"
#: The reply to :class:`ValueTooLarge`.
OBJECT_TOO_LARGE: Final = b"SERVER_ERROR object too large for cache\r\n"

_BAD_FORMAT: Final = b"CLIENT_ERROR bad command line format\r\n"
_BAD_DELETE: Final = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
_BAD_DATA_CHUNK: Final = b"CLIENT_ERROR bad data chunk\r\n"
_BAD_EXPTIME: Final = b"CLIENT_ERROR invalid exptime argument\r\n"
_BAD_DELTA: Final = b"CLIENT_ERROR invalid numeric delta argument\r\n"
_LINE_TOO_LONG: Final = b"CLIENT_ERROR line too long\r\n"
_BINARY_PROTOCOL: Final = b"CLIENT_ERROR binary protocol is not supported\r\n"

# Bytes never allowed in a key (Kai is stricter than memcached, which only splits on " ").
_FORBIDDEN_KEY_BYTE: Final = re.compile(rb"[\x00-\x20\x7f]")
# Lines starting like this may be as long as max_get_line_length (multi-gets are unbounded).
_RETRIEVAL_PREFIXES: Final = (b"get ", b"gets ", b"gat ", b"gats ")
_BINARY_PROTOCOL_MAGIC: Final = 0x80


def client_error(message: str) -> bytes:
    """Return the reply line ``CLIENT_ERROR <message>``.

    Raises:
        ValueError: if the message contains a line break, which would break framing.
    """
    return _error_line(b"CLIENT_ERROR ", message)


def server_error(message: str) -> bytes:
    """Return the reply line ``SERVER_ERROR <message>``.

    Raises:
        ValueError: if the message contains a line break, which would break framing.
    """
    return _error_line(b"SERVER_ERROR ", message)


def _error_line(prefix: bytes, message: str) -> bytes:
    if "\r" in message or "\n" in message:
        raise ValueError(f"a reply line cannot contain a line break: {message!r}")
    return prefix + message.encode() + b"\r\n"


def encode_value(key: bytes, flags: int, value: bytes, cas_unique: int | None = None) -> bytes:
    """Return one item of a retrieval reply: ``VALUE <key> <flags> <bytes>[ <cas>]`` + data.

    The caller sends :data:`END` after the last item.
    """
    if cas_unique is None:
        return b"VALUE %b %d %d\r\n%b\r\n" % (key, flags, len(value), value)
    return b"VALUE %b %d %d %d\r\n%b\r\n" % (key, flags, len(value), cas_unique, value)


def encode_stats(items: Iterable[tuple[str, object]]) -> bytes:
    """Return a stats reply: one ``STAT <name> <value>`` line per item, then ``END``.

    Values are written with ``str()`` (bytes as they are, booleans as ``1``/``0`` as
    memcached does); format floats such as ``rusage_user`` before passing them.

    Raises:
        ValueError: if a name is empty or contains whitespace, or a value contains a line
            break.
    """
    lines = []
    for name, value in items:
        if not name or any(character.isspace() for character in name):
            raise ValueError(f"invalid stat name {name!r}")
        if isinstance(value, bytes):
            text = value
        elif isinstance(value, bool):
            text = b"1" if value else b"0"
        else:
            text = str(value).encode()
        if b"\r" in text or b"\n" in text:
            raise ValueError(f"stat {name} has a line break in its value {value!r}")
        lines.append(b"STAT %b %b\r\n" % (name.encode(), text))
    lines.append(END)
    return b"".join(lines)


def is_valid_key(key: bytes) -> bool:
    """Whether ``key`` is 1 to 250 bytes long with no space, control byte or DEL."""
    return 0 < len(key) <= KEY_MAX_LENGTH and _FORBIDDEN_KEY_BYTE.search(key) is None


# --- Sentinels ------------------------------------------------------------------------------


class _Sentinel(type):
    """Metaclass of sentinels that are their own type, as h11's ``NEED_DATA``."""

    def __new__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> _Sentinel:
        if bases != (_Sentinel,):
            raise TypeError("a sentinel derives from _Sentinel only")
        sentinel = super().__new__(cls, name, bases, namespace)
        sentinel.__class__ = sentinel  # type: ignore[assignment]
        return sentinel

    def __repr__(self) -> str:
        return self.__name__


class NEED_DATA(_Sentinel, metaclass=_Sentinel):
    """Returned by :meth:`MemcacheParser.next_event` when it needs more bytes."""


class CLOSED(_Sentinel, metaclass=_Sentinel):
    """Returned by :meth:`MemcacheParser.next_event` once no more requests can come.

    That is after end of file with no complete request left, or after an event that closes
    the connection (:class:`Quit`, or :class:`Invalid` with ``close=True``).
    """


# --- Requests -------------------------------------------------------------------------------


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
    if not _INT32_MIN <= value <= _INT32_MAX:
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
        if not 0 <= self.flags <= _UINT32_MAX:
            raise ValueError(f"flags {self.flags} is not an unsigned 32-bit integer")
        _check_int32(self.exptime, "exptime")
        if not isinstance(self.value, bytes):
            raise TypeError(f"value must be bytes, not {type(self.value).__name__}")
        if (self.cas_unique is None) != (self.command != "cas"):
            raise ValueError("cas_unique is required for cas and allowed only there")
        if self.cas_unique is not None and not 0 <= self.cas_unique <= _UINT64_MAX:
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
        if not 0 <= self.delta <= _UINT64_MAX:
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
        if not 0 <= self.level <= _UINT32_MAX:
            raise ValueError(f"verbosity level {self.level} is not an unsigned 32-bit integer")


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


Request: TypeAlias = (
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
    | Quit
)
#: Everything :meth:`MemcacheParser.next_event` returns apart from the sentinels.
Event: TypeAlias = Request | Invalid
_Outcome: TypeAlias = Event | type[NEED_DATA] | type[CLOSED]

_SILENT: Final = Invalid(b"")
_UNKNOWN_COMMAND: Final = Invalid(ERROR)
_VERSION: Final = Version()
_QUIT: Final = Quit()


def _silenced(reply: Invalid, noreply: bool) -> Invalid:
    return _SILENT if noreply else reply


def _parse_unsigned(token: bytes, maximum: int) -> int | None:
    """Parse a plain decimal (digits only) no larger than ``maximum``, else ``None``."""
    if len(token) > _MAX_NUMBER_TOKEN_LENGTH or not token.isdigit():
        return None
    value = int(token)
    return value if value <= maximum else None


def _parse_int32(token: bytes) -> int | None:
    """Parse an optionally negative decimal that fits a signed 32-bit int, else ``None``."""
    digits = token[1:] if token.startswith(b"-") else token
    if len(digits) > _MAX_NUMBER_TOKEN_LENGTH or not digits.isdigit():
        return None
    value = int(token)
    return value if _INT32_MIN <= value <= _INT32_MAX else None


# --- Parser ---------------------------------------------------------------------------------


class MemcacheParser:
    """Incremental parser for one client connection (sans-IO, as h11's ``Connection``).

    Feed bytes with :meth:`receive_data` and call :meth:`next_event` until it returns
    :data:`NEED_DATA` or :data:`CLOSED`. Events come out in request order, so replies can
    be sent in order. Parsing is linear in the input however it is chunked.

    Args:
        max_item_size: longest value accepted; a longer one is swallowed and reported as
            :class:`ValueTooLarge`.
        max_line_length: longest command line in bytes, counting a ``\\r`` before the
            ``\\n`` but not the ``\\n``. A longer line closes the connection with
            ``CLIENT_ERROR line too long`` as soon as more bytes than that are buffered
            without a newline (memcached's rule), and also when its newline came in the same
            read (Kai's rule, so the outcome never depends on how TCP split the bytes).
        max_get_line_length: the same limit for lines starting ``get``/``gets``/``gat``/
            ``gats`` and a space (multi-gets can carry thousands of keys).
    """

    __slots__ = (
        "_after_discard",
        "_at_eof",
        "_buffer",
        "_closed",
        "_discard_remaining",
        "_final_event",
        "_max_get_line_length",
        "_max_item_size",
        "_max_line_length",
        "_pending_store",
        "_received_any",
        "_scan_start",
    )

    def __init__(
        self,
        *,
        max_item_size: int = 1024 * 1024,
        max_line_length: int = 2048,
        max_get_line_length: int = 4 * 1024 * 1024,
    ) -> None:
        if max_item_size < 0:
            raise ValueError(f"max_item_size must not be negative, got {max_item_size}")
        if max_line_length < 1 or max_get_line_length < max_line_length:
            raise ValueError(
                "need 1 <= max_line_length <= max_get_line_length, got "
                f"{max_line_length} and {max_get_line_length}"
            )
        self._max_item_size = max_item_size
        self._max_line_length = max_line_length
        self._max_get_line_length = max_get_line_length
        self._buffer = bytearray()
        # Where the search for the next "\n" resumes: bytes before it hold no newline.
        self._scan_start = 0
        # (command, key, flags, exptime, length, noreply, cas_unique) awaiting its data block.
        self._pending_store: tuple[str, bytes, int, int, int, bool, int | None] | None = None
        # Bytes of an over-long value still to drop, and the event to emit after that.
        self._discard_remaining = 0
        self._after_discard: ValueTooLarge | None = None
        self._received_any = False
        self._at_eof = False
        self._closed = False
        self._final_event: Invalid | None = None

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client; ``b""`` means the client closed its side.

        Raises:
            RuntimeError: if data arrives after end of file.
        """
        if not data:
            self._at_eof = True
            return
        if self._at_eof:
            raise RuntimeError("received data after end of file")
        if self._closed:
            return
        if not self._received_any:
            self._received_any = True
            if data[0] == _BINARY_PROTOCOL_MAGIC:
                self._closed = True
                self._final_event = Invalid(_BINARY_PROTOCOL, close=True)
                return
        if self._discard_remaining:
            # The buffer is empty while discarding: drop the bytes without copying them.
            dropped = min(self._discard_remaining, len(data))
            self._discard_remaining -= dropped
            if dropped == len(data):
                return
            data = data[dropped:]
        self._buffer += data

    @property
    def buffered(self) -> int:
        """How many received bytes are waiting to be parsed (a partial request)."""
        return len(self._buffer)

    def next_event(self) -> _Outcome:
        """Return the next request, an :class:`Invalid`, or a sentinel.

        Returns:
            A request record; an :class:`Invalid` carrying the exact reply; :data:`NEED_DATA`
            when the buffered bytes hold no complete request; :data:`CLOSED` after end of
            file (an incomplete request is dropped) or after a closing event.
        """
        if self._closed:
            final_event = self._final_event
            if final_event is not None:
                self._final_event = None
                return final_event
            return CLOSED
        if self._after_discard is not None:
            return self._finish_discarding()
        if self._pending_store is not None:
            return self._read_value()
        return self._read_command()

    # --- framing ---

    def _need_data(self) -> type[NEED_DATA] | type[CLOSED]:
        if self._at_eof:
            self._close()
            return CLOSED
        return NEED_DATA

    def _close(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._pending_store = None
        self._after_discard = None

    def _close_with(self, reply: bytes) -> Invalid:
        self._close()
        return Invalid(reply, close=True)

    def _line_limit(self) -> int:
        if self._buffer.startswith(_RETRIEVAL_PREFIXES):
            return self._max_get_line_length
        return self._max_line_length

    def _read_command(self) -> _Outcome:
        buffer = self._buffer
        newline = buffer.find(b"\n", self._scan_start)
        if newline < 0:
            buffered = len(buffer)
            if buffered > self._max_line_length and buffered > self._line_limit():
                return self._close_with(_LINE_TOO_LONG)
            self._scan_start = buffered
            return self._need_data()
        self._scan_start = 0
        if newline > self._max_line_length and newline > self._line_limit():
            return self._close_with(_LINE_TOO_LONG)
        line_end = newline - 1 if newline and buffer[newline - 1] == 0x0D else newline
        line = bytes(buffer[:line_end])
        del buffer[: newline + 1]

        tokens = line.split(b" ")
        if b"" in tokens:
            tokens = [token for token in tokens if token]
            if not tokens:
                return _UNKNOWN_COMMAND
        parse = _COMMAND_PARSERS.get(tokens[0])
        if parse is None:
            # memcached hangs up on what looks like an HTTP request line.
            if tokens[-1].startswith(b"HTTP/"):
                return self._close_with(ERROR)
            return _UNKNOWN_COMMAND
        return parse(self, tokens)

    def _read_value(self) -> _Outcome:
        pending = self._pending_store
        assert pending is not None
        command, key, flags, exptime, length, noreply, cas_unique = pending
        buffer = self._buffer
        if len(buffer) < length + 2:
            return self._need_data()
        self._pending_store = None
        if buffer[length] != 0x0D or buffer[length + 1] != 0x0A:
            del buffer[: length + 2]
            return _silenced(Invalid(_BAD_DATA_CHUNK), noreply)
        value = bytes(buffer[:length])
        del buffer[: length + 2]
        return Store(command, key, flags, exptime, value, noreply, cas_unique)

    def _discard_then(self, count: int, event: ValueTooLarge) -> _Outcome:
        buffer = self._buffer
        dropped = min(count, len(buffer))
        del buffer[:dropped]
        self._discard_remaining = count - dropped
        self._after_discard = event
        return self._finish_discarding()

    def _finish_discarding(self) -> _Outcome:
        if self._discard_remaining:
            return self._need_data()
        event = self._after_discard
        assert event is not None
        self._after_discard = None
        return event

    # --- commands (tokens is never empty; tokens[0] is the command name) ---

    def _parse_storage(self, tokens: list[bytes]) -> _Outcome:
        command = _STORE_COMMAND_NAMES[tokens[0]]
        is_cas = command == "cas"
        base_count = 6 if is_cas else 5
        if len(tokens) != base_count and len(tokens) != base_count + 1:
            return _UNKNOWN_COMMAND
        # A line error leaves the data block to be parsed as commands, as in memcached.
        noreply = tokens[-1] == b"noreply"
        key = tokens[1]
        if not is_valid_key(key):
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        flags = _parse_unsigned(tokens[2], _UINT32_MAX)
        exptime = _parse_int32(tokens[3])
        length = _parse_int32(tokens[4])
        if flags is None or exptime is None or length is None:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        cas_unique = None
        if is_cas:
            cas_unique = _parse_unsigned(tokens[5], _UINT64_MAX)
            if cas_unique is None:
                return _silenced(Invalid(_BAD_FORMAT), noreply)
        if not 0 <= length <= _MAX_DECLARED_LENGTH:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        if length > self._max_item_size:
            return self._discard_then(length + 2, ValueTooLarge(command, key, noreply))
        self._pending_store = (command, key, flags, exptime, length, noreply, cas_unique)
        return self._read_value()

    def _parse_get(self, tokens: list[bytes]) -> Event:
        if len(tokens) < 2:
            return _UNKNOWN_COMMAND
        try:
            # Get checks its keys with the same rule; one invalid key rejects the whole line.
            return Get(tuple(tokens[1:]), len(tokens[0]) == 4)
        except ValueError:
            return Invalid(_BAD_FORMAT)

    def _parse_get_and_touch(self, tokens: list[bytes]) -> Event:
        if len(tokens) < 2:
            return _UNKNOWN_COMMAND
        exptime = _parse_int32(tokens[1])
        if exptime is None:
            return Invalid(_BAD_EXPTIME)
        keys = tokens[2:]
        if not keys:
            # memcached touches nothing and answers an empty retrieval.
            return Invalid(END)
        try:
            return GetAndTouch(exptime, tuple(keys), len(tokens[0]) == 4)
        except ValueError:
            return Invalid(_BAD_FORMAT)

    def _parse_delete(self, tokens: list[bytes]) -> Event:
        count = len(tokens)
        if not 2 <= count <= 4:
            return _UNKNOWN_COMMAND
        noreply = False
        if count > 2:
            # Only the legacy hold time "0" may sit between the key and noreply.
            hold_is_zero = tokens[2] == b"0"
            noreply = tokens[-1] == b"noreply"
            if not (count == 3 and (hold_is_zero or noreply)) and not (
                count == 4 and hold_is_zero and noreply
            ):
                return _silenced(Invalid(_BAD_DELETE), noreply)
        key = tokens[1]
        if not is_valid_key(key):
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        return Delete(key, noreply)

    def _parse_arithmetic(self, tokens: list[bytes]) -> Event:
        if len(tokens) != 3 and len(tokens) != 4:
            return _UNKNOWN_COMMAND
        noreply = tokens[-1] == b"noreply"
        key = tokens[1]
        if not is_valid_key(key):
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        delta = _parse_unsigned(tokens[2], _UINT64_MAX)
        if delta is None:
            return _silenced(Invalid(_BAD_DELTA), noreply)
        return Arithmetic(key, delta, tokens[0] == b"incr", noreply)

    def _parse_touch(self, tokens: list[bytes]) -> Event:
        if len(tokens) != 3 and len(tokens) != 4:
            return _UNKNOWN_COMMAND
        noreply = tokens[-1] == b"noreply"
        key = tokens[1]
        if not is_valid_key(key):
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        exptime = _parse_int32(tokens[2])
        if exptime is None:
            return _silenced(Invalid(_BAD_EXPTIME), noreply)
        return Touch(key, exptime, noreply)

    def _parse_flush_all(self, tokens: list[bytes]) -> Event:
        count = len(tokens)
        if count > 3:
            return _UNKNOWN_COMMAND
        noreply = tokens[-1] == b"noreply"
        delay = 0
        if count != (2 if noreply else 1):
            parsed = _parse_int32(tokens[1])
            if parsed is None:
                return _silenced(Invalid(_BAD_EXPTIME), noreply)
            delay = parsed
        return FlushAll(delay, noreply)

    def _parse_stats(self, tokens: list[bytes]) -> Event:
        if len(tokens) == 2 and tokens[1] == b"noreply":
            return _UNKNOWN_COMMAND
        return Stats(tuple(tokens[1:]))

    def _parse_version(self, tokens: list[bytes]) -> Event:
        return _VERSION

    def _parse_verbosity(self, tokens: list[bytes]) -> Event:
        if len(tokens) != 2 and len(tokens) != 3:
            return _UNKNOWN_COMMAND
        noreply = tokens[-1] == b"noreply"
        level = _parse_unsigned(tokens[1], _UINT32_MAX)
        if level is None:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        return Verbosity(level, noreply)

    def _parse_quit(self, tokens: list[bytes]) -> Event:
        self._close()
        return _QUIT


_STORE_COMMAND_NAMES: Final = {name.encode(): name for name in STORE_COMMANDS}

_COMMAND_PARSERS: Final[dict[bytes, Callable[[MemcacheParser, list[bytes]], _Outcome]]] = {
    b"get": MemcacheParser._parse_get,
    b"gets": MemcacheParser._parse_get,
    b"set": MemcacheParser._parse_storage,
    b"add": MemcacheParser._parse_storage,
    b"replace": MemcacheParser._parse_storage,
    b"append": MemcacheParser._parse_storage,
    b"prepend": MemcacheParser._parse_storage,
    b"cas": MemcacheParser._parse_storage,
    b"gat": MemcacheParser._parse_get_and_touch,
    b"gats": MemcacheParser._parse_get_and_touch,
    b"delete": MemcacheParser._parse_delete,
    b"incr": MemcacheParser._parse_arithmetic,
    b"decr": MemcacheParser._parse_arithmetic,
    b"touch": MemcacheParser._parse_touch,
    b"flush_all": MemcacheParser._parse_flush_all,
    b"stats": MemcacheParser._parse_stats,
    b"version": MemcacheParser._parse_version,
    b"verbosity": MemcacheParser._parse_verbosity,
    b"quit": MemcacheParser._parse_quit,
}
