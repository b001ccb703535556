"""Tests for the sans-IO MessagePack-RPC framing in kai.core.rpc.protocol."""

from __future__ import annotations

import itertools
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from kai.core.errors import (
    RpcBadRequest,
    RpcError,
    RpcMethodNotFound,
    RpcProtocolError,
    RpcRemoteError,
)
from kai.core.rpc.protocol import (
    CLOSED,
    MAX_MSGID,
    NEED_DATA,
    Message,
    Notification,
    Request,
    Response,
    RpcConnection,
)


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def drain(connection: RpcConnection) -> list[Message]:
    """Every message available now; stops at NEED_DATA or CLOSED."""
    messages: list[Message] = []
    while True:
        message = connection.next_message()
        if message is NEED_DATA or message is CLOSED:
            return messages
        messages.append(message)


# (wire bytes, expected record) for every message kind.
VALID_CASES: list[tuple[bytes, Message]] = [
    (packb([0, 7, "get", [b"key"]]), Request(7, "get", (b"key",))),
    (packb([0, MAX_MSGID, "ping", []]), Request(MAX_MSGID, "ping", ())),
    (
        packb([0, 1, "put", [b"\x00\xff" * 40_000, {"n": 1}, [1, 2]]]),
        Request(1, "put", (b"\x00\xff" * 40_000, {"n": 1}, [1, 2])),
    ),
    (packb([1, 7, None, b"value"]), Response(7, None, b"value")),
    (packb([1, 8, None, None]), Response(8, None, None)),
    (packb([1, 9, [5, "no such method"], None]), Response(9, (5, "no such method"), None)),
    (packb([2, "gossip", ["node-a", 3]]), Notification("gossip", ("node-a", 3))),
    (packb([2, "x", []]), Notification("x", ())),
]
CASE_IDS = ["request", "max-msgid", "big-request", "response", "nil", "error", "notify", "empty"]

SECOND_WIRE, SECOND_MESSAGE = (
    packb([2, "after", [b"pipelined"]]),
    Notification("after", (b"pipelined",)),
)


@pytest.mark.parametrize(("wire", "expected"), VALID_CASES, ids=CASE_IDS)
def test_valid_message_fed_whole(wire: bytes, expected: Message) -> None:
    connection = RpcConnection()
    assert connection.next_message() is NEED_DATA
    connection.receive_data(wire)
    assert connection.next_message() == expected
    assert connection.next_message() is NEED_DATA
    connection.receive_data(b"")
    assert connection.next_message() is CLOSED
    assert connection.next_message() is CLOSED


@pytest.mark.parametrize(("wire", "expected"), VALID_CASES, ids=CASE_IDS)
def test_valid_message_fed_byte_by_byte(wire: bytes, expected: Message) -> None:
    connection = RpcConnection()
    for index in range(len(wire) - 1):
        connection.receive_data(wire[index : index + 1])
        assert connection.next_message() is NEED_DATA
    connection.receive_data(wire[-1:])
    assert connection.next_message() == expected
    assert connection.next_message() is NEED_DATA


@pytest.mark.parametrize(("wire", "expected"), VALID_CASES, ids=CASE_IDS)
def test_valid_message_followed_by_pipelined_message(wire: bytes, expected: Message) -> None:
    connection = RpcConnection()
    connection.receive_data(wire + SECOND_WIRE)
    connection.receive_data(b"")
    assert connection.next_message() == expected
    assert connection.next_message() == SECOND_MESSAGE
    assert connection.next_message() is CLOSED


def test_payload_types_survive() -> None:
    connection = RpcConnection()
    connection.receive_data(packb([0, 1, "m", [b"bytes", "text", 1.5, -3, True, None]]))
    message = connection.next_message()
    assert isinstance(message, Request)
    assert message.params == (b"bytes", "text", 1.5, -3, True, None)
    assert [type(value) for value in message.params] == [bytes, str, float, int, bool, type(None)]


