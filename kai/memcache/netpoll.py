"""Read readiness of many sockets behind one trio wait: edge-triggered, registered once.

Every time a task waits for a socket with ``trio.lowlevel.wait_readable``, trio re-arms a
one-shot epoll registration: an ``epoll_ctl`` system call plus bookkeeping that adds and drops
per-socket objects. The memcached listener would pay that once per request on every client
connection. A :class:`ReadPoller` instead registers each socket once, edge-triggered, in an
epoll set of its own, and :meth:`ReadPoller.run` (a task of the service that owns the poller)
waits for that set through trio and calls the ready sockets' callbacks. Several sockets that
became readable together cost one trio wait between them, and a request costs no task switch.

Edge-triggered means a callback hears only of *new* input: whatever it leaves unread when it
returns is not announced again. So a callback must read until the socket has nothing more
(a short receive or ``BlockingIOError``), or make sure something else will. But a short
receive does not show an end of file that arrived with the data (a client that sends its
requests and shuts down its side at once): that end of file was announced with the data, and
will not be again. So a watch is told which announcements carry one (``on_hang_up``), and
must then receive until the socket says end of file or fails.

trio's own epoll is one-shot on purpose, so that a closed and reused descriptor cannot
deliver a stale event; here a watch is closed before its socket, and a descriptor reused by
the kernel after all replaces the watch that it left behind.

Needs Linux's epoll; on any other system :class:`ReadPoller` raises ``OSError`` at creation.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable
from typing import NoReturn

import trio

#: Events taken from the kernel per system call; more ready sockets take another round.
MAX_EVENTS = 512
#: Rounds of callbacks the poller runs per trio wait while new input keeps arriving.
ROUNDS = 4

_EPOLL = getattr(select, "epoll", None)
#: Readable, peer closed its side, edge-triggered (errors and hang-ups are always reported).
_EVENTS = (
    getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLET", 0)
)
#: The peer shut down its side, or the connection hung up or failed: nothing after the input
#: already there will be announced.
_HUNG_UP = (
    getattr(select, "EPOLLRDHUP", 0)
    | getattr(select, "EPOLLHUP", 0)
    | getattr(select, "EPOLLERR", 0)
)


class Watch:
    """One watched socket: its callbacks run whenever new input (or end of file, or an error)
    arrives, until :meth:`close`."""

    __slots__ = ("_fd", "_poller", "_sock", "on_hang_up", "on_readable")

    def __init__(
        self,
        poller: ReadPoller,
        sock: socket.socket,
        on_readable: Callable[[], None],
        on_hang_up: Callable[[], None],
    ) -> None:
        self._poller = poller
        self._sock = sock
        self._fd = sock.fileno()
        self.on_readable = on_readable
        self.on_hang_up = on_hang_up

    def close(self) -> None:
        """Stop watching (call it before closing the socket); idempotent."""
        self._poller._forget(self)


class ReadPoller:
    """An epoll set of sockets, each registered once; :meth:`run` calls their callbacks.

    Raises:
        OSError: this system has no epoll.
    """

    def __init__(self) -> None:
        if _EPOLL is None:
            raise OSError("the memcached listener needs Linux's epoll")
        self._epoll = _EPOLL()
        self._watches: dict[int, Watch] = {}

    def watch(
        self,
        sock: socket.socket,
        on_readable: Callable[[], None],
        on_hang_up: Callable[[], None] | None = None,
    ) -> Watch:
        """Call ``on_readable`` whenever new input arrives on ``sock`` (a connected,
        non-blocking socket), from :meth:`run`'s task. Input that is already there when the
        watch starts counts as new.

        ``on_hang_up`` (``on_readable`` if not given) is called instead when the peer has
        shut down its side or the connection has hung up or failed, whether or not input
        came with it: nothing more may be announced after it, so the callback must receive
        until end of file or an error, short receives included. A callback that always
        reads until ``BlockingIOError`` or end of file needs no ``on_hang_up``.

        Raises:
            OSError: the kernel refused the registration (out of memory, or past
                ``fs.epoll.max_user_watches``).
        """
        fd = sock.fileno()
        stale = self._watches.get(fd)
        if stale is not None:
            if stale._sock is sock:
                raise ValueError(f"socket {fd} is already watched")
            # The descriptor was closed without its watch and the kernel reused it (closing
            # it dropped the registration): that watch is over.
            self._forget(stale)
        self._epoll.register(fd, _EVENTS)
        watch = self._watches[fd] = Watch(
            self, sock, on_readable, on_hang_up if on_hang_up is not None else on_readable
        )
        return watch

    def __len__(self) -> int:
        return len(self._watches)

    async def run(self) -> NoReturn:
        """Call the callbacks of watched sockets as input arrives; closes the epoll set when
        cancelled. A callback must not raise (an exception ends this task)."""
        epoll = self._epoll
        watches = self._watches
        hung_up = _HUNG_UP
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                # Clients answered in one round often send their next requests while the
                # round runs: look again before going back through trio's wait, which costs
                # three system calls and a task switch, but only a few times in a row, so
                # that other tasks get their turn.
                for _round in range(ROUNDS):
                    events = epoll.poll(0, MAX_EVENTS)
                    if not events:
                        break
                    for fd, mask in events:
                        watch = watches.get(fd)
                        if watch is not None:
                            if mask & hung_up:
                                watch.on_hang_up()
                            else:
                                watch.on_readable()
        finally:
            watches.clear()
            epoll.close()

    def _forget(self, watch: Watch) -> None:
        fd = watch._fd
        if self._watches.get(fd) is watch:
            del self._watches[fd]
            if not self._epoll.closed:
                # The socket may be closed already: the kernel then dropped it by itself.
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
