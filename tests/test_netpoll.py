"""The edge-triggered read poller: no lost wake-ups, closing, cancelling, and the fallback.

Real sockets (socket pairs) and real epoll, in virtual time: the poller is woken by the
kernel, and nothing here waits on a timer.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from kai.memcache import netpoll
from kai.memcache.netpoll import ReadPoller, Watch


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
async def running(poller: ReadPoller) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        yield nursery
        nursery.cancel_scope.cancel()
    poller.close()


@asynccontextmanager
async def watched_pair() -> AsyncIterator[tuple[socket.socket, socket.socket, Watch, ReadPoller]]:
    """Our end of a socket pair watched by a running poller, the peer's end, the watch."""
    poller = ReadPoller()
    with socket_pair() as (ours, theirs):
        async with running(poller):
            watch = poller.watch(ours)
            yield ours, theirs, watch, poller
            watch.close()


async def use_up_first_wait(watch: Watch) -> None:
    """A new watch's first wait returns at once (whatever came before it is found)."""
    with trio.fail_after(1):
        await watch.wait_readable()


async def receive(sock: socket.socket, watch: Watch) -> bytes:
    """What a connection does: read, and wait only once a read finds nothing."""
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await watch.wait_readable()


async def test_a_waiting_task_wakes_when_data_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair() as (ours, theirs, watch, _), trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await receive(ours, watch))

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []  # nothing sent yet: the reader waits
        theirs.send(b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert received == [b"hello"]


async def test_data_sent_while_nobody_waited_is_found_by_the_next_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair() as (ours, theirs, watch, _):
        with pytest.raises(BlockingIOError):
            ours.recv(10)
        await use_up_first_wait(watch)
        theirs.send(b"early")
        await trio.testing.wait_all_tasks_blocked()  # the poller sees the edge, no waiter
        with trio.fail_after(1):
            await watch.wait_readable()  # the edge was kept for this wait
        assert ours.recv(10) == b"early"


async def test_on_ready_serves_in_the_pollers_step_and_the_task_sleeps_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair() as (ours, theirs, watch, _), trio.open_nursery() as nursery:
        served: list[bytes] = []
        keep_waiting = True

        def on_ready() -> bool:
            if not keep_waiting:
                return False  # leave it to the task
            served.append(ours.recv(65536))
            return True

        watch.on_ready = on_ready
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await receive(ours, watch))

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        theirs.send(b"first")
        await trio.testing.wait_all_tasks_blocked()
        assert served == [b"first"]
        assert received == []  # the callback took it: the task still waits
        theirs.send(b"second")
        await trio.testing.wait_all_tasks_blocked()
        assert served == [b"first", b"second"]  # every edge reaches the callback
        keep_waiting = False
        theirs.send(b"third")
        await trio.testing.wait_all_tasks_blocked()
        assert received == [b"third"]  # woken as without a callback
        assert served == [b"first", b"second"]


async def test_on_ready_is_not_called_while_no_task_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair() as (ours, theirs, watch, _):
        calls: list[None] = []

        def on_ready() -> bool:
            calls.append(None)
            return True

        watch.on_ready = on_ready
        await use_up_first_wait(watch)
        theirs.send(b"while busy")
        await trio.testing.wait_all_tasks_blocked()
        assert calls == []  # the task was busy, not waiting: the edge is kept for it
        with trio.fail_after(1):
            await watch.wait_readable()
        assert ours.recv(20) == b"while busy"


async def test_end_of_file_and_shutdown_wake_the_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    poller = ReadPoller()
    with socket_pair() as (first, first_peer), socket_pair() as (second, _second_peer):
        async with running(poller) as nursery:
            watches = [poller.watch(first), poller.watch(second)]
            results: dict[int, bytes] = {}

            async def reader(index: int, sock: socket.socket) -> None:
                results[index] = await receive(sock, watches[index])

            nursery.start_soon(reader, 0, first)
            nursery.start_soon(reader, 1, second)
            await trio.testing.wait_all_tasks_blocked()
            first_peer.close()  # the client hangs up
            second.shutdown(socket.SHUT_RD)  # how the memcached listener ends idle connections
            await trio.testing.wait_all_tasks_blocked()
            assert results == {0: b"", 1: b""}
            for watch in watches:
                watch.close()


async def test_closing_the_watch_wakes_the_waiter_with_closed_resource_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair() as (_, _, watch, poller), trio.open_nursery() as nursery:
        await use_up_first_wait(watch)
        outcomes: list[str] = []

        async def waiter() -> None:
            try:
                await watch.wait_readable()
            except trio.ClosedResourceError:
                outcomes.append("closed")

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        watch.close()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["closed"]
        assert len(poller) == 0
        with pytest.raises(trio.ClosedResourceError):
            await watch.wait_readable()
        watch.close()  # closing twice is harmless


async def test_one_waiter_at_a_time_and_a_cancelled_wait_leaves_the_watch_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair() as (ours, theirs, watch, _), trio.open_nursery() as nursery:
        await use_up_first_wait(watch)
        with trio.move_on_after(5) as scope:
            await watch.wait_readable()
        assert scope.cancelled_caught  # nothing arrived: the wait was cancelled

        nursery.start_soon(watch.wait_readable)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await watch.wait_readable()
        theirs.send(b"x")  # wakes the first waiter
        await trio.testing.wait_all_tasks_blocked()
        assert ours.recv(10) == b"x"


