"""Local failure detection: which peers this node currently believes are down.

The coordinator asks :meth:`FailureDetector.is_up` to skip unreachable primaries (sloppy
quorum, hinted handoff), and the coordinator's calls and gossip feed it the outcome of every
call. A single call that cannot reach a peer marks it down, and a single answer (even an
error: see :attr:`~kai.core.errors.RpcError.unreachable`) marks it up again; down peers are
pinged by :meth:`FailureDetector.probe_down_nodes` so they are noticed when they come back.

This view is local and never gossiped. It must never change the membership view or the
ring: a down node stays a member (Kai evicted a node after one failed ping; DESIGN §8).

Peers going down or up are WARNINGs, rate-limited per peer and direction so a flapping peer
cannot flood the log; a peer that refuses our cluster secret is an ERROR naming it, at most
once per peer per minute (DESIGN §11).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from kai.core.errors import RpcAuthenticationError, RpcError
from kai.core.ring import NodeId
from kai.logs import RateLimitedLog
from kai.rpc.transport import Transport

logger = logging.getLogger(__name__)

#: Seconds between two "is down" (or two "is up") lines about one peer.
PEER_LOG_INTERVAL: Final = 10.0
#: Seconds between two authentication errors about one peer.
AUTH_LOG_INTERVAL: Final = 60.0


class FailureDetector:
    """Tracks, per peer, whether the last call to it reached it.

    Args:
        clock: Returns the current time in seconds; used to say in the log how long a node
            was down. Defaults to trio's clock, so it must then be used inside ``trio.run``.
    """

    def __init__(self, *, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        #: Per known node: whether it is up, and when that last changed.
        self._states: dict[NodeId, tuple[bool, float]] = {}
        self._transitions = 0
        #: The nodes believed down now: kept current, so that asking whether any is down
        #: (every request does) costs nothing.
        self.down: set[NodeId] = set()
        #: Keyed by (node, is up): the changes of state.
        self._changes: RateLimitedLog[tuple[NodeId, bool]] = RateLimitedLog(
            logger, logging.WARNING, PEER_LOG_INTERVAL, clock=clock
        )
        #: Keyed by node: peers that do not share our secret.
        self._refusals: RateLimitedLog[NodeId] = RateLimitedLog(
            logger, logging.ERROR, AUTH_LOG_INTERVAL, clock=clock
        )

    def is_up(self, node: NodeId) -> bool:
        """Whether ``node`` is believed reachable; nodes never called are up."""
        state = self._states.get(node)
        return state is None or state[0]

    def record_success(self, node: NodeId) -> None:
        """Note that a call to ``node`` succeeded: it is up from now on."""
        self._record(node, up=True)

    def record_failure(self, node: NodeId) -> None:
        """Note that a call to ``node`` could not reach it or timed out: it is down from now on."""
        self._record(node, up=False)

    def record_error(self, node: NodeId, error: RpcError) -> None:
        """Note that a call to ``node`` failed with ``error``: down if it did not reach the
        peer, up if the peer answered with it."""
        if isinstance(error, RpcAuthenticationError):
            self._refusals.log(
                node,
                "cannot authenticate to %s: %s; this node does not hold that cluster's secret:"
                " copy the cluster's secret file to this node and restart it",
                node,
                error,
            )
        self._record(node, up=not error.unreachable, cause=error if error.unreachable else None)

    def down_nodes(self) -> list[NodeId]:
        """The nodes currently believed down, sorted."""
        return sorted(self.down)

    def statuses(self) -> dict[NodeId, bool]:
        """Every node seen so far, mapped to whether it is up."""
        return {node: up for node, (up, _) in sorted(self._states.items())}

    def transitions(self) -> int:
        """How many times a node went from up to down or back (for stats)."""
        return self._transitions

    # A timeout parameter rather than the caller's cancel scope: the probe must end quietly
    # with the slow nodes still down, not raise TooSlowError into the gossip loop.
    async def probe_down_nodes(self, transport: Transport, *, timeout: float) -> None:  # noqa: ASYNC109
        """Ping every down node at once; the ones that answer within ``timeout`` are up.

        Args:
            transport: How to reach the nodes.
            timeout: Seconds to wait for all pings; nodes that have not answered by then
                stay down. The call returns after at most ``timeout`` seconds.
        """
        self.log_held_back_changes()
        down = self.down_nodes()
        if not down:
            return
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for node in down:
                    nursery.start_soon(self._ping, transport, node)

    async def _ping(self, transport: Transport, node: NodeId) -> None:
        try:
            await transport.call(node, "ping")
        except RpcError as exc:
            logger.debug("ping to %s failed: %s", node, exc)
            self.record_error(node, exc)
        else:
            self.record_success(node)

    def log_held_back_changes(self) -> None:
        """Log the current state of every peer whose last change was not logged (flapping),
        once its rate limit allows; called by every probe, so the log ends up right."""
        for key in self._changes.due():
            node, up = key
            if self.is_up(node) == up:
                self._changes.log(key, "%s is %s", node, "up" if up else "down")

    def _record(self, node: NodeId, *, up: bool, cause: RpcError | None = None) -> None:
        # Called for every answer a peer gives: the common case (no change) reads no clock.
        state = self._states.get(node)
        if state is None:
            self._states[node] = (up, self._clock())
            if not up:
                self.down.add(node)
                self._transitions += 1
                self._log_down(node, cause)
            return
        was_up, since = state
        if was_up == up:
            return
        now = self._clock()
        self._states[node] = (up, now)
        self._transitions += 1
        if up:
            self.down.discard(node)
        else:
            self.down.add(node)
        if up:
            self._changes.log((node, True), "%s is up again after %.1f s down", node, now - since)
        else:
            self._log_down(node, cause)

    def _log_down(self, node: NodeId, cause: RpcError | None) -> None:
        if cause is None:
            self._changes.log((node, False), "%s is down", node)
        else:
            self._changes.log((node, False), "%s is down: %s", node, cause)
