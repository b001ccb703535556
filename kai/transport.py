"""How a node calls its peers: one abstract call, with real and in-process implementations.

The coordinator, gossip and the failure detector only ever use :class:`Transport`, so the
same code runs over authenticated TCP (:class:`RpcTransport`) and over the fault-injecting
in-process network of ``kai.testing.network``. Callers own timeouts (wrap calls in
``trio.fail_after``); an unreachable peer raises :class:`~kai.errors.RpcConnectionError`.
"""

from __future__ import annotations

from typing import Protocol

import trio

from kai.ring import NodeId
from kai.rpc.client import RpcClientPool


class Transport(Protocol):
    """Calls a method on a peer node."""

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        """Call ``method(*params)`` on ``peer`` and return its result.

        Params and results must be msgpack-serialisable (bytes, str, int, float, bool, None,
        lists, dicts). Raises an :class:`~kai.errors.RpcError` subclass on failure.
        """
        ...


class RpcTransport:
    """:class:`Transport` over Kai's authenticated msgpack-RPC, one connection per peer."""

    def __init__(self, secret: bytes, nursery: trio.Nursery) -> None:
        self._pool = RpcClientPool(secret, nursery=nursery)

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        """Call ``method`` on ``peer`` over its RPC port."""
        return await self._pool.call(peer.host, peer.port, method, *params)

    async def aclose(self) -> None:
        """Close every peer connection."""
        await self._pool.aclose()
