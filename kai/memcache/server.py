"""The memcached TCP listener: a thin trio loop around the sans-IO parser.

Reads bytes, feeds the parser, executes each request, and writes the replies of a pipelined
batch in one send. Enforces the connection limit, and on shutdown stops accepting, lets every
connection finish the request it is executing, and closes. Never parses or interprets
commands itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from typing import NoReturn

import attrs
import trio

from kai.memcache import protocol as mc
from kai.memcache.commands import CommandExecutor
from kai.stats import NodeStats

logger = logging.getLogger(__name__)

#: Bytes asked for per receive.
RECEIVE_SIZE = 64 * 1024
#: Replies of a pipelined batch are sent once they reach this size, even mid-batch.
SEND_THRESHOLD = 256 * 1024
#: What a client over the connection limit gets before the close (memcached's words).
TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
#: accept() errors that mean "out of descriptors or memory for now": retry after a pause.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_DELAY = 0.1


@attrs.define(eq=False)
class _Connection:
    stream: trio.SocketStream
    closing: bool = False
    receive_scope: trio.CancelScope | None = None

    def should_close(self) -> bool:
        # A method, not the bare flag: shut_down() sets it while this task awaits.
        return self.closing

    def close_when_idle(self) -> None:
        self.closing = True
        if self.receive_scope is not None:
            self.receive_scope.cancel()


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
        self._all_closed.set()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until :meth:`shut_down` (or cancellation).

        ``task_status.started`` receives the listeners, so port 0 can be used.
        """
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
        async with trio.open_nursery() as connections:
            # shut_down() cancels only the accept loops; connections live in the outer nursery.
            with self._accepting:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    task_status.started(listeners)
            for listener in listeners:
                await listener.aclose()
        # Leaving the outer nursery waited for every connection to finish.

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> NoReturn:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                logger.warning("accept failed (%s); retrying in %ss", error, _ACCEPT_RETRY_DELAY)
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            nursery.start_soon(self._handle, stream)

    def shut_down(self) -> None:
        """Stop accepting; each connection closes once its current request is answered."""
        self._accepting.cancel()
        for connection in list(self._connections):
            connection.close_when_idle()

    async def _handle(self, stream: trio.SocketStream) -> None:
        stats = self.stats
        stats.total_connections += 1
        if len(self._connections) >= self.max_connections:
            stats.rejected_connections += 1
            with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(TOO_MANY_CONNECTIONS)
            await trio.aclose_forcefully(stream)
            return
        connection = _Connection(stream)
        self._connections.add(connection)
        stats.curr_connections += 1
        try:
            await self._serve_connection(connection)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to answer
        finally:
            self._connections.discard(connection)
            stats.curr_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, connection: _Connection) -> None:
        stream = connection.stream
        parser = mc.MemcacheParser(max_item_size=self.max_item_size)
        execute = self.executor.execute
        stats = self.stats
        pending: list[bytes] = []
        pending_size = 0
        while True:
            event = parser.next_event()
            if event is mc.NEED_DATA:
                if pending:
                    await self._send(stream, pending)
                    pending, pending_size = [], 0
                if connection.closing:
                    return
                data = b""
                with trio.CancelScope() as connection.receive_scope:
                    data = await stream.receive_some(RECEIVE_SIZE)
                connection.receive_scope = None
                if connection.should_close():
                    return
                stats.bytes_read += len(data)
                parser.receive_data(data)
                continue
            if event is mc.CLOSED or isinstance(event, mc.Quit):
                break
            assert not isinstance(event, type)
            reply = await execute(event)
            if reply:
                pending.append(reply)
                pending_size += len(reply)
                if pending_size >= SEND_THRESHOLD:
                    await self._send(stream, pending)
                    pending, pending_size = [], 0
            if isinstance(event, mc.Invalid) and event.close:
                break
        if pending:
            await self._send(stream, pending)

    async def _send(self, stream: trio.SocketStream, replies: list[bytes]) -> None:
        data = replies[0] if len(replies) == 1 else b"".join(replies)
        self.stats.bytes_written += len(data)
        await stream.send_all(data)
