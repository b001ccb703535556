"""Calling peers for the coordinator: deadlines, failure-detector feedback, parallel fan-out.

Every call to a peer goes through :class:`PeerCaller`, so each one is bounded by a deadline,
tells the failure detector whether the peer answered, and is counted. A fan-out sends all
its calls at once and returns a :class:`FanOut` that yields the answers as they come: the
requester stops waiting once its quorum is in, then hands the fan-out a listener so that late
answers still reach read repair and the failure detector. :meth:`PeerCaller.call` is a
fan-out of one call, awaited.

There is one path for every call: the transport starts it
(:meth:`~kai.rpc.transport.FanOutTransport.start_call`) and reports its outcome by callback,
from the RPC connection's reader over TCP or from the delivery task of the in-process test
network, so a call costs no task of its own. One sweeper task per caller ends the calls
whose deadline passes.

It must never raise for a peer's failure (every outcome is an :class:`Answer`), never let a
call outlive its deadline, answer any call twice, or start a task outside the background
nursery.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from kai.core.errors import RpcConnectionError, RpcError
from kai.core.ring import NodeId
from kai.rpc.sockets import Wakeup
from kai.rpc.transport import CancelCall, FanOutTransport

logger = logging.getLogger(__name__)

#: One call of a fan-out: (peer, method, params).
Call = tuple[NodeId, str, tuple[object, ...]]


@attrs.frozen(slots=True)
class Answer:
    """What one call to a peer came to: a result, an error, or no answer in time."""

    peer: NodeId
    result: object = None
    error: RpcError | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Whether the peer answered without an error."""
        return self.error is None and not self.timed_out

    @property
    def missed(self) -> bool:
        """Whether the call never reached the peer or got no answer in time (unlike an
        error the peer answered with): the peer may not hold what was sent."""
        return self.timed_out or (self.error is not None and self.error.unreachable)


class FanOut:
    """The answers to the calls of one fan-out, in the order they come.

    Either await them one by one with :meth:`receive`, then (or instead) :meth:`listen` for
    the rest, or :meth:`close` to ignore the rest. Every call is answered exactly once (at
    the latest by its deadline), so :meth:`receive` returns None after at most one answer per
    call.
    """

    __slots__ = (
        "_answers",
        "_arrival",
        "_closed",
        "_finished",
        "_listener",
        "_on_finished",
        "_outstanding",
    )

    def __init__(self, calls: int) -> None:
        self._answers: deque[Answer] = deque()
        self._outstanding = calls
        self._listener: Callable[[Answer], None] | None = None
        self._on_finished: Callable[[], None] | None = None
        self._closed = False
        self._finished = False
        self._arrival = Wakeup()

    async def receive(self) -> Answer | None:
        """The next answer, waiting for it if needed; None once every call is answered."""
        if not self._answers and self._outstanding:
            await self._arrival.wait()
        return self._answers.popleft() if self._answers else None

    def listen(self, on_answer: Callable[[Answer], None], on_finished: Callable[[], None]) -> None:
        """Pass every answer not yet received to ``on_answer``, then call ``on_finished``.

        Answers already in are passed at once; ``on_finished`` runs once the last call is
        answered (at once if it already was). Both run in whatever task delivers the answer,
        so they must not block; an exception they raise is logged and otherwise ignored.
        """
        self._listener, self._on_finished = on_answer, on_finished
        while self._answers:
            _guarded(on_answer, self._answers.popleft())
        if not self._outstanding:
            self._finish()

    def close(self) -> None:
        """Drop the answers not yet received, and any still to come."""
        self._closed = True
        self._answers.clear()

    def _deliver(self, answer: Answer) -> None:
        self._outstanding -= 1
        if self._listener is not None:
            _guarded(self._listener, answer)
            if not self._outstanding and not self._answers:
                self._finish()
            return
        if self._closed:
            return
        self._answers.append(answer)
        self._arrival.wake()

    def _finish(self) -> None:
        if not self._finished and self._on_finished is not None:
            self._finished = True
            _guarded(self._on_finished)


def _guarded(function: Callable[..., None], *args: object) -> None:
    try:
        function(*args)
    except Exception:
        logger.exception("fan-out listener %s failed", getattr(function, "__name__", function))


class _PendingCall:
    """One call of a fan-out that has not been answered yet."""

    __slots__ = ("caller", "cancel", "deadline", "done", "fan", "method", "peer")

    def __init__(
        self, caller: PeerCaller, peer: NodeId, method: str, fan: FanOut, deadline: float
    ) -> None:
        self.caller = caller
        self.peer = peer
        self.method = method
        self.fan = fan
        self.deadline = deadline
        self.cancel: CancelCall | None = None
        self.done = False

    def complete(self, result: object, error: RpcError | None) -> None:
        """The transport's ``on_done``: the peer answered, or could not be reached."""
        if not self.done:
            self.caller._finish(self, self.caller._answered(self.peer, self.method, result, error))