MALFORMED_CASES: list[bytes] = [
    packb("not an array"),
    packb([]),
    packb(["0", 1, "m", []]),
    packb([True, 1, "m", []]),
    packb([3, 1, "m", []]),
    packb([0, 1, "m"]),
    packb([0, 1, "m", [], "extra"]),
    packb([0, -1, "m", []]),
    packb([0, MAX_MSGID + 1, "m", []]),
    packb([0, True, "m", []]),
    packb([0, 1.0, "m", []]),
    packb([0, 1, b"m", []]),
    packb([0, 1, "", []]),
    packb([0, 1, "m", "params"]),
    packb([0, 1, "m", {"a": 1}]),
    packb([1, 1, "error", None]),
    packb([1, 1, [5], None]),
    packb([1, 1, ["5", "x"], None]),
    packb([1, 1, [5, b"x"], None]),
    packb([1, 1, None]),
    packb([2, "m"]),
    packb([2, 7, []]),
    packb([2, "m", b"params"]),
    b"\xc1",  # A byte MessagePack reserves: never valid.
    b"\xa2\xff\xfe",  # A str that is not UTF-8.
    b"\xdd\xff\xff\xff\xff",  # An array header claiming 4 billion elements.
]


@pytest.mark.parametrize("wire", MALFORMED_CASES)
def test_malformed_message_is_a_protocol_error_and_framing_stays_lost(wire: bytes) -> None:
    connection = RpcConnection()
    connection.receive_data(wire + SECOND_WIRE)
    with pytest.raises(RpcProtocolError):
        drain(connection)
    with pytest.raises(RpcProtocolError):
        connection.next_message()


def test_oversize_message_is_refused_before_it_is_buffered() -> None:
    connection = RpcConnection(max_message_size=100)
    wire = packb([0, 1, "m", [b"x" * 200]])
    for index in range(99):
        connection.receive_data(wire[index : index + 1])
        assert connection.next_message() is NEED_DATA
    # 100 bytes without a complete message: it can only be larger than the limit.
    connection.receive_data(wire[99:])
    with pytest.raises(RpcProtocolError, match="100-byte limit"):
        connection.next_message()


def test_many_small_elements_count_towards_the_size_limit() -> None:
    # Parsing is incremental, so the limit must cover the whole message, not the buffer.
    connection = RpcConnection(max_message_size=1000)
    wire = packb([0, 1, "m", [list(range(100)) for _ in range(20)]])

    def feed_all() -> None:
        for index in range(0, len(wire), 10):
            connection.receive_data(wire[index : index + 10])
            drain(connection)

    with pytest.raises(RpcProtocolError, match="limit"):
        feed_all()


def test_message_of_exactly_the_limit_is_accepted_even_when_pipelined() -> None:
    base = packb([0, 1, "m", [b""]])
    wire = packb([0, 1, "m", [b"y" * (200 - len(base))]])
    assert len(wire) == 200
    connection = RpcConnection(max_message_size=200)
    connection.receive_data(wire + wire + wire[:50])
    assert len(drain(connection)) == 2
    connection.receive_data(wire[50:])
    assert len(drain(connection)) == 1


def test_end_of_stream_inside_a_message_is_a_protocol_error() -> None:
    connection = RpcConnection()
    connection.receive_data(SECOND_WIRE[:-1])
    assert connection.next_message() is NEED_DATA
    connection.receive_data(b"")
    with pytest.raises(RpcProtocolError, match="stream ended"):
        connection.next_message()


def test_data_after_end_of_stream_is_a_caller_bug() -> None:
    connection = RpcConnection()
    connection.receive_data(b"")
    with pytest.raises(RuntimeError):
        connection.receive_data(b"x")


def test_encoders_produce_what_the_decoder_reads() -> None:
    sender = RpcConnection()
    wire = (
        sender.encode_request(3, "get", [b"k"])
        + sender.encode_response(3, result=[b"v"])
        + sender.encode_response(4, error=RpcMethodNotFound("nope"))
        + sender.encode_notification("hint", (b"k", 2))
    )
    receiver = RpcConnection()
    receiver.receive_data(wire)
    assert drain(receiver) == [
        Request(3, "get", (b"k",)),
        Response(3, None, [b"v"]),
        Response(4, (RpcMethodNotFound.code, "nope"), None),
        Notification("hint", (b"k", 2)),
    ]


