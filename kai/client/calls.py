"""What each client call does, once for both flavours: routing, failover, retries, ``update``.

A call is a *plan*: a generator that yields effects for an I/O shell to carry out and is sent
their outcomes (or has their errors thrown into it):

- :class:`Exchange`: send these bytes to this node and return the one reply that answers
  them, before this deadline (raising a :mod:`~kai.client.errors` error if that fails);
- :class:`Backoff`: wait this many seconds.

The blocking client (:mod:`kai.client.blocking`) and the trio one
(:mod:`kai.client.trio_client`) each drive plans with a loop of a dozen lines
(:func:`drive` is the blocking one), so the rules below exist once:

- Before a request, the ring is read (``stats kai_ring``) if it is due: at first use, every
  ``ring_refresh`` seconds and after a node failed.
- A request goes to the first candidate of :meth:`Router.candidates` (a primary of its key
  that did not fail lately); if that fails it goes on to the next candidate only when trying
  again cannot do harm: a read after any error but a :class:`ClientError`; a write only
  after a ``retryable`` error (it certainly did not take effect).
- ``update`` repeats its read-modify-write cycle with exponential backoff and jitter.

Pure: no I/O; the clock and the random generator are passed in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator, Sequence
from typing import TypeAlias, TypeVar

import attrs

from kai.client.errors import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    KaiError,
    ProtocolError,
    Timeout,
)
from kai.client.framing import ErrorReply, MetaReply, Reply, StatsReply
from kai.client.protocol import (
    EMPTY_CONTEXT,
    DeleteInContext,
    DescribeRing,
    Key,
    ReadSiblings,
    Request,
    WireKey,
    WriteInContext,
    wire_key,
)
from kai.client.records import Address, Context, Fetched, Sibling, is_whole_number
from kai.client.routing import Router

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Resolves concurrent siblings (two or more, newest first) into the value to write.
Merge: TypeAlias = Callable[[Sequence[Sibling]], bytes]
#: Computes the value to write from the current one (None: the key has no live value).
Change: TypeAlias = Callable[[bytes | None], bytes]


@attrs.frozen(slots=True)
class Exchange:
    """Send ``request`` to ``address``; the outcome is the reply that answers it.

    The shell raises :class:`ConnectionFailed` if it cannot connect or send (also when
    ``deadline`` passes before then), :class:`ConnectionLost` if the connection ends before
    the reply, :class:`Timeout` if ``deadline`` passes while waiting for it, and
    :class:`ProtocolError` if the reply does not parse.
    """

    address: Address
    request: bytes
    deadline: float


@attrs.frozen(slots=True)
class Backoff:
    """Wait ``seconds`` before trying again; the outcome is None."""

    seconds: float = attrs.field(validator=attrs.validators.ge(0))


Effect: TypeAlias = Exchange | Backoff
#: A plan whose result is a ``T``: it yields effects and is sent their outcomes.
Plan: TypeAlias = Generator[Effect, object, T]


def drive(plan: Plan[T], perform: Callable[[Effect], object]) -> T:
    """Run ``plan`` to its end, carrying out each effect with ``perform`` (blocking shells).

    A :class:`KaiError` that ``perform`` raises is thrown into the plan, which decides
    whether to go on; any other exception ends the plan and propagates.
    """
    try:
        effect = next(plan)
        while True:
            try:
                outcome = perform(effect)
            except KaiError as error:
                effect = plan.throw(error)
            else:
                effect = plan.send(outcome)
    except StopIteration as finished:
        result: T = finished.value
        return result
    finally:
        plan.close()


def resolve(fetched: Fetched, merge: Merge) -> bytes | None:
    """The current value of a read: None for no sibling, the value of one, else ``merge``'s."""
    if not fetched.siblings:
        return None
    if len(fetched.siblings) == 1:
        return fetched.siblings[0].value
    merged = merge(fetched.siblings)
    if not isinstance(merged, bytes):
        raise TypeError(f"merge must return bytes, not {type(merged).__name__}")
    return merged


def may_try_elsewhere(request: Request[object], error: KaiError) -> bool:
    """Whether ``request``, having failed with ``error`` on one node, may go to another."""
    if request.is_read:
        return error.retryable or error.outcome_unknown
    return error.retryable


def node_seems_down(error: KaiError) -> bool:
    """Whether ``error`` says the node is unreachable (rather than that it answered)."""
    if isinstance(error, ProtocolError):
        return error.framing_lost
    return isinstance(error, ConnectionFailed | ConnectionLost | Timeout)


def worth_another_cycle(error: KaiError, *, writing: bool, idempotent: bool) -> bool:
    """Whether ``update`` should read, change and write again after ``error``.

    A ``retryable`` error changed nothing. An error of unknown outcome while reading changed
    nothing either (the write was not sent yet); while writing it may have stored the new
    value, so the cycle runs again only if applying the change twice is harmless.
    """
    if error.retryable:
        return True
    return error.outcome_unknown and (idempotent or not writing)


