"""Quorum writes for the cluster coordinator: build the version at a primary, replicate, W acks.

A write is coordinated by a primary of its key, because the replica builds the new version
atomically with its local store. A primary stores the version, sends its sibling set to the
other primaries (``replica_apply``) and is done once W of them (itself included) hold it: at
once when its own store meets W (a node of one, or W=1), else as a pending step.

* A ``set`` is coordinated by whichever primary received it; any other node forwards it once
  (``coordinate_put``) to the first primary that is up. When none can be reached (sloppy
  quorum), the node that received it stands in: it builds the version from what its hints
  hold, with a dot of a fresh actor, and hands it to the first fallbacks of the key as hints,
  one per primary; W of them must keep it.
* A conditional write (:mod:`kai.core.updates`) is decided by the key's *coordinating
  primary*, the first of its primaries that is up: it is forwarded there (``coordinate_update``)
  from anywhere else, primaries included, and decided under the key's lock there: read (a
  quorum read), check, write with the read's context. So two ``cas`` with one token through
  any two nodes give one STORED and one EXISTS; a ``set`` arriving at that primary meanwhile
  waits for the lock, so it lands after the decision, not inside it.
* ``flush_all`` is a write to every member: recorded here, handed to gossip, and sent
  best-effort to the others.

It must never acknowledge a write with fewer than W acks, forward a write more than once,
count a node towards W that neither holds the write as a primary nor keeps it as a hint for
one, or let a slow replica delay an answer once W acks are in (the rest are still sent, and
their answers followed). Conditional writes are never decided by a stand-in: their check
needs what the primaries hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from functools import partial
from typing import TypeVar

import trio

from kai.cluster.fanout import Answer, Call, FanOut, PeerCaller
from kai.cluster.hints import HintStore
from kai.core.config import Quorum
from kai.core.contexts import encode_context
from kai.core.errors import QuorumTimeout, QuorumUnavailable, RpcBadRequest, RpcConnectionError
from kai.core.pending import Pending, Step, resolve
from kai.core.quorum import Tally
from kai.core.ring import NodeId, Ring
from kai.core.updates import Applied, Update, decide
from kai.core.vclock import VClock
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    cas_of,
    context_of,
    decode_siblings,
    encode_siblings,
)
from kai.core.wire import (
    applied_from_wire,
    raise_forwarded,
    siblings_from_wire,
    update_to_wire,
)
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Reads keys with their quorum (the coordinator's ``get``).
Read = Callable[[Sequence[bytes]], Step[list[SiblingSet]]]


class KeyLocks:
    """One lock per key a conditional write is deciding on this node; unused locks go."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[trio.Lock, int]] = {}

    def locked(self, key: bytes) -> bool:
        """Whether some task holds or waits for ``key``'s lock."""
        return key in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the duration of the block (first come, first served)."""
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class QuorumWriter:
    """Runs the writes and flushes this node coordinates or forwards.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica.
        peers: how to call the other replicas.
        placement: the current ring and the quorum capped at its member count.
        read: quorum-reads keys (what a conditional write decides on).
        is_up: the failure detector's opinion (forwarding tries nodes it calls down last).
        request_timeout: seconds a write, forward or flush waits for its answers.
        on_flush: told of every ``flush_all`` this node coordinates (gossip carries it).
        hints: where this node keeps the writes a primary could not take.
        down: the nodes the failure detector calls down now (kept current by it).
        sloppy: whether fallbacks stand in for primaries that are down (sloppy quorum).
        also: during an ownership transition, the ring whose primaries of a key also get
            every write of it, uncounted (see :mod:`kai.core.transition`); else None.
        replicas: the configured N (the ``also`` ring's primaries of a key).
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        peers: PeerCaller,
        placement: Callable[[], tuple[Ring, Quorum]],
        read: Read,
        is_up: Callable[[NodeId], bool],
        request_timeout: float,
        on_flush: Callable[[int], None],
        hints: HintStore,
        down: Collection[NodeId] = frozenset(),
        sloppy: bool = True,
        also: Callable[[], Ring | None] = lambda: None,
        replicas: int = 3,
    ) -> None:
        self.self_node = self_node
        self.also = also
        self.replicas = replicas
        self.replica = replica
        self.placement = placement
        self.is_up = is_up
        self.hints = hints
        self.down = down
        self.sloppy = sloppy
        self.request_timeout = request_timeout
        self.on_flush = on_flush
        self._read = read
        self._peers = peers
        self.locks = KeyLocks()
        #: Writes this node handed to a primary of their key.
        self.forwarded_writes = 0
        #: Writes this node coordinated as a stand-in, with no primary of their key reachable.
        self.stand_in_writes = 0

    # --- set ----------------------------------------------------------------------------------

    def write(self, key: bytes, payload: Payload, context: VClock | None = None) -> Step[Version]:
        """Write a new version of ``key``: here if this node is a primary, else forwarded
        once to a primary.

        With ``context`` None the version supersedes every version the coordinating primary
        knows (a memcached ``set``); with a context (a client's read, see
        :mod:`kai.core.contexts`) it supersedes exactly what that context covers, and
        anything written concurrently stays beside it as a sibling.

        When no primary can be reached and quorums are sloppy, this node coordinates the
        write as a stand-in (see :meth:`_stand_in`).

        Raises (at once, or from the pending step):
            QuorumUnavailable: fewer than W replicas can acknowledge the write.
            QuorumTimeout: W acks did not arrive within ``request_timeout``.
            TooManySiblings: the write would leave too many siblings.
        """
        ring, quorum = self.placement()
        primaries = ring.primaries_of(key, quorum.n)
        if self.self_node in primaries:
            return self._write_here(key, payload, context, primaries, quorum.w)
        params: tuple[object, ...] = (key, payload.flags, payload.expiry, payload.value)
        if context is not None:
            params += (encode_context(context),)
        stand_in = (
            partial(self._stand_in, key, payload, context, primaries, quorum.w)
            if self.sloppy
            else None
        )
        return Pending(
            self._forward(
                key, "coordinate_put", params, primaries, _version_from, stand_in=stand_in
            )
        )

    def coordinate(
        self, key: bytes, payload: Payload, context: VClock | None = None
    ) -> Step[Version]:
        """Write as :meth:`write` does, here, whatever the ring says (a write a peer
        forwarded: forwarding again could loop).

        If rings briefly disagree and this node is no longer a primary, the version is
        stored here too, but only the primaries' acks count towards W.
        """
        primaries, w = self._primaries(key)
        return self._write_here(key, payload, context, primaries, w)

    def _write_here(
        self,
        key: bytes,
        payload: Payload,
        context: VClock | None,
        primaries: Sequence[NodeId],
        w: int,
    ) -> Step[Version]:
        if self.locks.locked(key):
            return Pending(self._write_in_turn(key, payload, context, primaries, w))
        return self._coordinate(key, payload, context, primaries, w)

    async def _write_in_turn(
        self,
        key: bytes,
        payload: Payload,
        context: VClock | None,
        primaries: Sequence[NodeId],
        w: int,
    ) -> Version:
        # A conditional write of this key is deciding: this write comes after it.
        async with self.locks.hold(key):
            return await resolve(self._coordinate(key, payload, context, primaries, w))

    # --- conditional writes -------------------------------------------------------------------

    def update(self, key: bytes, update: Update) -> Step[Applied]:
        """Carry out a conditional write at ``key``'s coordinating primary: here if this
        node is the first primary that is up, else forwarded once to it (or, when it cannot
        be reached, to the next primary).

        Raises (from the pending step): as :meth:`write`.
        """
        primaries, w = self._primaries(key)
        params = (key, update_to_wire(update))
        here = partial(self._update_here, key, update, primaries, w)
        return Pending(
            self._forward(key, "coordinate_update", params, primaries, applied_from_wire, here)
        )

    def coordinate_update(self, key: bytes, update: Update) -> Step[Applied]:
        """Carry out a conditional write here (one a peer forwarded: never forwarded again)."""
        primaries, w = self._primaries(key)
        return Pending(self._update_here(key, update, primaries, w))

    async def _update_here(
        self, key: bytes, update: Update, primaries: Sequence[NodeId], w: int
    ) -> Applied:
        async with self.locks.hold(key):
            (siblings,) = await resolve(self._read((key,)))
            now = self.replica.wall_clock()
            decision = decide(
                update, key, siblings, now=now, flushed_before=self.replica.flushed_before(now)
            )
            if decision.write is None:
                return Applied(decision.outcome)
            context = context_of(siblings)
            version = await resolve(self._coordinate(key, decision.write, context, primaries, w))
        # The new version supersedes everything read: it alone is the key's state now.
        return Applied(decision.outcome, version, cas_of(key, (version,)))

    # --- both ---------------------------------------------------------------------------------

    def _primaries(self, key: bytes) -> tuple[Sequence[NodeId], int]:
        ring, quorum = self.placement()
        return ring.primaries_of(key, quorum.n), quorum.w

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
        also = self.also()
        extras = () if also is None else self._extras(key, primaries, also)
        if not others and not extras:
            return version  # the only primary is this node, and it stored the version
        tally = Tally(min(w, len(primaries)), len(primaries))
        if len(others) < len(primaries):
            tally.reply()  # the local store is one ack
        deadline = trio.current_time() + self.request_timeout
        replication = _Replication(self, key, record, tally, primaries, deadline, self.down)
        replication.start(others, extras)
        if tally.met:
            replication.follow()
            return version
        return Pending(self._wait(replication, version))

    def _extras(self, key: bytes, primaries: Sequence[NodeId], also: Ring) -> tuple[NodeId, ...]:
        """The primaries of ``key`` on the ``also`` ring that are not primaries now (nor
        this node, which stored the write)."""
        return tuple(
            node
            for node in also.primaries_of(key, self.replicas)
            if node not in primaries and node != self.self_node
        )

    async def _stand_in(
        self,
        key: bytes,
        payload: Payload,
        context: VClock | None,
        primaries: Sequence[NodeId],
        w: int,
        unreachable: Collection[NodeId],
        deadline: float,
    ) -> Version:
        """Coordinate a write none of whose primaries could be reached (Dynamo's sloppy
        quorum: the first healthy nodes of the preference list take it).

        The version supersedes what this node's hints hold of the key (it holds no data of
        it), or what ``context`` covers when the client gave one, and has a dot of its own
        actor (:meth:`LocalReplica.stand_in_write`). Each
        primary's copy goes to the next fallback that is not down, this node included, as a
        hint for that primary; the handoff delivers them when the primaries are back.
        """
        known = self.hints.record_for(key)
        version, siblings = self.replica.stand_in_write(
            key, payload, decode_siblings(known) if known is not None else (), context
        )
        self.stand_in_writes += 1
        tally = Tally(min(w, len(primaries)), len(primaries))
        gone = {*unreachable, *self.down}
        replication = _Replication(
            self, key, encode_siblings(siblings), tally, primaries, deadline, gone
        )
        replication.start(primaries)
        return await self._wait(replication, version)

    async def _wait(self, replication: _Replication, version: Version) -> Version:
        tally, answers = replication.tally, replication.answers
        try:
            while not tally.met and not tally.lost:
                answer = await answers.receive()  # every call is answered by its deadline
                if answer is None:
                    break
                replication.answered(answer)
        finally:
            replication.follow()
        if not tally.met:
            raise tally.error(f"write of {replication.key!r}")
        return version

    async def _forward(
        self,
        key: bytes,
        method: str,
        params: tuple[object, ...],
        primaries: Sequence[NodeId],
        parse: Callable[[object], T],
        here: Callable[[], Awaitable[T]] | None = None,
        stand_in: Callable[[Collection[NodeId], float], Awaitable[T]] | None = None,
    ) -> T:
        """Hand a write to a primary of ``key`` (one hop): the first that is up, then the
        others in turn while they cannot be reached. When this node's own turn comes (it is
        a primary itself), ``here`` carries the write out. With ``stand_in``, primaries the
        failure detector calls down are not tried, and ``stand_in`` carries the write out
        when no primary could be reached (told which ones, and the deadline)."""
        candidates = [node for node in primaries if self.is_up(node)]
        if stand_in is None:
            candidates += [node for node in primaries if node not in candidates]
        deadline = trio.current_time() + self.request_timeout
        forwarded = False
        for peer in candidates:
            if peer == self.self_node:
                if here is None:
                    continue
                return await here()
            if not forwarded:
                forwarded = True
                self.forwarded_writes += 1
            answer = await self._peers.call(peer, method, params, deadline)
            if answer.timed_out:
                raise QuorumTimeout(f"write of {key!r}: primary {peer} did not answer in time")
            if answer.error is None:
                try:
                    return parse(answer.result)
                except (RpcBadRequest, ValueError) as exc:
                    raise QuorumUnavailable(
                        f"write of {key!r}: primary {peer} answered nonsense: {exc}"
                    ) from exc
            if isinstance(answer.error, RpcConnectionError):
                continue  # the write never reached it: try the next primary
            raise_forwarded(answer.error)
            raise QuorumUnavailable(f"write of {key!r}: primary {peer} failed: {answer.error}")
        if stand_in is not None:
            return await stand_in(primaries, deadline)
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


