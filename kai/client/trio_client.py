"""The trio client of Kai's Dynamo API: :class:`AsyncClient`, the async twin of ``Client``.

The same plans (:mod:`kai.client.calls`), protocol and router as the blocking client,
driven by trio streams: this module only moves bytes, keeps idle streams and turns stream
failures into :mod:`kai.client.errors`. Timeouts are ``trio.fail_at`` deadlines. Named so
that it never shadows the ``trio`` package.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import TracebackType
from typing import Self, TypeVar

import trio

from kai.client.calls import Backoff, CallPlans, Change, Effect, Exchange, Merge, Plan
from kai.client.errors import ConnectionFailed, ConnectionLost, KaiError, Timeout
from kai.client.framing import CLOSED, NEED_DATA, Reply, ReplyParser, reusable_after
from kai.client.liveness import idle_connection_is_usable
from kai.client.protocol import Key
from kai.client.records import Address, Context, Fetched
from kai.client.routing import Router

T = TypeVar("T")

#: Bytes asked for per ``receive_some``.
RECEIVE_SIZE = 64 * 1024


class _Connection:
    """One stream to a node and the parser of its replies."""

    def __init__(self, address: Address, stream: trio.SocketStream) -> None:
        self.address = address
        self.stream = stream
        self.parser = ReplyParser()
        self.broken = False

    @classmethod
    async def open(cls, address: Address, deadline: float) -> _Connection:
        try:
            with trio.fail_at(deadline):
                stream = await trio.open_tcp_stream(address.host, address.port)
        except trio.TooSlowError as exc:
            raise ConnectionFailed(
                f"could not connect to {address} in time; nothing was sent"
            ) from exc
        except OSError as exc:
            raise ConnectionFailed(
                f"could not connect to {address}: {exc}; nothing was sent"
            ) from exc
        return cls(address, stream)

    async def exchange(self, request: bytes, deadline: float) -> Reply:
        """Send ``request`` and read the reply that answers it (see ``calls.Exchange``)."""
        self.broken = True  # until the reply is complete
        try:
            with trio.fail_at(deadline):
                await self.stream.send_all(request)
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            raise ConnectionFailed(
                f"could not send the request to {self.address}: {exc!r}; the node did not "
                "get all of it, so it was not carried out"
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
            try:
                with trio.fail_at(deadline):
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.TooSlowError as exc:
                raise Timeout(
                    f"{self.address} did not answer in time; the request may or may not have "
                    "been carried out",
                    sent=True,
                ) from exc
            except (trio.BrokenResourceError, OSError) as exc:
                raise ConnectionLost(
                    f"the connection to {self.address} broke before the reply: {exc!r}; the "
                    "request may or may not have been carried out"
                ) from exc
            parser.receive_data(data)

    def close(self) -> None:
        """Close the stream now (a socket close needs no waiting)."""
        self.broken = True
        self.stream.socket.close()


class _Pool:
    """Idle streams per node, at most ``size`` each (one trio thread: no lock needed)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: dict[Address, list[_Connection]] = {}
        self.closed = False

    def take(self, address: Address) -> _Connection | None:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if idle_connection_is_usable(connection.stream.socket.fileno()):
                return connection
            connection.close()
        return None

    def give_back(self, connection: _Connection) -> None:
        if not connection.broken and not self.closed:
            idle = self._idle.setdefault(connection.address, [])
            if len(idle) < self.size:
                idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


class AsyncClient:
    """A trio client of a Kai cluster's Dynamo API: :class:`kai.client.Client`'s methods,
    as awaitables, with the same arguments, routing, retries and errors.

    Use it from one trio run (its idle streams belong to that run); close it with
    ``await client.aclose()`` or ``async with``.
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
            clock=trio.current_time,
            rng=rng,
        )
        self._pool = _Pool(pool_size)

    @property
    def router(self) -> Router:
        """Where requests go: the ring last read and the nodes that failed lately."""
        return self._plans.router

    async def get(self, key: Key) -> Fetched:
        """See :meth:`kai.client.Client.get`."""
        return await self._run(self._plans.get(key))

    async def put(
        self,
        key: Key,
        value: bytes,
        *,
        context: Context | None = None,
        flags: int = 0,
        ttl: int = 0,
    ) -> Context:
        """See :meth:`kai.client.Client.put`: with ``context`` None the write supersedes
        nothing and becomes a sibling of whatever the key holds."""
        return await self._run(self._plans.put(key, value, context=context, flags=flags, ttl=ttl))

    async def delete(self, key: Key, *, context: Context) -> Context:
        """See :meth:`kai.client.Client.delete`."""
        return await self._run(self._plans.delete(key, context=context))

    async def update(
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
        """See :meth:`kai.client.Client.update` (``fn`` and ``merge`` are plain functions)."""
        return await self._run(
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

    async def refresh_ring(self) -> None:
        """Read the ring now (it is read by itself when due)."""
        await self._run(self._plans.refresh_ring(trio.current_time() + self._plans.timeout))

    async def aclose(self) -> None:
        """Close every idle stream; the client cannot be used afterwards."""
        self._pool.close()
        await trio.lowlevel.checkpoint()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the shell: calls.drive, awaiting each effect -----------------------------------------

    async def _run(self, plan: Plan[T]) -> T:
        if self._pool.closed:
            plan.close()
            raise RuntimeError("this AsyncClient is closed; make a new one")
        try:
            effect = next(plan)
            while True:
                try:
                    outcome = await self._perform(effect)
                except KaiError as error:
                    effect = plan.throw(error)
                else:
                    effect = plan.send(outcome)
        except StopIteration as finished:
            result: T = finished.value
            return result
        finally:
            plan.close()

    async def _perform(self, effect: Effect) -> object:
        if isinstance(effect, Backoff):
            await trio.sleep(effect.seconds)  # update's backoff between attempts
            return None
        return await self._exchange(effect)

    async def _exchange(self, effect: Exchange) -> Reply:
        connection = self._pool.take(effect.address) or await _Connection.open(
            effect.address, effect.deadline
        )
        try:
            return await connection.exchange(effect.request, effect.deadline)
        finally:
            self._pool.give_back(connection)