class PeerCaller:
    """Calls peers with deadlines and reports each outcome to the failure detector.

    Args:
        transport: how to reach peers.
        background: the nursery that runs the deadline sweeper (and the tasks given to
            :meth:`start_background`).
        on_success: told of every peer that answered (even with an error: it is up).
        on_failure: told of every peer that could not be reached or did not answer in time
            (:attr:`~kai.core.errors.RpcError.unreachable`).
    """

    def __init__(
        self,
        transport: FanOutTransport,
        background: trio.Nursery,
        *,
        on_success: Callable[[NodeId], None],
        on_failure: Callable[[NodeId], None],
    ) -> None:
        self.transport = transport
        self.background = background
        self.on_success = on_success
        self.on_failure = on_failure
        #: Calls that did not answer before their deadline.
        self.timeouts = 0
        #: Calls that failed: peer unreachable, or it answered with an error.
        self.errors = 0
        self._deadlines: list[tuple[float, int, _PendingCall]] = []
        self._order = itertools.count()
        self._sweeping = False
        self._sweep_scope: trio.CancelScope | None = None

    async def call(
        self, peer: NodeId, method: str, params: tuple[object, ...], deadline: float
    ) -> Answer:
        """Call ``method`` on ``peer``, giving up at ``deadline`` (trio time).

        A fan-out of one call: if the caller is cancelled first, the call still runs to
        its answer or its deadline, and the failure detector still hears how it went.
        """
        fan = self.fan_out([(peer, method, params)], deadline)
        try:
            answer = await fan.receive()
        finally:
            fan.close()
        assert answer is not None, "every call is answered by its deadline"
        return answer

    def fan_out(self, calls: Sequence[Call], deadline: float) -> FanOut:
        """Send every call now; their answers come through the returned :class:`FanOut`.

        The calls outlive the request that started them (bounded by ``deadline``). If the
        background nursery is closed (shutdown), the calls are answered at once with a
        connection error, without blaming the peer.
        """
        fan = FanOut(0)
        self.add_calls(fan, calls, deadline)
        return fan

    def add_calls(self, fan: FanOut, calls: Sequence[Call], deadline: float) -> None:
        """Send more calls whose answers join ``fan`` (say, to ask for what an answer left
        out); ``fan`` is not finished until they are answered too."""
        fan._outstanding += len(calls)
        for peer, method, params in calls:
            pending = _PendingCall(self, peer, method, fan, deadline)
            try:
                pending.cancel = self.transport.start_call(peer, method, params, pending.complete)
            except RpcError as exc:  # nothing was sent (say, unencodable params)
                pending.complete(None, exc)
                continue
            if not self._track(pending):
                self._abandon(pending)

    def start_background(self, function: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start ``function(*args)`` in the background nursery (read repair, say); False if
        that nursery is already closed (shutdown), and the task was not started."""
        try:
            self.background.start_soon(function, *args)
        except RuntimeError:
            logger.debug("background nursery closed: %s not started", function.__name__)
            return False
        return True

    #: The former name of :meth:`start_background`, kept while callers move over.
    start = start_background

    # --- outcomes -----------------------------------------------------------------------------

    def _answered(
        self, peer: NodeId, method: str, result: object, error: RpcError | None
    ) -> Answer:
        if error is None:
            self.on_success(peer)
            return Answer(peer, result=result)
        self.errors += 1
        if error.unreachable:
            self.on_failure(peer)
            logger.debug("%s to %s failed: %s", method, peer, error)
        else:
            self.on_success(peer)
            logger.info("%s on %s failed there: %s", method, peer, error)
        return Answer(peer, error=error)

    def _expire(self, pending: _PendingCall) -> None:
        if not pending.done:
            if pending.cancel is not None:
                pending.cancel()
            self.timeouts += 1
            self.on_failure(pending.peer)
            logger.debug("%s to %s timed out", pending.method, pending.peer)
            self._finish(pending, Answer(pending.peer, timed_out=True))

    def _abandon(self, pending: _PendingCall) -> None:
        if not pending.done:
            if pending.cancel is not None:
                pending.cancel()
            error = RpcConnectionError("the node is shutting down")
            self._finish(pending, Answer(pending.peer, error=error))

    def _finish(self, pending: _PendingCall, answer: Answer) -> None:
        pending.done = True
        pending.fan._deliver(answer)

    # --- deadlines ----------------------------------------------------------------------------

    def _track(self, pending: _PendingCall) -> bool:
        """Have the sweeper time ``pending`` out at its deadline; False if it cannot run."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].done:
            heapq.heappop(deadlines)  # answered long ago: keep the heap small
        heapq.heappush(deadlines, (pending.deadline, next(self._order), pending))
        if not self._sweeping:
            if not self.start_background(self._sweep):
                return False
            self._sweeping = True
        elif self._sweep_scope is not None and pending.deadline < self._sweep_scope.deadline:
            self._sweep_scope.deadline = pending.deadline
        return True

    async def _sweep(self) -> None:
        """Time calls out at their deadlines; ends when it wakes and finds no call pending.

        Ending as soon as the last call is answered would cost a cancellation and a new
        task whenever the calls in flight drop to zero for a moment.
        """
        deadlines = self._deadlines
        try:
            while deadlines:
                now = trio.current_time()
                while deadlines and (deadlines[0][2].done or deadlines[0][0] <= now):
                    self._expire(heapq.heappop(deadlines)[2])
                if deadlines:
                    with trio.CancelScope(deadline=deadlines[0][0]) as self._sweep_scope:
                        await trio.sleep_forever()
                    self._sweep_scope = None
        finally:
            self._sweep_scope = None
            self._sweeping = False
