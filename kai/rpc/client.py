"""The trio RPC client: one authenticated, multiplexed connection per peer.

A thin shell around the sans-IO :mod:`kai.core.rpc.auth` and :mod:`kai.core.rpc.protocol`. It must
never send a request before the server has proved it holds the cluster secret, never let a
cancelled caller disturb other callers on the same connection, never choose timeouts for
callers (they wrap calls in :func:`trio.fail_after` / :func:`trio.move_on_after`), and never
run a background task outside a nursery its owner controls.

Lifetime: a client's reader and writer tasks run in a nursery. Either the client owns one
(``async with RpcClient(host, port, secret) as client:``; leaving the block closes the
connection and waits for its tasks), or it is given one
(``RpcClient(host, port, secret, nursery=nursery)``; call :meth:`RpcClient.aclose` when
done, or let the nursery's cancellation end the tasks). :class:`kai.rpc.pool.RpcClientPool`
works the same way and hands its nursery to the clients it creates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import Final, Self

import trio

from kai.core.errors import RpcConnectionError, RpcError, RpcProtocolError
from kai.core.rpc.auth import NONCE_SIZE, ClientHandshake
from kai.core.rpc.protocol import CLOSED, MAX_MSGID, NEED_DATA, Response, RpcConnection
from kai.rpc.sockets import MAX_BACKLOG, SocketIO, from_stream, send_all

logger = logging.getLogger(__name__)

#: Default limit on opening a connection: TCP connect plus authentication, in seconds. It
#: only bounds connection setup (a silent peer would otherwise stall every caller waiting to
#: connect); calls themselves have no timeout but the caller's.
DEFAULT_CONNECT_TIMEOUT: Final = 5.0

_STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Waiter:
    """Where the reader task delivers one call's response (None: the connection was lost)."""

    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Response | None = None

    def deliver(self, response: Response | None) -> None:
        self.response = response
        self.event.set()


class _CallbackWaiter:
    """A call started by :meth:`RpcClient.start_call`: its outcome goes to a callback."""

    __slots__ = ("client", "connection", "msgid", "on_done")

    def __init__(
        self,
        client: RpcClient,
        connection: _Connection,
        msgid: int,
        on_done: Callable[[object, RpcError | None], None],
    ) -> None:
        self.client = client
        self.connection = connection
        self.msgid = msgid
        self.on_done = on_done

    def deliver(self, response: Response | None) -> None:
        if response is None:
            self.on_done(None, self.client._lost(self.connection))
        elif response.error is not None:
            self.on_done(None, RpcError.for_code(*response.error))
        else:
            self.on_done(response.result, None)

    def cancel(self) -> None:
        """Forget the call: a late response is discarded."""
        if self.connection.waiters.get(self.msgid) is self:
            del self.connection.waiters[self.msgid]


class _Connection:
    """One authenticated socket to the peer, with the calls waiting on it."""

    def __init__(self, io: SocketIO, framing: RpcConnection) -> None:
        self.io = io
        self.framing = framing
        self.waiters: dict[int, _Waiter | _CallbackWaiter] = {}
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        self.failure: str | None = None
        self._next_msgid = 0

    def allocate_msgid(self) -> int:
        while True:
            msgid = self._next_msgid
            self._next_msgid = (msgid + 1) & MAX_MSGID
            if msgid not in self.waiters:
                return msgid

    def fail(self, reason: str) -> None:
        """Mark the connection dead: wake every waiting call and stop both tasks."""
        if self.failure is None:
            self.failure = reason
        self.cancel_scope.cancel()
        self.io.close()
        waiters = list(self.waiters.values())
        self.waiters.clear()
        for waiter in waiters:
            waiter.deliver(None)


