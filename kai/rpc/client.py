"""The trio RPC client: one authenticated, multiplexed connection per peer.

A thin shell around the sans-IO :mod:`kai.core.rpc.auth` and :mod:`kai.core.rpc.protocol`. It must
never send a request before the server has proved it holds the cluster secret, never let a
cancelled caller disturb other callers on the same connection, never choose timeouts for
callers (they wrap calls in :func:`trio.fail_after` / :func:`trio.move_on_after`), and never
run a background task outside a nursery its owner controls.

Every call takes one path, :meth:`RpcClient.start_call`: it sends the request (or holds it
until the connection is authenticated, or has room in its send queue) and the connection's
reader task hands the response to the call's ``on_done`` callback, so a call costs no task
of its own. :meth:`RpcClient.call` is that, awaited (:func:`wait_for_call`).

Lifetime: a client's connection tasks (connect and authenticate, then read, write, and send
held calls) run in a nursery. Either the client owns one
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
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import Final, Self, TypeAlias

import trio

from kai.core.errors import RpcConnectionError, RpcError, RpcProtocolError
from kai.core.rpc.auth import NONCE_SIZE, ClientHandshake
from kai.core.rpc.protocol import CLOSED, MAX_MSGID, NEED_DATA, Response, RpcConnection
from kai.rpc.sockets import MAX_BACKLOG, SocketIO, Wakeup, from_stream, send_all

logger = logging.getLogger(__name__)

#: Default limit on opening a connection: TCP connect plus authentication, in seconds. It
#: only bounds connection setup (a silent peer would otherwise hold every call waiting to be
#: sent); calls themselves have no timeout but the caller's.
DEFAULT_CONNECT_TIMEOUT: Final = 5.0

#: Told how a started call ended: ``(result, None)`` or ``(None, error)``.
OnDone: TypeAlias = Callable[[object, RpcError | None], None]
#: Forgets a started call: it is not sent if it has not been yet, its response is dropped if
#: it comes, and ``on_done`` is not called.
CancelCall: TypeAlias = Callable[[], None]

_STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


async def wait_for_call(start_call: Callable[[OnDone], CancelCall]) -> object:
    """Start a call with ``start_call(on_done)`` and wait for its outcome.

    Returns the result or raises the call's :class:`~kai.core.errors.RpcError`; an error
    ``start_call`` raises propagates as it is. If the waiting task is cancelled, the call is
    cancelled too.
    """
    outcome = _Outcome()
    cancel = start_call(outcome.deliver)
    try:
        await outcome.done.wait()
    except BaseException:
        cancel()
        raise
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


class _Outcome:
    """Where a started call's outcome waits for the task that awaits it."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: object = None
        self.error: RpcError | None = None

    def deliver(self, result: object, error: RpcError | None) -> None:
        self.result, self.error = result, error
        self.done.set()


class _Call:
    """One call on a connection, from :meth:`RpcClient.start_call` until its outcome."""

    __slots__ = ("connection", "msgid", "on_done", "request")

    def __init__(self, connection: _Connection, msgid: int, on_done: OnDone) -> None:
        self.connection = connection
        self.msgid = msgid
        self.on_done = on_done
        #: The encoded request while it is held back (see :attr:`_Connection.held`).
        self.request: bytes | None = None

    def receive(self, response: Response) -> None:
        if response.error is not None:
            self.on_done(None, RpcError.for_code(*response.error))
        else:
            self.on_done(response.result, None)

    def cancel(self) -> None:
        """Forget the call: a held request is never sent, a late response is discarded."""
        self.request = None
        calls = self.connection.calls
        if calls.get(self.msgid) is self:
            del calls[self.msgid]