def test_encoders_refuse_what_the_peer_would_reject() -> None:
    connection = RpcConnection(max_message_size=64)
    with pytest.raises(RpcBadRequest, match="64"):
        connection.encode_request(1, "m", [b"x" * 100])
    with pytest.raises(RpcBadRequest, match="cannot encode"):
        connection.encode_notification("m", [object()])
    with pytest.raises(ValueError, match="msgid"):
        connection.encode_request(-1, "m", [])
    with pytest.raises(ValueError, match="method"):
        connection.encode_notification("", [])
    # The packer is still usable after a failure.
    assert connection.encode_notification("m", [1]) == packb([2, "m", [1]])


def test_response_unwrap_rebuilds_the_remote_error() -> None:
    assert Response(1, None, b"ok").unwrap() == b"ok"
    with pytest.raises(RpcRemoteError, match="boom"):
        Response(1, (RpcRemoteError.code, "boom"), None).unwrap()
    with pytest.raises(RpcError, match="from the future") as raised:
        Response(1, (999, "from the future"), None).unwrap()
    assert type(raised.value) is RpcError


def test_records_refuse_invalid_fields() -> None:
    with pytest.raises(ValueError, match="msgid"):
        Request(-1, "m", ())
    with pytest.raises(ValueError, match="method"):
        Notification("", ())
    with pytest.raises(TypeError, match="params"):
        Request(1, "m", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error"):
        Response(1, (1,), None)  # type: ignore[arg-type]


def test_pure_modules_do_not_import_trio() -> None:
    code = (
        "import sys, kai.core.rpc.protocol, kai.core.rpc.auth, kai.rpc.secret\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Properties -------------------------------------------------------------------------

payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
msgids = st.integers(min_value=0, max_value=MAX_MSGID)
methods = st.text(min_size=1, max_size=20)
params = st.lists(payloads, max_size=4).map(tuple)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Request, msgids, methods, params),
    st.builds(Response, msgids, st.none(), payloads),
    st.builds(Response, msgids, st.tuples(st.integers(0, 2**31), st.text(max_size=20)), st.none()),
    st.builds(Notification, methods, params),
)


def encode(connection: RpcConnection, message: Message) -> bytes:
    if isinstance(message, Request):
        return connection.encode_request(message.msgid, message.method, message.params)
    if isinstance(message, Notification):
        return connection.encode_notification(message.method, message.params)
    if message.error is None:
        return connection.encode_response(message.msgid, result=message.result)
    error = RpcError.for_code(*message.error)
    if error.code == message.error[0]:
        return connection.encode_response(message.msgid, error=error)
    return packb([1, message.msgid, list(message.error), None])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    chunks = [data[start:end] for start, end in itertools.pairwise(bounds)]
    return [chunk for chunk in chunks if chunk]  # b"" would mean end of stream.


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=8))
def test_round_trip_in_any_chunking(sent: list[Message], cuts: list[int]) -> None:
    sender = RpcConnection()
    wire = b"".join(encode(sender, message) for message in sent)
    receiver = RpcConnection()
    received: list[Message] = []
    for chunk in split(wire, cuts):
        receiver.receive_data(chunk)
        received.extend(drain(receiver))
    receiver.receive_data(b"")
    received.extend(drain(receiver))
    assert receiver.next_message() is CLOSED
    assert received == sent


def corrupt(data: bytes, position: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1 :]


valid_streams = st.lists(messages, max_size=3).map(lambda ms: b"".join(map(packb_message, ms)))
fuzz_inputs = (
    st.binary(max_size=300)
    | valid_streams
    | st.builds(corrupt, valid_streams, st.integers(0, 10_000), st.integers(0, 255))
    | st.builds(bytes.__add__, valid_streams, st.binary(max_size=50))
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    fuzz_inputs, st.lists(st.integers(0, 10_000), max_size=10), st.sampled_from([64, 1024, 2**20])
)
def test_arbitrary_bytes_give_messages_or_a_protocol_error(
    data: bytes, cuts: list[int], max_message_size: int
) -> None:
    connection = RpcConnection(max_message_size=max_message_size)
    try:
        for chunk in [*split(data, cuts), b""]:
            connection.receive_data(chunk)
            for message in drain(connection):
                assert isinstance(message, Request | Response | Notification)
        assert connection.next_message() is CLOSED
    except RpcProtocolError:
        with pytest.raises(RpcProtocolError):
            connection.next_message()


def packb_message(message: Message) -> bytes:
    return encode(RpcConnection(), message)
