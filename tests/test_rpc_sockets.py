"""The RPC socket layer: ordering, batching, back-pressure and closing, over socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from kai.rpc.sockets import MAX_BACKLOG, SocketIO, Wakeup, from_stream

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class CountingSocket(socket.socket):
    """A socket that counts its ``send`` calls."""

    sends = 0

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        self.sends += 1
        return super().send(data, flags)


@contextmanager
def pair() -> Iterator[tuple[SocketIO, socket.socket]]:
    """A :class:`SocketIO` (on a :class:`CountingSocket`) and the plain socket at the other end."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    io = SocketIO(CountingSocket(fileno=ours.detach()))
    try:
        yield io, theirs
    finally:
        io.close()
        theirs.close()


async def read_exactly(sock: socket.socket, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        try:
            data = sock.recv(size - len(received))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        assert data, "closed early"
        received += data
    return bytes(received)


async def test_messages_queued_in_one_pass_leave_in_order_in_one_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pair() as (io, theirs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.run_writer)
            await trio.testing.wait_all_tasks_blocked()
            for index in range(50):
                io.send(b"<%d>" % index)
            assert io.backlog == sum(len(b"<%d>" % index) for index in range(50))
            await trio.testing.wait_all_tasks_blocked()
            assert io.backlog == 0
            expected = b"".join(b"<%d>" % index for index in range(50))
            assert theirs.recv(len(expected) + 1) == expected
            assert isinstance(io.sock, CountingSocket)
            assert io.sock.sends == 1
            io.finish()


async def test_a_peer_that_does_not_read_makes_writers_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    chunk = b"x" * (1024 * 1024)
    with pair() as (io, theirs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.run_writer)
            for _ in range(MAX_BACKLOG // len(chunk) + 2):
                io.send(chunk)
            waited = trio.Event()

            async def writer() -> None:
                await io.wait_for_room()
                waited.set()

            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert not waited.is_set()  # the kernel buffers are full and nobody reads
            assert io.backlog > MAX_BACKLOG
            total = (MAX_BACKLOG // len(chunk) + 2) * len(chunk)
            received = await read_exactly(theirs, total)
            assert received == chunk * (total // len(chunk))
            await waited.wait()
            assert io.backlog == 0
            io.finish()


async def test_close_wakes_a_waiting_reader_and_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pair() as (io, _theirs):
        for _ in range(MAX_BACKLOG // 65536 + 2):
            io.send(b"y" * 65536)  # no writer runs: the backlog only grows
        outcomes: list[str] = []

        async def expect_closed(name: str, wait: Callable[[], Awaitable[object]]) -> None:
            with pytest.raises(trio.ClosedResourceError):
                await wait()
            outcomes.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_closed, "reader", io.receive)
            nursery.start_soon(expect_closed, "room", io.wait_for_room)
            await trio.testing.wait_all_tasks_blocked()
            io.close()
        assert sorted(outcomes) == ["reader", "room"]
        with pytest.raises(trio.ClosedResourceError):
            io.send(b"late")


async def test_end_of_stream_and_a_reset_peer(autojump_clock: trio.testing.MockClock) -> None:
    with pair() as (io, theirs):
        theirs.sendall(b"last words")
        theirs.shutdown(socket.SHUT_WR)
        assert await io.receive() == b"last words"
        assert await io.receive() == b""
    with pair() as (io, theirs):
        theirs.close()
        io.send(b"to nobody")
        io.finish()
        with pytest.raises(trio.BrokenResourceError):
            await io.run_writer()


async def test_from_stream_refuses_streams_without_a_socket() -> None:
    left, _right = trio.testing.memory_stream_pair()
    with pytest.raises(TypeError, match="TCP sockets"):
        from_stream(left)


async def test_send_now_goes_straight_out_only_when_nothing_is_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pair() as (io, theirs):
        io.send_now(b"direct")  # no writer task exists: it must not be needed
        assert io.backlog == 0
        assert theirs.recv(100) == b"direct"
        io.send(b"first")
        io.send_now(b"second")  # must not overtake what is queued
        assert io.backlog == len(b"firstsecond")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.run_writer)
            await trio.testing.wait_all_tasks_blocked()
            io.finish()
        assert theirs.recv(100) == b"firstsecond"


async def test_a_wakeup_wakes_its_one_waiter_and_survives_a_cancelled_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wakeup = Wakeup()
    wakeup.wake()  # nobody waits: nothing happens, and nothing is remembered
    woken: list[float] = []

    async def waiter() -> None:
        await wakeup.wait()
        woken.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already waiting"):
            await wakeup.wait()
        await trio.sleep(1)
        wakeup.wake()
    assert woken == [1]
    with trio.move_on_after(1):
        await wakeup.wait()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)  # the cancelled wait left no waiter behind
        await trio.testing.wait_all_tasks_blocked()
        wakeup.wake()
    assert woken == [1, 2]
