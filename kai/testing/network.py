"""A fault-injecting, in-process network for fast, deterministic cluster tests.

:class:`FakeNetwork` stands in for TCP between Kai nodes: every node registers its RPC
handlers, and :meth:`FakeNetwork.transport_for` gives each node a
:class:`~kai.rpc.transport.Transport` whose calls are routed, through a seeded
:class:`random.Random`, to deliver, drop, duplicate or delay each request and each response
(as trio's ``test_handshake_over_terrible_network``). Tests can also partition the network,
crash (:meth:`~FakeNetwork.unregister`), pause (:meth:`~FakeNetwork.hang`) and slow down
(:meth:`~FakeNetwork.slow`) nodes, and read who called whom (:attr:`~FakeNetwork.log`).
Delays use :func:`trio.sleep`, so a test under ``autojump_clock`` runs in virtual time.

It must never behave differently from the real RPC where a caller could tell: params and
results are encoded and decoded by the real sans-IO framing (:mod:`kai.core.rpc.protocol`), and
handler errors are mapped exactly as :mod:`kai.rpc.server` maps them. It must never choose a
timeout (a lost message hangs the caller until the caller's own timeout fires), never let a
cancelled caller cancel a handler that has already received the request, and never leave a
task running after :meth:`FakeNetwork.running` exits.

Every call takes one path, :meth:`FakeNetwork.start_call`, as on the real RPC client: the
delivery runs in the network's nursery and hands the outcome to the call's ``on_done``
callback; :meth:`FakeNetwork.call` is that call, awaited.

Determinism: every random draw for a call happens synchronously when the call is started,
a fixed number of draws per call for a given :class:`Faults`, so the outcomes depend only on
the seed and on the order in which calls are made. Calls a node makes to itself are never
faulty and draw nothing. A slow node's fixed delay is added to the drawn one and draws
nothing either.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Final

import attrs
import trio

from kai.core.errors import RpcConnectionError, RpcError
from kai.core.ring import NodeId
from kai.core.rpc.protocol import Request, Response, RpcConnection
from kai.rpc.client import wait_for_call
from kai.rpc.server import Handler, respond
from kai.rpc.transport import CancelCall, FanOutTransport, OnDone

#: The message id used on the fake wire; every call has its own reply slot, so ids do not
#: need to differ.
_MSGID: Final = 0

#: The counters :meth:`FakeNetwork.statistics` reports, in order.
STATISTICS: Final = ("delivered", "dropped", "duplicated", "delayed", "refused", "hung", "lost")


def _check_probability(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be a probability from 0 to 1, not {value!r}")


def _check_delay(
    _instance: object, _attribute: attrs.Attribute[tuple[float, float]], value: object
) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(
            isinstance(bound, int | float) and not isinstance(bound, bool) for bound in value
        )
        or not 0.0 <= value[0] <= value[1]
    ):
        raise ValueError(f"delay must be (low, high) seconds with 0 <= low <= high, not {value!r}")


def _is_duration(value: object) -> bool:
    """Whether ``value`` is a finite number of seconds >= 0 (a bool is not a number here)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value < math.inf
    )


@attrs.frozen
class Faults:
    """How unreliable the network is; applied independently to each request and response.

    Attributes:
        drop: probability that a message is lost (its caller hangs until its own timeout).
        duplicate: probability that a message is delivered twice. A duplicated request runs
            the handler twice (the second result is discarded); a duplicated response is
            discarded by the caller, as the real client discards a reply nobody waits for.
        delay: ``(low, high)``: each message is delayed by a uniform draw from this range, in
            seconds (``(0.0, 0.0)``, the default, means no delay and no draw).

    Raises:
        ValueError: a probability is outside [0, 1] or the delay range is not
            ``0 <= low <= high``.
    """

    drop: float = attrs.field(default=0.0, validator=_check_probability)
    duplicate: float = attrs.field(default=0.0, validator=_check_probability)
    delay: tuple[float, float] = attrs.field(default=(0.0, 0.0), validator=_check_delay)


@attrs.frozen
class _Fate:
    """What happens to one message, drawn when its call is made."""

    dropped: bool = False
    duplicated: bool = False
    delay: float = 0.0


_RELIABLE: Final = _Fate()


@attrs.frozen
class Attempt:
    """One call started on a :class:`FakeNetwork`, whatever became of it."""

    caller: NodeId
    target: NodeId
    method: str


class _Endpoint:
    """One registration of a node: a process listening, until it crashes or is replaced."""

    def __init__(self, node: NodeId, handlers: Mapping[str, Handler]) -> None:
        self.node = node
        self.handlers = dict(handlers)
        self.crashed = False
        # Cancel scopes of the deliveries in progress on this endpoint; a crash cancels them.
        self.in_flight: set[trio.CancelScope] = set()

    def crash(self) -> None:
        self.crashed = True
        for scope in self.in_flight:
            scope.cancel()


