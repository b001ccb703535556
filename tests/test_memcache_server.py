"""The memcached listener over real loopback sockets, in one trio run with its clients.

What these pin down is the one serving path in its two settings: run by the poller's task for
input that arrives on an idle connection, and by a task of the listener's once a request
hands back a pending step. Replies must come back in request order, nothing may be lost or
counted twice, and a connection whose handling fails ends alone.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from kai.core.memcache import protocol
from kai.core.memcache.report import VERSION_REPLY
from kai.core.pending import Pending
from kai.memcache.server import RECEIVE_SIZE, SEND_THRESHOLD, MemcacheServer
from tests.test_commands import make_harness

MAX_ITEM_SIZE = 1 << 20
#: Every exchange here finishes in milliseconds; this only bounds a hang.
DEADLINE = 10


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[MemcacheServer, int]]:
    """A listener on a free loopback port over one in-memory node, shut down afterwards."""
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            executor = make_harness(nursery).executor
            server = MemcacheServer(
                executor, executor.stats, max_connections=16, max_item_size=MAX_ITEM_SIZE
            )
            addresses = await nursery.start(server.serve, "127.0.0.1", 0)
            yield server, addresses[0][1]
            server.shut_down()
            nursery.cancel_scope.deadline = trio.current_time() + DEADLINE


async def read_until(stream: trio.SocketStream, ending: bytes, count: int = 1) -> bytes:
    """Receive until ``ending`` has been seen ``count`` times (at the end of the data)."""
    received = bytearray()
    while received.count(ending) < count or not received.endswith(ending):
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed after {len(received)} bytes")
        received += chunk
    return bytes(received)


@pytest.mark.parametrize("when", ["before the accept", "on an idle connection"])
@pytest.mark.parametrize(
    ("requests", "replies"),
    [
        pytest.param(b"version\r\n", VERSION_REPLY, id="answered at once"),
        pytest.param(
            b"set n 0 0 1\r\n1\r\nincr n 2\r\nget n\r\n",
            b"STORED\r\n3\r\nVALUE n 0 1\r\n3\r\nEND\r\n",
            id="answered by the connection's task",
        ),
    ],
)
async def test_a_client_that_half_closes_with_its_requests_gets_its_replies_and_a_close(
    when: str, requests: bytes, replies: bytes
) -> None:
    """The requests and the end of file in one announcement: the last receive is short, and
    only the poller's word says the end of file is behind it."""
    async with serving() as (server, port):
        sock = socket.create_connection(("127.0.0.1", port))  # the kernel completes it
        sock.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        async with stream:
            if when == "on an idle connection":
                await stream.send_all(b"version\r\n")
                assert await read_until(stream, b"\r\n") == VERSION_REPLY  # watched now
            # With no checkpoint in between, the server sees both at its next look.
            sock.sendall(requests)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := await stream.receive_some(1 << 20):
                received += chunk
        assert received == replies
        assert server.stats.curr_connections == 0


async def test_answers_made_without_and_after_waiting_come_back_in_request_order() -> None:
    requests = (
        b"set a 0 0 1\r\n1\r\n"  # at once
        b"get a\r\n"  # at once
        b"incr a 5\r\n"  # waits for the connection's task (read, check, write)
        b"get a\r\n"  # after it, so also the task's
        b"set b 3 0 2 noreply\r\nbb\r\n"
        b"version\r\n"
        b"get a b\r\n"
        b"delete b\r\n"
        b"get b\r\n"
    )
    expected = (
        b"STORED\r\n"
        b"VALUE a 0 1\r\n1\r\nEND\r\n"
        b"6\r\n"
        b"VALUE a 0 1\r\n6\r\nEND\r\n"
        + VERSION_REPLY
        + b"VALUE a 0 1\r\n6\r\nVALUE b 3 2\r\nbb\r\nEND\r\n"
        b"DELETED\r\n"
        b"END\r\n"
    )
    async with serving() as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(requests)
            assert await read_until(stream, b"END\r\n", 4) == expected
    assert server.stats.cmd_get == 5
    assert server.stats.cmd_set == 2


