"""The memcached TCP listener: a thin trio loop around the sans-IO parser.

Reads bytes, feeds the parser, executes each request, and writes the replies of a pipelined
batch in one send. Enforces the connection limit, and on shutdown stops accepting, lets every
connection finish the requests it has already received, and closes. Never parses or
interprets commands itself.

Sockets are plain non-blocking stdlib sockets: a request whose bytes are already there costs
no trip through the scheduler (trio's stream wrappers take several per request, a large share
of the per-request cost here). Connections wait for input through one edge-triggered
:class:`~kai.memcache.netpoll.Watch` (registered once per connection instead of once per wait)
and for room to send with ``trio.lowlevel.wait_writable``. Fairness is kept explicitly: a
connection that always has more input yields after :data:`FAIR_SHARE` batches.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from typing import NoReturn, TypeAlias

import attrs
import trio

from kai.core.memcache import protocol as mc
from kai.core.stats import NodeStats
from kai.memcache.commands import CommandExecutor
from kai.memcache.netpoll import Watch, watch

logger = logging.getLogger(__name__)

#: Bytes asked for per receive.
RECEIVE_SIZE = 64 * 1024
#: Replies of a pipelined batch are sent once they reach this size, even mid-batch.
SEND_THRESHOLD = 256 * 1024
#: Batches a connection may serve back to back before letting other tasks run.
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


#: A request (or the parser's ``CLOSED``) left for a connection's task to take up, or None.
Deferred: TypeAlias = mc.Request | mc.Invalid | type | None


@attrs.define(eq=False)
class _Connection:
    """A client connection: its socket and parser, and what the poller's step (see
    :meth:`MemcacheServer._serve_at_once`) leaves for the connection's task."""

    sock: socket.socket
    watch: Watch
    parser: mc.MemcacheParser
    closing: bool = False
    #: A parsed request that could not be answered at once: the task executes it first.
    deferred: Deferred = None
    #: Reply bytes the socket did not take at once: the task sends them before anything else.
    unsent: bytes = b""
    #: The last receive filled its buffer, so more may be waiting in the socket.
    unread: bool = False
    #: What the poller's step raised: the task raises it.
    error: Exception | None = None

    def take_up(self) -> tuple[bytes, Deferred]:
        """What the poller's step left for the task (unsent reply bytes, a request to execute
        before any other), cleared; raises what the step raised."""
        if self.error is not None:
            raise self.error
        unsent, self.unsent = self.unsent, b""
        deferred, self.deferred = self.deferred, None
        return unsent, deferred

    def close_when_idle(self) -> None:
        """Make the connection end after the requests it already received.

        Shutting down the read side wakes a connection waiting for input with an end of
        file; a busy one sees it once it has answered everything it read.
        """
        self.closing = True
        with contextlib.suppress(OSError):  # already disconnected
            self.sock.shutdown(socket.SHUT_RD)


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

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until :meth:`shut_down` (or cancellation).

        ``task_status.started`` receives the bound addresses, so port 0 can be used.
        """
        listeners = await bind_listeners(host, port)
        try:
            async with trio.open_nursery() as connections:
                # shut_down() cancels only the accept loops; connections live in the outer
                # nursery, which waits for each of them to finish.
                with self._accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener, connections)
                        task_status.started([sock.getsockname()[:2] for sock in listeners])
                for listener in listeners:
                    listener.close()
        finally:
            for listener in listeners:
                listener.close()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> NoReturn:
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
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(self._handle, sock)

    def shut_down(self) -> None:
        """Stop accepting; each connection closes once its received requests are answered."""
        self._accepting.cancel()
        for connection in list(self._connections):
            connection.close_when_idle()

    async def _handle(self, sock: socket.socket) -> None:
        stats = self.stats
        stats.total_connections += 1
        try:
            if len(self._connections) >= self.max_connections:
                stats.rejected_connections += 1
                with contextlib.suppress(OSError):  # a fresh socket's buffer takes it whole
                    sock.send(TOO_MANY_CONNECTIONS)
                return
            parser = mc.MemcacheParser(max_item_size=self.max_item_size)
            connection = _Connection(sock, watch(sock), parser)
            connection.watch.on_ready = lambda: self._serve_at_once(connection)
            self._connections.add(connection)
            stats.curr_connections += 1
            try:
                await self._serve_connection(connection)
            except _GONE:
                pass  # the client went away; nothing to answer
            finally:
                connection.watch.close()
                self._connections.discard(connection)
                stats.curr_connections -= 1
        finally:
            sock.close()

    async def _serve_connection(self, connection: _Connection) -> None:
        """Serve one connection until it ends.

        While this task waits for input, the poller serves what arrives by itself as long as
        every request can be answered at once (:meth:`_serve_at_once`); it wakes this task for
        anything else, leaving it in ``connection``. So after every wait the task first takes
        up what the poller left (:meth:`_Connection.take_up`): an error, unsent replies, a
        request to execute.
        """
        sock = connection.sock
        wait_readable = connection.watch.wait_readable
        parser = connection.parser
        execute = self.executor.execute
        stats = self.stats
        pending: list[bytes] = []
        pending_size = 0
        batches = 0
        deferred: Deferred = None
        while True:
            if deferred is None:
                event = parser.next_event()
            else:
                event, deferred = deferred, None
            if event is mc.NEED_DATA:
                # A client that waited for the replies sent now has sent nothing more yet:
                # wait for it rather than paying for a receive that would find nothing.
                idle = False
                if pending:
                    await self._send(sock, pending)
                    pending, pending_size = [], 0
                    idle = not parser.buffered and not connection.unread
                if not idle:
                    batches += 1
                    if batches >= FAIR_SHARE:
                        batches = 0
                        await trio.lowlevel.checkpoint()
                    try:
                        data = sock.recv(RECEIVE_SIZE)
                    except BlockingIOError:
                        pass
                    else:
                        connection.unread = False
                        stats.bytes_read += len(data)
                        parser.receive_data(data)
                        continue
                batches = 0
                connection.unread = False
                await wait_readable()
                unsent, deferred = connection.take_up()
                if unsent:
                    pending.append(unsent)
                    pending_size += len(unsent)
                continue
            if event is mc.CLOSED or isinstance(event, mc.Quit):
                break
            assert not isinstance(event, type)
            reply = await execute(event)
            if reply:
                pending.append(reply)
                pending_size += len(reply)
                if pending_size >= SEND_THRESHOLD:
                    await self._send(sock, pending)
                    pending, pending_size = [], 0
            if isinstance(event, mc.Invalid) and event.close:
                break
        if pending:
            await self._send(sock, pending)

    def _serve_at_once(self, connection: _Connection) -> bool:
        """Serve what arrived on an idle connection inside the poller's step, without waking
        its task; True if everything was served (see :attr:`Watch.on_ready`).

        One receive, then every complete request in the parser while each can be answered at
        once (:meth:`CommandExecutor.execute_now`) and the replies stay under
        ``SEND_THRESHOLD``, then one send of the replies. Anything else goes to the task
        through ``connection``: the first request that must wait (and so everything after it),
        requests past the threshold (left in the parser), end of file (in the parser), replies
        the socket did not take, an error, or a full receive buffer (more may be waiting).
        """
        try:
            sock = connection.sock
            parser = connection.parser
            data = sock.recv(RECEIVE_SIZE)
            parser.receive_data(data)
            if not data:
                return False
            self.stats.bytes_read += len(data)
            execute_now = self.executor.execute_now
            replies: list[bytes] = []
            size = 0
            served = True
            while True:
                event = parser.next_event()
                if event is mc.NEED_DATA:
                    break
                reply = None if isinstance(event, type) else execute_now(event)
                if reply is None:
                    connection.deferred = event
                    served = False
                    break
                if reply:
                    replies.append(reply)
                    size += len(reply)
                    if size >= SEND_THRESHOLD:
                        served = False  # the task serves the rest, a batch at a time
                        break
            if replies:
                data_out = replies[0] if len(replies) == 1 else b"".join(replies)
                try:
                    sent = sock.send(data_out)
                except BlockingIOError:
                    sent = 0
                self.stats.bytes_written += sent  # the task counts the rest when it sends it
                if sent < len(data_out):
                    connection.unsent = data_out[sent:]
                    served = False
            if len(data) == RECEIVE_SIZE:
                connection.unread = True
                served = False
            return served
        except BlockingIOError:
            return True  # woken for nothing: whatever came was read before
        except Exception as error:  # noqa: BLE001 - the task raises it as its own
            connection.error = error
            return False

    async def _send(self, sock: socket.socket, replies: list[bytes]) -> None:
        data = replies[0] if len(replies) == 1 else b"".join(replies)
        self.stats.bytes_written += len(data)
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            view = view[sent:]
