"""kai.client's sans-IO protocol: request encoding, reply framing and what replies mean.

Every reply shape is fed three ways (whole, byte by byte, and followed by a pipelined second
reply), the reply bytes written exactly as docs/dynamo-api.md and memcached's protocol.txt
give them. Requests are checked against the server's own parser, so the client never sends
what a node would read differently. A property: any bytes give replies or a ProtocolError,
and any reply interprets as a result or a KaiError, never another exception.
"""

from __future__ import annotations

import ast
import base64
import itertools
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings, strategies as st

import kai.client
from kai.client.errors import ClientError, KaiError, ProtocolError, ServerError
from kai.client.framing import (
    CLOSED,
    NEED_DATA,
    ErrorReply,
    MetaReply,
    Reply,
    ReplyParser,
    StatsReply,
    reusable_after,
)
from kai.client.protocol import (
    BINARY_KEY_MAX_LENGTH,
    EMPTY_CONTEXT,
    DeleteInContext,
    DescribeRing,
    NoOp,
    ReadSiblings,
    Request,
    WriteInContext,
    wire_key,
)
from kai.client.records import Address, Context, Fetched, RingMember, Sibling
from kai.core.contexts import encode_context
from kai.core.memcache import replies
from kai.core.memcache.meta import MetaDelete, MetaGet, MetaSet
from kai.core.memcache.protocol import NEED_DATA as SERVER_NEED_DATA, MemcacheParser
from kai.core.ring import NodeId
from kai.core.vclock import VClock

NODE = "127.0.0.1:11211"
TOKEN = b"AQGSkwihYQEA"
#: A second reply pipelined after the one under test.
PIPELINED = (b"MN\r\n", MetaReply(b"MN", (), None, b"MN"))


def drain(parser: ReplyParser) -> Iterator[Reply]:
    while True:
        reply = parser.next_reply()
        if reply is NEED_DATA or reply is CLOSED:
            return
        assert not isinstance(reply, type)
        yield reply


def whole(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    parser.receive_data(data)
    found = list(drain(parser))
    assert parser.buffered == 0
    assert not parser.in_reply
    return found


def in_chunks(parser: ReplyParser, data: bytes, size: int) -> list[Reply]:
    """Every reply ``parser`` gives for ``data`` fed ``size`` bytes at a time."""
    found: list[Reply] = []
    for start in range(0, len(data), size):
        parser.receive_data(data[start : start + size])
        found += drain(parser)
    return found


def byte_by_byte(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    found = in_chunks(parser, data, 1)
    assert parser.buffered == 0
    return found


def three_ways(data: bytes) -> Reply:
    """The one reply ``data`` holds, checked to parse alike whole, byte by byte and with a
    second reply pipelined behind it."""
    (reply,) = whole(data)
    assert byte_by_byte(data) == [reply]
    assert whole(data + PIPELINED[0]) == [reply, PIPELINED[1]]
    assert byte_by_byte(data + PIPELINED[0]) == [reply, PIPELINED[1]]
    return reply


# --- framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"HD\r\n", MetaReply(b"HD", (), None, b"HD")),
        (b"HD K" + TOKEN + b"\r\n", MetaReply(b"HD", (b"K" + TOKEN,), None, b"HD K" + TOKEN)),
        (b"NS\r\n", MetaReply(b"NS", (), None, b"NS")),
        (b"EX\r\n", MetaReply(b"EX", (), None, b"EX")),
        (b"NF\r\n", MetaReply(b"NF", (), None, b"NF")),
        (b"EN\r\n", MetaReply(b"EN", (), None, b"EN")),
        (b"MN\r\n", MetaReply(b"MN", (), None, b"MN")),
        (
            b"HD c77 Oabc kfoo\r\n",
            MetaReply(b"HD", (b"c77", b"Oabc", b"kfoo"), None, b"HD c77 Oabc kfoo"),
        ),
        (b"VA 2 f30 t-1\r\nhi\r\n", MetaReply(b"VA", (b"f30", b"t-1"), b"hi", b"VA 2 f30 t-1")),
        (b"VA 0\r\n\r\n", MetaReply(b"VA", (), b"", b"VA 0")),
        # A value may hold CRLF, and look like a reply: only the size frames it.
        (b"VA 8 f0\r\nEN\r\nMN\r\n\r\n", MetaReply(b"VA", (b"f0",), b"EN\r\nMN\r\n", b"VA 8 f0")),
        (b"ERROR\r\n", ErrorReply("ERROR", "", b"ERROR")),
        (
            b"CLIENT_ERROR bad causal context\r\n",
            ErrorReply("CLIENT_ERROR", "bad causal context", b"CLIENT_ERROR bad causal context"),
        ),
        (
            b"SERVER_ERROR not enough replicas\r\n",
            ErrorReply("SERVER_ERROR", "not enough replicas", b"SERVER_ERROR not enough replicas"),
        ),
        (b"END\r\n", StatsReply(())),
        (
            b"STAT ring ab12\r\nSTAT node 127.0.0.1:7001 127.0.0.1:11211\r\nSTAT empty \r\nEND\r\n",
            StatsReply(
                (("ring", "ab12"), ("node", "127.0.0.1:7001 127.0.0.1:11211"), ("empty", ""))
            ),
        ),
    ],
)
def test_every_reply_shape_parses_whole_byte_by_byte_and_pipelined(
    data: bytes, expected: Reply
) -> None:
    assert three_ways(data) == expected