class CallPlans:
    """The plans of a client's calls, sharing one router.

    Args:
        router: where requests go; the plans update it as nodes answer or fail.
        timeout: seconds each request may take, from its first byte to its reply,
            including connecting, reading the ring first and trying other nodes.
        clock: monotonic seconds (``time.monotonic``, ``trio.current_time``).
        rng: the source of ``update``'s backoff jitter.
    """

    def __init__(
        self,
        router: Router,
        *,
        timeout: float,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.router = router
        self.timeout = timeout
        self.clock = clock
        self.rng = rng

    @classmethod
    def of_settings(
        cls,
        nodes: Sequence[str],
        *,
        timeout: float,
        pool_size: int,
        ring_refresh: float,
        clock: Callable[[], float],
        rng: random.Random | None,
    ) -> CallPlans:
        """The plans of a client made with these settings (both clients make theirs here, so
        they refuse the same settings the same way).

        Raises:
            TypeError: ``nodes`` is one string.
            ValueError: a node address is not ``host:port``, or a number is out of range.
        """
        if isinstance(nodes, str | bytes):
            raise TypeError("nodes is a sequence of 'host:port' strings, not one string")
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, not {pool_size!r}")
        router = Router([Address.parse(node) for node in nodes], refresh_interval=ring_refresh)
        return cls(router, timeout=timeout, clock=clock, rng=rng or random.Random())

    # --- the calls ----------------------------------------------------------------------------

    def get(self, key: Key) -> Plan[Fetched]:
        """Read every live sibling of ``key`` and the read's context."""
        return self.send(ReadSiblings(wire_key(key)))

    def put(
        self, key: Key, value: bytes, *, context: Context | None, flags: int, ttl: int
    ) -> Plan[Context]:
        """Write ``value`` in ``context`` (None: the empty context); the new context."""
        return self.send(
            WriteInContext(
                wire_key(key), value, EMPTY_CONTEXT if context is None else context, flags, ttl
            )
        )

    def delete(self, key: Key, *, context: Context) -> Plan[Context]:
        """Write a tombstone in ``context``; the new context."""
        return self.send(DeleteInContext(wire_key(key), context))

    def update(
        self,
        key: Key,
        change: Change,
        *,
        merge: Merge,
        attempts: int,
        backoff: float,
        idempotent: bool,
        flags: int,
        ttl: int,
    ) -> Plan[bytes]:
        """Read, resolve the siblings, apply ``change``, write in the read's context; the
        value written. See :meth:`kai.client.Client.update`."""
        if not is_whole_number(attempts) or attempts < 1:
            raise ValueError(f"attempts must be an integer >= 1, not {attempts!r}")
        if not backoff >= 0:
            raise ValueError(f"backoff must be seconds >= 0, not {backoff!r}")
        wired = wire_key(key)
        WriteInContext(wired, b"", EMPTY_CONTEXT, flags, ttl)  # refuse bad flags/ttl up front
        return self._update(wired, change, merge, attempts, backoff, idempotent, flags, ttl)

    def _update(
        self,
        key: WireKey,
        change: Change,
        merge: Merge,
        attempts: int,
        backoff: float,
        idempotent: bool,
        flags: int,
        ttl: int,
    ) -> Plan[bytes]:
        for attempt in range(1, attempts + 1):
            writing = False
            try:
                fetched = yield from self.send(ReadSiblings(key))
                value = change(resolve(fetched, merge))
                write = WriteInContext(key, value, fetched.context, flags, ttl)
                writing = True
                yield from self.send(write)
                return value
            except KaiError as error:
                if attempt == attempts or not worth_another_cycle(
                    error, writing=writing, idempotent=idempotent
                ):
                    raise
                delay = backoff * 2 ** (attempt - 1) * self.rng.uniform(0.5, 1.0)
                logger.debug(
                    "update of %r: attempt %d failed (%s); again in %.3f s",
                    key.raw,
                    attempt,
                    error,
                    delay,
                )
            yield Backoff(delay)
        raise AssertionError("the loop returns or raises")

    # --- one request, routed ------------------------------------------------------------------

    def send(self, request: Request[T]) -> Plan[T]:
        """Send ``request`` to the best node for it, going on to others where that is safe."""
        deadline = self.clock() + self.timeout
        if self.router.claim_refresh(self.clock()):
            yield from self.refresh_ring(deadline)
        # When every node failed, the error of a node that answered (say, a quorum it could
        # not meet) says more than those of the nodes that could not be reached.
        last_error: KaiError | None = None
        answered_error: KaiError | None = None
        for address in self.router.candidates(request.routing_key, self.clock()):
            if self.clock() >= deadline:
                break
            try:
                reply = yield from _exchange(address, request.encode(), deadline)
                result = request.interpret(reply, node=str(address))
            except ClientError:
                raise
            except KaiError as error:
                if node_seems_down(error):
                    self.router.node_failed(address, self.clock())
                elif answered_error is None:
                    answered_error = error
                if not may_try_elsewhere(request, error):
                    raise
                logger.debug(
                    "%s of %r failed on %s (%s); trying the next node",
                    type(request).__name__,
                    request.routing_key,
                    address,
                    error,
                )
                last_error = error
                continue
            self.router.node_answered(address)
            return result
        if answered_error is not None:
            raise answered_error
        if last_error is not None:
            raise last_error
        raise Timeout(
            f"no node could be tried within the timeout of {self.timeout} s "
            "(reading the ring took it all); the request was not sent",
            sent=False,
        )

    def refresh_ring(self, deadline: float) -> Plan[None]:
        """Ask the known nodes for the ring, one after another, until one describes it."""
        request = DescribeRing()
        for address in self.router.ring_sources(self.clock()):
            if self.clock() >= deadline:
                break
            try:
                reply = yield from _exchange(address, request.encode(), deadline)
                description = request.interpret(reply, node=str(address))
            except KaiError as error:
                if node_seems_down(error):
                    self.router.node_failed(address, self.clock())
                logger.debug("could not read the ring from %s: %s", address, error)
                continue
            self.router.node_answered(address)
            self.router.ring_described(description, self.clock())
            return
        self.router.ring_unavailable(self.clock())


def _exchange(address: Address, request: bytes, deadline: float) -> Plan[Reply]:
    reply = yield Exchange(address, request, deadline)
    assert isinstance(reply, MetaReply | StatsReply | ErrorReply), reply
    return reply
