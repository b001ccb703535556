"""The memcached TCP listener: a thin trio shell around the sans-IO parser and the executor.

Reads bytes, feeds the parser, executes each request, and writes the replies of a pipelined
batch in one send. Enforces the connection limit, and on shutdown stops accepting, lets every
connection finish the requests it has already received, and closes. Never parses or
interprets commands itself.

One path serves every connection, in h11's manner (:mod:`kai.core.pending`):
:meth:`MemcacheServer._serve` receives, parses and executes for as long as nothing has to
wait, and hands back a pending step when something does (a reply that needs other nodes, a
lock, room in a full socket, a turn for other connections). New input on an idle connection
is announced by the listener's :class:`~kai.memcache.netpoll.ReadPoller`, whose task runs
``_serve`` right there: a request whose answer is local (any request on a node of one) costs
no task switch. A pending step is awaited in a task of the listener's own (one per busy
stretch of a connection, not per request), which then goes on with the same ``_serve``. While
that task runs, announcements for its connection are left to it, so requests stay in order.

``_serve`` stops for input after a receive that took less than it asked for: any later input
will be announced. An end of file that arrived with the data will not (a client that sends
its requests and shuts down its side at once, as ``nc -q1`` does): the poller says which
announcements carry one, and such a connection is served on until the end of file is read,
so it gets its replies and a close.

Each connection is its own failure domain: an exception from its request handling, in
whichever task, closes that connection (logged with its traceback) and nothing else.
Sockets are plain non-blocking stdlib sockets: a request whose bytes are already there costs
no trip through the scheduler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Sequence
from functools import partial
from typing import NoReturn

import trio

from kai.core.memcache import protocol
from kai.core.pending import Pending
from kai.core.stats import NodeStats
from kai.memcache.commands import CommandExecutor
from kai.memcache.netpoll import ReadPoller, Watch

logger = logging.getLogger(__name__)

#: Bytes asked for per receive.
RECEIVE_SIZE = 64 * 1024
#: Replies of a pipelined batch are sent once they reach this size, even mid-batch.
SEND_THRESHOLD = 256 * 1024
#: Receives a connection may serve back to back before it lets other connections run.
FAIR_SHARE = 8
#: Pending connections the kernel queues for accept().
BACKLOG = 1024
#: What a client over the connection limit gets before the close (memcached's words).
TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
#: accept() errors that mean "out of descriptors or memory for now": retry after a pause.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_DELAY = 0.1
#: Errors that mean the client went away.
_GONE = (ConnectionError, OSError)


class _Connection:
    """A client connection: its socket, its parser, and the replies not yet sent."""

    __slots__ = (
        "busy",
        "closed",
        "drained",
        "hung_up",
        "parser",
        "replies",
        "replies_size",
        "sock",
        "unsent",
        "watch",
    )

    def __init__(self, sock: socket.socket, parser: protocol.MemcacheParser) -> None:
        self.sock = sock
        self.parser = parser
        self.watch: Watch | None = None
        #: Replies made and not yet sent, and their size.
        self.replies: list[bytes] = []
        self.replies_size = 0
        #: Reply bytes the socket did not take: they go before anything else.
        self.unsent = memoryview(b"")
        #: The last receive took everything the socket had, and no input was announced
        #: since: the next input will be announced, so there is no need to look for it.
        self.drained = False
        #: A task is serving this connection (awaiting a pending step); it serves whatever
        #: input arrives meanwhile.
        self.busy = False
        #: The peer shut down its side or the connection failed (the poller said so): no
        #: input will be announced any more, so serving stops only at the end of file.
        self.hung_up = False
        self.closed = False


async def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets for every address ``host`` resolves to."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            if port == 0:  # every address family must share the port the first one got
                port = sock.getsockname()[1]
                break
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class MemcacheServer:
    """Serves the memcached text protocol to TCP clients.

    Args:
        executor: executes parsed requests.
        stats: connection and byte counters to update.
        max_connections: clients beyond this are told so and disconnected.
        max_item_size: values above this are refused (``SERVER_ERROR object too large``).
    """

    def __init__(
        self,
        executor: CommandExecutor,
        stats: NodeStats,
        *,
        max_connections: int,
        max_item_size: int,
    ) -> None:
        self.executor = executor
        self.stats = stats
        self.max_connections = max_connections
        self.max_item_size = max_item_size
        self._connections: set[_Connection] = set()
        self._accepting = trio.CancelScope()
        self._all_closed = trio.Event()
        self._poller: ReadPoller | None = None
        self._tasks: trio.Nursery | None = None

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until :meth:`shut_down` has let every connection
        finish (or until cancelled, which closes every connection at once).

        ``task_status.started`` receives the bound addresses, so port 0 can be used.
        """
        listeners = await bind_listeners(host, port)
        try:
            self._poller = ReadPoller()
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._poller.run)
                # shut_down() cancels only the accept loops; connections end by themselves.
                with self._accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener)
                        task_status.started([sock.getsockname()[:2] for sock in listeners])
                _close_all(listeners)
                if self._connections:
                    await self._all_closed.wait()
                tasks.cancel_scope.cancel()
        finally:
            _close_all(listeners)
            for connection in list(self._connections):
                self._close(connection)

    def shut_down(self) -> None:
        """Stop accepting; each connection closes once its received requests are answered.

        Shutting down a connection's read side makes it see end of file, after the input it
        already has.
        """
        self._accepting.cancel()
        for connection in self._connections:
            with contextlib.suppress(OSError):  # already disconnected
                connection.sock.shutdown(socket.SHUT_RD)

    async def _accept_loop(self, listener: socket.socket) -> NoReturn:
        while True:
            try:
                sock, _address = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as error:
                if error.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                logger.warning("accept failed (%s); retrying in %ss", error, _ACCEPT_RETRY_DELAY)
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            self._open(sock)

    def _open(self, sock: socket.socket) -> None:
        """Start serving a new client, or turn it away."""
        stats = self.stats
        stats.total_connections += 1
        if len(self._connections) >= self.max_connections:
            stats.rejected_connections += 1
            with contextlib.suppress(OSError):  # a fresh socket's buffer takes it whole
                sock.send(TOO_MANY_CONNECTIONS)
            sock.close()
            return
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(sock, protocol.MemcacheParser(max_item_size=self.max_item_size))
        assert self._poller is not None
        try:
            # Input that is already there is announced at once.
            connection.watch = self._poller.watch(
                sock, partial(self._on_readable, connection), partial(self._on_hang_up, connection)
            )
        except OSError as error:
            stats.rejected_connections += 1
            logger.warning("cannot watch a new connection (%s); closing it", error)
            sock.close()
            return
        self._connections.add(connection)
        stats.curr_connections += 1

    # --- serving ------------------------------------------------------------------------------

    def _on_readable(self, connection: _Connection) -> None:
        """New input on ``connection`` (the poller's callback)."""
        if connection.busy:
            connection.drained = False  # its task must look for this input
            return
        try:
            step = self._serve(connection)
        except Exception as error:  # noqa: BLE001 - this connection's failure only
            self._fail(connection, error)
            return
        if step is not None:
            self._go_on(connection, step)

    def _on_hang_up(self, connection: _Connection) -> None:
        """The peer shut down its side or the connection failed, maybe with new input (the
        poller's callback in place of :meth:`_on_readable`): serve until the end of file."""
        connection.hung_up = True
        if connection.busy:
            connection.drained = False  # its task must look, and reads on to the end
            return
        step = self._serve_guarded(connection)
        if step is not None:
            self._go_on(connection, step)

    def _go_on(self, connection: _Connection, step: Pending[None]) -> None:
        """Have a task await ``step`` and serve on."""
        assert self._tasks is not None
        connection.busy = True
        try:
            self._tasks.start_soon(self._serve_in_task, connection, step)
        except RuntimeError:  # the listener is shutting down
            step.close()
            self._close(connection)

    async def _serve_in_task(self, connection: _Connection, step: Pending[None]) -> None:
        """Await pending steps and serve on, until the connection waits for input again."""
        next_step: Pending[None] | None = step
        try:
            while next_step is not None:
                try:
                    await next_step
                except Exception as error:  # noqa: BLE001 - this connection's failure only
                    self._fail(connection, error)
                    return
                next_step = self._serve_guarded(connection)
        except BaseException:
            self._close(connection)  # cancelled: the listener is going away
            raise
        finally:
            connection.busy = False

    def _serve_guarded(self, connection: _Connection) -> Pending[None] | None:
        """:meth:`_serve`, and again for as long as it stops for input that a hung-up
        connection will never announce."""
        try:
            step = self._serve(connection)
            # Each pass receives at least once, and a hung-up socket ends in end of file or
            # an error, which close the connection (or hand back the step that will).
            while step is None and connection.hung_up and not connection.closed:
                connection.drained = False
                step = self._serve(connection)
            return step
        except Exception as error:  # noqa: BLE001 - this connection's failure only
            self._fail(connection, error)
            return None

    def _serve(self, connection: _Connection) -> Pending[None] | None:
        """Serve ``connection`` for as long as nothing has to wait.

        Returns None when it waits for input (the poller announces it) or has closed, and a
        pending step when something has to wait first; once that step is awaited, serving
        goes on with another call.
        """
        parser = connection.parser
        execute = self.executor.execute
        receives = 0
        # An empty buffer holds no request: receive first (end of file is fed to the parser
        # and asked about at once, so it is never missed).
        event = parser.next_event() if parser.buffered else protocol.NEED_DATA
        while True:
            if event is protocol.NEED_DATA:
                if connection.replies:
                    if not self._send(connection):
                        return Pending(self._drain(connection))
                    if connection.drained and not parser.buffered:
                        # A client that waited for these replies has sent nothing more yet:
                        # its next request will be announced.
                        return None
                receives += 1
                if receives > FAIR_SHARE:
                    return Pending(_take_turn())  # let other connections run
                try:
                    data = connection.sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    connection.drained = True
                    # A hung-up socket says end of file, never this; should it all the same,
                    # waiting for an announcement beats spinning in _serve_guarded.
                    connection.hung_up = False
                    return None
                connection.drained = len(data) < RECEIVE_SIZE
                self.stats.bytes_read += len(data)
                parser.receive_data(data)
                event = parser.next_event()
                continue
            if event is protocol.CLOSED or type(event) is protocol.Quit:
                return self._end(connection)
            reply = execute(event)  # type: ignore[arg-type]  # the sentinels are handled above
            if isinstance(reply, Pending):
                return Pending(self._reply_when_ready(connection, reply))
            if reply:
                connection.replies.append(reply)
                connection.replies_size += len(reply)
                if connection.replies_size >= SEND_THRESHOLD and not self._send(connection):
                    return Pending(self._drain(connection))
            if type(event) is protocol.Invalid and event.close:
                return self._end(connection)
            event = parser.next_event() if parser.buffered else protocol.NEED_DATA

    async def _reply_when_ready(self, connection: _Connection, reply: Pending[bytes]) -> None:
        data = await reply
        if data:
            connection.replies.append(data)
            connection.replies_size += len(data)

    def _end(self, connection: _Connection) -> Pending[None] | None:
        """Send what is left and close."""
        if connection.replies and not self._send(connection):
            return Pending(self._drain_and_close(connection))
        self._close(connection)
        return None

    # --- sending and closing ------------------------------------------------------------------

    def _send(self, connection: _Connection) -> bool:
        """Send the replies made so far; False if the socket did not take them all."""
        replies = connection.replies
        data = replies[0] if len(replies) == 1 else b"".join(replies)
        connection.replies = []
        connection.replies_size = 0
        self.stats.bytes_written += len(data)
        assert not connection.unsent  # a failed send is always drained before the next
        try:
            sent = connection.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return True
        connection.unsent = memoryview(data)[sent:]
        return False

    async def _drain(self, connection: _Connection) -> None:
        """Wait until the socket has taken every unsent byte."""
        sock = connection.sock
        while connection.unsent:
            await trio.lowlevel.wait_writable(sock)
            try:
                sent = sock.send(connection.unsent)
            except BlockingIOError:
                continue
            connection.unsent = connection.unsent[sent:]

    async def _drain_and_close(self, connection: _Connection) -> None:
        await self._drain(connection)
        self._close(connection)

    def _fail(self, connection: _Connection, error: Exception) -> None:
        if isinstance(error, _GONE):
            logger.debug("memcached client went away: %s", error)
        else:
            logger.error("closing a memcached connection: serving it failed", exc_info=error)
        self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        if connection.watch is not None:
            connection.watch.close()
        with contextlib.suppress(OSError):
            connection.sock.close()
        self._connections.discard(connection)
        self.stats.curr_connections -= 1
        if not self._connections and self._accepting.cancel_called:
            self._all_closed.set()


async def _take_turn() -> None:
    await trio.lowlevel.checkpoint()


def _close_all(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
