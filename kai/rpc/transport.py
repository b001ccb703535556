"""How a node calls its peers: one abstract call, with real and in-process implementations.

Gossip and the failure detector only ever use :class:`Transport`, the coordinator's fan-out
:class:`FanOutTransport`, so the same code runs over authenticated TCP (:class:`RpcTransport`)
and over the fault-injecting in-process network of ``kai.testing.network``. Callers own timeouts (wrap calls in
``trio.fail_after``); an unreachable peer raises :class:`~kai.core.errors.RpcConnectionError`.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeAlias

import trio

from kai.core.errors import RpcError
from kai.core.ring import NodeId
from kai.rpc.pool import RpcClientPool

#: Told how a call started with :meth:`Transport.start_call` ended: ``(result, None)`` or
#: ``(None, error)``.
OnDone: TypeAlias = Callable[[object, RpcError | None], None]
#: Forgets a started call: its response, if it comes, is dropped and ``on_done`` not called.
CancelCall: TypeAlias = Callable[[], None]


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
    ) -> CancelCall | None:
        """Send ``method(*params)`` to ``peer`` without waiting, if that can be done right now.

        Returns a function that cancels the call, and later calls ``on_done`` exactly once
        (unless cancelled first) from whatever task sees the outcome; ``on_done`` must not
        block or raise. Returns None, having sent nothing, when the call cannot start that
        way (not connected yet, the send queue is full, or the transport does not support
        it): the caller then uses :meth:`call`. Raises an :class:`~kai.core.errors.RpcError` only
        for params that cannot be sent at all.
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
        """Call ``method`` on ``peer`` over its RPC port."""
        return await self._pool.call(peer.host, peer.port, method, *params)

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall | None:
        """Queue ``method`` on the peer's connection if it is open (see :class:`Transport`)."""
        return self._pool.client(peer.host, peer.port).start_call(method, params, on_done)

    async def aclose(self) -> None:
        """Close every peer connection."""
        await self._pool.aclose()