def test_a_sibling_block_is_one_va_reply_holding_more_va_entries() -> None:
    block = b"VA 3 f1 t-1\r\nnew\r\nVA 3 f0 t20\r\nold\r\n"
    data = b"VA %d K%b\r\n%b\r\n" % (len(block), TOKEN, block)
    reply = three_ways(data)
    assert isinstance(reply, MetaReply)
    assert reply.data == block
    assert reply.flag(b"K") == TOKEN


def test_many_pipelined_replies_come_out_in_order() -> None:
    data = b"".join(
        [b"HD KAZA\r\n", b"VA 1 KAZA\r\nx\r\n", b"STAT a 1\r\nEND\r\n", b"SERVER_ERROR timeout\r\n"]
        * 50
    )
    expected = whole(data)
    assert [type(reply).__name__ for reply in expected[:4]] == [
        "MetaReply",
        "MetaReply",
        "StatsReply",
        "ErrorReply",
    ]
    assert len(expected) == 200
    assert byte_by_byte(data) == expected


def test_a_return_flag_lookup_finds_the_first_flag_of_a_letter() -> None:
    reply = MetaReply(b"HD", (b"Kabc", b"O1", b"b"), None, b"")
    assert reply.flag(b"K") == b"abc"
    assert reply.flag(b"b") == b""
    assert reply.flag(b"c") is None


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"VALUE k 0 1\r\nx\r\nEND\r\n", "not a reply"),
        (b"HD\n", "does not end with CRLF"),
        (b"\r\n", "not a reply"),
        (b"HD  K1\r\n", "empty token"),
        (b"HD 1abc\r\n", "does not start with a letter"),
        (b"VA x\r\n", "without a decimal size"),
        (b"VA\r\n", "without a decimal size"),
        (b"VA 2\r\nabcd\r\n", "not followed by CRLF"),
        (b"STAT a 1\r\nHD\r\n", "interrupted"),
        (b"STAT\r\n", "without a name"),
    ],
)
def test_bytes_that_are_no_reply_lose_the_framing(data: bytes, complaint: str) -> None:
    for feed in (whole, byte_by_byte):
        with pytest.raises(ProtocolError, match=complaint) as raised:
            feed(data)
        assert raised.value.framing_lost
        assert raised.value.outcome_unknown
        assert not raised.value.retryable


def test_a_broken_parser_raises_the_same_error_again_and_ignores_more_bytes() -> None:
    parser = ReplyParser()
    parser.receive_data(b"bogus\r\nHD\r\n")
    with pytest.raises(ProtocolError) as first:
        parser.next_reply()
    parser.receive_data(b"MN\r\n")
    with pytest.raises(ProtocolError) as second:
        parser.next_reply()
    assert second.value is first.value
    assert parser.buffered == 0