class _Reply:
    """Where a delivery hands the response (or the news that the connection was lost)."""

    __slots__ = ("arrived", "on_done")

    def __init__(self, on_done: OnDone) -> None:
        self.on_done: OnDone | None = on_done
        self.arrived = False

    def cancel(self) -> None:
        """The caller gave up: the outcome, if it comes, is dropped."""
        self.on_done = None

    def arrive(self, data: bytes) -> None:
        """The encoded response reached the caller."""
        self.arrived = True
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            response = _decode(data)
            assert isinstance(response, Response)
            if response.error is not None:
                on_done(None, RpcError.for_code(*response.error))
            else:
                on_done(response.result, None)

    def lose(self, reason: str) -> None:
        """The connection was lost before the response came."""
        self.arrived = True
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(None, RpcConnectionError(reason))


@attrs.frozen
class _NodeTransport:
    """The :class:`~kai.rpc.transport.Transport` one node uses on a :class:`FakeNetwork`."""

    network: FakeNetwork
    node: NodeId

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        """Call ``method(*params)`` on ``peer`` from this node (see :meth:`FakeNetwork.call`)."""
        return await self.network.call(self.node, peer, method, *params)

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall:
        """Start ``method(*params)`` on ``peer`` from this node (see
        :meth:`FakeNetwork.start_call`)."""
        return self.network.start_call(self.node, peer, method, params, on_done)