class NurseryUser:
    """Either borrows a nursery or opens its own as an async context manager."""

    def __init__(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery
        self._exit_stack: contextlib.AsyncExitStack | None = None

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError(
                f"use `async with {type(self).__name__}(...)` or pass nursery= explicitly"
            )
        return self._nursery

    async def aclose(self) -> None:
        """Close connections; overridden."""

    async def __aenter__(self) -> Self:
        if self._nursery is not None:
            return self
        self._exit_stack = contextlib.AsyncExitStack()
        self._nursery = await self._exit_stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            if self._exit_stack is not None:
                # Every background task has been told to stop, so the nursery only waits for
                # them; the body's own exception propagates unwrapped.
                await self._exit_stack.aclose()


class RpcClient(NurseryUser):
    """Calls methods on one peer over a single multiplexed, authenticated connection.

    The connection opens on the first call, and again on the first call after it is lost.
    Any number of tasks may call concurrently; responses are matched by message id, so they
    may complete in any order. A caller that is cancelled simply stops waiting: its request
    may still run on the peer, and its late response is discarded.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        *,
        nursery: trio.Nursery | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        open_socket: Callable[[], Awaitable[socket.socket]] | None = None,
    ) -> None:
        """Create a client; nothing connects until the first call.

        Args:
            host: the peer's RPC address.
            port: the peer's RPC port.
            secret: the cluster secret.
            nursery: where the connection's reader and writer tasks run. If omitted, use the
                client as ``async with RpcClient(...) as client:``.
            connect_timeout: seconds allowed for TCP connect plus authentication.
            open_socket: returns a connected socket instead of a TCP connection to
                ``host``:``port`` (for tests, say a ``socket.socketpair()`` end); it should
                raise ``OSError`` on failure.
        """
        super().__init__(nursery)
        self._open_socket = open_socket or partial(_open_tcp_socket, host, port)
        self.host = host
        self.port = port
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._connect_lock = trio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RpcClient({self.host!r}, {self.port})"

    @property
    def connected(self) -> bool:
        """Whether a live connection is open right now."""
        return self._connection is not None and self._connection.failure is None

    async def call(self, method: str, *params: object) -> object:
        """Call ``method(*params)`` on the peer and return its result.

        Raises:
            RpcConnectionError: the peer could not be reached, or the connection was lost
                before the response arrived (retriable; the call may or may not have run).
            RpcAuthenticationError: the peer does not share the cluster secret.
            RpcProtocolError: the peer does not speak Kai RPC.
            RpcBadRequest: the parameters cannot be encoded, or the peer refused them.
            RpcMethodNotFound, RpcRemoteError, RpcError: as sent back by the peer.
        """
        connection = await self._get_connection()
        msgid = connection.allocate_msgid()
        data = connection.framing.encode_request(msgid, method, params)
        waiter = _Waiter()
        connection.waiters[msgid] = waiter
        try:
            try:
                await connection.io.wait_for_room()
                connection.io.send(data)
            except _STREAM_ERRORS:
                raise self._lost(connection) from None
            await waiter.event.wait()
        finally:
            if connection.waiters.get(msgid) is waiter:
                del connection.waiters[msgid]
        if waiter.response is None:
            raise self._lost(connection)
        return waiter.response.unwrap()

    def start_call(
        self,
        method: str,
        params: tuple[object, ...],
        on_done: Callable[[object, RpcError | None], None],
    ) -> Callable[[], None] | None:
        """Queue ``method(*params)`` without waiting, if the connection is open right now.

        ``on_done(result, None)`` or ``on_done(None, error)`` is called exactly once, from
        the connection's reader task (or whichever task sees the connection fail), unless the
        returned cancel function is called first. ``on_done`` must not block or raise.
        Returns None, having sent nothing, when not connected or the send queue is full: use
        :meth:`call` then (it connects, and waits for room).

        Raises:
            RpcBadRequest: the parameters cannot be encoded.
        """
        connection = self._connection
        if connection is None or connection.failure is not None:
            return None
        if connection.io.backlog > MAX_BACKLOG:
            return None
        msgid = connection.allocate_msgid()
        connection.io.send(connection.framing.encode_request(msgid, method, params))
        waiter = _CallbackWaiter(self, connection, msgid, on_done)
        connection.waiters[msgid] = waiter
        return waiter.cancel

    async def notify(self, method: str, *params: object) -> None:
        """Send a one-way ``method(*params)``; returns once it is queued for sending.

        Raises:
            RpcConnectionError: the peer could not be reached or the connection is lost.
            RpcAuthenticationError, RpcProtocolError, RpcBadRequest: as for :meth:`call`.
        """
        connection = await self._get_connection()
        data = connection.framing.encode_notification(method, params)
        try:
            await connection.io.wait_for_room()
            connection.io.send(data)
        except _STREAM_ERRORS:
            raise self._lost(connection) from None

    async def aclose(self) -> None:
        """Close the connection, failing calls still waiting; later calls raise.

        Waits (shielded from cancellation, which is quick) until the connection's tasks end.
        """
        self._closed = True
        connection = self._connection
        if connection is not None:
            connection.fail("the client was closed")
            with trio.CancelScope(shield=True):
                await connection.finished.wait()

    def _lost(self, connection: _Connection) -> RpcConnectionError:
        return RpcConnectionError(
            f"connection to {self.host}:{self.port} lost: {connection.failure or 'closed'}"
        )

    async def _get_connection(self) -> _Connection:
        connection = self._connection
        if connection is not None and connection.failure is None:
            return connection
        async with self._connect_lock:
            connection = self._connection
            if connection is not None and connection.failure is None:
                return connection
            if self._closed:
                raise RpcConnectionError(f"the client for {self.host}:{self.port} is closed")
            nursery = self._require_nursery()
            io, trailing = await self._open_authenticated_socket()
            framing = RpcConnection()
            if trailing:
                framing.receive_data(trailing)
            connection = _Connection(io, framing)
            try:
                nursery.start_soon(self._run_connection, connection)
            except RuntimeError as exc:  # The nursery is closed to new tasks.
                connection.io.close()
                raise RpcConnectionError(f"cannot run a connection: {exc}") from exc
            self._connection = connection
            return connection

    async def _open_authenticated_socket(self) -> tuple[SocketIO, bytes]:
        address = f"{self.host}:{self.port}"
        try:
            with trio.fail_after(self._connect_timeout):
                io = SocketIO(await self._open_socket())
                try:
                    trailing = await _client_handshake(io, self._secret)
                except BaseException:
                    io.close()
                    raise
        except trio.TooSlowError:
            raise RpcConnectionError(
                f"could not connect to {address} and authenticate within {self._connect_timeout} s"
            ) from None
        except OSError as exc:
            raise RpcConnectionError(f"could not connect to {address}: {exc}") from exc
        except _STREAM_ERRORS as exc:
            raise RpcConnectionError(f"connection to {address} lost during handshake") from exc
        return io, trailing

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            with connection.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_write_loop, connection)
                    await _read_loop(connection)
        finally:
            connection.fail("the connection was closed")
            if self._connection is connection:
                self._connection = None
            connection.finished.set()


async def _open_tcp_socket(host: str, port: int) -> socket.socket:
    return from_stream(await trio.open_tcp_stream(host, port))


async def _client_handshake(io: SocketIO, secret: bytes) -> bytes:
    """Authenticate to the server; returns bytes received after the handshake."""
    handshake = ClientHandshake(secret, os.urandom(NONCE_SIZE))
    while not handshake.authenticated:
        data = await io.receive()
        if not data:
            raise RpcConnectionError("the server closed the connection during the handshake")
        reply = handshake.receive_data(data)
        if reply:
            await send_all(io.sock, reply)
    return handshake.trailing_data()


async def _write_loop(connection: _Connection) -> None:
    try:
        await connection.io.run_writer()
    except _STREAM_ERRORS as exc:
        connection.fail(f"send failed: {exc!r}")


async def _read_loop(connection: _Connection) -> None:
    """Deliver responses to waiting callers until the connection ends."""
    framing = connection.framing
    while True:
        try:
            message = framing.next_message()
        except RpcProtocolError as exc:
            logger.warning("closing RPC connection: %s", exc)
            connection.fail(f"protocol error: {exc}")
            return
        if message is NEED_DATA:
            try:
                data = await connection.io.receive()
            except _STREAM_ERRORS as exc:
                connection.fail(f"receive failed: {exc!r}")
                return
            framing.receive_data(data)
        elif message is CLOSED:
            connection.fail("the server closed the connection")
            return
        elif isinstance(message, Response):
            waiter = connection.waiters.pop(message.msgid, None)
            if waiter is None:
                logger.debug("discarding RPC response %d: its caller gave up", message.msgid)
            else:
                waiter.deliver(message)
        else:
            logger.warning("closing RPC connection: the server sent %r", message)
            connection.fail("the server sent a request; only clients may")
            return
