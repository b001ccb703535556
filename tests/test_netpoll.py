"""The edge-triggered read poller: every arrival announced, closing, reused descriptors.

Real sockets (socket pairs) and real epoll, in virtual time: the poller is woken by the
kernel, and nothing here waits on a timer.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from kai.memcache import netpoll
from kai.memcache.netpoll import ReadPoller


@contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


@asynccontextmanager
async def running() -> AsyncIterator[ReadPoller]:
    poller = ReadPoller()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        yield poller
        nursery.cancel_scope.cancel()


def reader(sock: socket.socket, into: bytearray, eof: trio.Event) -> Callable[[], None]:
    """What a connection does when told of input: read until nothing is left."""

    def on_readable() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                eof.set()
                return
            into.extend(data)

    return on_readable


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_input_is_announced_and_input_before_the_watch_counts_as_new() -> None:
    received = bytearray()
    eof = trio.Event()
    async with running() as poller:
        with socket_pair() as (ours, theirs):
            theirs.send(b"early")
            watch = poller.watch(ours, reader(ours, received, eof))
            await settle()
            assert received == b"early"
            theirs.send(b" late")
            await settle()
            assert received == b"early late"
            theirs.shutdown(socket.SHUT_WR)
            with trio.fail_after(1):
                await eof.wait()
            watch.close()


@pytest.mark.parametrize("ending", ["shutdown", "close"])
async def test_an_end_of_file_that_comes_with_data_is_announced_as_a_hang_up(ending: str) -> None:
    """Data and the end of file behind it, announced once: a callback that stops at a short
    receive (as the memcached listener does) learns from ``on_hang_up`` to read on."""
    calls: list[str] = []
    async with running() as poller:
        with socket_pair() as (ours, theirs):
            watch = poller.watch(
                ours, lambda: calls.append("readable"), lambda: calls.append("hang-up")
            )
            theirs.send(b"x")
            await settle()
            assert calls == ["readable"]
            assert ours.recv(100) == b"x"
            theirs.send(b"y")
            if ending == "shutdown":
                theirs.shutdown(socket.SHUT_WR)
            else:
                theirs.close()
            await settle()
            await settle()
            assert calls == ["readable", "hang-up"]  # one announcement for both
            assert ours.recv(100) == b"y"  # a short receive, with the end of file behind it
            assert ours.recv(100) == b""
            watch.close()


async def test_without_on_hang_up_a_hang_up_is_announced_to_on_readable() -> None:
    received = bytearray()
    eof = trio.Event()
    async with running() as poller:
        with socket_pair() as (ours, theirs):
            watch = poller.watch(ours, reader(ours, received, eof))
            theirs.send(b"last")
            theirs.shutdown(socket.SHUT_WR)
            with trio.fail_after(1):
                await eof.wait()
            assert received == b"last"
            watch.close()


async def test_a_closed_watch_hears_nothing_more() -> None:
    calls: list[int] = []
    async with running() as poller:
        with socket_pair() as (ours, theirs):
            watch = poller.watch(ours, lambda: calls.append(1))
            theirs.send(b"x")
            await settle()
            assert calls == [1]
            watch.close()
            watch.close()  # idempotent
            theirs.send(b"y")
            await settle()
            assert calls == [1]
            assert len(poller) == 0


async def test_input_left_unread_is_not_announced_again_until_more_arrives() -> None:
    calls: list[int] = []
    async with running() as poller:
        with socket_pair() as (ours, theirs):
            watch = poller.watch(ours, lambda: calls.append(1))  # reads nothing
            theirs.send(b"x")
            await settle()
            await settle()
            assert calls == [1]  # edge-triggered: once
            theirs.send(b"y")
            await settle()
            assert calls == [1, 1]
            watch.close()


async def test_a_reused_descriptor_replaces_the_watch_it_left_behind() -> None:
    calls: list[str] = []
    async with running() as poller:
        first, peer = socket.socketpair()
        first.setblocking(False)
        poller.watch(first, lambda: calls.append("first"))
        fd = first.fileno()
        first.close()  # without closing its watch
        peer.close()
        with socket_pair() as (ours, theirs):
            if ours.fileno() != fd:
                pytest.skip("the kernel did not reuse the descriptor")
            watch = poller.watch(ours, lambda: calls.append("second"))
            theirs.send(b"x")
            await settle()
            assert calls == ["second"]
            with pytest.raises(ValueError, match="already watched"):
                poller.watch(ours, lambda: None)
            watch.close()


async def test_seeded_traffic_over_many_sockets_loses_no_announcement(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fewer events per poll than ready sockets, so a round leaves some for the next one.
    monkeypatch.setattr(netpoll, "MAX_EVENTS", 3)
    rng = random.Random(4)
    pairs = [socket.socketpair() for _ in range(12)]
    try:
        for ours, theirs in pairs:
            ours.setblocking(False)
            theirs.setblocking(False)
        expected = [bytearray() for _ in pairs]
        received = [bytearray() for _ in pairs]
        ends = [trio.Event() for _ in pairs]
        async with running() as poller:
            watches = [
                poller.watch(ours, reader(ours, received[index], ends[index]))
                for index, (ours, _theirs) in enumerate(pairs)
            ]
            for _round in range(200):
                for index in rng.sample(range(len(pairs)), rng.randint(1, len(pairs))):
                    chunk = bytes([rng.randrange(256)]) * rng.randint(1, 50)
                    pairs[index][1].send(chunk)
                    expected[index] += chunk
                if rng.random() < 0.5:
                    await settle()
            for _ours, theirs in pairs:
                theirs.shutdown(socket.SHUT_WR)
            with trio.fail_after(5):  # a lost announcement leaves a reader short forever
                for end in ends:
                    await end.wait()
            for watch in watches:
                watch.close()
        assert received == expected
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_without_epoll_the_poller_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netpoll, "_EPOLL", None)
    with pytest.raises(OSError, match="epoll"):
        ReadPoller()


async def test_input_that_arrives_during_a_round_is_served_in_the_same_wake_a_few_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chain of sockets whose callbacks each make the next one readable: the poller looks
    again before going back through trio's wait, at most ROUNDS times in a row."""
    waits = 0
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(fd: int) -> None:
        nonlocal waits
        waits += 1
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    length = 3 * netpoll.ROUNDS
    pairs = [socket.socketpair() for _ in range(length)]
    served: list[int] = []
    all_served = trio.Event()
    try:
        for ours, theirs in pairs:
            ours.setblocking(False)
            theirs.setblocking(False)

        def callback(index: int) -> Callable[[], None]:
            def on_readable() -> None:
                pairs[index][0].recv(100)
                served.append(index)
                if index + 1 < length:
                    pairs[index + 1][1].send(b"x")  # the next socket becomes readable now
                else:
                    all_served.set()

            return on_readable

        async with running() as poller:
            watches = [poller.watch(pair[0], callback(index)) for index, pair in enumerate(pairs)]
            await settle()
            before = waits
            pairs[0][1].send(b"x")
            with trio.fail_after(5):
                await all_served.wait()
            assert served == list(range(length))
            assert waits - before == length // netpoll.ROUNDS
            for watch in watches:
                watch.close()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
