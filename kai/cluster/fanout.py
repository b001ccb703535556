"""Calling peers for the coordinator: deadlines, failure-detector feedback, parallel fan-out.

Every call to a peer goes through :class:`PeerCaller`, so each one is bounded by a deadline,
tells the failure detector whether the peer answered, and is counted. A fan-out sends all
its calls at once and returns a :class:`FanOut` that yields the answers as they come: the
requester stops waiting once its quorum is in, then hands the fan-out a listener so that late
answers still reach read repair and the failure detector.

A fan-out costs no task per call: requests are queued on the peers' RPC connections and each
response is delivered by the connection's reader (:meth:`~kai.rpc.transport.FanOutTransport.start_call`).
One sweeper task per caller ends the calls whose deadline passes. Only a transport that cannot
start a call that way right now (not connected yet, or an in-process test network) gets a
task for that call.

It must never raise for a peer's failure (every outcome is an :class:`Answer`), never let a
call outlive its deadline, answer any call twice, or start a task outside the background
nursery.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import attrs
import trio

from kai.core.errors import (
    RpcAuthenticationError,
    RpcConnectionError,
    RpcError,
    RpcProtocolError,
)
from kai.core.ring import NodeId
from kai.rpc.transport import CancelCall, FanOutTransport

logger = logging.getLogger(__name__)

#: Errors that mean the peer could not be reached (or cannot be trusted to have processed the
#: call): the failure detector hears about them. Any other RPC error is an answer.
UNREACHABLE = (RpcConnectionError, RpcProtocolError, RpcAuthenticationError)

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


class FanOut:
    """The answers to the calls of one fan-out, in the order they come.

    Either await them one by one with :meth:`receive`, then (or instead) :meth:`listen` for
    the rest, or :meth:`close` to ignore the rest. Every call is answered exactly once (at
    the latest by its deadline), so :meth:`receive` returns None after at most one answer per
    call.
    """

    __slots__ = (
        "_answers",
        "_closed",
        "_finished",
        "_listener",
        "_on_finished",
        "_outstanding",
        "_waiting",
    )

    def __init__(self, calls: int) -> None:
        self._answers: deque[Answer] = deque()
        self._outstanding = calls
        self._listener: Callable[[Answer], None] | None = None
        self._on_finished: Callable[[], None] | None = None
        self._closed = False
        self._finished = False
        self._waiting: trio.lowlevel.Task | None = None

    async def receive(self) -> Answer | None:
        """The next answer, waiting for it if needed; None once every call is answered."""
        if not self._answers and self._outstanding:
            self._waiting = trio.lowlevel.current_task()

            def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
                self._waiting = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
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
        task, self._waiting = self._waiting, None
        if task is not None:
            trio.lowlevel.reschedule(task)

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

    __slots__ = ("cancel", "deadline", "done", "fan", "method", "peer")

    def __init__(self, peer: NodeId, method: str, fan: FanOut, deadline: float) -> None:
        self.peer = peer
        self.method = method
        self.fan = fan
        self.deadline = deadline
        self.cancel: CancelCall | None = None
        self.done = False


class PeerCaller:
    """Calls peers with deadlines and reports each outcome to the failure detector.

    Args:
        transport: how to reach peers.
        background: the nursery that runs the deadline sweeper and any call that needs a
            task of its own.
        on_success: told of every peer that answered (even with an error: it is up).
        on_failure: told of every peer that could not be reached or did not answer in time.
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
        self._pending = 0
        self._sweeping = False
        self._sweep_scope: trio.CancelScope | None = None

    async def call(
        self, peer: NodeId, method: str, params: tuple[object, ...], deadline: float
    ) -> Answer:
        """Call ``method`` on ``peer``, giving up at ``deadline`` (trio time)."""
        with trio.move_on_at(deadline):
            try:
                result = await self.transport.call(peer, method, *params)
            except RpcError as exc:
                return self._answered(peer, method, None, exc)
            return self._answered(peer, method, result, None)
        return self._timed_out(peer, method)

    def fan_out(self, calls: Sequence[Call], deadline: float) -> FanOut:
        """Send every call now; their answers come through the returned :class:`FanOut`.

        The calls outlive the request that started them (bounded by ``deadline``). If the
        background nursery is closed (shutdown), calls that would need it are answered at
        once with a connection error, without blaming the peer.
        """
        fan = FanOut(0)
        self.add_calls(fan, calls, deadline)
        return fan

    def add_calls(self, fan: FanOut, calls: Sequence[Call], deadline: float) -> None:
        """Send more calls whose answers join ``fan`` (say, to ask for what an answer left
        out); ``fan`` is not finished until they are answered too."""
        fan._outstanding += len(calls)
        for peer, method, params in calls:
            pending = _PendingCall(peer, method, fan, deadline)
            self._pending += 1
            try:
                cancel = self.transport.start_call(
                    peer, method, params, partial(self._complete, pending)
                )
            except RpcError as exc:  # the call cannot even be sent (say, unencodable params)
                self._complete(pending, None, exc)
                continue
            if cancel is None:
                if not self.start(self._call_in_task, pending, params):
                    self._abandon(pending)
                continue
            pending.cancel = cancel
            if not self._track(pending):
                self._abandon(pending)

    def start(self, function: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start a background task; False if the background nursery is already closed."""
        try:
            self.background.start_soon(function, *args)
        except RuntimeError:
            logger.debug("background nursery closed: %s not started", function.__name__)
            return False
        return True

    # --- outcomes -----------------------------------------------------------------------------

    def _answered(
        self, peer: NodeId, method: str, result: object, error: RpcError | None
    ) -> Answer:
        if error is None:
            self.on_success(peer)
            return Answer(peer, result=result)
        self.errors += 1
        if isinstance(error, UNREACHABLE):
            self.on_failure(peer)
            logger.debug("%s to %s failed: %s", method, peer, error)
        else:
            self.on_success(peer)
            logger.info("%s on %s failed there: %s", method, peer, error)
        return Answer(peer, error=error)

    def _timed_out(self, peer: NodeId, method: str) -> Answer:
        self.timeouts += 1
        self.on_failure(peer)
        logger.debug("%s to %s timed out", method, peer)
        return Answer(peer, timed_out=True)

    def _complete(self, pending: _PendingCall, result: object, error: RpcError | None) -> None:
        if not pending.done:
            self._finish(pending, self._answered(pending.peer, pending.method, result, error))

    def _expire(self, pending: _PendingCall) -> None:
        if not pending.done:
            if pending.cancel is not None:
                pending.cancel()
            self._finish(pending, self._timed_out(pending.peer, pending.method))

    def _abandon(self, pending: _PendingCall) -> None:
        if not pending.done:
            if pending.cancel is not None:
                pending.cancel()
            error = RpcConnectionError("the node is shutting down")
            self._finish(pending, Answer(pending.peer, error=error))

    def _finish(self, pending: _PendingCall, answer: Answer) -> None:
        pending.done = True
        self._pending -= 1
        scope = self._sweep_scope
        if not self._pending and scope is not None and scope.deadline == math.inf:
            # Nothing left to time out and no deadline to wake the sweeper: let it end now.
            # A sweeper with a deadline ends when it wakes and finds nothing pending; not
            # cancelling it here saves a cancellation and a new task whenever the calls in
            # flight drop to zero for a moment.
            scope.cancel()
        pending.fan._deliver(answer)

    async def _call_in_task(self, pending: _PendingCall, params: tuple[object, ...]) -> None:
        # Not tracked by the sweeper: :meth:`call` bounds it and counts its outcome.
        self._finish(
            pending, await self.call(pending.peer, pending.method, params, pending.deadline)
        )

    # --- deadlines ----------------------------------------------------------------------------

    def _track(self, pending: _PendingCall) -> bool:
        """Have the sweeper time ``pending`` out at its deadline; False if it cannot run."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].done:
            heapq.heappop(deadlines)  # answered long ago: keep the heap small
        heapq.heappush(deadlines, (pending.deadline, next(self._order), pending))
        if not self._sweeping:
            if not self.start(self._sweep):
                return False
            self._sweeping = True
        elif self._sweep_scope is not None and pending.deadline < self._sweep_scope.deadline:
            self._sweep_scope.deadline = pending.deadline
        return True

    async def _sweep(self) -> None:
        """Time calls out at their deadlines; ends once no call is pending (at the latest
        at the deadline it sleeps until)."""
        deadlines = self._deadlines
        try:
            while self._pending:
                now = trio.current_time()
                while deadlines and (deadlines[0][2].done or deadlines[0][0] <= now):
                    self._expire(heapq.heappop(deadlines)[2])
                if not self._pending:
                    break
                wake_at = deadlines[0][0] if deadlines else math.inf
                with trio.CancelScope(deadline=wake_at) as self._sweep_scope:
                    await trio.sleep_forever()
                self._sweep_scope = None
        finally:
            self._sweep_scope = None
            self._sweeping = False
            deadlines.clear()
