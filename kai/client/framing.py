"""Sans-IO framing of the replies a Kai node (or memcached) sends a meta-protocol client.

:class:`ReplyParser` cuts the byte stream of one connection into replies, in the order the
requests were sent (so requests can be pipelined): meta replies (``VA`` with its data block,
``HD``, ``NS``, ``EX``, ``NF``, ``EN``, ``MN``), a ``stats`` listing (``STAT`` lines up to
``END``), and the error lines ``ERROR``, ``CLIENT_ERROR ...`` and ``SERVER_ERROR ...``. It
only frames: what a reply means for the request it answers is
:mod:`kai.client.protocol`'s job.

The buffer is bounded (one line, or one data block, at a time) and parsing is linear in the
input however it is chunked: the search for a line end resumes where the last one stopped.
Any bytes give replies or a :class:`~kai.client.errors.ProtocolError`, never another
exception. Never does I/O.

Typical use::

    parser = ReplyParser()
    parser.receive_data(chunk)  # b"" once the node closed the connection
    reply = parser.next_reply()  # a reply, NEED_DATA, or CLOSED (connection ended)
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypeAlias

import attrs

from kai.client.errors import ProtocolError

#: Longest reply line accepted, CRLF excluded (Kai's lines are far shorter).
DEFAULT_MAX_LINE_LENGTH: Final = 8 * 1024
#: Largest data block accepted: every sibling of a key in one ``VA`` block. Kai keeps at
#: most ``siblings_maximum`` (100) siblings of ``max_item_size`` (1 MiB) by default.
DEFAULT_MAX_BLOCK_SIZE: Final = 256 * 1024 * 1024

#: The meta reply codes, each followed by return flags (``VA`` by a size first).
META_CODES: Final = frozenset({b"VA", b"HD", b"NS", b"EX", b"NF", b"EN", b"MN"})
ErrorKind: TypeAlias = Literal["ERROR", "CLIENT_ERROR", "SERVER_ERROR"]
_ERROR_KINDS: Final[dict[bytes, ErrorKind]] = {
    b"ERROR": "ERROR",
    b"CLIENT_ERROR": "CLIENT_ERROR",
    b"SERVER_ERROR": "SERVER_ERROR",
}
#: Most STAT lines in one listing (``stats kai_ring`` has one per node and four more).
MAX_STAT_LINES: Final = 100_000
#: How much of a bad reply an error message quotes.
_QUOTED: Final = 200


class _Sentinel(type):
    """Metaclass of sentinels that are their own type, as h11's ``NEED_DATA``."""

    def __new__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> _Sentinel:
        sentinel = super().__new__(cls, name, bases, namespace)
        sentinel.__class__ = sentinel  # type: ignore[assignment]
        return sentinel

    def __repr__(self) -> str:
        return self.__name__


class NEED_DATA(_Sentinel, metaclass=_Sentinel):
    """Returned by :meth:`ReplyParser.next_reply` when the buffer holds no complete reply."""


class CLOSED(_Sentinel, metaclass=_Sentinel):
    """Returned by :meth:`ReplyParser.next_reply` after the node closed the connection and
    every complete reply was taken (a partial one is dropped: see ``ReplyParser.buffered``)."""


@attrs.frozen(slots=True)
class MetaReply:
    """A meta reply: its code, its return flags as sent (``b"K<token>"``, ``b"f0"``...) and,
    for ``VA``, its data block."""

    code: bytes = attrs.field(validator=attrs.validators.in_(META_CODES))
    flags: tuple[bytes, ...] = ()
    data: bytes | None = None
    #: The reply line without its CRLF, for error messages.
    line: bytes = b""

    def __attrs_post_init__(self) -> None:
        if (self.data is not None) != (self.code == b"VA"):
            raise ValueError(f"a data block comes with VA and only with it, not {self.code!r}")

    def flag(self, letter: bytes) -> bytes | None:
        """The value of the first return flag ``letter`` (``b""`` for a bare flag), or None."""
        for token in self.flags:
            if token[:1] == letter:
                return token[1:]
        return None


@attrs.frozen(slots=True)
class StatsReply:
    """A ``stats`` listing: ``(name, value)`` in the order sent (values may hold spaces)."""

    fields: tuple[tuple[str, str], ...]


@attrs.frozen(slots=True)
class ErrorReply:
    """``ERROR``, ``CLIENT_ERROR <message>`` or ``SERVER_ERROR <message>``."""

    kind: ErrorKind
    message: str
    #: The reply line without its CRLF.
    line: bytes


Reply: TypeAlias = MetaReply | StatsReply | ErrorReply


def _lost(message: str, offending: bytes | bytearray) -> ProtocolError:
    return ProtocolError(
        f"{message}: {bytes(offending[:_QUOTED])!r}; the connection cannot be used any more",
        reply=bytes(offending[:_QUOTED]),
        framing_lost=True,
    )