class FakeNetwork:
    """An in-process network of Kai nodes that drops, duplicates, delays and partitions.

    Use ``async with FakeNetwork.running(rng, faults) as network:``; the network's own
    nursery runs every handler, so a handler that has received its request finishes even if
    its caller gives up, and nothing outlives the block.

    Attributes:
        calls: how many times each ``(target, method)`` was delivered to a handler (a
            duplicated request counts twice, a dropped one not at all).
        log: every call started, in order, as an :class:`Attempt`: refused, hung and
            dropped ones too, and calls a node makes to itself; not those whose params could
            not be encoded, or made when the network was not running (nothing was sent).
            Tests may clear it.
    """

    def __init__(
        self,
        rng: random.Random,
        faults: Faults | None = None,
        *,
        nursery: trio.Nursery | None = None,
    ) -> None:
        """Create a network with no nodes.

        Args:
            rng: the only source of randomness; seed it for reproducible runs.
            faults: the initial faults; the default is a perfect network.
            nursery: where handlers run. Omit it and use :meth:`running` instead, which
                provides one; a network without a nursery refuses calls.
        """
        self._rng = rng
        self._faults = faults if faults is not None else Faults()
        self._nursery = nursery
        self._framing = RpcConnection()
        self._endpoints: dict[NodeId, _Endpoint] = {}
        self._group_of: dict[NodeId, int] = {}
        self._hung: dict[NodeId, trio.Event] = {}
        self._slow: dict[NodeId, float] = {}
        self._statistics: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[tuple[NodeId, str]] = collections.Counter()
        self.log: list[Attempt] = []

    @classmethod
    @asynccontextmanager
    async def running(
        cls, rng: random.Random, faults: Faults | None = None
    ) -> AsyncIterator[FakeNetwork]:
        """Run a network whose handlers live in a nursery owned by this context manager.

        On exit every delivery still in progress (including handlers and requests queued at
        a hung node) is cancelled, and later calls raise :class:`RpcConnectionError`.

        Args:
            rng: the only source of randomness; seed it for reproducible runs.
            faults: the initial faults; the default is a perfect network.
        """
        async with trio.open_nursery() as nursery:
            network = cls(rng, faults, nursery=nursery)
            try:
                yield network
            finally:
                network._nursery = None
                nursery.cancel_scope.cancel()

    # Topology and faults.

    def register(self, node: NodeId, handlers: Mapping[str, Handler]) -> None:
        """Start ``node`` listening with ``handlers`` (method name to async handler).

        Registering a node that is already registered replaces it, as a restarted process
        would: calls in flight to the old registration fail as if it had crashed.
        """
        old = self._endpoints.pop(node, None)
        if old is not None:
            old.crash()
        self._endpoints[node] = _Endpoint(node, handlers)

    def unregister(self, node: NodeId) -> None:
        """Crash ``node``: new calls to it fail at once with :class:`RpcConnectionError`.

        Calls in flight to it fail with :class:`RpcConnectionError` (connection lost) and
        their handlers are cancelled, unless the response was already dropped (that caller
        hangs, as it would have anyway). Unknown nodes are ignored.
        """
        endpoint = self._endpoints.pop(node, None)
        if endpoint is not None:
            endpoint.crash()

    def transport_for(self, node: NodeId) -> FanOutTransport:
        """The transport ``node`` uses to call its peers (it is the caller of every call)."""
        return _NodeTransport(self, node)

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Cut the network into ``groups``, replacing any earlier partition.

        Nodes in different groups cannot reach each other in either direction: a request
        across the cut hangs its caller (a response across a cut formed while the handler
        ran is lost, so its caller hangs too). Nodes in no group reach everyone.

        Raises:
            ValueError: a node is listed in more than one group.
        """
        group_of: dict[NodeId, int] = {}
        for index, group in enumerate(groups):
            for node in group:
                if group_of.setdefault(node, index) != index:
                    raise ValueError(f"node {node} is in more than one partition group")
        self._group_of = group_of

    def heal(self) -> None:
        """Remove the partition; calls that already hung on it stay hung."""
        self._group_of = {}

    def hang(self, node: NodeId) -> None:
        """Pause ``node`` (as SIGSTOP): requests to it wait, unanswered, until :meth:`unhang`.

        As with a stopped process whose kernel still queues incoming data, requests that
        reach a hung node are processed after :meth:`unhang` even if their callers have
        given up by then.
        """
        self._hung.setdefault(node, trio.Event())

    def unhang(self, node: NodeId) -> None:
        """Resume ``node`` (as SIGCONT): queued requests run now. Unknown nodes are ignored."""
        resumed = self._hung.pop(node, None)
        if resumed is not None:
            resumed.set()

    def slow(self, node: NodeId, seconds: float) -> None:
        """Delay every message to ``node`` by ``seconds`` more, in calls started from now on.

        As a slow link into ``node``: a request to it, and the response to a call it made,
        each take ``seconds`` on top of any delay :class:`Faults` draws, so a call from a
        normal node to ``node`` is answered ``seconds`` late. Calls a node makes to itself
        are not delayed. Replaces an earlier :meth:`slow` of ``node``; 0 ends it.

        Raises:
            ValueError: ``seconds`` is not a finite number >= 0.
        """
        if not _is_duration(seconds):
            raise ValueError(f"a slow node's delay must be finite seconds >= 0, not {seconds!r}")
        if seconds:
            self._slow[node] = seconds
        else:
            self._slow.pop(node, None)

    def unslow(self, node: NodeId) -> None:
        """End :meth:`slow` for ``node``, in calls started from now on (calls already
        started keep their delay). Nodes that are not slow are ignored."""
        self._slow.pop(node, None)

    def attempts(self, method: str) -> list[tuple[NodeId, NodeId]]:
        """``(caller, target)`` of every call of ``method`` in :attr:`log`, in order."""
        return [
            (attempt.caller, attempt.target) for attempt in self.log if attempt.method == method
        ]

    def set_faults(self, faults: Faults) -> None:
        """Use ``faults`` for calls made from now on."""
        self._faults = faults

    @property
    def faults(self) -> Faults:
        """The faults applied to new calls."""
        return self._faults

    def reachable(self, caller: NodeId, target: NodeId) -> bool:
        """Whether the current partition lets ``caller`` reach ``target`` (and back)."""
        caller_group = self._group_of.get(caller)
        target_group = self._group_of.get(target)
        return caller_group is None or target_group is None or caller_group == target_group

    def statistics(self) -> dict[str, int]:
        """Counters since the network was created.

        Returns:
            ``delivered`` (requests handed to a handler, duplicates included), ``dropped``
            (requests and responses lost), ``duplicated`` (requests and responses sent
            twice), ``delayed`` (messages given a non-zero delay), ``refused`` (calls to an
            unregistered node), ``hung`` (calls stuck on a partition or a hung node) and
            ``lost`` (calls failed because their target crashed while they were in flight).
        """
        return {name: self._statistics[name] for name in STATISTICS}

    # Calls.

    async def call(self, caller: NodeId, target: NodeId, method: str, *params: object) -> object:
        """Call ``method(*params)`` on ``target`` as ``caller``: :meth:`start_call`, awaited.

        A lost message (dropped, or stuck on a partition) hangs the caller until its own
        timeout.

        Raises:
            RpcBadRequest: ``params`` cannot be encoded as MessagePack (nothing was sent).
            ValueError: ``method`` is not a non-empty str (as the real client).
            RpcConnectionError: ``target`` is not registered, crashed during the call, or
                the network is no longer running.
            RpcMethodNotFound, RpcRemoteError, RpcError: as the real server sends them.
        """
        return await wait_for_call(partial(self.start_call, caller, target, method, params))

    def start_call(
        self,
        caller: NodeId,
        target: NodeId,
        method: str,
        params: tuple[object, ...],
        on_done: OnDone,
    ) -> CancelCall:
        """Start ``method(*params)`` on ``target`` as ``caller``; what the transports use.

        As :meth:`~kai.rpc.transport.FanOutTransport.start_call`: the delivery runs in the
        network's nursery and calls ``on_done`` once with the outcome, unless the returned
        function cancels the call first; a lost message never calls it. Errors are those of
        :meth:`call`; the ones known at once (unencodable params, a refused connection, a
        network no longer running) are raised here instead, and nothing is delivered.
        """
        request = self._framing.encode_request(_MSGID, method, params)
        nursery = self._nursery
        if nursery is None:
            raise RpcConnectionError(f"could not connect to {target}: the network is not running")
        self.log.append(Attempt(caller, target, method))
        reply = _Reply(on_done)
        if caller != target and not self.reachable(caller, target):
            self._statistics["hung"] += 1
            return reply.cancel
        endpoint = self._endpoints.get(target)
        if endpoint is None:
            self._statistics["refused"] += 1
            raise RpcConnectionError(f"could not connect to {target}: connection refused")
        if caller == target:
            request_fate = response_fate = _RELIABLE
        else:
            request_fate = self._slowed(self._draw_fate(), target)
            response_fate = self._slowed(self._draw_fate(), caller)
        if request_fate.dropped:
            self._statistics["dropped"] += 1
            return reply.cancel
        nursery.start_soon(
            self._deliver, endpoint, caller, request, request_fate, response_fate, reply
        )
        if request_fate.duplicated:
            self._statistics["duplicated"] += 1
            nursery.start_soon(self._deliver, endpoint, caller, request, request_fate, None, None)
        return reply.cancel

    def _draw_fate(self) -> _Fate:
        """Draw one message's fate: one draw per fault kind that is switched on."""
        faults = self._faults
        dropped = faults.drop > 0 and self._rng.random() < faults.drop
        duplicated = faults.duplicate > 0 and self._rng.random() < faults.duplicate
        low, high = faults.delay
        delay = self._rng.uniform(low, high) if high > 0 else 0.0
        return _Fate(dropped=dropped, duplicated=duplicated and not dropped, delay=delay)

    def _slowed(self, fate: _Fate, receiver: NodeId) -> _Fate:
        """``fate`` with the fixed delay of a message to ``receiver`` added, if it is slow."""
        extra = self._slow.get(receiver)
        return fate if extra is None else attrs.evolve(fate, delay=fate.delay + extra)

    async def _deliver(
        self,
        endpoint: _Endpoint,
        caller: NodeId,
        request: bytes,
        request_fate: _Fate,
        response_fate: _Fate | None,
        reply: _Reply | None,
    ) -> None:
        """Carry one request to ``endpoint``, run its handler, and carry the response back.

        Runs in the network's nursery, so a caller that gives up does not cancel it. With
        ``reply`` None (a duplicated request) the response is discarded.
        """
        if endpoint.crashed:  # It crashed between the call and this task's start.
            self._lose(endpoint, reply)
            return
        with trio.CancelScope() as scope:
            endpoint.in_flight.add(scope)
            try:
                await self._transit(request_fate)
                resumed = self._hung.get(endpoint.node)
                if resumed is not None:
                    if reply is not None:
                        self._statistics["hung"] += 1
                    while resumed is not None:
                        await resumed.wait()
                        resumed = self._hung.get(endpoint.node)
                response = await self._run_handler(endpoint, request)
                if reply is None or response_fate is None:
                    return
                if caller != endpoint.node and not self.reachable(endpoint.node, caller):
                    self._statistics["hung"] += 1
                    return
                if response_fate.dropped:
                    self._statistics["dropped"] += 1
                    return
                if response_fate.duplicated:
                    self._statistics["duplicated"] += 1
                await self._transit(response_fate)
                reply.arrive(response)
            finally:
                endpoint.in_flight.discard(scope)
        if scope.cancelled_caught:
            self._lose(endpoint, reply)

    def _lose(self, endpoint: _Endpoint, reply: _Reply | None) -> None:
        """Fail a call whose target crashed while it was in flight."""
        if reply is not None and not reply.arrived:
            self._statistics["lost"] += 1
            reply.lose(f"connection to {endpoint.node} lost: {endpoint.node} crashed")

    async def _transit(self, fate: _Fate) -> None:
        if fate.delay > 0:
            self._statistics["delayed"] += 1
            await trio.sleep(fate.delay)

    async def _run_handler(self, endpoint: _Endpoint, data: bytes) -> bytes:
        """Run the handler for one encoded request; the encoded response, as the server does."""
        request = _decode(data)
        assert isinstance(request, Request)
        method = request.method
        self._statistics["delivered"] += 1
        self.calls[(endpoint.node, method)] += 1
        return await respond(request, endpoint.handlers, self._framing)


def _decode(data: bytes) -> Request | Response:
    """Decode one message that :class:`RpcConnection` encoded, as the receiving side would."""
    framing = RpcConnection()
    framing.receive_data(data)
    message = framing.next_message()
    assert isinstance(message, Request | Response), message
    return message