class _Connection:
    """One connection to the peer, from the first call that needs it until it fails.

    Calls are registered at once; their requests go straight to the socket's send queue,
    or wait in :attr:`held` while the connection is still being opened and authenticated,
    or while the send queue is over :data:`~kai.rpc.sockets.MAX_BACKLOG` (the peer is not
    reading). A held call that is cancelled is never sent, so a call that times out while
    held costs nothing on the wire, and what is held is bounded by the callers' deadlines.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        #: The authenticated socket; None while connecting.
        self.io: SocketIO | None = None
        self.framing = RpcConnection()
        self.calls: dict[int, _Call] = {}
        self.held: deque[_Call] = deque()
        self.something_held = Wakeup()
        #: Set once the connection is authenticated, or has failed.
        self.settled = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        self.error: RpcError | None = None
        self._next_msgid = 0

    def allocate_msgid(self) -> int:
        while True:
            msgid = self._next_msgid
            self._next_msgid = (msgid + 1) & MAX_MSGID
            if msgid not in self.calls:
                return msgid

    def send(self, call: _Call, request: bytes) -> None:
        """Send ``call``'s request now, or hold it (in order) until it can be sent."""
        io = self.io
        if io is None or self.held or io.backlog > MAX_BACKLOG:
            call.request = request
            self.held.append(call)
            self.something_held.wake()
        else:
            io.send(request)

    def send_held(self) -> None:
        """Send held requests, oldest first, while the send queue has room."""
        io = self.io
        assert io is not None
        held = self.held
        while held and io.backlog <= MAX_BACKLOG:
            call = held.popleft()
            if call.request is not None:  # not cancelled
                io.send(call.request)
                call.request = None

    def opened(self, io: SocketIO, trailing: bytes) -> None:
        """The connection is authenticated: send what was held."""
        self.io = io
        if trailing:
            self.framing.receive_data(trailing)
        self.settled.set()
        self.send_held()

    def lost(self, reason: str) -> RpcConnectionError:
        return RpcConnectionError(f"connection to {self.address} lost: {reason}")

    def fail(self, error: RpcError) -> None:
        """Mark the connection dead: fail every call on it and stop its tasks."""
        if self.error is None:
            self.error = error
        self.settled.set()
        self.cancel_scope.cancel()
        if self.io is not None:
            self.io.close()
        self.held.clear()
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.on_done(None, _fresh(self.error))


def _fresh(error: RpcError) -> RpcError:
    """A copy of ``error`` for one more caller (an exception must not be raised twice)."""
    copy = type(error)(*error.args)
    copy.__cause__ = error.__cause__
    return copy


class NurseryOwner:
    """Runs its tasks in a nursery it is given, or else in its own, as an async context manager."""

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


