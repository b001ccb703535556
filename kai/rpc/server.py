"""The trio RPC server: authenticate each connection, then dispatch requests to handlers.

A thin shell around the sans-IO :mod:`kai.core.rpc.auth` and :mod:`kai.core.rpc.protocol`. It must
never run a handler for a peer that has not proved it holds the cluster secret, never let one
connection's bad input or failing handler disturb another connection, and never leave a
task running after :func:`serve_rpc` returns (it follows :func:`trio.serve_listeners`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Final, NoReturn, TypeAlias, TypeVar

import attrs
import trio

from kai.core.errors import (
    RpcAuthenticationError,
    RpcError,
    RpcMethodNotFound,
    RpcProtocolError,
    RpcRemoteError,
)
from kai.core.pending import Pending, Step
from kai.core.rpc.auth import NONCE_SIZE, REJECTION, ServerHandshake
from kai.core.rpc.protocol import (
    CLOSED,
    NEED_DATA,
    Notification,
    Request,
    Response,
    RpcConnection,
)
from kai.logs import RateLimitedLog
from kai.rpc.sockets import MAX_BACKLOG, SocketIO, from_stream, send_all

logger = logging.getLogger(__name__)

#: An RPC handler: a step function called as ``handler(*params)``. Its result, if it has one
#: at once, is answered from the connection's reader, in the order requests arrive; a
#: :class:`~kai.core.pending.Pending` is awaited as a task of its own
#: (:func:`~kai.core.pending.waits` makes an ``async def`` one). Either may raise an
#: :class:`~kai.core.errors.RpcError` to answer with that error.
Handler: TypeAlias = Callable[..., Step[object]]

ListenerT = TypeVar("ListenerT", bound=trio.abc.Listener[trio.abc.Stream])

#: Requests (and notifications) one connection may have running at once. When reached, the
#: server stops reading from that connection until one finishes, pushing back on the peer.
MAX_CONCURRENT_REQUESTS_PER_CONNECTION: Final = 256
#: Responses of inline handlers are sent once they reach this many bytes, even mid-batch.
SEND_THRESHOLD: Final = 256 * 1024
#: Default deadline for a new connection to complete authentication, in seconds.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 5.0
#: Seconds between two handshake failures logged for one peer host (the rest are counted).
HANDSHAKE_LOG_INTERVAL: Final = 60.0

#: Peers that failed authentication (ERROR) or broke the handshake (WARNING), keyed by host:
#: a peer reconnects from a new port every time.
_refused_peers: RateLimitedLog[str] = RateLimitedLog(logger, logging.ERROR, HANDSHAKE_LOG_INTERVAL)
_garbled_peers: RateLimitedLog[str] = RateLimitedLog(
    logger, logging.WARNING, HANDSHAKE_LOG_INTERVAL
)


async def serve_rpc(
    host: str,
    port: int,
    secret: bytes,
    handlers: Mapping[str, Handler],
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen on ``host``:``port`` (0 picks a free port) and serve RPC forever.

    Start it with ``listeners = await nursery.start(serve_rpc, host, port, secret,
    handlers)``; ``listeners[0].socket.getsockname()[1]`` is the bound port.

    Args:
        host: address to bind; Kai's default is ``127.0.0.1``.
        port: TCP port, or 0 for any free one.
        secret: the cluster secret every client must prove it holds.
        handlers: method name to async handler, called as ``handler(*params)``.
        handshake_timeout: seconds a new connection has to authenticate.
        task_status: reports the open listeners once they accept connections.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_rpc_listeners(
        listeners,
        secret,
        handlers,
        handshake_timeout=handshake_timeout,
        task_status=task_status,
    )


async def serve_rpc_listeners(
    listeners: Sequence[ListenerT],
    secret: bytes,
    handlers: Mapping[str, Handler],
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    task_status: trio.TaskStatus[list[ListenerT]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve RPC forever on listeners that are already open (see :func:`serve_rpc`).

    The listeners are closed when this returns (it only returns by raising or being
    cancelled); ``task_status.started`` receives them as a list.
    """
    await trio.serve_listeners(
        partial(
            _serve_stream,
            secret=secret,
            handlers=handlers,
            handshake_timeout=handshake_timeout,
        ),
        list(listeners),
        task_status=task_status,
    )


