"""Non-blocking sockets for the RPC client and server, driven straight by trio's I/O waits.

trio's stream wrappers take several trips through the scheduler per receive and per send;
here a receive whose bytes are already there is one ``recv`` call, and sends queued by any
number of tasks during one scheduler pass go out in a single ``send`` from a writer task.
The memcached listener does the same (:mod:`kai.memcache.server`).

:class:`SocketIO` must never interleave the bytes of two messages, never hold more than
:data:`MAX_BACKLOG` queued bytes without telling writers to wait, and never let a reader
that always finds data starve other tasks (it yields after :data:`FAIR_SHARE` receives).
Errors surface as trio's ``BrokenResourceError`` (the connection failed) and
``ClosedResourceError`` (it was closed here).
"""

from __future__ import annotations

import socket
from typing import Final

import trio

#: Most bytes asked of the socket per receive.
RECEIVE_SIZE: Final = 64 * 1024
#: Queued bytes beyond which writers wait (:meth:`SocketIO.wait_for_room`); the RPC client
#: holds calls back instead of queueing more.
MAX_BACKLOG: Final = 4 * 1024 * 1024
#: Receives that find data at once before the reader lets other tasks run.
FAIR_SHARE: Final = 8


class Wakeup:
    """Lets one task sleep until another task wakes it: a ParkingLot for a single waiter.

    trio advises :class:`trio.lowlevel.ParkingLot` over ``wait_task_rescheduled``; this is
    the one place Kai uses the latter, because its waits come once per RPC call (a writer
    waiting for bytes to send, a fan-out waiting for an answer), where a ParkingLot's
    bookkeeping for many waiters costs measurably more.
    """

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        """Sleep until :meth:`wake` is called (or the task is cancelled).

        Raises:
            RuntimeError: another task is already waiting.
        """
        if self._task is not None:
            raise RuntimeError("another task is already waiting")
        self._task = trio.lowlevel.current_task()

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        """Wake the waiting task, if there is one."""
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


def from_stream(stream: trio.abc.Stream) -> socket.socket:
    """Take the socket out of a connected :class:`trio.SocketStream` (which no longer owns it)."""
    if not isinstance(stream, trio.SocketStream):
        raise TypeError(f"RPC runs on TCP sockets, not on {type(stream).__name__}")
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock


class SocketIO:
    """One connected non-blocking socket: a reader, a write queue and its writer task.

    One task receives (:meth:`receive`); any task may queue bytes (:meth:`send`), and the
    task running :meth:`run_writer` sends them, several messages per system call.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._queue: list[bytes] = []
        self._queued = 0
        self._writer_idle = Wakeup()
        self._room: trio.Event | None = None
        self._finishing = False
        self._sending = False
        self._closed = False
        self._streak = 0

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        return self._queued

    async def receive(self) -> bytes:
        """The next bytes from the peer; ``b""`` once it has closed its side."""
        self._streak += 1
        if self._streak >= FAIR_SHARE:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return self.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._broken(exc) from exc
            self._streak = 0
            await trio.lowlevel.wait_readable(self.sock)

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the writer task; never blocks (see :meth:`wait_for_room`)."""
        if self._closed:
            raise trio.ClosedResourceError("the RPC socket is closed")
        self._queue.append(data)
        self._queued += len(data)
        self._writer_idle.wake()

    def send_now(self, data: bytes) -> None:
        """Send ``data`` from this task if nothing is queued, else queue it; never blocks.

        For a task that has already gathered a batch (the server's reader): it saves waking
        the writer task. What the kernel does not take at once is left to the writer.
        """
        if self._queue or self._sending:
            self.send(data)
            return
        if self._closed:
            raise trio.ClosedResourceError("the RPC socket is closed")
        sent = _send_some(self.sock, data)
        if sent < len(data):
            self.send(data[sent:])

    async def wait_for_room(self) -> None:
        """Wait while more than :data:`MAX_BACKLOG` bytes are queued."""
        while self._queued > MAX_BACKLOG and not self._closed:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
        if self._closed:
            raise trio.ClosedResourceError("the RPC socket is closed")

    def finish(self) -> None:
        """Let :meth:`run_writer` return once everything queued is sent."""
        self._finishing = True
        self._writer_idle.wake()

    async def run_writer(self) -> None:
        """Send queued bytes until :meth:`finish` is called and the queue is empty."""
        while True:
            if not self._queue:
                if self._finishing:
                    return
                await self._writer_idle.wait()
                continue
            queue, self._queue = self._queue, []
            data = queue[0] if len(queue) == 1 else b"".join(queue)
            self._sending = True
            try:
                await send_all(self.sock, data)
            finally:
                self._sending = False
            self._queued -= len(data)
            if self._room is not None and self._queued <= MAX_BACKLOG:
                self._room.set()
                self._room = None

    def close(self) -> None:
        """Close the socket, waking any task waiting on it with ``ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        if self._room is not None:
            self._room.set()
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    def _broken(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._closed:
            return trio.ClosedResourceError("the RPC socket is closed")
        return trio.BrokenResourceError(f"RPC socket failed: {exc}")


def _send_some(sock: socket.socket, data: bytes | memoryview) -> int:
    """Bytes of ``data`` the kernel takes right now (0 when the socket is full)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"RPC socket failed: {exc}") from exc


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` whole on a non-blocking socket, waiting for room as needed."""
    sent = _send_some(sock, data)
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while True:
        await trio.lowlevel.wait_writable(sock)
        view = view[_send_some(sock, view) :]
        if not view:
            return
