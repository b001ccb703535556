"""The blocking client of Kai's Dynamo API: sockets, a connection pool, and a plan driver.

Everything a call decides (which node, whether to try another, the ring, ``update``'s
cycle) is in :mod:`kai.client.calls`; every byte is encoded and parsed by
:mod:`kai.client.protocol` and :mod:`kai.client.framing`. This module only moves bytes,
keeps idle connections and turns socket failures into :mod:`kai.client.errors`. A client
may be shared by threads.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self, TypeVar

from kai.client.calls import Backoff, CallPlans, Change, Effect, Exchange, Merge, Plan, drive
from kai.client.errors import ConnectionFailed, ConnectionLost, Timeout
from kai.client.framing import CLOSED, NEED_DATA, Reply, ReplyParser, reusable_after
from kai.client.liveness import idle_connection_is_usable
from kai.client.protocol import Key
from kai.client.records import Address, Context, Fetched
from kai.client.routing import Router

T = TypeVar("T")

#: Bytes asked for per ``recv``.
RECEIVE_SIZE = 64 * 1024


class _Connection:
    """One socket to a node and the parser of its replies."""

    def __init__(self, address: Address, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.parser = ReplyParser()
        self.broken = False

    @classmethod
    def open(cls, address: Address, deadline: float) -> _Connection:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionFailed(f"no time left to connect to {address}; nothing was sent")
        try:
            sock = socket.create_connection((address.host, address.port), timeout=remaining)
        except OSError as exc:
            raise ConnectionFailed(
                f"could not connect to {address}: {exc}; nothing was sent"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(address, sock)

    def exchange(self, request: bytes, deadline: float) -> Reply:
        """Send ``request`` and read the reply that answers it (see ``calls.Exchange``)."""
        self.broken = True  # until the reply is complete
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionFailed(f"no time left to send to {self.address}; nothing was sent")
        try:
            self.sock.settimeout(remaining)
            self.sock.sendall(request)
        except OSError as exc:
            raise ConnectionFailed(
                f"could not send the request to {self.address}: {exc}; the node did not get "
                "all of it, so it was not carried out"
            ) from exc
        parser = self.parser
        while True:
            reply = parser.next_reply()
            if reply is CLOSED:
                raise ConnectionLost(
                    f"{self.address} closed the connection before answering; the request "
                    "may or may not have been carried out"
                )
            if reply is not NEED_DATA:
                assert not isinstance(reply, type)
                self.broken = parser.buffered > 0 or parser.in_reply or not reusable_after(reply)
                return reply
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.sock.settimeout(remaining)
                data = self.sock.recv(RECEIVE_SIZE)
            except TimeoutError as exc:
                raise Timeout(
                    f"{self.address} did not answer in time; the request may or may not have "
                    "been carried out",
                    sent=True,
                ) from exc
            except OSError as exc:
                raise ConnectionLost(
                    f"the connection to {self.address} broke before the reply: {exc}; the "
                    "request may or may not have been carried out"
                ) from exc
            parser.receive_data(data)

    def close(self) -> None:
        self.broken = True
        self.sock.close()


class _Pool:
    """Idle connections per node, at most ``size`` each; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: dict[Address, list[_Connection]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def take(self, address: Address) -> _Connection | None:
        """An idle connection to ``address`` that is still usable, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(address)
                if not idle:
                    return None
                connection = idle.pop()
            if idle_connection_is_usable(connection.sock.fileno()):
                return connection
            connection.close()

    def give_back(self, connection: _Connection) -> None:
        """Keep ``connection`` for later if it is sound and there is room; else close it."""
        if not connection.broken:
            with self._lock:
                idle = self._idle.setdefault(connection.address, [])
                if not self.closed and len(idle) < self.size:
                    idle.append(connection)
                    return
        connection.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


class Client:
    """A blocking client of a Kai cluster's Dynamo API (docs/dynamo-api.md).

    It reads the ring from any node (``stats kai_ring``) at first use, every
    ``ring_refresh`` seconds and after a node fails, and sends each request straight to a
    primary of its key, so the node coordinates it with no forwarding hop. When that node
    fails, a read goes on to the key's other primaries and then any node; a write does so
    only when the error says it certainly did not take effect (``retryable``).

    Keys are bytes, or str sent as UTF-8. Keys that memcached would refuse (with spaces or
    control bytes) are sent base64-encoded, up to 186 bytes; others up to 250.

    Args:
        nodes: memcached addresses (``"host:port"``) of one or more nodes of the cluster,
            the seeds to read the ring from.
        timeout: seconds one request may take, connecting, reading the ring and trying
            other nodes included.
        pool_size: idle connections kept per node (a connection that saw an error or a
            timeout is closed, never reused).
        ring_refresh: seconds between readings of the ring.
        rng: the source of ``update``'s backoff jitter (seed it for repeatable runs).

    Raises:
        TypeError: ``nodes`` is one string.
        ValueError: a node address is not ``host:port``, or a number is out of range.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        timeout: float = 1.0,
        pool_size: int = 4,
        ring_refresh: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self._plans = CallPlans.of_settings(
            nodes,
            timeout=timeout,
            pool_size=pool_size,
            ring_refresh=ring_refresh,
            clock=time.monotonic,
            rng=rng,
        )
        self._pool = _Pool(pool_size)

    @property
    def router(self) -> Router:
        """Where requests go: the ring last read and the nodes that failed lately."""
        return self._plans.router

    def get(self, key: Key) -> Fetched:
        """Every live sibling of ``key`` (newest first) and the read's causal context.

        A key that was never written, was deleted or expired has no sibling; its context
        still lets a write supersede what was deleted.

        Raises:
            KaiError: see :mod:`kai.client.errors`; every node the read could go to failed.
        """
        return self._run(self._plans.get(key))

    def put(
        self,
        key: Key,
        value: bytes,
        *,
        context: Context | None = None,
        flags: int = 0,
        ttl: int = 0,
    ) -> Context:
        """Write ``value`` in ``context``: it supersedes exactly what that read saw.

        With ``context`` None (the empty context) the write supersedes nothing: it becomes a
        sibling of whatever the key holds, as a Dynamo put without a context does. To
        replace a value, pass the context of a read of it (or use :meth:`update`).

        Args:
            flags: client flags stored with the value (0 to 2**32-1).
            ttl: memcached's exptime: 0 never expires, up to 30 days (2592000) is seconds
                from now, larger is a unix time.

        Returns:
            The context of the version written: writing again in it supersedes this write
            (and nothing written concurrently).

        Raises:
            ClientError: the request cannot be sent as it is (bad key, flags or ttl), or
                the node refused the context.
            KaiError: see :mod:`kai.client.errors`; after an error whose
                ``outcome_unknown`` is True the write may still have landed.
        """
        return self._run(self._plans.put(key, value, context=context, flags=flags, ttl=ttl))

    def delete(self, key: Key, *, context: Context) -> Context:
        """Delete ``key`` in ``context``: a tombstone superseding exactly what that read saw
        (a version written concurrently survives it). Returns the tombstone's context.

        Raises:
            KaiError: as :meth:`put`.
        """
        return self._run(self._plans.delete(key, context=context))

    def update(
        self,
        key: Key,
        fn: Change,
        *,
        merge: Merge,
        attempts: int = 3,
        backoff: float = 0.05,
        idempotent: bool = False,
        flags: int = 0,
        ttl: int = 0,
    ) -> bytes:
        """Read ``key``, compute its new value and write it in the read's context.

        The current value is None when the key has no live sibling, the value itself when
        it has one, and ``merge(siblings)`` (newest first) when it has several; the value
        written is ``fn(current)``, and it supersedes every sibling the read saw.

        The whole cycle runs again, up to ``attempts`` times in all, after ``backoff``
        seconds doubling each time (times a random factor from 0.5 to 1), when the error
        says nothing was stored (``retryable``), or when it came while reading; when a
        write's outcome is unknown (a timeout, or a write quorum not met: the value may
        have landed) only if ``idempotent`` says applying ``fn`` twice is harmless.

        Returns:
            The value written.

        Raises:
            KaiError: the last attempt's error, or the first one not worth another cycle.
        """
        return self._run(
            self._plans.update(
                key,
                fn,
                merge=merge,
                attempts=attempts,
                backoff=backoff,
                idempotent=idempotent,
                flags=flags,
                ttl=ttl,
            )
        )

    def refresh_ring(self) -> None:
        """Read the ring now (it is read by itself when due; this is for impatient callers)."""
        self._run(self._plans.refresh_ring(time.monotonic() + self._plans.timeout))

    def close(self) -> None:
        """Close every idle connection; the client cannot be used afterwards."""
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the shell ----------------------------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        if self._pool.closed:
            plan.close()
            raise RuntimeError("this Client is closed; make a new one")
        return drive(plan, self._perform)

    def _perform(self, effect: Effect) -> object:
        if isinstance(effect, Backoff):
            time.sleep(effect.seconds)  # update's backoff between attempts
            return None
        return self._exchange(effect)

    def _exchange(self, effect: Exchange) -> Reply:
        connection = self._pool.take(effect.address) or _Connection.open(
            effect.address, effect.deadline
        )
        try:
            return connection.exchange(effect.request, effect.deadline)
        finally:
            self._pool.give_back(connection)