async def test_a_reused_descriptor_can_be_watched_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    poller = ReadPoller()
    async with running(poller):
        with socket_pair() as (ours, _theirs):
            fd = ours.fileno()
            watch = poller.watch(ours)
            with pytest.raises(ValueError, match="already watched"):
                poller.watch(ours)
            ours.close()  # closed before its watch: the kernel drops the registration itself
            watch.close()
        with socket_pair() as (ours, theirs):
            assert ours.fileno() == fd  # Linux hands out the lowest free descriptor
            watch = poller.watch(ours)
            await use_up_first_wait(watch)
            theirs.send(b"again")
            assert await receive(ours, watch) == b"again"
            ours.close()  # this time the watch is never closed...
        with socket_pair() as (ours, theirs):
            assert ours.fileno() == fd
            reused = poller.watch(ours)  # ...and the descriptor's next socket replaces it
            with pytest.raises(trio.ClosedResourceError):
                await watch.wait_readable()
            await use_up_first_wait(reused)
            theirs.send(b"third")
            assert await receive(ours, reused) == b"third"
            reused.close()


async def test_seeded_traffic_over_many_sockets_loses_no_wake_up(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fewer events per poll than ready sockets, so a round leaves some for the next one.
    monkeypatch.setattr(netpoll, "MAX_EVENTS", 3)
    rng = random.Random(4)
    poller = ReadPoller()
    pairs = [socket.socketpair() for _ in range(12)]
    try:
        for ours, theirs in pairs:
            ours.setblocking(False)
            theirs.setblocking(False)
        expected = [bytearray() for _ in pairs]
        received = [bytearray() for _ in pairs]
        async with running(poller) as nursery:
            watches = [poller.watch(ours) for ours, _ in pairs]

            finished: list[int] = []
            all_finished = trio.Event()

            async def reader(index: int) -> None:
                sock = pairs[index][0]
                while data := await receive(sock, watches[index]):
                    received[index] += data
                finished.append(index)
                if len(finished) == len(pairs):
                    all_finished.set()

            for index in range(len(pairs)):
                nursery.start_soon(reader, index)
            for _round in range(200):
                for index in rng.sample(range(len(pairs)), rng.randint(1, len(pairs))):
                    chunk = bytes([rng.randrange(256)]) * rng.randint(1, 50)
                    pairs[index][1].send(chunk)
                    expected[index] += chunk
                if rng.random() < 0.5:
                    await trio.testing.wait_all_tasks_blocked()
            for _ours, theirs in pairs:
                theirs.shutdown(socket.SHUT_WR)  # end of file: each reader returns
            with trio.fail_after(5):  # a lost wake-up leaves a reader waiting forever
                await all_finished.wait()
            for watch in watches:
                watch.close()
        assert received == expected
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


async def test_without_epoll_watches_use_trios_own_wait(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netpoll, "_EPOLL", None)
    poller = ReadPoller()
    with socket_pair() as (ours, theirs):
        async with running(poller) as nursery:
            watch = poller.watch(ours)
            assert len(poller) == 0  # nothing is registered anywhere but in trio
            received: list[bytes] = []

            async def reader() -> None:
                received.append(await receive(ours, watch))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            theirs.send(b"plain")
            await trio.testing.wait_all_tasks_blocked()
            assert received == [b"plain"]

            async def waiter() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await watch.wait_readable()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            watch.close()  # wakes it through trio.lowlevel.notify_closing


def poller_tasks() -> int:
    """How many tasks of this run are running a kai read poller."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found, stack = 0, [root]
    while stack:
        task = stack.pop()
        found += task.name == "kai.memcache.netpoll"
        stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return found


async def test_watch_uses_one_poller_per_run_started_on_first_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket_pair() as (first, first_peer), socket_pair() as (second, second_peer):
        assert poller_tasks() == 0
        first_watch = netpoll.watch(first)
        second_watch = netpoll.watch(second)
        assert poller_tasks() == 1
        assert len(netpoll._RUN_POLLER.get()) == 2  # both in the same epoll set
        for sock, peer, readiness in (
            (first, first_peer, first_watch),
            (second, second_peer, second_watch),
        ):
            await use_up_first_wait(readiness)
            peer.send(b"ping")
            with trio.fail_after(1):
                assert await receive(sock, readiness) == b"ping"
            readiness.close()
        assert len(netpoll._RUN_POLLER.get()) == 0


async def test_a_refused_registration_falls_back_to_trios_wait(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: ReadPoller, sock: socket.socket) -> Watch:
        raise OSError(28, "No space left on device")  # what epoll says past max_user_watches

    monkeypatch.setattr(ReadPoller, "watch", refuse)
    with socket_pair() as (ours, theirs):
        readiness = netpoll.watch(ours)
        with pytest.raises(BlockingIOError):
            ours.recv(10)
        theirs.send(b"still served")
        with trio.fail_after(1):
            assert await receive(ours, readiness) == b"still served"
        readiness.close()