class RpcClient(NurseryOwner):
    """Calls methods on one peer over a single multiplexed, authenticated connection.

    The connection opens on the first call, and again on the first call after it is lost.
    Any number of calls may be in flight; responses are matched by message id, so they may
    complete in any order. A call that is cancelled simply stops waiting: its request may
    still run on the peer, and its late response is discarded.
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
            nursery: where the connection's tasks run. If omitted, use the client as
                ``async with RpcClient(...) as client:``.
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
        self._closed = False

    def __repr__(self) -> str:
        return f"RpcClient({self.host!r}, {self.port})"

    @property
    def connected(self) -> bool:
        """Whether an authenticated connection is open right now."""
        connection = self._connection
        return connection is not None and connection.error is None and connection.io is not None

    async def call(self, method: str, *params: object) -> object:
        """Call ``method(*params)`` on the peer and return its result.

        Raises:
            RpcConnectionError: the peer could not be reached, or the connection was lost
                before the response arrived (the call may or may not have run).
            RpcAuthenticationError: the peer does not share the cluster secret.
            RpcProtocolError: the peer does not speak Kai RPC.
            RpcBadRequest: the parameters cannot be encoded, or the peer refused them.
            RpcMethodNotFound, RpcRemoteError, RpcError: as sent back by the peer.
        """
        return await wait_for_call(partial(self.start_call, method, params))

    def start_call(self, method: str, params: tuple[object, ...], on_done: OnDone) -> CancelCall:
        """Send ``method(*params)`` without waiting for the response; returns its cancel.

        ``on_done(result, None)`` or ``on_done(None, error)`` is called exactly once, later
        (never before this returns), from the task that sees the outcome (the connection's
        reader, or whichever task sees the connection fail), unless the returned function
        cancels the call first. ``on_done`` must not block or raise. Errors are those of
        :meth:`call`. Without a connection, this one opens it (in the client's nursery)
        and the request is sent once it is authenticated; while the peer is not reading and
        the send queue is full, it waits its turn (see :class:`_Connection`).

        Raises:
            RpcBadRequest: the parameters cannot be encoded (``on_done`` is not called).
            RpcConnectionError: the client is closed, or its nursery is.
            RuntimeError: the client has no nursery (see :class:`RpcClient`).
        """
        connection = self._connection
        if connection is None or connection.error is not None:
            connection = self._connect()
        msgid = connection.allocate_msgid()
        request = connection.framing.encode_request(msgid, method, params)
        call = _Call(connection, msgid, on_done)
        connection.calls[msgid] = call
        connection.send(call, request)
        return call.cancel

    async def notify(self, method: str, *params: object) -> None:
        """Send a one-way ``method(*params)``; returns once it is queued for sending.

        Raises:
            RpcConnectionError: the peer could not be reached or the connection is lost.
            RpcAuthenticationError, RpcProtocolError, RpcBadRequest: as for :meth:`call`.
        """
        connection = self._connection
        if connection is None or connection.error is not None:
            connection = self._connect()
        data = connection.framing.encode_notification(method, params)
        await connection.settled.wait()
        if connection.error is None:
            io = connection.io
            assert io is not None
            try:
                await io.wait_for_room()
                io.send(data)
                return
            except _STREAM_ERRORS:
                pass  # the connection failed meanwhile (only its failure closes the socket)
        assert connection.error is not None
        raise _fresh(connection.error)

    async def aclose(self) -> None:
        """Close the connection, failing calls still waiting; later calls raise.

        Waits (shielded from cancellation, which is quick) until the connection's tasks end.
        """
        self._closed = True
        connection = self._connection
        if connection is not None:
            connection.fail(connection.lost("the client was closed"))
            with trio.CancelScope(shield=True):
                await connection.finished.wait()

    def _connect(self) -> _Connection:
        """A new connection, opening in the background; calls can be started on it at once."""
        address = f"{self.host}:{self.port}"
        if self._closed:
            raise RpcConnectionError(f"the client for {address} is closed")
        nursery = self._require_nursery()
        connection = _Connection(address)
        try:
            nursery.start_soon(self._run_connection, connection)
        except RuntimeError as exc:  # The nursery is closed to new tasks.
            raise RpcConnectionError(f"cannot run a connection to {address}: {exc}") from exc
        self._connection = connection
        return connection

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            with connection.cancel_scope:
                try:
                    io, trailing = await self._open_authenticated_socket(connection.address)
                except RpcError as exc:
                    connection.fail(exc)
                    return
                connection.opened(io, trailing)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_write_loop, connection)
                    nursery.start_soon(_send_held_loop, connection)
                    await _read_loop(connection)
        finally:
            connection.fail(connection.lost("the connection was closed"))
            if self._connection is connection:
                self._connection = None
            connection.finished.set()

    async def _open_authenticated_socket(self, address: str) -> tuple[SocketIO, bytes]:
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
    assert connection.io is not None
    try:
        await connection.io.run_writer()
    except _STREAM_ERRORS as exc:
        connection.fail(connection.lost(f"send failed: {exc!r}"))


async def _send_held_loop(connection: _Connection) -> None:
    """Send the calls held back while the send queue was full, as it drains."""
    io = connection.io
    assert io is not None
    try:
        while True:
            if not connection.held:
                await connection.something_held.wait()
            await io.wait_for_room()
            connection.send_held()
    except _STREAM_ERRORS:
        return  # the connection failed; whoever closed the socket failed its calls


async def _read_loop(connection: _Connection) -> None:
    """Deliver responses to their calls until the connection ends."""
    io = connection.io
    assert io is not None
    framing = connection.framing
    calls = connection.calls
    while True:
        try:
            message = framing.next_message()
        except RpcProtocolError as exc:
            logger.warning("closing RPC connection: %s", exc)
            connection.fail(connection.lost(f"protocol error: {exc}"))
            return
        if message is NEED_DATA:
            try:
                data = await io.receive()
            except _STREAM_ERRORS as exc:
                connection.fail(connection.lost(f"receive failed: {exc!r}"))
                return
            framing.receive_data(data)
        elif message is CLOSED:
            connection.fail(connection.lost("the server closed the connection"))
            return
        elif isinstance(message, Response):
            call = calls.pop(message.msgid, None)
            if call is None:
                logger.debug("discarding RPC response %d: its caller gave up", message.msgid)
            else:
                call.receive(message)
        else:
            logger.warning("closing RPC connection: the server sent %r", message)
            connection.fail(connection.lost("the server sent a request; only clients may"))
            return
