"""Read readiness of many sockets behind one trio wait: edge-triggered, registered once.

Every time a task waits for a socket with ``trio.lowlevel.wait_readable``, trio re-arms a
one-shot epoll registration: an ``epoll_ctl`` system call plus bookkeeping that adds and drops
per-socket objects. The memcached listener waits once per request on each client connection,
so that is paid per request. A :class:`ReadPoller` registers each socket once, edge-triggered,
in an epoll set of its own; one task waits for that set through trio and wakes the tasks
whose sockets received something. Several sockets that became readable together then cost one
trio wait between them. :func:`watch` uses one poller per trio run, started on first use as a
system task: like trio's own I/O manager, it belongs to the event loop, not to any service.

A :class:`Watch` must never lose a wake-up: data (or end of file, or an error) arriving after
the last time its task found nothing to read always wakes it. It may wake a task that then
finds nothing (after data was read before the task waited), so callers read until
``BlockingIOError`` and wait again. On systems without epoll, watches fall back to trio's own
wait.

A watch may also have an :attr:`Watch.on_ready` callback, which the poller calls instead of
waking the waiting task: it can serve what arrived right there, in the poller's own step, and
leave the task asleep. A request then costs no task switch at all.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Callable
from typing import NoReturn

import outcome
import trio

logger = logging.getLogger(__name__)

#: Events taken from the kernel per system call; more ready sockets take another round.
MAX_EVENTS = 512

_EPOLL = getattr(select, "epoll", None)
#: Readable, peer closed its side, edge-triggered (errors and hang-ups are always reported).
_EVENTS = (
    getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLET", 0)
)


class Watch:
    """One socket's read readiness; one task at a time may wait on it.

    Attributes:
        on_ready: if set, called by the poller when the socket becomes readable while a task
            waits on it. Returning True keeps the task waiting: the callback took care of
            everything that arrived (so it must read until it is sure nothing is left, or the
            next wake-up may never come); False wakes the task as usual. It runs inside the
            poller's task step, so it must not raise or wait, and should be short.
    """

    __slots__ = ("_closed", "_fd", "_poller", "_ready", "_sock", "_task", "on_ready")

    def __init__(self, poller: ReadPoller | None, sock: socket.socket) -> None:
        self._poller = poller
        self._sock = sock
        self._fd = sock.fileno()
        # Something may have arrived that no task has looked for yet. Starts True: whatever
        # arrived before the registration is found by the first receive.
        self._ready = True
        self._task: trio.lowlevel.Task | None = None
        self._closed = False
        self.on_ready: Callable[[], bool] | None = None

    async def wait_readable(self) -> None:
        """Return once the socket may have something to read (data, end of file, an error).

        Raises:
            trio.BusyResourceError: another task is already waiting on this socket.
            trio.ClosedResourceError: the watch was (or gets) closed.
        """
        poller = self._poller
        if poller is None:
            await trio.lowlevel.wait_readable(self._sock)
            return
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting for this socket")
        if self._closed:
            raise trio.ClosedResourceError("the socket is no longer watched")
        if self._ready:
            self._ready = False
            return
        self._task = trio.lowlevel.current_task()

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        """Stop watching (before the socket is closed); a waiting task gets ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        poller = self._poller
        if poller is None:
            if self._sock.fileno() >= 0:
                trio.lowlevel.notify_closing(self._sock)
            return
        poller._forget(self)
        task, self._task = self._task, None
        if task is not None:
            error = trio.ClosedResourceError("the socket was closed while a task waited on it")
            trio.lowlevel.reschedule(task, outcome.Error(error))

    def _wake(self) -> None:
        task = self._task
        if task is None:
            self._ready = True
            return
        on_ready = self.on_ready
        if on_ready is not None and on_ready():
            return
        self._task = None
        trio.lowlevel.reschedule(task)


class ReadPoller:
    """An epoll set of sockets, each registered once; :meth:`run` wakes their waiting tasks.

    :meth:`run` must be running for as long as any watch is waited on; :meth:`close` releases
    the epoll set once every watch is closed.
    """

    def __init__(self) -> None:
        self._epoll = _EPOLL() if _EPOLL is not None else None
        self._watches: dict[int, Watch] = {}

    def watch(self, sock: socket.socket) -> Watch:
        """Start watching ``sock`` (a connected, non-blocking socket)."""
        if self._epoll is None:
            return Watch(None, sock)
        fd = sock.fileno()
        stale = self._watches.get(fd)
        if stale is not None:
            if stale._sock is sock:
                raise ValueError(f"socket {fd} is already watched")
            # The descriptor was closed without its watch and the kernel reused it (closing
            # it dropped the registration): that watch is over.
            stale.close()
        self._epoll.register(fd, _EVENTS)
        watch = self._watches[fd] = Watch(self, sock)
        return watch

    def __len__(self) -> int:
        return len(self._watches)

    async def run(self) -> NoReturn:
        """Wake the tasks waiting on watched sockets as their sockets become readable."""
        epoll = self._epoll
        if epoll is None:
            await trio.sleep_forever()
        watches = self._watches
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _events in epoll.poll(0, MAX_EVENTS):
                watch = watches.get(fd)
                if watch is not None:
                    watch._wake()

    def close(self) -> None:
        """Release the epoll set (watches still open stop working)."""
        if self._epoll is not None and not self._epoll.closed:
            for watch in list(self._watches.values()):
                watch.close()
            self._epoll.close()

    def _forget(self, watch: Watch) -> None:
        fd = watch._fd
        if self._watches.get(fd) is watch:
            del self._watches[fd]
            if self._epoll is not None and not self._epoll.closed:
                # The socket may be closed already: the kernel then dropped it by itself.
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)


_RUN_POLLER: trio.lowlevel.RunVar[ReadPoller] = trio.lowlevel.RunVar("kai_read_poller")


def watch(sock: socket.socket) -> Watch:
    """Watch ``sock`` with this trio run's poller; close the watch before the socket.

    If the kernel refuses the registration (out of memory, or past ``max_user_watches``),
    the watch waits through trio instead: slower, never wrong.
    """
    try:
        poller = _RUN_POLLER.get()
    except LookupError:
        poller = ReadPoller()
        _RUN_POLLER.set(poller)
        trio.lowlevel.spawn_system_task(_run_poller, poller, name="kai.memcache.netpoll")
    try:
        return poller.watch(sock)
    except OSError as exc:
        logger.warning("epoll refused a socket (%s); it waits through trio instead", exc)
        return Watch(None, sock)


async def _run_poller(poller: ReadPoller) -> None:
    try:
        await poller.run()
    finally:
        poller.close()