def test_a_line_too_long_is_refused_however_the_bytes_arrive() -> None:
    limit = 64
    too_long = b"SERVER_ERROR " + b"x" * limit + b"\r\n"
    just_fits = b"SERVER_ERROR " + b"x" * (limit - len(b"SERVER_ERROR ")) + b"\r\n"
    for chunk in (len(too_long), 1, 7):
        with pytest.raises(ProtocolError, match="longer than 64"):
            in_chunks(ReplyParser(max_line_length=limit), too_long, chunk)
        parser = ReplyParser(max_line_length=limit)
        parser.receive_data(just_fits)
        assert isinstance(parser.next_reply(), ErrorReply)


def test_the_buffer_never_holds_more_than_one_line_without_a_newline() -> None:
    parser = ReplyParser(max_line_length=100)
    with pytest.raises(ProtocolError):
        in_chunks(parser, b"x" * 1000, 1)
    assert parser.buffered == 0


def test_a_block_larger_than_the_limit_is_refused_before_it_is_buffered() -> None:
    parser = ReplyParser(max_block_size=10)
    parser.receive_data(b"VA 11 KAZA\r\n")
    with pytest.raises(ProtocolError, match="larger than 10"):
        parser.next_reply()


def test_a_large_block_in_small_chunks_is_read_once() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    data = b"VA %d KAZA\r\n%b\r\n" % (len(value), value)
    found = in_chunks(ReplyParser(), data, 1000)
    assert [reply.data for reply in found if isinstance(reply, MetaReply)] == [value]


def test_end_of_file_returns_complete_replies_then_closed() -> None:
    parser = ReplyParser()
    parser.receive_data(b"HD KAZA\r\nVA 5 KAZA\r\nab")
    parser.receive_data(b"")
    assert isinstance(parser.next_reply(), MetaReply)
    assert parser.next_reply() is CLOSED
    assert parser.in_reply  # the second reply was cut short
    assert parser.next_reply() is CLOSED


def test_errors_that_may_desynchronise_the_stream_end_the_connection() -> None:
    assert not reusable_after(ErrorReply("ERROR", "", b"ERROR"))
    assert not reusable_after(ErrorReply("CLIENT_ERROR", "bad data chunk", b""))
    assert reusable_after(ErrorReply("SERVER_ERROR", "timeout", b""))
    assert reusable_after(MetaReply(b"HD", (), None, b"HD"))


# --- keys and requests ------------------------------------------------------------------------


def server_event(data: bytes) -> object:
    """What a Kai node's own parser makes of ``data`` (one request)."""
    parser = MemcacheParser()
    parser.receive_data(data)
    event = parser.next_event()
    assert parser.next_event() is SERVER_NEED_DATA
    return event


def test_a_classic_key_goes_as_it_is_and_a_str_as_utf8() -> None:
    assert wire_key(b"cart:1") == wire_key("cart:1")
    key = wire_key("panier:é")
    assert (key.raw, key.token, key.binary) == ("panier:é".encode(), "panier:é".encode(), False)
    assert wire_key(b"k" * 250).token == b"k" * 250


@pytest.mark.parametrize(
    "raw", [b"with space", b"tab\there", b"\x00\x01", b"\xff\r\n", b"x" * BINARY_KEY_MAX_LENGTH]
)
def test_a_key_memcached_would_refuse_goes_in_base64_and_the_node_decodes_it(raw: bytes) -> None:
    if b" " not in raw and b"\x00" not in raw and raw.isalnum():
        raw = raw[:-1] + b" "  # the longest key that needs base64
    key = wire_key(raw)
    assert key.binary
    assert base64.b64decode(key.token) == raw
    event = server_event(ReadSiblings(key).encode())
    assert isinstance(event, MetaGet)
    assert (event.key, event.base64_key, event.with_context) == (raw, True, True)


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        (b"", "cannot be empty"),
        ("", "cannot be empty"),
        (b"k" * 251, "at most 250 bytes"),
        (b" " * (BINARY_KEY_MAX_LENGTH + 1), "at most 186 bytes"),
    ],
)
def test_a_key_that_cannot_be_sent_is_a_client_error(key: bytes | str, complaint: str) -> None:
    with pytest.raises(ClientError, match=complaint) as raised:
        wire_key(key)
    assert not raised.value.retryable
    assert not raised.value.outcome_unknown
    assert raised.value.reply is None


