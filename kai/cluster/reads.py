"""Quorum reads for the cluster coordinator: ask every replica, answer after R, repair.

A read asks all of a key's replicas at once (this node's replica directly, each peer with one
``replica_read`` for all the keys it holds) and returns as soon as every key has R replies:
at once when this node's own replica meets R (a node of one, or R=1), else as a pending step.
The replies that come later are still collected, without a task of their own, and once every
replica has answered (or timed out) the stale or missing ones are sent the merged sibling set
(read repair). A peer whose answer is byte-equal to this node's record is not decoded.

It must never decide a read from fewer than R replies, let a slow replica delay an answer
once the quorum is in, or run a task outside the background nursery of its fan-out.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import trio

from kai.cluster.fanout import Answer, FanOut, PeerCaller
from kai.core.errors import RpcBadRequest, TooManySiblings
from kai.core.pending import Pending, Step
from kai.core.quorum import ReadRound
from kai.core.ring import NodeId
from kai.core.versions import SiblingSet, encode_siblings
from kai.core.wire import siblings_from_wire
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)


class _QuorumRead:
    """A quorum read in flight: its round and its fan-out."""

    __slots__ = ("answers", "deadline", "round")

    def __init__(self, round_: ReadRound, answers: FanOut, deadline: float) -> None:
        self.round = round_
        self.answers = answers
        self.deadline = deadline


class QuorumReader:
    """Runs quorum reads and their read repair for one node.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica.
        peers: how to call the other replicas (with deadlines and failure-detector feedback).
        request_timeout: seconds a read waits for its quorum; also bounds the collection of
            late replies and each read repair round.
        is_primary: whether a node is a primary of a key now; read repair skips the others
            (fallbacks standing in for a primary keep hints, not the key's data).
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        peers: PeerCaller,
        request_timeout: float,
        is_primary: Callable[[bytes, NodeId], bool] = lambda key, node: True,
    ) -> None:
        self.self_node = self_node
        self.is_primary = is_primary
        self.replica = replica
        self.request_timeout = request_timeout
        self._peers = peers
        #: Replicas brought up to date (here or on a peer) by read repair.
        self.read_repairs = 0

    def read(self, round_: ReadRound) -> Step[None]:
        """Ask the replicas ``round_`` has not heard from (this node's own replica answered
        as the round was made); done (None) once it is decided, pending until then.
        Answers that come after the decision go on to read repair.

        Raises (at once, or from the pending step):
            QuorumUnavailable: some key's replicas failed so that it can never reach R.
            QuorumTimeout: some key did not get R replies within ``request_timeout``.
        """
        peers = round_.batches
        if not peers:  # the local replica holds every key and answered: nobody else to ask
            return self._decide(round_)
        deadline = trio.current_time() + self.request_timeout
        answers = self._peers.fan_out(
            [(peer, "replica_read", (round_.batch(peer),)) for peer in peers], deadline
        )
        in_flight = _QuorumRead(round_, answers, deadline)
        if round_.decided:
            self._collect_the_rest(in_flight)
            return self._decide(round_)
        return Pending(self._wait(in_flight))

    async def _wait(self, in_flight: _QuorumRead) -> None:
        round_, answers = in_flight.round, in_flight.answers
        try:
            while not round_.decided:
                answer = await answers.receive()  # every call is answered by its deadline
                if answer is None:
                    break
                self._record_read(in_flight, answer)
        finally:
            self._collect_the_rest(in_flight)
        self._decide(round_)

    def _collect_the_rest(self, in_flight: _QuorumRead) -> None:
        """Stop waiting, not listening: the rest of the answers feed read repair."""
        in_flight.answers.listen(
            partial(self._record_read, in_flight), partial(self._after_read, in_flight.round)
        )

    @staticmethod
    def _decide(round_: ReadRound) -> None:
        error = round_.error()
        if error is not None:
            raise error

    def _record_read(self, read: _QuorumRead, answer: Answer) -> None:
        """Count one ``replica_read`` answer; ask again for keys a partial answer left out."""
        round_, peer = read.round, answer.peer
        if not answer.ok:
            round_.record_failure(peer, timed_out=answer.timed_out)
            return
        try:
            records = answer.result
            if not isinstance(records, list):
                raise RpcBadRequest(f"replica_read answered {type(records).__name__}")
            indices = round_.unanswered(peer)
            if not 1 <= len(records) <= len(indices):
                raise RpcBadRequest(f"replica_read answered {len(records)} of {len(indices)} keys")
            sibling_sets: list[SiblingSet] = []
            reads = round_.reads
            for index, record in zip(indices, records, strict=False):
                key_read = reads[index]
                mine = None if key_read is None else key_read.local
                if record is None:
                    sibling_sets.append(())
                elif mine is not None and record == mine[0]:
                    sibling_sets.append(mine[1])  # same bytes, same versions: no decoding
                else:
                    sibling_sets.append(siblings_from_wire(record))
            left = round_.record_reply(peer, sibling_sets)
        except (RpcBadRequest, ValueError) as exc:
            logger.warning("replica %s sent a malformed replica_read answer: %s", peer, exc)
            self._peers.errors += 1
            round_.record_failure(peer, timed_out=False)
            return
        if left:
            # The peer stopped at its answer-size budget: ask for the rest, same deadline.
            self._peers.add_calls(
                read.answers, [(peer, "replica_read", (round_.batch(peer),))], read.deadline
            )

    def _after_read(self, round_: ReadRound) -> None:
        """Every replica answered (or timed out): repair the stale ones."""
        remote = self._read_repair(round_)
        if remote:
            self._peers.start(self._repair_peers, remote)

    def _read_repair(self, round_: ReadRound) -> dict[NodeId, list[tuple[bytes, bytes]]]:
        """Repair this node's stale replicas; the repairs to send to each stale peer."""
        by_peer: dict[NodeId, list[tuple[bytes, bytes]]] = defaultdict(list)
        records: dict[int, bytes] = {}
        for index, node in round_.stale_replicas():
            key, merged = round_.keys[index], round_.merged[index]
            if not self.is_primary(key, node):
                continue  # a fallback standing in: handoff, not repair, brings it the key
            if node == self.self_node:
                self._repair_locally(key, merged)
                continue
            record = records.get(index)
            if record is None:
                record = records[index] = encode_siblings(merged)
            by_peer[node].append((key, record))
        return by_peer

    async def _repair_peers(self, by_peer: dict[NodeId, list[tuple[bytes, bytes]]]) -> None:
        """Send each stale peer the merged sibling sets of the keys it answered with less."""
        deadline = trio.current_time() + self.request_timeout
        async with trio.open_nursery() as nursery:
            for peer, repairs in by_peer.items():
                nursery.start_soon(self._repair_peer, peer, repairs, deadline)

    def _repair_locally(self, key: bytes, merged: SiblingSet) -> None:
        try:
            self.replica.apply(key, merged)
        except TooManySiblings as exc:
            logger.warning("read repair of %r skipped locally: %s", key, exc)
            return
        self.read_repairs += 1

    async def _repair_peer(
        self, peer: NodeId, repairs: list[tuple[bytes, bytes]], deadline: float
    ) -> None:
        # One peer's repairs go one after the other: a node that missed a whole multi-get
        # gets them at the pace it answers, and the first failure ends its round (the next
        # read or anti-entropy tries again).
        for key, record in repairs:
            answer = await self._peers.call(peer, "replica_apply", (key, record), deadline)
            if not answer.ok:
                logger.info("read repair of %r on %s failed; giving up on it for now", key, peer)
                return
            self.read_repairs += 1
        logger.debug("read repair: %d keys sent to %s", len(repairs), peer)
