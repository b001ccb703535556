"""The memcached reply lines and how values and stats are written, byte for byte.

Shared by the parser (:mod:`kai.core.memcache.protocol`, which answers malformed input itself) and
the command executor. This module must never do I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

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
#: The reply to :class:`~kai.core.memcache.requests.ValueTooLarge`.
OBJECT_TOO_LARGE: Final = b"SERVER_ERROR object too large for cache\r\n"


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