def test_a_key_of_another_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        wire_key(42)  # type: ignore[arg-type]


def test_a_read_with_context_is_mg_k_as_the_node_parses_it() -> None:
    data = ReadSiblings(wire_key("cart:1")).encode()
    assert data == b"mg cart:1 K\r\n"
    assert server_event(data) == MetaGet(b"cart:1", "K", with_context=True)


def test_a_write_in_context_is_ms_k_as_the_node_parses_it() -> None:
    plain = WriteInContext(wire_key("cart:1"), b"book\r\npen", Context(TOKEN))
    assert plain.encode() == b"ms cart:1 9 K" + TOKEN + b"\r\nbook\r\npen\r\n"
    assert server_event(plain.encode()) == MetaSet(b"cart:1", b"book\r\npen", "K", context=TOKEN)
    full = WriteInContext(wire_key(b"a b"), b"", EMPTY_CONTEXT, flags=2**32 - 1, ttl=30)
    assert full.encode() == b"ms YSBi 0 KAZA F4294967295 T30 b\r\n\r\n"
    assert server_event(full.encode()) == MetaSet(
        b"a b", b"", "K", base64_key=True, flags=2**32 - 1, exptime=30, context=b"AZA"
    )


def test_a_delete_in_context_is_md_k_as_the_node_parses_it() -> None:
    data = DeleteInContext(wire_key(b"\x00"), Context(TOKEN)).encode()
    assert data == b"md AA== K" + TOKEN + b" b\r\n"
    assert server_event(data) == MetaDelete(b"\x00", "K", base64_key=True, context=TOKEN)


def test_ring_and_noop_requests() -> None:
    assert DescribeRing().encode() == b"stats kai_ring\r\n"
    assert NoOp().encode() == b"mn\r\n"
    assert DescribeRing().routing_key is None
    assert DescribeRing().is_read
    assert ReadSiblings(wire_key("k")).is_read
    assert not WriteInContext(wire_key("k"), b"", EMPTY_CONTEXT).is_read


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"flags": -1}, "client flags"),
        ({"flags": 2**32}, "client flags"),
        ({"flags": True}, "client flags"),
        ({"ttl": -1}, "a ttl"),
        ({"ttl": 2**31}, "a ttl"),
        ({"ttl": 1.5}, "a ttl"),
    ],
)
def test_flags_and_ttls_the_protocol_cannot_carry_are_client_errors(
    fields: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ClientError, match=complaint):
        WriteInContext(wire_key("k"), b"v", EMPTY_CONTEXT, **fields)  # type: ignore[arg-type]


def test_a_value_must_be_bytes() -> None:
    with pytest.raises(TypeError, match="value is bytes"):
        WriteInContext(wire_key("k"), "text", EMPTY_CONTEXT)  # type: ignore[arg-type]


def test_a_command_line_longer_than_a_node_accepts_is_refused_before_sending() -> None:
    long_token = Context(b"A" * 2000)
    with pytest.raises(ClientError, match="more than a node accepts"):
        DeleteInContext(wire_key(b"k" * 250), long_token).encode()
    assert len(DeleteInContext(wire_key(b"k"), long_token).encode()) < 2048


def test_the_empty_context_is_the_token_a_node_gives_for_a_read_that_saw_nothing() -> None:
    assert EMPTY_CONTEXT.token == encode_context(VClock())


@pytest.mark.parametrize("token", [b"", b"has space", b"a+b/c=", b"\xff", b"A" * 2049])
def test_a_context_holds_one_token_of_url_safe_base64(token: bytes) -> None:
    with pytest.raises(ValueError, match="URL-safe base64"):
        Context(token)


def test_a_context_shows_only_the_start_of_a_long_token() -> None:
    assert repr(Context(b"AZA")) == "Context(AZA)"
    assert repr(Context(b"A" * 100)) == "Context(" + "A" * 20 + "...)"


# --- what replies mean ------------------------------------------------------------------------


def interpret_read(data: bytes) -> Fetched:
    return ReadSiblings(wire_key("k")).interpret(three_ways(data), node=NODE)


