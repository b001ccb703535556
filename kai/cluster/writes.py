"""Quorum writes for the cluster coordinator: build the version at a primary, replicate, W acks.

A write is coordinated by a primary of its key, because the replica builds the new version
atomically with its local store. A primary stores the version, sends it to the other
primaries (``replica_apply``) and is done once W of them (itself included) hold it: at once
when its own store meets W (a node of one, or W=1), else as a pending step. Any other node
forwards the write once (``coordinate_put``) to the first primary that is up; the primary
never forwards it again. ``flush_all`` is a write to every member: recorded here, handed to
gossip, and sent best-effort to the others.

It must never acknowledge a write with fewer than W acks, forward a write more than once,
count a replica that is not a primary towards W, or let a slow replica delay an answer once
W acks are in (the rest are still sent, and their answers dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from kai.cluster.fanout import FanOut, PeerCaller
from kai.core.config import Quorum
from kai.core.errors import QuorumTimeout, QuorumUnavailable, RpcBadRequest, RpcConnectionError
from kai.core.pending import Pending, Step
from kai.core.quorum import Tally
from kai.core.ring import NodeId, Ring
from kai.core.vclock import VClock
from kai.core.versions import Version
from kai.core.wire import context_to_wire, raise_forwarded, siblings_from_wire
from kai.storage.replica import LocalReplica, Payload

logger = logging.getLogger(__name__)


class QuorumWriter:
    """Runs the writes and flushes this node coordinates or forwards.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica.
        peers: how to call the other replicas.
        placement: the current ring and the quorum capped at its member count.
        is_up: the failure detector's opinion (forwarding tries nodes it calls down last).
        request_timeout: seconds a write, forward or flush waits for its answers.
        on_flush: told of every ``flush_all`` this node coordinates (gossip carries it).
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        peers: PeerCaller,
        placement: Callable[[], tuple[Ring, Quorum]],
        is_up: Callable[[NodeId], bool],
        request_timeout: float,
        on_flush: Callable[[int], None],
    ) -> None:
        self.self_node = self_node
        self.replica = replica
        self.placement = placement
        self.is_up = is_up
        self.request_timeout = request_timeout
        self.on_flush = on_flush
        self._peers = peers
        #: Writes this node handed to a primary of their key.
        self.forwarded_writes = 0

    def write(self, key: bytes, payload: Payload, context: VClock | None) -> Step[Version]:
        """Write a new version of ``key``: coordinate it here if this node is a primary,
        else forward it once to a primary.

        Raises (at once, or from the pending step):
            QuorumUnavailable: fewer than W replicas can acknowledge the write.
            QuorumTimeout: W acks did not arrive within ``request_timeout``.
            TooManySiblings: the write would leave too many siblings.
        """
        ring, quorum = self.placement()
        primaries = ring.primaries_of(key, quorum.n)
        if self.self_node in primaries:
            return self._coordinate(key, payload, context, primaries, quorum.w)
        return Pending(self._forward(key, payload, context, primaries))

    def coordinate(self, key: bytes, payload: Payload, context: VClock | None) -> Step[Version]:
        """Build, store and replicate a new version here, whatever the ring says (a write
        a peer forwarded: forwarding again could loop).

        If rings briefly disagree and this node is no longer a primary, the version is
        stored here too, but only the primaries' acks count towards W.
        """
        ring, quorum = self.placement()
        primaries = ring.primaries_of(key, quorum.n)
        return self._coordinate(key, payload, context, primaries, quorum.w)

    def _coordinate(
        self,
        key: bytes,
        payload: Payload,
        context: VClock | None,
        primaries: Sequence[NodeId],
        w: int,
    ) -> Step[Version]:
        version, record = self.replica.coordinate_write_record(key, payload, context)
        others = [node for node in primaries if node != self.self_node]
        if not others:
            return version  # the only primary is this node, and it stored the version
        tally = Tally(min(w, len(primaries)), len(primaries))
        if len(others) < len(primaries):
            tally.reply()  # the local store is one ack
        deadline = trio.current_time() + self.request_timeout
        answers = self._peers.fan_out(
            [(peer, "replica_apply", (key, record)) for peer in others], deadline
        )
        if tally.met:
            answers.close()
            return version
        return Pending(self._wait(answers, tally, key, version))

    async def _wait(self, answers: FanOut, tally: Tally, key: bytes, version: Version) -> Version:
        try:
            while not tally.met and not tally.lost:
                answer = await answers.receive()  # every call is answered by its deadline
                if answer is None:
                    break
                if answer.ok and isinstance(answer.result, bool):
                    tally.reply()
                else:
                    tally.fail(timed_out=answer.timed_out)
        finally:
            answers.close()
        if not tally.met:
            raise tally.error(f"write of {key!r}")
        return version

    async def _forward(
        self, key: bytes, payload: Payload, context: VClock | None, primaries: Sequence[NodeId]
    ) -> Version:
        """Hand a write to a primary of ``key`` (one hop) and return the version it wrote."""
        self.forwarded_writes += 1
        candidates = [node for node in primaries if self.is_up(node)]
        candidates += [node for node in primaries if node not in candidates]
        params = (key, payload.flags, payload.expiry, payload.value, context_to_wire(context))
        deadline = trio.current_time() + self.request_timeout
        for peer in candidates:
            answer = await self._peers.call(peer, "coordinate_put", params, deadline)
            if answer.timed_out:
                raise QuorumTimeout(f"write of {key!r}: primary {peer} did not answer in time")
            if answer.error is None:
                try:
                    (version,) = siblings_from_wire(answer.result)
                except (RpcBadRequest, ValueError) as exc:
                    raise QuorumUnavailable(
                        f"write of {key!r}: primary {peer} answered nonsense: {exc}"
                    ) from exc
                return version
            if isinstance(answer.error, RpcConnectionError):
                continue  # the write never reached it: try the next primary
            raise_forwarded(answer.error)
            raise QuorumUnavailable(f"write of {key!r}: primary {peer} failed: {answer.error}")
        raise QuorumUnavailable(f"write of {key!r}: no primary could be reached")

    def flush_all(self, at: int) -> Step[None]:
        """Flush here, hand the flush to gossip, and tell every other member best-effort.

        Pending (at most ``request_timeout``) only while members the failure detector
        thinks are up have not answered; the others hear of it by gossip when they are back.
        """
        at = self.replica.covering(at)
        self.replica.flush(at)
        self.on_flush(at)
        ring, _quorum = self.placement()
        peers = [node for node in ring.nodes if node != self.self_node]
        if not peers:
            return None
        deadline = trio.current_time() + self.request_timeout
        waiting = {peer for peer in peers if self.is_up(peer)}
        answers = self._peers.fan_out([(peer, "flush", (at,)) for peer in peers], deadline)
        if not waiting:
            answers.close()
            return None
        return Pending(self._wait_for_flush(answers, waiting))

    @staticmethod
    async def _wait_for_flush(answers: FanOut, waiting: set[NodeId]) -> None:
        try:
            while waiting:
                answer = await answers.receive()  # every call is answered by its deadline
                if answer is None:
                    break
                waiting.discard(answer.peer)
                if not answer.ok:
                    logger.info("flush_all did not reach %s; gossip will carry it", answer.peer)
        finally:
            answers.close()