class _Replication:
    """One write on its way to the other primaries: W acks from them or from fallbacks
    standing in for them (sloppy quorum), and a hint kept here for each one neither reached.

    A primary in ``gone`` (the ones the failure detector calls down), or whose call could not
    reach it, is replaced by the next fallback of the key's preference list that is not down;
    the fallback keeps the write as a hint for it (``hint_apply``) and counts towards W. A
    coordinator that is not a primary (a stand-in) is a fallback too, and keeps its hint
    without a call. When no fallback is left, or the primary did not answer in time, this
    node keeps the hint itself (not counted: it is one node, already counted once). Answers
    that come after the decision are still followed, so that every primary gets the write or
    a hint.
    """

    __slots__ = (
        "answers",
        "deadline",
        "extras",
        "fallbacks",
        "gone",
        "key",
        "primaries",
        "record",
        "stand_ins",
        "tally",
        "writer",
    )

    def __init__(
        self,
        writer: QuorumWriter,
        key: bytes,
        record: bytes,
        tally: Tally,
        primaries: Sequence[NodeId],
        deadline: float,
        gone: Collection[NodeId],
    ) -> None:
        self.writer = writer
        self.gone = gone
        self.key = key
        self.record = record
        self.tally = tally
        self.primaries = primaries
        self.deadline = deadline
        self.answers: FanOut
        #: Fallback called -> the primary it stands in for.
        self.stand_ins: dict[NodeId, NodeId] | None = None  # made on first need
        self.fallbacks: list[NodeId] | None = None  # found on first need
        #: Nodes sent the write that do not count (a transition's next owners).
        self.extras: frozenset[NodeId] = frozenset()

    def start(self, others: Sequence[NodeId], extras: Sequence[NodeId] = ()) -> None:
        """Send the write to each other primary, or to a fallback for one that is down, and
        to each of ``extras`` (not counted: the next owners of a transition)."""
        calls = self._calls(others)
        if extras:
            self.extras = frozenset(extras)
            calls += [(node, "replica_apply", (self.key, self.record)) for node in extras]
        self.answers = self.writer._peers.fan_out(calls, self.deadline)

    def _calls(self, others: Sequence[NodeId]) -> list[Call]:
        gone, key, record = self.gone, self.key, self.record
        if not (gone and self.writer.sloppy):
            return [(peer, "replica_apply", (key, record)) for peer in others]
        calls: list[Call] = []
        for owner in others:
            fallback = self._fallback() if owner in gone else None
            if fallback is None:
                calls.append((owner, "replica_apply", (key, record)))
            elif (call := self._stand_in(fallback, owner)) is not None:
                calls.append(call)
        return calls

    def answered(self, answer: Answer) -> None:
        """Count one answer; find a stand-in, or keep a hint, for a replica it did not reach."""
        if self.extras and answer.peer in self.extras:
            if answer.missed:
                self.writer.hints.add(answer.peer, self.key, self.record)
            return
        if answer.ok and isinstance(answer.result, bool):
            self.tally.reply()
            return
        if answer.error is not None and not answer.missed:
            self.tally.fail(timed_out=False)  # it is up and refused the write (logged)
            return
        stand_ins = self.stand_ins
        owner = answer.peer if stand_ins is None else stand_ins.get(answer.peer, answer.peer)
        if not answer.timed_out and self.writer.sloppy:
            fallback = self._fallback()
            if fallback is not None:
                call = self._stand_in(fallback, owner)
                if call is not None:
                    self.writer._peers.add_calls(self.answers, [call], self.deadline)
                return
        self.writer.hints.add(owner, self.key, self.record)
        self.tally.fail(timed_out=answer.timed_out)

    def follow(self) -> None:
        """Stop waiting: the answers still to come are followed in the background."""
        self.answers.listen(self.answered, _nothing)

    def _stand_in(self, fallback: NodeId, owner: NodeId) -> Call | None:
        """The call asking ``fallback`` to keep the write for ``owner``; None when the
        fallback is this node, which keeps it at once (one ack)."""
        if fallback == self.writer.self_node:
            self.writer.hints.add(owner, self.key, self.record)
            self.tally.reply()
            return None
        if self.stand_ins is None:
            self.stand_ins = {}
        self.stand_ins[fallback] = owner
        return (fallback, "hint_apply", (str(owner), self.key, self.record))

    def _fallback(self) -> NodeId | None:
        """The next fallback of the key that is not down, or None."""
        if self.fallbacks is None:
            ring, _quorum = self.writer.placement()
            preference = ring.preference_list(ring.partition_for_key(self.key))
            # A coordinator that is a primary is skipped with them; a stand-in is not.
            skip = {*self.primaries, *self.extras}
            self.fallbacks = [node for node in preference if node not in skip]
        down = self.writer.down
        while self.fallbacks:
            node = self.fallbacks.pop(0)
            if node not in down:
                return node
        return None


def _nothing() -> None:
    pass


def _version_from(result: object) -> Version:
    """The version a primary wrote for a forwarded ``set`` (a one-version record)."""
    (version,) = siblings_from_wire(result)
    return version