def test_a_read_of_a_key_never_written_has_no_sibling_and_a_context() -> None:
    assert interpret_read(b"VA 0 KAZA\r\n\r\n") == Fetched((), Context(b"AZA"))


def test_a_read_gives_every_sibling_newest_first_with_flags_and_ttl() -> None:
    block = b"VA 3 f7 t-1\r\nnew\r\nVA 0 f0 t0\r\n\r\nVA 5 f4294967295 t120\r\nol\r\nd\r\n"
    fetched = interpret_read(b"VA %d K%b\r\n%b\r\n" % (len(block), TOKEN, block))
    assert fetched.siblings == (
        Sibling(b"new", 7, None),
        Sibling(b"", 0, 0),
        Sibling(b"ol\r\nd", 2**32 - 1, 120),
    )
    assert fetched.values == (b"new", b"", b"ol\r\nd")
    assert fetched.context == Context(TOKEN)


def test_return_flags_the_client_did_not_ask_for_are_ignored() -> None:
    block = b"VA 1 t-1 s1 f2\r\nx\r\n"
    fetched = interpret_read(b"VA %d c99 K%b Oop\r\n%b\r\n" % (len(block), TOKEN, block))
    assert fetched.siblings == (Sibling(b"x", 2, None),)


def read_reply(block: bytes, flags: bytes = b"KAZA") -> bytes:
    """A ``mg K`` reply holding ``block``."""
    return b"VA %d %b\r\n%b\r\n" % (len(block), flags, block)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"EN\r\n", "does not allow"),
        (b"HD KAZA\r\n", "does not allow"),
        (b"END\r\n", "does not allow"),
        (b"VA 0\r\n\r\n", "without the K<token>"),
        (read_reply(b"", b"K"), "not URL-safe base64"),
        (read_reply(b"", b"Ka+b"), "not URL-safe base64"),
        (read_reply(b"abc\r\n"), "sibling block that does not parse"),
        (read_reply(b"abc"), "ends inside an entry"),
        (read_reply(b"VA 1 f0\r\nx\r\n"), "without f<flags> and t<ttl>"),
        (read_reply(b"VA 1 t5\r\nx\r\n"), "without f<flags> and t<ttl>"),
        (read_reply(b"VA 1 fx t5\r\nx\r\n"), "without f<flags> and t<ttl>"),
        (read_reply(b"VA 1 f0 t-2\r\nx\r\n"), "without f<flags> and t<ttl>"),
        (read_reply(b"VA 1 f4294967296 t1\r\nx\r\n"), "without f<flags> and t<ttl>"),
        (read_reply(b"VA 2 f0 t5\r\nx\r\n"), "ends inside an entry"),
        (read_reply(b"VA 1 f0 t-1\r\nx\r\nVA"), "ends inside an entry"),
        (read_reply(b"VA 1 f0 t-1\r\nxx\r\n"), "sibling block that does not parse"),
        (read_reply(b"HD\r\n"), "not VA"),
        (read_reply(b"END\r\n"), "not VA"),
        (read_reply(b"SERVER_ERROR x\r\n"), "not VA"),
    ],
)
def test_a_read_reply_the_doc_does_not_allow_is_a_protocol_error(
    data: bytes, complaint: str
) -> None:
    with pytest.raises(ProtocolError, match=complaint) as raised:
        interpret_read(data)
    assert not raised.value.framing_lost  # the reply itself was framed correctly


def test_server_error_says_a_write_may_have_landed() -> None:
    reply = three_ways(b"SERVER_ERROR timeout\r\n")
    write = WriteInContext(wire_key("k"), b"v", EMPTY_CONTEXT)
    with pytest.raises(ServerError, match="may still have landed") as raised:
        write.interpret(reply, node=NODE)
    error = raised.value
    assert (error.reply_text, error.outcome_unknown, error.retryable) == ("timeout", True, False)
    assert NODE in error.message
    with pytest.raises(ServerError, match="nothing was changed"):
        ReadSiblings(wire_key("k")).interpret(reply, node=NODE)