async def _serve_stream(
    stream: trio.abc.Stream,
    *,
    secret: bytes,
    handlers: Mapping[str, Handler],
    handshake_timeout: float,
) -> None:
    await handle_rpc_connection(
        from_stream(stream), secret=secret, handlers=handlers, handshake_timeout=handshake_timeout
    )


async def handle_rpc_connection(
    sock: socket.socket,
    *,
    secret: bytes,
    handlers: Mapping[str, Handler],
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> None:
    """Serve one connected socket until the peer closes it or breaks the protocol; close it.

    Authenticates first, under ``handshake_timeout``; a peer that fails, stalls or sends
    garbage is dropped before any handler runs. Then a handler that answers at once runs in
    the reader (the responses to one received batch go out in one send), and every other
    request runs concurrently as its own task (at most
    :data:`MAX_CONCURRENT_REQUESTS_PER_CONNECTION`). At end of stream, running handlers
    finish and their responses are sent before this returns. Never raises for network or
    peer errors.
    """
    io = SocketIO(sock)
    try:
        trailing = await _authenticate(io, secret, handshake_timeout)
        if trailing is None:
            return
        framing = RpcConnection()
        if trailing:
            framing.receive_data(trailing)
        with trio.CancelScope() as connection_scope:
            async with trio.open_nursery() as writer:
                writer.start_soon(_write_responses, io, connection_scope)
                slots = trio.Semaphore(MAX_CONCURRENT_REQUESTS_PER_CONNECTION)
                async with trio.open_nursery() as requests:
                    clean_end = await _read_requests(io, framing, handlers, slots, requests)
                    if not clean_end:
                        requests.cancel_scope.cancel()
                if clean_end:
                    io.finish()  # the writer ends once every response is sent
                else:
                    writer.cancel_scope.cancel()
    finally:
        io.close()


def _peer_address(sock: socket.socket) -> tuple[str, str]:
    """The peer's host and ``host:port``, for the log (``?`` if the socket cannot say)."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "?", "?"
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), f"{peer[0]}:{peer[1]}"
    return str(peer), str(peer)


async def _authenticate(io: SocketIO, secret: bytes, handshake_timeout: float) -> bytes | None:
    """Run the server side of the handshake; the bytes after it, or None to hang up."""
    handshake = ServerHandshake(secret, os.urandom(NONCE_SIZE))
    host, peer = _peer_address(io.sock)
    with trio.move_on_after(handshake_timeout):
        try:
            await send_all(io.sock, handshake.hello())
            while not handshake.authenticated:
                data = await io.receive()
                if not data:
                    logger.info("RPC peer %s closed the connection during the handshake", peer)
                    return None
                reply = handshake.receive_data(data)
                if reply:
                    await send_all(io.sock, reply)
        except RpcAuthenticationError as exc:
            _refused_peers.log(
                host,
                "RPC peer %s failed authentication: %s; it does not hold this cluster's secret"
                " (copy this node's secret file to it, or check what connects from there)",
                peer,
                exc,
            )
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send_all(io.sock, REJECTION)
            return None
        except RpcProtocolError as exc:
            _garbled_peers.log(host, "RPC peer %s sent an invalid handshake: %s", peer, exc)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("RPC connection from %s lost during the handshake: %s", peer, exc)
            return None
        return handshake.trailing_data()
    _garbled_peers.log(
        host, "RPC peer %s did not authenticate within %s s", peer, handshake_timeout
    )
    return None


async def _write_responses(io: SocketIO, connection_scope: trio.CancelScope) -> None:
    try:
        await io.run_writer()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.info("RPC connection lost while sending: %s", exc)
        connection_scope.cancel()


async def _read_requests(
    io: SocketIO,
    framing: RpcConnection,
    handlers: Mapping[str, Handler],
    slots: trio.Semaphore,
    nursery: trio.Nursery,
) -> bool:
    """Answer every incoming message until end of stream (True) or an error (False).

    A handler that answers at once is run right here, and the responses to everything one
    receive brought are sent together; one that returns an awaitable gets a task of its own.
    """
    batch: list[bytes] = []
    batch_size = 0
    while True:
        try:
            message = framing.next_message()
        except RpcProtocolError as exc:
            logger.warning("closing RPC connection: %s", exc)
            return False
        if message is NEED_DATA:
            try:
                if batch:
                    io.send_now(batch[0] if len(batch) == 1 else b"".join(batch))
                    batch, batch_size = [], 0
                if io.backlog > MAX_BACKLOG:
                    await io.wait_for_room()  # the peer is not reading its responses
                data = await io.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                logger.info("RPC connection lost while receiving: %s", exc)
                return False
            framing.receive_data(data)
            continue
        if message is CLOSED:
            if batch:
                io.send(b"".join(batch))
            return True
        if isinstance(message, Response):
            logger.warning("closing RPC connection: a client sent a response")
            return False
        pending = _start_handler(message, handlers)
        if not isinstance(pending, _Outcome):
            try:
                # Not `await acquire()` alone: that yields per message, so a pipelined batch
                # of requests would be answered one write at a time instead of in one batch.
                slots.acquire_nowait()
            except trio.WouldBlock:
                await slots.acquire()
            nursery.start_soon(_finish_handler, message, pending, framing, io, slots)
            continue
        response = _encode_outcome(message, pending, framing)
        if response is not None:
            batch.append(response)
            batch_size += len(response)
            if batch_size >= SEND_THRESHOLD:
                io.send(b"".join(batch))
                batch, batch_size = [], 0


@attrs.frozen(slots=True)
class _Outcome:
    """What a handler came to: its result, or the error to send back."""

    result: object = None
    error: RpcError | None = None


def _start_handler(
    message: Request | Notification, handlers: Mapping[str, Handler]
) -> _Outcome | Pending[object]:
    """Call the message's handler: its outcome, or the pending step it returned."""
    handler = handlers.get(message.method)
    if handler is None:
        logger.debug("unknown RPC method %r", message.method)
        return _Outcome(error=RpcMethodNotFound(f"no RPC method named {message.method!r}"))
    try:
        result = handler(*message.params)
    except RpcError as exc:
        logger.debug("RPC handler %s raised %r", message.method, exc)
        return _Outcome(error=exc)
    except Exception as exc:
        logger.exception("RPC handler %s failed", message.method)
        return _Outcome(error=_remote_error(exc))
    if isinstance(result, Pending):
        return result
    return _Outcome(result)


def _remote_error(exc: Exception) -> RpcRemoteError:
    """What the caller is told when a handler fails with an unexpected exception."""
    return RpcRemoteError(f"{type(exc).__name__}: {exc}")


def _encode_outcome(
    message: Request | Notification, outcome: _Outcome, framing: RpcConnection
) -> bytes | None:
    """The response to send for ``message``; None for a notification."""
    if isinstance(message, Notification):
        return None
    try:
        return framing.encode_response(message.msgid, result=outcome.result, error=outcome.error)
    except RpcError as exc:
        logger.error("RPC handler %s returned an unsendable result: %s", message.method, exc)
        error = RpcRemoteError(f"the result of {message.method} cannot be sent: {exc}")
        return framing.encode_response(message.msgid, error=error)


async def _await_handler(message: Request | Notification, pending: Pending[object]) -> _Outcome:
    """The outcome of a handler that did not answer at once."""
    try:
        return _Outcome(await pending)
    except RpcError as exc:
        logger.debug("RPC handler %s raised %r", message.method, exc)
        return _Outcome(error=exc)
    except Exception as exc:
        logger.exception("RPC handler %s failed", message.method)
        return _Outcome(error=_remote_error(exc))


async def respond(
    request: Request, handlers: Mapping[str, Handler], framing: RpcConnection
) -> bytes:
    """Run ``request``'s handler exactly as the server does; the encoded response.

    For an in-process network (:mod:`kai.testing.network`) that must answer as a real peer.
    """
    outcome = _start_handler(request, handlers)
    if not isinstance(outcome, _Outcome):
        outcome = await _await_handler(request, outcome)
    response = _encode_outcome(request, outcome, framing)
    assert response is not None  # only notifications go unanswered
    return response


async def _finish_handler(
    message: Request | Notification,
    pending: Pending[object],
    framing: RpcConnection,
    io: SocketIO,
    slots: trio.Semaphore,
) -> None:
    """Await a handler that did not answer at once, and queue its response."""
    try:
        outcome = await _await_handler(message, pending)
        data = _encode_outcome(message, outcome, framing)
        if data is None:
            return
        try:
            await io.wait_for_room()
            io.send(data)
        except trio.ClosedResourceError:
            logger.debug("RPC response to %s dropped: connection closed", message.method)
    finally:
        slots.release()
