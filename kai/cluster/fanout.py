"""Calling peers for the coordinator: deadlines, failure-detector feedback, parallel fan-out.

Every call to a peer goes through :class:`PeerCaller`, so each one is bounded by a deadline,
tells the failure detector whether the peer answered, and is counted. A fan-out runs its
calls in the background nursery it was given and delivers the answers on a channel (trio's
happy-eyeballs shape): the requester stops waiting once its quorum is in, while the calls
themselves run on so that replication completes and late replies still reach read repair.

It must never raise for a peer's failure (every outcome is an :class:`Answer`), never let a
call outlive its deadline, and never start a task outside the background nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

import attrs
import trio

from kai.errors import (
    RpcAuthenticationError,
    RpcConnectionError,
    RpcError,
    RpcProtocolError,
)
from kai.ring import NodeId
from kai.transport import Transport

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


class PeerCaller:
    """Calls peers with deadlines and reports each outcome to the failure detector.

    Args:
        transport: how to reach peers.
        background: the nursery fan-out calls run in.
        on_success: told of every peer that answered (even with an error: it is up).
        on_failure: told of every peer that could not be reached or did not answer in time.
    """

    def __init__(
        self,
        transport: Transport,
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

    async def call(
        self, peer: NodeId, method: str, params: tuple[object, ...], deadline: float
    ) -> Answer:
        """Call ``method`` on ``peer``, giving up at ``deadline`` (trio time)."""
        with trio.move_on_at(deadline):
            try:
                result = await self.transport.call(peer, method, *params)
            except UNREACHABLE as exc:
                self.errors += 1
                self.on_failure(peer)
                logger.debug("%s to %s failed: %s", method, peer, exc)
                return Answer(peer, error=exc)
            except RpcError as exc:
                self.errors += 1
                self.on_success(peer)
                logger.info("%s on %s failed there: %s", method, peer, exc)
                return Answer(peer, error=exc)
            self.on_success(peer)
            return Answer(peer, result=result)
        self.timeouts += 1
        self.on_failure(peer)
        logger.debug("%s to %s timed out", method, peer)
        return Answer(peer, timed_out=True)

    def fan_out(self, calls: Sequence[Call], deadline: float) -> trio.MemoryReceiveChannel[Answer]:
        """Start every call in the background nursery; each answer arrives on the channel.

        The calls outlive the request that started them (bounded by ``deadline``). The
        channel never blocks a sender; closing it early just drops the late answers. If the
        background nursery is closed (shutdown), the calls are not made and the channel
        ends early.
        """
        send, receive = trio.open_memory_channel[Answer](max(len(calls), 1))
        with send:
            for peer, method, params in calls:
                clone = send.clone()
                if not self.start(self._call_into, clone, peer, method, params, deadline):
                    clone.close()
        return receive

    async def _call_into(
        self,
        send: trio.MemorySendChannel[Answer],
        peer: NodeId,
        method: str,
        params: tuple[object, ...],
        deadline: float,
    ) -> None:
        with send:
            answer = await self.call(peer, method, params, deadline)
            with suppress(trio.BrokenResourceError):
                send.send_nowait(answer)

    def start(self, function: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start a background task; False if the background nursery is already closed."""
        try:
            self.background.start_soon(function, *args)
        except RuntimeError:
            logger.debug("background nursery closed: %s not started", function.__name__)
            return False
        return True