@pytest.mark.parametrize(
    ("data", "advice"),
    [
        (b"CLIENT_ERROR bad causal context\r\n", "context of a read from this cluster"),
        (b"CLIENT_ERROR invalid flag\r\n", "is it memcached"),
        (b"CLIENT_ERROR bad command line format\r\n", "fix the request"),
        (b"ERROR\r\n", "not a Kai node that serves the Dynamo API"),
    ],
)
def test_refusals_are_client_errors_that_say_what_to_change(data: bytes, advice: str) -> None:
    reply = three_ways(data)
    for request in (
        ReadSiblings(wire_key("k")),
        DeleteInContext(wire_key("k"), EMPTY_CONTEXT),
        DescribeRing(),
    ):
        with pytest.raises(ClientError, match=advice) as raised:
            request.interpret(reply, node=NODE)
        assert raised.value.reply == data[:-2]
        assert not raised.value.retryable
        assert not raised.value.outcome_unknown


def test_a_write_gives_the_context_of_the_version_written() -> None:
    write = WriteInContext(wire_key("k"), b"v", EMPTY_CONTEXT)
    assert write.interpret(three_ways(b"HD K" + TOKEN + b"\r\n"), node=NODE) == Context(TOKEN)
    delete = DeleteInContext(wire_key("k"), Context(TOKEN))
    assert delete.interpret(three_ways(b"HD KAZA\r\n"), node=NODE) == EMPTY_CONTEXT


@pytest.mark.parametrize("data", [b"HD\r\n", b"NS\r\n", b"EX\r\n", b"NF\r\n", b"VA 0 KAZA\r\n\r\n"])
def test_a_write_reply_without_a_new_context_is_a_protocol_error(data: bytes) -> None:
    for request in (
        WriteInContext(wire_key("k"), b"v", EMPTY_CONTEXT),
        DeleteInContext(wire_key("k"), EMPTY_CONTEXT),
    ):
        with pytest.raises(ProtocolError) as raised:
            request.interpret(three_ways(data), node=NODE)
        assert raised.value.outcome_unknown


def ring_reply(fields: list[tuple[str, object]]) -> Reply:
    """A ``stats kai_ring`` reply rendered by the node's own stats encoder."""
    return three_ways(replies.encode_stats(fields))


def test_the_ring_description_names_every_node_and_its_memcached_address() -> None:
    reply = ring_reply(
        [
            ("ring", "5f3a9c"),
            ("buckets", 1024),
            ("virtual_nodes", 128),
            ("replicas", 2),
            ("node", "127.0.0.1:7002 127.0.0.1:11212"),
            ("node", "127.0.0.1:7001 -"),
            ("a_later_field", "ignored"),
        ]
    )
    description = DescribeRing().interpret(reply, node=NODE)
    assert (description.fingerprint, description.buckets, description.virtual_nodes) == (
        "5f3a9c",
        1024,
        128,
    )
    assert description.replicas == 2
    assert description.members == (
        RingMember(NodeId.parse("127.0.0.1:7002"), Address("127.0.0.1", 11212)),
        RingMember(NodeId.parse("127.0.0.1:7001"), None),
    )


def test_a_ring_without_nodes_is_a_description_too() -> None:
    reply = ring_reply([("ring", "0"), ("buckets", 64), ("virtual_nodes", 8), ("replicas", 0)])
    assert DescribeRing().interpret(reply, node=NODE).members == ()


@pytest.mark.parametrize(
    "fields",
    [
        [("buckets", 64), ("virtual_nodes", 8), ("replicas", 1)],
        [("ring", "x"), ("buckets", 63), ("virtual_nodes", 8), ("replicas", 0)],
        [("ring", "x"), ("buckets", 64), ("virtual_nodes", 0), ("replicas", 0)],
        [("ring", "x"), ("buckets", 64), ("virtual_nodes", 8), ("replicas", "two")],
        [("ring", "x"), ("buckets", 64), ("virtual_nodes", 8), ("replicas", 1)],
        [("ring", "x"), ("buckets", "6\u0664"), ("virtual_nodes", 8), ("replicas", 0)],
        [
            ("ring", "x"),
            ("buckets", 64),
            ("virtual_nodes", 8),
            ("replicas", 1),
            ("node", "localhost:7001 127.0.0.1:11211"),
        ],
        [
            ("ring", "x"),
            ("buckets", 64),
            ("virtual_nodes", 8),
            ("replicas", 1),
            ("node", "127.0.0.1:7001 127.0.0.1"),
        ],
        [
            ("ring", "x"),
            ("buckets", 64),
            ("virtual_nodes", 8),
            ("replicas", 1),
            ("node", "127.0.0.1:7001 -"),
            ("node", "127.0.0.1:7001 127.0.0.1:11211"),
        ],
    ],
)
def test_a_ring_description_the_doc_does_not_allow_is_a_protocol_error(
    fields: list[tuple[str, object]],
) -> None:
    with pytest.raises(ProtocolError, match="described its ring") as raised:
        DescribeRing().interpret(ring_reply(fields), node=NODE)
    assert not raised.value.framing_lost


