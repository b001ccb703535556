"""Tests for the sans-IO memcached text protocol parser and reply encoders.

Every parser case is fed three ways, as h11's ``tests/test_io.py`` does: whole, one byte at a
time, and followed by a pipelined ``version`` that must come out next. Property tests check
that arbitrary bytes only ever produce events or sentinels and that valid requests round-trip
under any chunking. Expected replies are memcached 1.6.18's, byte for byte.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kai.core.memcache.protocol import (
    CLOSED,
    DELETED,
    END,
    ERROR,
    EXISTS,
    NEED_DATA,
    NOT_FOUND,
    NOT_STORED,
    OBJECT_TOO_LARGE,
    OK,
    RESET,
    STORED,
    TOUCHED,
    Arithmetic,
    Delete,
    Event,
    FlushAll,
    Get,
    GetAndTouch,
    Invalid,
    MemcacheParser,
    Quit,
    Request,
    SlabsAutomove,
    Stats,
    Store,
    Touch,
    ValueTooLarge,
    Verbosity,
    Version,
    client_error,
    encode_stats,
    encode_value,
    is_valid_key,
    server_error,
)

BAD_FORMAT = Invalid(b"CLIENT_ERROR bad command line format\r\n")
BAD_DELETE = Invalid(b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n")
BAD_CHUNK = Invalid(b"CLIENT_ERROR bad data chunk\r\n")
BAD_EXPTIME = Invalid(b"CLIENT_ERROR invalid exptime argument\r\n")
BAD_DELTA = Invalid(b"CLIENT_ERROR invalid numeric delta argument\r\n")
UNKNOWN = Invalid(b"ERROR\r\n")
SILENT = Invalid(b"")
LINE_TOO_LONG = Invalid(b"CLIENT_ERROR line too long\r\n", close=True)
HTTP_CLOSE = Invalid(b"", close=True)  # memcached hangs up without a byte
SHUTDOWN_DISABLED = Invalid(b"ERROR: shutdown not enabled\r\n")
BINARY = Invalid(b"CLIENT_ERROR binary protocol is not supported\r\n", close=True)

PIPELINED = b"version\r\n"
KEY_250 = b"k" * 250
KEY_251 = b"k" * 251
FIVE_THOUSAND_KEYS = tuple(b"key:%d" % index for index in range(5000))


# --- Harness ------------------------------------------------------------------------------


def drain(parser: MemcacheParser) -> tuple[list[Event], object]:
    """Take events until a sentinel; return them and the sentinel."""
    events: list[Event] = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA or event is CLOSED:
            return events, event
        assert isinstance(event, Event)
        events.append(event)


def closes(events: list[Event]) -> bool:
    if not events:
        return False
    last = events[-1]
    return isinstance(last, Quit) or (isinstance(last, Invalid) and last.close)


def check_three_ways(data: bytes, expected: list[Event], **limits: int) -> None:
    """Feed ``data`` whole, byte by byte, and with a pipelined ``version`` after it."""
    final = CLOSED if closes(expected) else NEED_DATA

    whole = MemcacheParser(**limits)
    whole.receive_data(data)
    assert drain(whole) == (expected, final)
    whole.receive_data(b"")
    assert drain(whole) == ([], CLOSED)

    byte_by_byte = MemcacheParser(**limits)
    events: list[Event] = []
    for index in range(len(data)):
        byte_by_byte.receive_data(data[index : index + 1])
        new_events, sentinel = drain(byte_by_byte)
        events += new_events
        if index < len(data) - 1 and sentinel is CLOSED:
            assert events == expected  # closed early: the rest is ignored
    assert events == expected
    assert byte_by_byte.next_event() is final

    pipelined = MemcacheParser(**limits)
    pipelined.receive_data(data + PIPELINED)
    if closes(expected):
        assert drain(pipelined) == (expected, CLOSED)
    else:
        assert drain(pipelined) == ([*expected, Version()], NEED_DATA)


def case(data: bytes, *expected: Event, **limits: int) -> Any:
    return pytest.param(data, list(expected), limits, id=repr(data[:50]))


CASES = [
    # storage commands
    case(b"set k 5 10 3\r\nabc\r\n", Store("set", b"k", 5, 10, b"abc")),
    case(b"add k 0 0 1\r\nx\r\n", Store("add", b"k", 0, 0, b"x")),
    case(b"replace k 0 0 1\r\nx\r\n", Store("replace", b"k", 0, 0, b"x")),
    case(b"append k 0 0 1\r\nx\r\n", Store("append", b"k", 0, 0, b"x")),
    case(b"prepend k 0 0 1\r\nx\r\n", Store("prepend", b"k", 0, 0, b"x")),
    case(b"cas k 1 2 1 99\r\nx\r\n", Store("cas", b"k", 1, 2, b"x", cas_unique=99)),
    case(b"cas k 0 0 1 99 noreply\r\nx\r\n", Store("cas", b"k", 0, 0, b"x", True, 99)),
    case(
        b"cas k 0 0 1 18446744073709551615\r\nx\r\n",
        Store("cas", b"k", 0, 0, b"x", cas_unique=2**64 - 1),
    ),
    case(b"set k 0 0 1 noreply\r\nx\r\n", Store("set", b"k", 0, 0, b"x", noreply=True)),
    case(b"set k 0 0 1 bogus\r\nx\r\n", Store("set", b"k", 0, 0, b"x")),
    case(b"set k 0 0 4\r\na\r\nb\r\n", Store("set", b"k", 0, 0, b"a\r\nb")),
    case(b"set k 0 0 0\r\n\r\n", Store("set", b"k", 0, 0, b"")),
    case(b"set k 0 0 1\nx\r\n", Store("set", b"k", 0, 0, b"x")),
    case(b"set  k  0 0   1 \r\nx\r\n", Store("set", b"k", 0, 0, b"x")),
    case(b"set k 4294967295 0 1\r\nx\r\n", Store("set", b"k", 2**32 - 1, 0, b"x")),
    case(b"set k 4294967296 0 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k -1 0 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k 0 -1 1\r\nx\r\n", Store("set", b"k", 0, -1, b"x")),
    case(b"set k 0 -2147483648 1\r\nx\r\n", Store("set", b"k", 0, -(2**31), b"x")),
    case(b"set k 0 2147483648 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k 0 abc 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k 0 0 abc\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k 0 0 -1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k 0 0 4294967295\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k 0 0 2147483646\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set k abc 0 1 noreply\r\nx\r\n", SILENT, UNKNOWN),
    case(b"set k 0 0 noreply\r\nx\r\n", SILENT, UNKNOWN),
    case(b"set k 0 0\r\n", UNKNOWN),
    case(b"set k 0 0 1 noreply extra\r\nx\r\n", UNKNOWN, UNKNOWN),
    case(b"cas foo 0 0 1\r\nZ\r\n", UNKNOWN, UNKNOWN),
    case(b"cas k 0 0 1 -1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"cas k 0 0 1 18446744073709551616\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"cas k 0 0 1 noreply\r\nx\r\n", SILENT, UNKNOWN),
    case(b"set " + KEY_250 + b" 0 0 1\r\nx\r\n", Store("set", KEY_250, 0, 0, b"x")),
    case(b"set " + KEY_251 + b" 0 0 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set " + KEY_251 + b" 0 0 1 noreply\r\nx\r\n", SILENT, UNKNOWN),
    case(b"set a\tb 0 0 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set a\x7fb 0 0 1\r\nx\r\n", BAD_FORMAT, UNKNOWN),
    case(b"set \xc3\xa9t\xc3\xa9 0 0 1\r\nx\r\n", Store("set", "été".encode(), 0, 0, b"x")),
    # bad data chunk: exactly bytes+2 consumed, the rest parsed as commands
    case(b"set k 0 0 3\r\nabcde\r\n", BAD_CHUNK, UNKNOWN),
    case(b"set k 0 0 3 noreply\r\nabcde\r\n", SILENT, UNKNOWN),
    case(b"set k 0 0 3\r\nabc\n\r\n", BAD_CHUNK, UNKNOWN),
    # too large: the data block is swallowed whatever it ends with
    case(
        b"set k 0 0 16\r\n" + b"v" * 16 + b"\r\n",
        Store("set", b"k", 0, 0, b"v" * 16),
        max_item_size=16,
    ),
    case(b"set k 0 0 17\r\n" + b"v" * 17 + b"\r\n", ValueTooLarge("set", b"k"), max_item_size=16),
    case(b"set k 0 0 17\r\n" + b"v" * 19, ValueTooLarge("set", b"k"), max_item_size=16),
    case(
        b"cas k 0 0 17 5 noreply\r\n" + b"v" * 17 + b"\r\n",
        ValueTooLarge("cas", b"k", noreply=True),
        max_item_size=16,
    ),
    # retrieval
    case(b"get k\r\n", Get((b"k",))),
    case(b"get k\n", Get((b"k",))),
    case(b"gets a b c\r\n", Get((b"a", b"b", b"c"), with_cas=True)),
    case(b"get foo nokey foo\r\n", Get((b"foo", b"nokey", b"foo"))),
    case(b"get   a  b \r\n", Get((b"a", b"b"))),
    case(b"get k noreply\r\n", Get((b"k", b"noreply"))),
    case(b"get\r\n", UNKNOWN),
    case(b"gets \r\n", UNKNOWN),
    case(b"get " + b" ".join(FIVE_THOUSAND_KEYS) + b"\r\n", Get(FIVE_THOUSAND_KEYS)),
    case(b"get " + KEY_250 + b"\r\n", Get((KEY_250,))),
    case(b"get a " + KEY_251 + b" b\r\n", BAD_FORMAT),
    case(b"get a b\tc\r\n", BAD_FORMAT),
    case(b"get a\r\r\n", BAD_FORMAT),
    case(b"gat 10 k\r\n", GetAndTouch(10, (b"k",))),
    case(b"gats -1 a b\r\n", GetAndTouch(-1, (b"a", b"b"), with_cas=True)),
    case(b"gat\r\n", UNKNOWN),
    case(b"gat k\r\n", BAD_EXPTIME),
    case(b"gat abc k\r\n", BAD_EXPTIME),
    case(b"gats 10\r\n", Invalid(END)),
    case(b"gat 10 a " + KEY_251 + b"\r\n", BAD_FORMAT),
    # delete
    case(b"delete k\r\n", Delete(b"k")),
    case(b"delete k noreply\r\n", Delete(b"k", noreply=True)),
    case(b"delete k 0\r\n", Delete(b"k")),
    case(b"delete k 0 noreply\r\n", Delete(b"k", noreply=True)),
    case(b"delete k 5\r\n", BAD_DELETE),
    case(b"delete k x\r\n", BAD_DELETE),
    case(b"delete k noreply 0\r\n", BAD_DELETE),
    case(b"delete k 5 noreply\r\n", SILENT),
    case(b"delete\r\n", UNKNOWN),
    case(b"delete a b c d e\r\n", UNKNOWN),
    case(b"delete " + KEY_251 + b"\r\n", BAD_FORMAT),
    case(b"delete " + KEY_251 + b" noreply\r\n", SILENT),
    # incr / decr
    case(b"incr k 5\r\n", Arithmetic(b"k", 5, incr=True)),
    case(b"decr k 5 noreply\r\n", Arithmetic(b"k", 5, incr=False, noreply=True)),
    case(b"incr k 18446744073709551615\r\n", Arithmetic(b"k", 2**64 - 1, incr=True)),
    case(b"incr k 18446744073709551616\r\n", BAD_DELTA),
    case(b"incr k -1\r\n", BAD_DELTA),
    case(b"decr k abc\r\n", BAD_DELTA),
    case(b"incr k abc noreply\r\n", SILENT),
    case(b"incr k noreply\r\n", SILENT),
    case(b"incr k\r\n", UNKNOWN),
    case(b"incr k 1 2 3\r\n", UNKNOWN),
    case(b"incr " + KEY_251 + b" 1\r\n", BAD_FORMAT),
    # touch
    case(b"touch k 10\r\n", Touch(b"k", 10)),
    case(b"touch k -1 noreply\r\n", Touch(b"k", -1, noreply=True)),
    case(b"touch k\r\n", UNKNOWN),
    case(b"touch k abc\r\n", BAD_EXPTIME),
    case(b"touch k abc noreply\r\n", SILENT),
    case(b"touch " + KEY_251 + b" abc\r\n", BAD_FORMAT),
    # flush_all
    case(b"flush_all\r\n", FlushAll()),
    case(b"flush_all 10\r\n", FlushAll(10)),
    case(b"flush_all -1\r\n", FlushAll(-1)),
    case(b"flush_all noreply\r\n", FlushAll(0, noreply=True)),
    case(b"flush_all 10 noreply\r\n", FlushAll(10, noreply=True)),
    case(b"flush_all abc\r\n", BAD_EXPTIME),
    case(b"flush_all abc noreply\r\n", SILENT),
    case(b"flush_all 1 2 3\r\n", UNKNOWN),
    # stats, version, verbosity, quit
    case(b"stats\r\n", Stats()),
    case(b"stats settings\r\n", Stats((b"settings",))),
    case(b"stats reset\r\n", Stats((b"reset",))),
    case(b"stats detail on\r\n", Stats((b"detail", b"on"))),
    case(b"stats noreply\r\n", UNKNOWN),
    case(b"version\r\n", Version()),
    case(b"version foo bar\r\n", Version()),
    case(b"verbosity 1\r\n", Verbosity(1)),
    case(b"verbosity 1 noreply\r\n", Verbosity(1, noreply=True)),
    case(b"verbosity\r\n", UNKNOWN),
    case(b"verbosity foo bar my\r\n", UNKNOWN),
    case(b"verbosity noreply\r\n", SILENT),
    case(b"verbosity abc\r\n", BAD_FORMAT),
    case(b"verbosity invalid\r\n", BAD_FORMAT),
    case(b"verbosity invalid noreply\r\n", SILENT),
    case(b"verbosity 1 2\r\n", Verbosity(1)),
    case(b"verbosity -1\r\n", BAD_FORMAT),
    # slabs: only automove, accepted and ignored (memcached 1.6.18's replies)
    case(b"slabs automove 0\r\n", SlabsAutomove(0)),
    case(b"slabs automove 2\r\n", SlabsAutomove(2)),
    case(b"slabs automove 1 noreply\r\n", SlabsAutomove(1, noreply=True)),
    case(b"slabs automove 1 2 3\r\n", SlabsAutomove(1)),
    case(b"slabs automove ratio 0.5\r\n", SlabsAutomove(None)),
    case(b"slabs automove ratio x\r\n", BAD_FORMAT),
    case(b"slabs automove invalid\r\n", BAD_FORMAT),
    case(b"slabs automove -1\r\n", BAD_FORMAT),
    case(b"slabs automove invalid noreply\r\n", SILENT),
    case(b"slabs automove 3\r\n", UNKNOWN),
    case(b"slabs automove 3 noreply\r\n", SILENT),
    case(b"slabs automove\r\n", UNKNOWN),
    case(b"slabs\r\n", UNKNOWN),
    case(b"slabs reassign 1 2\r\n", UNKNOWN),
    # shutdown: refused as by memcached without -A, whatever follows
    case(b"shutdown\r\n", SHUTDOWN_DISABLED),
    case(b"shutdown graceful\r\n", SHUTDOWN_DISABLED),
    case(b"shutdown noreply\r\n", SHUTDOWN_DISABLED),
    case(b"quit\r\n", Quit()),
    case(b"quit foo bar\r\n", Quit()),
    case(b"get k\r\nquit\r\nget never\r\n", Get((b"k",)), Quit()),
    # unknown commands, HTTP and binary
    case(b"foo\r\n", UNKNOWN),
    case(b"\r\n", UNKNOWN),
    case(b"   \r\n", UNKNOWN),
    case(b"SET k 0 0 1\r\nx\r\n", UNKNOWN, UNKNOWN),
    case(b"Get k\r\n", UNKNOWN),
    case(b"mx k v\r\n", UNKNOWN),  # a meta-looking command memcached does not know
    case(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", HTTP_CLOSE),
    case(b"DELETE HTTP/1.1\r\n", HTTP_CLOSE),
    case(b"version\r\nPOST /x HTTP/1.1\r\nversion\r\n", Version(), HTTP_CLOSE),
    case(b"get / HTTP/1.0\r\n", Get((b"/", b"HTTP/1.0"))),
    case(b"\x80\x00\x00\x05\x00\x00\x00\x00", BINARY),
    case(b"get k\r\n\x80\r\n", Get((b"k",)), UNKNOWN),
    # line length
    case(b"x" * 2049, LINE_TOO_LONG),
    case(b"x" * 2048 + b"\r\n", LINE_TOO_LONG),
    case(b"x" * 2047 + b"\r\n", UNKNOWN),
    case(b"set " + b"k" * 3000 + b" 0 0 1\r\nx\r\n", LINE_TOO_LONG),
    case(
        b"get " + b"k" * 96 + b"\n",
        Get((b"k" * 96,)),
        max_line_length=16,
        max_get_line_length=100,
    ),
    case(
        b"get " + b"k" * 95 + b"\r\r\n", LINE_TOO_LONG, max_line_length=16, max_get_line_length=100
    ),
    case(
        b"gats 1 " + b"k" * 93 + b"\n",
        GetAndTouch(1, (b"k" * 93,), True),
        max_line_length=16,
        max_get_line_length=100,
    ),
    case(b"gets " + b"k " * 60, LINE_TOO_LONG, max_line_length=16, max_get_line_length=100),
    case(b"get" + b"k" * 97 + b"\r\n", LINE_TOO_LONG, max_line_length=16, max_get_line_length=100),
]


@pytest.mark.parametrize(("data", "expected", "limits"), CASES)
def test_parse_three_ways(data: bytes, expected: list[Event], limits: dict[str, int]) -> None:
    check_three_ways(data, expected, **limits)


# --- Framing details ---------------------------------------------------------------------


def test_value_of_exactly_max_item_size_and_one_byte_over_with_default_limit() -> None:
    limit = 1024 * 1024
    fits = b"set k 0 0 %d\r\n%b\r\n" % (limit, b"a" * limit)
    too_large = b"set k 0 0 %d\r\n%b\r\n" % (limit + 1, b"b" * (limit + 1))
    stream = fits + too_large + b"get k\r\n"
    expected = [Store("set", b"k", 0, 0, b"a" * limit), ValueTooLarge("set", b"k"), Get((b"k",))]
    for chunk_size in (len(stream), 4096, 65536 + 7):
        parser = MemcacheParser()
        events: list[Event] = []
        for start in range(0, len(stream), chunk_size):
            parser.receive_data(stream[start : start + chunk_size])
            events += drain(parser)[0]
        assert events == expected
        assert all(type(event.value) is bytes for event in events if isinstance(event, Store))


def test_too_large_value_is_swallowed_without_being_buffered() -> None:
    parser = MemcacheParser(max_item_size=100)
    parser.receive_data(b"set k 0 0 2147483645 noreply\r\n")
    assert parser.next_event() is NEED_DATA
    for _ in range(100):
        parser.receive_data(b"z" * 65536)
        assert parser.next_event() is NEED_DATA
    # The declared length is the largest memcached accepts; a larger one is a line error.
    parser = MemcacheParser(max_item_size=100)
    parser.receive_data(b"set k 0 0 2147483646 noreply\r\n")
    assert parser.next_event() == SILENT


def test_swallowed_bytes_are_counted_across_chunks() -> None:
    parser = MemcacheParser(max_item_size=4)
    parser.receive_data(b"set k 0 0 10\r\n0123")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"456789")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"\r\nget k\r\n")
    assert drain(parser) == ([ValueTooLarge("set", b"k"), Get((b"k",))], NEED_DATA)


@pytest.mark.parametrize(
    "partial",
    [b"get k", b"set k 0 0 5\r\nab", b"set k 0 0 50\r\n", b"set k 0 0 5\r\nhello\r"],
)
def test_partial_request_at_eof_is_dropped(partial: bytes) -> None:
    parser = MemcacheParser(max_item_size=10)
    parser.receive_data(b"version\r\n" + partial)
    parser.receive_data(b"")
    assert drain(parser) == ([Version()], CLOSED)
    assert parser.next_event() is CLOSED


def test_complete_requests_are_returned_after_eof() -> None:
    parser = MemcacheParser()
    parser.receive_data(b"get a\r\nset b 0 0 1\r\nx\r\n")
    parser.receive_data(b"")
    assert drain(parser) == ([Get((b"a",)), Store("set", b"b", 0, 0, b"x")], CLOSED)


def test_data_after_eof_is_a_programming_error() -> None:
    parser = MemcacheParser()
    parser.receive_data(b"")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"get k\r\n")


def test_data_after_close_is_ignored() -> None:
    parser = MemcacheParser()
    parser.receive_data(b"quit\r\n")
    assert parser.next_event() == Quit()
    parser.receive_data(b"get k\r\n")
    assert parser.next_event() is CLOSED


def test_binary_magic_only_matters_as_the_first_byte() -> None:
    parser = MemcacheParser()
    parser.receive_data(b"version\r\n")
    parser.receive_data(b"\x80\r\n")
    assert drain(parser) == ([Version(), UNKNOWN], NEED_DATA)


def test_line_limit_applies_while_waiting_for_the_newline() -> None:
    parser = MemcacheParser()
    parser.receive_data(b"set " + b"k" * 2044)
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"k")
    assert parser.next_event() == LINE_TOO_LONG
    assert parser.next_event() is CLOSED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_item_size": -1},
        {"max_line_length": 0},
        {"max_line_length": 100, "max_get_line_length": 99},
    ],
)
def test_parser_rejects_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="max_"):
        MemcacheParser(**kwargs)


class CountingBuffer(bytearray):
    """A bytearray that counts how many bytes ``find`` was asked to search."""

    searched = 0

    def find(self, sub: Any, start: Any = 0, end: Any = None) -> int:
        CountingBuffer.searched += len(self) - start
        return super().find(sub, start) if end is None else super().find(sub, start, end)


@pytest.mark.parametrize(("line_length", "max_chunk"), [(2 * 1024 * 1024, 4096), (64 * 1024, 1)])
def test_long_get_line_is_scanned_in_linear_time(line_length: int, max_chunk: int) -> None:
    keys = tuple(b"%07d" % index for index in range(line_length // 8))
    data = b"get " + b" ".join(keys) + b"\r\n"
    parser = MemcacheParser()
    parser._buffer = CountingBuffer()
    CountingBuffer.searched = 0
    chunks = random.Random(1234)
    position = 0
    events: list[Event] = []
    while position < len(data):
        size = chunks.randint(1, max_chunk)
        parser.receive_data(data[position : position + size])
        position += size
        events += drain(parser)[0]
    assert events == [Get(keys)]
    # Each byte is searched for "\n" once, not once per chunk.
    assert CountingBuffer.searched <= 2 * len(data)


# --- Records and encoders ----------------------------------------------------------------


def test_reply_constants_are_memcached_lines() -> None:
    assert [STORED, NOT_STORED, EXISTS, NOT_FOUND, DELETED, TOUCHED, END, OK, RESET, ERROR] == [
        b"STORED\r\n",
        b"NOT_STORED\r\n",
        b"EXISTS\r\n",
        b"NOT_FOUND\r\n",
        b"DELETED\r\n",
        b"TOUCHED\r\n",
        b"END\r\n",
        b"OK\r\n",
        b"RESET\r\n",
        b"ERROR\r\n",
    ]
    assert OBJECT_TOO_LARGE == b"SERVER_ERROR object too large for cache\r\n"


def test_error_lines() -> None:
    assert client_error("bad data chunk") == b"CLIENT_ERROR bad data chunk\r\n"
    assert server_error("timeout") == b"SERVER_ERROR timeout\r\n"
    with pytest.raises(ValueError, match="line break"):
        server_error("two\r\nlines")


def test_encode_value() -> None:
    assert encode_value(b"k", 5, b"abc") == b"VALUE k 5 3\r\nabc\r\n"
    assert encode_value(b"k", 0, b"", 2**64 - 1) == b"VALUE k 0 0 18446744073709551615\r\n\r\n"


def test_encode_stats() -> None:
    items = [("pid", 42), ("rusage_user", "0.064593"), ("accepting_conns", True), ("v", b"1.6")]
    assert encode_stats(items) == (
        b"STAT pid 42\r\nSTAT rusage_user 0.064593\r\nSTAT accepting_conns 1\r\n"
        b"STAT v 1.6\r\nEND\r\n"
    )
    assert encode_stats([]) == b"END\r\n"
    with pytest.raises(ValueError, match="invalid stat name"):
        encode_stats([("two words", 1)])
    with pytest.raises(ValueError, match="line break"):
        encode_stats([("name", "a\r\nSTAT fake 1")])


def test_sentinels_are_their_own_type() -> None:
    assert type(NEED_DATA) is NEED_DATA
    assert type(CLOSED) is CLOSED
    assert repr(NEED_DATA) == "NEED_DATA"
    assert NEED_DATA is not CLOSED  # type: ignore[comparison-overlap]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Get(()),
        lambda: Get((b"",)),
        lambda: Get((b"a", KEY_251)),
        lambda: Get((b"a", b"b c")),
        lambda: GetAndTouch(2**31, (b"k",)),
        lambda: Store("put", b"k", 0, 0, b""),
        lambda: Store("set", b"k", 2**32, 0, b""),
        lambda: Store("set", b"k", 0, 0, b"", cas_unique=1),
        lambda: Store("cas", b"k", 0, 0, b""),
        lambda: Store("cas", b"k", 0, 0, b"", cas_unique=2**64),
        lambda: Store("set", b"k\n", 0, 0, b""),
        lambda: ValueTooLarge("set", b""),
        lambda: Delete(KEY_251),
        lambda: Arithmetic(b"k", -1, incr=True),
        lambda: Touch(b"k", -(2**31) - 1),
        lambda: FlushAll(2**31),
        lambda: Stats((b"a b",)),
        lambda: Verbosity(-1),
        lambda: SlabsAutomove(3),
        lambda: Invalid(b"ERROR"),
    ],
)
def test_records_refuse_invalid_fields(build: Any) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        build()


def test_store_value_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        Store("set", b"k", 0, 0, bytearray(b"x"))  # type: ignore[arg-type]


def test_is_valid_key() -> None:
    assert is_valid_key(b"k")
    assert is_valid_key(KEY_250)
    assert is_valid_key("ключ".encode())
    assert not is_valid_key(b"")
    assert not is_valid_key(KEY_251)
    assert not is_valid_key(b"a b")
    assert not is_valid_key(b"a\x00")
    assert not is_valid_key(b"a\x7f")


def test_protocol_module_does_no_io_imports() -> None:
    code = (
        "import sys, kai.core.memcache.protocol\n"
        "bad = {'trio', 'plyvel', 'socket', 'asyncio'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Properties ---------------------------------------------------------------------------

# Fragments that steer random input towards the interesting paths.
FRAGMENTS = [
    b"\r\n",
    b"\n",
    b" ",
    b"noreply",
    b"get ",
    b"gets ",
    b"gat ",
    b"set k 0 0 3\r\n",
    b"cas k 0 0 1 5 noreply\r\n",
    b"set k 0 0 40\r\n",
    b"delete k 0",
    b"incr k ",
    b"flush_all ",
    b"verbosity ",
    b"slabs automove ",
    b"shutdown",
    b"stats",
    b"quit",
    b"HTTP/1.1",
    b"\x80",
    b"-1",
    b"4294967296",
    b"18446744073709551616",
    b"k" * 251,
    # the meta commands (one parser serves both, mixed freely)
    b"mg ",
    b"ms ",
    b"md ",
    b"ma ",
    b"me ",
    b"mn",
    b" v",
    b" q",
    b" k",
    b" b",
    b" K",
    b" Kabc",
    b" T30",
    b" N5",
    b" R9",
    b" O12",
    b" C5",
    b" MA",
    b" M",
    b" I",
    b" D9",
    b" J1",
    b" 2",
    b" 40",
    b" Zm9v",
    b"hi\r\n",
    b"\xff",
    b" E5",
]
SMALL_LIMITS = {"max_item_size": 32, "max_line_length": 64, "max_get_line_length": 300}


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def feed_all(parser: MemcacheParser, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        if chunk:
            parser.receive_data(chunk)
        events += drain(parser)[0]
    parser.receive_data(b"")
    final_events, sentinel = drain(parser)
    assert sentinel is CLOSED
    return events + final_events


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(FRAGMENTS)), max_size=30),
    data=st.data(),
)
def test_any_bytes_give_events_or_sentinels(pieces: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pieces)
    for event in feed_all(MemcacheParser(**SMALL_LIMITS), data.draw(chunked(stream))):
        assert isinstance(event, Event)
        if isinstance(event, Invalid):
            assert event.reply == b"" or event.reply.endswith(b"\r\n")


# A key is any run of bytes other than space, control bytes and DEL.
KEY_SAFE = bytes(byte if 0x20 < byte != 0x7F else ord("_") for byte in range(256))
#: Short keys any client may send.
classic_keys = st.binary(min_size=1, max_size=12).map(lambda raw: raw.translate(KEY_SAFE))
keys = st.one_of(
    classic_keys,
    st.integers(1, 250).map(lambda length: b"k" * length),
)
int32s = st.integers(-(2**31), 2**31 - 1)
uint32s = st.integers(0, 2**32 - 1)
uint64s = st.integers(0, 2**64 - 1)
values = st.binary(max_size=SMALL_LIMITS["max_item_size"])
store_commands = st.sampled_from(["set", "add", "replace", "append", "prepend"])

requests = st.one_of(
    st.builds(Get, st.lists(keys, min_size=1, max_size=5).map(tuple), st.booleans()),
    st.builds(
        GetAndTouch, int32s, st.lists(keys, min_size=1, max_size=5).map(tuple), st.booleans()
    ),
    st.builds(Store, store_commands, keys, uint32s, int32s, values, st.booleans()),
    st.builds(Store, st.just("cas"), keys, uint32s, int32s, values, st.booleans(), uint64s),
    st.builds(ValueTooLarge, st.sampled_from(["set", "cas", "append"]), keys, st.booleans()),
    st.builds(Delete, keys, st.booleans()),
    st.builds(Arithmetic, keys, uint64s, st.booleans(), st.booleans()),
    st.builds(Touch, keys, int32s, st.booleans()),
    st.builds(FlushAll, int32s, st.booleans()),
    st.builds(Stats, st.lists(keys, max_size=3).map(tuple)).filter(
        lambda s: s.args != (b"noreply",)
    ),
    st.just(Version()),
    st.builds(Verbosity, uint32s, st.booleans()),
)


def encode_request(request: Request) -> bytes:
    """Write a request as a client would (test-only inverse of the parser)."""

    def suffix(noreply: bool) -> bytes:
        return b" noreply\r\n" if noreply else b"\r\n"

    match request:
        case Get(keys, with_cas):
            return (b"gets " if with_cas else b"get ") + b" ".join(keys) + b"\r\n"
        case GetAndTouch(exptime, keys, with_cas):
            return b"%b %d %b\r\n" % (b"gats" if with_cas else b"gat", exptime, b" ".join(keys))
        case Store(command, key, flags, exptime, value, noreply, cas_unique):
            cas = b"" if cas_unique is None else b" %d" % cas_unique
            header = b"%b %b %d %d %d%b" % (command.encode(), key, flags, exptime, len(value), cas)
            return header + suffix(noreply) + value + b"\r\n"
        case ValueTooLarge(command, key, noreply):
            size = SMALL_LIMITS["max_item_size"] + 1
            cas = b" 7" if command == "cas" else b""
            header = b"%b %b 0 0 %d%b" % (command.encode(), key, size, cas)
            return header + suffix(noreply) + b"\x00" * size + b"\r\n"
        case Delete(key, noreply):
            return b"delete " + key + suffix(noreply)
        case Arithmetic(key, delta, incr, noreply):
            return b"%b %b %d" % (b"incr" if incr else b"decr", key, delta) + suffix(noreply)
        case Touch(key, exptime, noreply):
            return b"touch %b %d" % (key, exptime) + suffix(noreply)
        case FlushAll(delay, noreply):
            return b"flush_all %d" % delay + suffix(noreply)
        case Stats(args):
            return b" ".join([b"stats", *args]) + b"\r\n"
        case Version():
            return b"version\r\n"
        case Verbosity(level, noreply):
            return b"verbosity %d" % level + suffix(noreply)
        case Quit():
            return b"quit\r\n"
    raise AssertionError(f"no encoding for {request!r}")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(requests, max_size=8), then_quit=st.booleans(), data=st.data())
def test_valid_requests_round_trip(
    batch: list[Request], then_quit: bool, data: st.DataObject
) -> None:
    expected: list[Request] = [*batch, Quit()] if then_quit else batch
    stream = b"".join(encode_request(request) for request in expected)
    parser = MemcacheParser(max_item_size=SMALL_LIMITS["max_item_size"])
    assert feed_all(parser, data.draw(chunked(stream))) == expected