async def test_requests_one_at_a_time_are_answered_and_counted_once() -> None:
    async with serving() as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            sent = received = 0
            for i in range(200):
                value = b"%d" % i
                request = b"set k%d 0 0 %d\r\n%s\r\n" % (i % 7, len(value), value)
                await stream.send_all(request)
                received += len(await read_until(stream, b"STORED\r\n"))
                request2 = b"get k%d\r\n" % (i % 7)
                await stream.send_all(request2)
                reply = await read_until(stream, b"END\r\n")
                assert reply == b"VALUE k%d 0 %d\r\n%s\r\nEND\r\n" % (i % 7, len(value), value)
                received += len(reply)
                sent += len(request) + len(request2)
        stats = server.stats
        assert (stats.cmd_set, stats.cmd_get, stats.get_hits) == (200, 200, 200)
        assert stats.bytes_read == sent
        assert stats.bytes_written == received


async def test_a_value_longer_than_one_receive_reaches_an_idle_connection() -> None:
    value = bytes(range(256)) * (3 * RECEIVE_SIZE // 256 + 1)
    async with serving() as (_server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"set big 0 0 %d\r\n%s\r\nget big\r\n" % (len(value), value))
            reply = await read_until(stream, b"END\r\n")
    assert reply == b"STORED\r\nVALUE big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)


async def test_replies_beyond_what_the_socket_takes_are_all_delivered() -> None:
    value = b"v" * 100_000
    gets = 120  # 12 MB of replies, more than the loopback socket buffers hold
    assert 2 * len(value) < SEND_THRESHOLD < 5 * len(value)
    async with serving() as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"set v 0 0 %d\r\n%s\r\n" % (len(value), value))
            await read_until(stream, b"STORED\r\n")
            written = server.stats.bytes_written
            # Five replies to one receive pass the threshold: the task sends the last ones.
            await stream.send_all(b"get v\r\n" * 5)
            first = await read_until(stream, b"END\r\n", 5)
            for _ in range(gets):  # one at a time, nobody reading: the buffers fill up
                await stream.send_all(b"get v\r\n")
                await trio.sleep(0.001)
            await stream.send_all(b"get v\r\n" * gets)  # and a batch far past the threshold
            replies = await read_until(stream, b"END\r\n", 2 * gets)
    reply = b"VALUE v 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
    assert first == reply * 5
    assert replies == reply * (2 * gets)
    assert server.stats.bytes_written - written == len(first) + len(replies)
    assert server.stats.get_hits == 5 + 2 * gets


@pytest.mark.parametrize("where", ["at once", "pending"])
async def test_a_connection_whose_handling_fails_ends_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A bug in request handling (here: an exception injected for the key ``boom``, raised
    either while the request is answered at once or from its pending step) closes that
    connection, is logged with its traceback, and every other connection goes on."""
    async with serving() as (server, port):
        execute = server.executor.execute

        async def explode() -> bytes:
            raise RuntimeError("injected failure")

        def failing(request: protocol.Request | protocol.Invalid) -> bytes | Pending[bytes]:
            if isinstance(request, protocol.Get) and request.keys == (b"boom",):
                if where == "pending":
                    return Pending(explode())
                raise RuntimeError("injected failure")
            return execute(request)

        monkeypatch.setattr(server.executor, "execute", failing)
        doomed = await trio.open_tcp_stream("127.0.0.1", port)
        healthy = await trio.open_tcp_stream("127.0.0.1", port)
        bystander = await trio.open_tcp_stream("127.0.0.1", port)
        async with doomed, healthy, bystander:
            await healthy.send_all(b"set k 0 0 1\r\nv\r\n")
            await read_until(healthy, b"STORED\r\n")
            await doomed.send_all(b"get k\r\nget boom\r\nget k\r\n")
            # The reply to the request before the failure may or may not have been sent.
            received = b""
            while chunk := await doomed.receive_some(1000):
                received += chunk
            assert received in (b"", b"VALUE k 0 1\r\nv\r\nEND\r\n")
            for stream in (healthy, bystander):
                await stream.send_all(b"get k\r\nincr n 1\r\n")
                assert await read_until(stream, b"NOT_FOUND\r\n") == (
                    b"VALUE k 0 1\r\nv\r\nEND\r\nNOT_FOUND\r\n"
                )
            assert server.stats.curr_connections == 2
    assert "injected failure" in caplog.text
    assert any(record.exc_info for record in caplog.records)