def test_a_noop_is_answered_mn() -> None:
    NoOp().interpret(three_ways(b"MN\r\n"), node=NODE)
    with pytest.raises(ProtocolError):
        NoOp().interpret(three_ways(b"HD\r\n"), node=NODE)


# --- any bytes --------------------------------------------------------------------------------

#: Bytes that look like replies more often than random ones do.
_PIECES = st.sampled_from(
    [b"VA ", b"HD", b"EN", b"MN", b"NS", b"STAT ", b"END", b"ERROR", b"SERVER_ERROR ", b" ",
     b"\r\n", b"\n", b"K", b"AZA", b"f0", b"t-1", b"0", b"3", b"12", b"node", b"-", b"b"]
)  # fmt: skip
_REPLY_BYTES = st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=30).map(b"".join)
_REQUESTS = (
    ReadSiblings(wire_key("k")),
    WriteInContext(wire_key("k"), b"v", EMPTY_CONTEXT),
    DeleteInContext(wire_key("k"), EMPTY_CONTEXT),
    DescribeRing(),
    NoOp(),
)


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[Reply] | ProtocolError:
    """The replies in ``data`` fed in the pieces ``cuts`` makes, then end of file; or the
    error that ended parsing."""
    parser = ReplyParser(max_line_length=64, max_block_size=64)
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    found: list[Reply] = []
    try:
        for start, end in itertools.pairwise(bounds):
            parser.receive_data(data[start:end])
            found += drain(parser)
        parser.receive_data(b"")
        found += drain(parser)
    except ProtocolError as error:
        return error
    return found


def interpretation(request: Request[object], reply: Reply) -> object:
    """What ``request`` makes of ``reply``: its result, or the KaiError it raised."""
    try:
        return request.interpret(reply, node=NODE)
    except KaiError as error:
        return error


@settings(max_examples=400, deadline=None)
@given(data=_REPLY_BYTES, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_any_bytes_give_replies_or_a_protocol_error_never_another_exception(
    data: bytes, cuts: list[int]
) -> None:
    parsed = parse_in_pieces(data, cuts)
    whole_at_once = parse_in_pieces(data, [])
    if isinstance(whole_at_once, ProtocolError):  # however the bytes are cut: the same
        assert isinstance(parsed, ProtocolError)
    else:
        assert parsed == whole_at_once
    if isinstance(parsed, ProtocolError):
        assert parsed.framing_lost
        assert len(parsed.reply) <= 200
        return
    for reply in parsed:
        for request in _REQUESTS:
            interpretation(request, reply)


# --- layering ---------------------------------------------------------------------------------

CLIENT = pathlib.Path(kai.client.__file__).parent
#: The modules that decide things; only the shells (blocking, trio_client, liveness) do I/O.
PURE_CLIENT_MODULES = ("calls", "errors", "framing", "protocol", "records", "routing")


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE_CLIENT_MODULES)
def test_the_client_core_imports_no_io(module: str) -> None:
    imported = {name.split(".")[0] for name in imported_modules(CLIENT / f"{module}.py")}
    assert not imported & {"trio", "socket", "select", "selectors", "threading", "time"}


def test_the_client_uses_nothing_of_the_server_but_its_ring() -> None:
    code = (
        "import sys, kai.client\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('kai.'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    used = set(result.stdout.split())
    assert {"kai.core.ring", "kai.client.trio_client", "kai.client.blocking"} <= used
    assert used - {"kai._version", "kai.core", "kai.core.ring"} == {
        name for name in used if name.startswith("kai.client")
    }
