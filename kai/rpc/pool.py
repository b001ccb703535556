"""A pool of RPC clients, one per peer address, for the coordinator and gossip.

Lifetime as for :class:`~kai.rpc.client.RpcClient`: use ``async with RpcClientPool(secret)
as pool:`` or give it a nursery, where its clients run their connection tasks.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from kai.core.errors import RpcConnectionError
from kai.rpc.client import DEFAULT_CONNECT_TIMEOUT, NurseryOwner, RpcClient


class RpcClientPool(NurseryOwner):
    """One :class:`RpcClient` per peer address, created on first use (for the coordinator).

    Use as ``async with RpcClientPool(secret) as pool:`` or give it a nursery; its clients
    run their tasks there.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        nursery: trio.Nursery | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        open_socket: Callable[[str, int], Awaitable[socket.socket]] | None = None,
    ) -> None:
        """Create an empty pool.

        Args:
            secret: the cluster secret.
            nursery: where the clients' tasks run; omit to use ``async with``.
            connect_timeout: passed to every :class:`RpcClient`.
            open_socket: ``open_socket(host, port)`` replaces the TCP connection for every
                client (for tests).
        """
        super().__init__(nursery)
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._open_socket = open_socket
        self._clients: dict[tuple[str, int], RpcClient] = {}
        self._closed = False

    def client(self, host: str, port: int) -> RpcClient:
        """The client for ``host``:``port``, created (unconnected) if needed.

        Raises:
            RpcConnectionError: the pool was closed.
            RuntimeError: the pool has no nursery.
        """
        key = (host, port)
        client = self._clients.get(key)
        if client is None:
            if self._closed:
                raise RpcConnectionError(
                    f"the RPC client pool is closed: not calling {host}:{port}"
                )
            client = RpcClient(
                host,
                port,
                self._secret,
                nursery=self._require_nursery(),
                connect_timeout=self._connect_timeout,
                open_socket=None
                if self._open_socket is None
                else partial(self._open_socket, host, port),
            )
            self._clients[key] = client
        return client

    async def call(self, host: str, port: int, method: str, *params: object) -> object:
        """Shorthand for ``pool.client(host, port).call(method, *params)``."""
        return await self.client(host, port).call(method, *params)

    async def aclose(self) -> None:
        """Close every client in the pool."""
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.aclose()