class ReplyParser:
    """Incremental parser of one connection's replies (sans-IO, as h11's ``Connection``).

    Feed bytes with :meth:`receive_data`; call :meth:`next_reply` until it returns
    :data:`NEED_DATA` or :data:`CLOSED`. Once it has raised a ``ProtocolError`` it raises the
    same error again: framing is lost and the connection must be closed.

    Args:
        max_line_length: longest reply line, CRLF excluded.
        max_block_size: largest ``VA`` data block.
    """

    __slots__ = (
        "_at_eof",
        "_block_header",
        "_buffer",
        "_error",
        "_max_block_size",
        "_max_line_length",
        "_scan_start",
        "_stats",
    )

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    ) -> None:
        if max_line_length < 16 or max_block_size < 0:
            raise ValueError(
                "need max_line_length >= 16 and max_block_size >= 0, got "
                f"{max_line_length} and {max_block_size}"
            )
        self._max_line_length = max_line_length
        self._max_block_size = max_block_size
        self._buffer = bytearray()
        # Where the search for the next "\n" resumes: bytes before it hold none.
        self._scan_start = 0
        # A VA reply waiting for its data block: (code line tokens' flags, size, line).
        self._block_header: tuple[tuple[bytes, ...], int, bytes] | None = None
        # The STAT lines of a stats listing waiting for its END.
        self._stats: list[tuple[str, str]] | None = None
        self._at_eof = False
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection; ``b""`` means the node closed it."""
        if not data:
            self._at_eof = True
        elif self._error is None and not self._at_eof:
            self._buffer += data

    @property
    def buffered(self) -> int:
        """Received bytes not yet returned as a reply (part of one, or replies not yet taken)."""
        return len(self._buffer)

    @property
    def in_reply(self) -> bool:
        """Whether part of a reply has been consumed and the rest is awaited."""
        return self._block_header is not None or self._stats is not None

    def next_reply(self) -> Reply | type[NEED_DATA] | type[CLOSED]:
        """The next complete reply, :data:`NEED_DATA`, or :data:`CLOSED`.

        Raises:
            ProtocolError: the bytes are not a reply (``framing_lost`` is True); raised
                again on every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as error:
            self._error = error
            self._buffer.clear()
            raise

    def _next(self) -> Reply | type[NEED_DATA] | type[CLOSED]:
        while True:
            if self._block_header is not None:
                return self._read_block()
            line = self._read_line()
            if line is None:
                return CLOSED if self._at_eof else NEED_DATA
            reply = self._parse_line(line)
            if reply is not None:
                return reply
            # A STAT line or a VA header was consumed: go on with what follows.

    def _read_line(self) -> bytes | None:
        buffer = self._buffer
        newline = buffer.find(b"\n", self._scan_start)
        if newline < 0:
            if len(buffer) > self._max_line_length + 1:
                raise _lost(f"a reply line longer than {self._max_line_length} bytes", buffer)
            self._scan_start = len(buffer)
            return None
        self._scan_start = 0
        if newline > self._max_line_length + 1:
            raise _lost(f"a reply line longer than {self._max_line_length} bytes", buffer)
        if newline == 0 or buffer[newline - 1] != 0x0D:
            raise _lost("a reply line that does not end with CRLF", buffer[: newline + 1])
        line = bytes(buffer[: newline - 1])
        del buffer[: newline + 1]
        return line

    def _parse_line(self, line: bytes) -> Reply | None:
        code, _, rest = line.partition(b" ")
        if self._stats is not None:
            return self._parse_stats_line(code, rest, line)
        if code in META_CODES:
            return self._parse_meta(code, rest, line)
        if code == b"STAT":
            self._stats = []
            return self._parse_stats_line(code, rest, line)
        if code == b"END" and not rest:
            return StatsReply(())
        kind = _ERROR_KINDS.get(code)
        if kind is not None:
            return ErrorReply(kind, rest.decode("utf-8", "replace"), line)
        raise _lost("not a reply", line)

    def _parse_meta(self, code: bytes, rest: bytes, line: bytes) -> MetaReply | None:
        tokens = rest.split(b" ") if rest else []
        if b"" in tokens:
            raise _lost("a meta reply with an empty token", line)
        if code != b"VA":
            return MetaReply(code, self._checked_flags(tokens, line), None, line)
        if not tokens or not tokens[0].isdigit() or len(tokens[0]) > 12:
            raise _lost("a VA reply without a decimal size", line)
        size = int(tokens[0])
        if size > self._max_block_size:
            raise _lost(f"a VA block larger than {self._max_block_size} bytes", line)
        self._block_header = (self._checked_flags(tokens[1:], line), size, line)
        return None

    @staticmethod
    def _checked_flags(tokens: list[bytes], line: bytes) -> tuple[bytes, ...]:
        for token in tokens:
            if not token[:1].isalpha():
                raise _lost("a return flag that does not start with a letter", line)
        return tuple(tokens)

    def _read_block(self) -> Reply | type[NEED_DATA] | type[CLOSED]:
        header = self._block_header
        assert header is not None
        flags, size, line = header
        buffer = self._buffer
        if len(buffer) < size + 2:
            return CLOSED if self._at_eof else NEED_DATA
        if buffer[size : size + 2] != b"\r\n":
            raise _lost(f"a {size}-byte VA block not followed by CRLF", buffer[size : size + 2])
        data = bytes(buffer[:size])
        del buffer[: size + 2]
        self._block_header = None
        return MetaReply(b"VA", flags, data, line)

    def _parse_stats_line(self, code: bytes, rest: bytes, line: bytes) -> Reply | None:
        stats = self._stats
        assert stats is not None
        if code == b"END" and not rest:
            self._stats = None
            return StatsReply(tuple(stats))
        if code != b"STAT":
            raise _lost("a stats listing interrupted by another line", line)
        name, _, value = rest.partition(b" ")
        if not name:
            raise _lost("a STAT line without a name", line)
        if len(stats) >= MAX_STAT_LINES:
            raise _lost(f"a stats listing longer than {MAX_STAT_LINES} lines", line)
        stats.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
        return None


def reusable_after(reply: Reply) -> bool:
    """Whether a connection may carry more requests after ``reply``.

    Not after ``ERROR`` or ``CLIENT_ERROR``: a node that refused a command line may read
    the data block that followed it as a command of its own and answer that too, so the
    replies would no longer line up with the requests.
    """
    return not isinstance(reply, ErrorReply) or reply.kind == "SERVER_ERROR"
