"""How a node calls its peers: one abstract call, with real and in-process implementations.

Gossip and the failure detector only ever use :class:`Transport`, the coordinator's fan-out
:class:`FanOutTransport`, so the same code runs over authenticated TCP (:class:`RpcTransport`)
and over the fault-injecting in-process network of :mod:`kai.testing.network`. Both
implement :meth:`FanOutTransport.start_call` for real, and their :meth:`Transport.call` is
that call awaited, so a test on the in-process network takes the same path as a node.

Callers own timeouts: they wrap :meth:`Transport.call` in ``trio.fail_after``, and cancel a
started call at their deadline. An unreachable peer raises (or answers with)
:class:`~kai.core.errors.RpcConnectionError`.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from kai.core.ring import NodeId
from kai.rpc.client import CancelCall, OnDone, wait_for_call
from kai.rpc.pool import RpcClientPool

__all__ = ["CancelCall", "FanOutTransport", "OnDone", "RpcTransport", "Transport"]


class Transport(Protocol):
    """Calls a method on a peer node."""

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        """Call ``method(*params)`` on ``peer`` and return its result.

        Params and results must be msgpack-serialisable (bytes, str, int, float, bool, None,
        lists, dicts). Raises an :class:`~kai.core.errors.RpcError` subclass on failure.
        """
        ...


class FanOutTransport(Transport, Protocol):
    """A :class:`Transport` that can also start a call without a task waiting on it."""

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall:
        """Send ``method(*params)`` to ``peer`` without waiting; returns its cancel function.

        ``on_done(result, None)`` or ``on_done(None, error)`` is called at most once, later
        (never before this returns), from whatever task sees the outcome, unless the call
        is cancelled first; ``on_done`` must not block or raise. A call whose answer never
        comes (a silent peer, a lost message) never calls it: the caller cancels the call
        at its own deadline.

        Raises:
            RpcError: the call failed before anything was sent, and ``on_done`` will not be
                called: :class:`~kai.core.errors.RpcBadRequest` for params that cannot be
                encoded, :class:`~kai.core.errors.RpcConnectionError` when the transport
                is closed or knows at once that the peer refuses connections.
        """
        ...


class RpcTransport:
    """:class:`FanOutTransport` over Kai's authenticated msgpack-RPC, one connection per peer.

    ``open_socket(host, port)`` replaces TCP (for tests), as for
    :class:`~kai.rpc.pool.RpcClientPool`.
    """

    def __init__(
        self,
        secret: bytes,
        nursery: trio.Nursery,
        *,
        open_socket: Callable[[str, int], Awaitable[socket.socket]] | None = None,
    ) -> None:
        self._pool = RpcClientPool(secret, nursery=nursery, open_socket=open_socket)

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        """Call ``method`` on ``peer`` over its RPC port: :meth:`start_call`, awaited."""
        return await wait_for_call(partial(self.start_call, peer, method, params))

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall:
        """Send ``method`` on the peer's connection, opening it if needed (see
        :meth:`FanOutTransport.start_call` and :meth:`~kai.rpc.client.RpcClient.start_call`)."""
        return self._pool.client(peer.host, peer.port).start_call(method, params, on_done)

    async def aclose(self) -> None:
        """Close every peer connection."""
        await self._pool.aclose()
