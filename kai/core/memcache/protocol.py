"""Sans-IO memcached text protocol: the request parser.

This module turns the bytes a memcached client sends into request records
(:mod:`kai.core.memcache.requests`); the reply lines and encoders are in
:mod:`kai.core.memcache.replies`. It re-exports both, so ``protocol`` is the one name users of the
protocol need. It must never do I/O, import trio or plyvel, or know about storage: the
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

from collections.abc import Callable
from typing import Any, Final, TypeAlias

import attrs

from kai.core.memcache import meta_parser
from kai.core.memcache.meta import (
    MetaArithmetic,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaRequest,
    MetaSet,
    MetaValueTooLarge,
)
from kai.core.memcache.numbers import parse_int32, parse_ratio, parse_unsigned
from kai.core.memcache.replies import (
    DELETED,
    END,
    ERROR,
    EXISTS,
    NOT_FOUND,
    NOT_STORED,
    OBJECT_TOO_LARGE,
    OK,
    RESET,
    STORED,
    TOUCHED,
    client_error,
    encode_stats,
    encode_value,
    server_error,
)
from kai.core.memcache.requests import (
    INT32_MAX,
    KEY_MAX_LENGTH,
    STORE_COMMANDS,
    UINT32_MAX,
    UINT64_MAX,
    Arithmetic,
    ClassicRequest,
    Delete,
    FlushAll,
    Get,
    GetAndTouch,
    Invalid,
    Quit,
    SlabsAutomove,
    Stats,
    Store,
    Touch,
    ValueTooLarge,
    Verbosity,
    Version,
    is_valid_key,
)

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
    "MetaArithmetic",
    "MetaDebug",
    "MetaDelete",
    "MetaGet",
    "MetaNoop",
    "MetaRequest",
    "MetaSet",
    "MetaValueTooLarge",
    "Quit",
    "Request",
    "SlabsAutomove",
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

#: Every request the parser makes: the classic commands' and the meta commands'.
Request: TypeAlias = ClassicRequest | MetaRequest
#: Everything :meth:`MemcacheParser.next_event` returns apart from the sentinels.
Event: TypeAlias = Request | Invalid

# memcached rejects a declared value length above INT_MAX - 2 (the "+2" for the "\r\n").
_MAX_DECLARED_LENGTH: Final = INT32_MAX - 2

# --- Parser replies --------------------------------------------------------------------------

_BAD_FORMAT: Final = b"CLIENT_ERROR bad command line format\r\n"
_BAD_DELETE: Final = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
_BAD_DATA_CHUNK: Final = b"CLIENT_ERROR bad data chunk\r\n"
_BAD_EXPTIME: Final = b"CLIENT_ERROR invalid exptime argument\r\n"
_BAD_DELTA: Final = b"CLIENT_ERROR invalid numeric delta argument\r\n"
_LINE_TOO_LONG: Final = b"CLIENT_ERROR line too long\r\n"
_BINARY_PROTOCOL: Final = b"CLIENT_ERROR binary protocol is not supported\r\n"
# memcached's answer to ``shutdown`` unless it was started with -A (Kai never is).
_SHUTDOWN_DISABLED: Final = b"ERROR: shutdown not enabled\r\n"
# ``slabs automove`` levels memcached knows (0 off, 1 background, 2 aggressive).
_SLABS_AUTOMOVE_MAX: Final = 2

# Lines starting like this may be as long as max_get_line_length (multi-gets are unbounded).
_RETRIEVAL_PREFIXES: Final = (b"get ", b"gets ", b"gat ", b"gats ")
_BINARY_PROTOCOL_MAGIC: Final = 0x80


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


_Outcome: TypeAlias = Event | type[NEED_DATA] | type[CLOSED]
#: What a discarded data block was: the event to return once it is gone.
_AfterDiscard: TypeAlias = ValueTooLarge | MetaValueTooLarge | Invalid

_SILENT: Final = Invalid(b"")
_UNKNOWN_COMMAND: Final = Invalid(ERROR)
_VERSION: Final = Version()
_QUIT: Final = Quit()


def _silenced(reply: Invalid, noreply: bool) -> Invalid:
    return _SILENT if noreply else reply


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
        "_pending_meta_set",
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
        # (command, key, flags, exptime, length, noreply, cas_unique) awaiting its data block;
        # the command is _META_SET for an ms, whose record waits in _pending_meta_set.
        self._pending_store: tuple[str, bytes, int, int, int, bool, int | None] | None = None
        self._pending_meta_set: MetaSet | None = None
        # Bytes of an over-long value still to drop, and the event to emit after that.
        self._discard_remaining = 0
        self._after_discard: _AfterDiscard | None = None
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
        self._pending_meta_set = None
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
            # memcached hangs up on what looks like an HTTP request line, without a reply.
            if tokens[-1].startswith(b"HTTP/"):
                return self._close_with(b"")
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
        if command is _META_SET:
            return self._meta_set_with(value)
        return Store(command, key, flags, exptime, value, noreply, cas_unique)

    def _meta_set_with(self, value: bytes) -> MetaSet:
        header = self._pending_meta_set
        assert header is not None
        self._pending_meta_set = None
        return attrs.evolve(header, value=value)

    def _discard_then(self, count: int, event: _AfterDiscard) -> _Outcome:
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
        flags = parse_unsigned(tokens[2], UINT32_MAX)
        exptime = parse_int32(tokens[3])
        length = parse_int32(tokens[4])
        if flags is None or exptime is None or length is None:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        cas_unique = None
        if is_cas:
            cas_unique = parse_unsigned(tokens[5], UINT64_MAX)
            if cas_unique is None:
                return _silenced(Invalid(_BAD_FORMAT), noreply)
        if not 0 <= length <= _MAX_DECLARED_LENGTH:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        if length > self._max_item_size:
            return self._discard_then(length + 2, ValueTooLarge(command, key, noreply))
        self._pending_store = (command, key, flags, exptime, length, noreply, cas_unique)
        return self._read_value()

    def _parse_meta_set(self, tokens: list[bytes]) -> _Outcome:
        event, length = meta_parser.parse_set(tokens, self._max_item_size)
        if length is None:
            return event
        if isinstance(event, MetaSet):
            # The data block is read as a classic one is; a bad chunk is always answered.
            self._pending_meta_set = event
            self._pending_store = (_META_SET, b"", 0, 0, length, False, None)
            return self._read_value()
        # Flags memcached refuses, or a value too large: the data block is swallowed.
        return self._discard_then(length + 2, event)

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
        exptime = parse_int32(tokens[1])
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
        delta = parse_unsigned(tokens[2], UINT64_MAX)
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
        exptime = parse_int32(tokens[2])
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
            parsed = parse_int32(tokens[1])
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
        level = parse_unsigned(tokens[1], UINT32_MAX)
        if level is None:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        return Verbosity(level, noreply)

    def _parse_slabs(self, tokens: list[bytes]) -> Event:
        # memcached 1.6.18: only "slabs automove <0|1|2|ratio N>" and "slabs reassign" exist;
        # Kai has no slabs, so it takes the automove setting (and ignores it) and nothing else.
        if len(tokens) < 3 or tokens[1] != b"automove":
            return _UNKNOWN_COMMAND
        noreply = tokens[-1] == b"noreply"
        if tokens[2] == b"ratio":
            if len(tokens) < 4 or parse_ratio(tokens[3]) is None:
                return _silenced(Invalid(_BAD_FORMAT), noreply)
            return SlabsAutomove(None, noreply)
        level = parse_unsigned(tokens[2], UINT32_MAX)
        if level is None:
            return _silenced(Invalid(_BAD_FORMAT), noreply)
        if level > _SLABS_AUTOMOVE_MAX:
            return _silenced(_UNKNOWN_COMMAND, noreply)
        return SlabsAutomove(level, noreply)

    def _parse_shutdown(self, tokens: list[bytes]) -> Event:
        # As memcached without -A: a client cannot stop the node (signals and kai-admin do).
        return Invalid(_SHUTDOWN_DISABLED)

    def _parse_quit(self, tokens: list[bytes]) -> Event:
        self._close()
        return _QUIT


#: The command of a pending data block that belongs to an ``ms`` (never a classic name).
_META_SET: Final = "ms"
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
    b"slabs": MemcacheParser._parse_slabs,
    b"shutdown": MemcacheParser._parse_shutdown,
    b"quit": MemcacheParser._parse_quit,
    b"mg": lambda parser, tokens: meta_parser.parse_get(tokens),
    b"ms": MemcacheParser._parse_meta_set,
    b"md": lambda parser, tokens: meta_parser.parse_delete(tokens),
    b"ma": lambda parser, tokens: meta_parser.parse_arithmetic(tokens),
    b"me": lambda parser, tokens: meta_parser.parse_debug(tokens),
    b"mn": lambda parser, tokens: meta_parser.parse_noop(tokens),
}
