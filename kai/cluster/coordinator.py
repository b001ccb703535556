"""The coordinator (DESIGN §5): N/R/W quorum reads and writes over the ring, for any size.

The memcached front end reads and writes keys only through :class:`Coordinator`. A key's
replicas are its N primaries on the ring (``ring().primaries(partition, N)``, with N, R and W
capped at the member count). A node of one is a ring of one and runs this same code: its
reads and writes are decided by its own replica, so they come back at once; in a larger
cluster they come back as pending steps (:mod:`kai.core.pending`).

* Reads are coordinated by whichever node received them (:mod:`kai.cluster.reads`): every
  primary is asked in parallel, the answer goes out once R replies per key are in, and later
  replies still feed read repair.
* Writes are coordinated by a primary (:mod:`kai.cluster.writes`); any other node forwards
  them once. Conditional writes are decided by the key's coordinating primary (the first
  primary that is up), under its lock for the key.
* ``flush_all`` is recorded here, handed to gossip (``on_flush``) and sent to every member.

What it must never do: answer a read from fewer than R replies or acknowledge a write with
fewer than W acks; forward a write more than once; let a slow or dead replica delay an answer
once the quorum is in; run a task outside the nurseries it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

import trio

from kai.cluster.fanout import PeerCaller
from kai.cluster.hints import HintStore
from kai.cluster.reads import QuorumReader
from kai.cluster.replica_rpc import READ_REPLY_BUDGET, ReplicaRpcHandlers
from kai.cluster.writes import QuorumWriter
from kai.core.config import Quorum
from kai.core.errors import QuorumUnavailable
from kai.core.pending import Pending, Step
from kai.core.quorum import ReadRound
from kai.core.ring import NodeId, Ring
from kai.core.updates import Applied, Update
from kai.core.vclock import VClock
from kai.core.versions import Payload, SiblingSet, Version
from kai.rpc.server import Handler
from kai.rpc.transport import FanOutTransport
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)


class Coordinator:
    """Reads and writes keys on behalf of clients, wherever their replicas are.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica.
        transport: how to call peers.
        ring: the current ring (asked once per request, so membership changes apply to the
            next request).
        quorum: the configured N, R, W (capped at the member count per request).
        background: the nursery that runs replication, late replies and read repair.
        is_up: the failure detector's opinion; nodes it calls down are still asked for reads
            and writes (they may be back), but forwarding tries them last.
        on_success: told of every peer that answered a call (even with an error).
        on_failure: told of every peer that could not be reached or did not answer in time.
        request_timeout: seconds a read, write or forward waits for its quorum; also bounds
            the background collection of late replies and each read repair round.
        on_flush: told of every ``flush_all`` this node coordinates (the membership view
            gossips it to nodes that are down).
        read_reply_budget: bytes of records this node puts in one ``replica_read`` answer
            before it stops and lets the caller ask for the rest.

    Errors (raised at once or from the pending step): :class:`~kai.core.errors.QuorumTimeout`
    and :class:`~kai.core.errors.QuorumUnavailable` when a quorum cannot be met (the client
    sees ``SERVER_ERROR``), :class:`~kai.core.errors.TooManySiblings` when a write is refused.
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        transport: FanOutTransport,
        ring: Callable[[], Ring],
        quorum: Quorum,
        background: trio.Nursery,
        is_up: Callable[[NodeId], bool] = lambda node: True,
        on_success: Callable[[NodeId], None] = lambda node: None,
        on_failure: Callable[[NodeId], None] = lambda node: None,
        request_timeout: float = 5.0,
        on_flush: Callable[[int], None] = lambda at: None,
        read_reply_budget: int = READ_REPLY_BUDGET,
        hints: HintStore | None = None,
        down: Collection[NodeId] = frozenset(),
        sloppy: bool = True,
        also: Callable[[], Ring | None] = lambda: None,
    ) -> None:
        self.self_node = self_node
        self.replica = replica
        self.ring = ring
        self.quorum = quorum
        self.hints = (
            hints if hints is not None else HintStore(replica.engine, buckets=replica.buckets)
        )
        self.down = down
        self.sloppy = sloppy
        self._capped: dict[int, Quorum] = {}
        self._placed: tuple[Ring, Quorum] | None = None
        #: The flush cutoff (microseconds) in effect at a unix time: the local replica's, as
        #: flushes reach every node by RPC or by gossip.
        self.flushed_before: Callable[[float], int] = replica.flushed_before
        self._peers = PeerCaller(
            transport, background, on_success=on_success, on_failure=on_failure
        )
        self._reads = QuorumReader(
            self_node=self_node,
            replica=replica,
            peers=self._peers,
            request_timeout=request_timeout,
            is_primary=self._is_primary,
        )
        self._writes = QuorumWriter(
            self_node=self_node,
            replica=replica,
            peers=self._peers,
            placement=self._placement,
            read=self.get,
            is_up=is_up,
            request_timeout=request_timeout,
            on_flush=on_flush,
            hints=self.hints,
            down=down,
            sloppy=sloppy,
            also=also,
            replicas=quorum.n,
        )
        self._rpc = ReplicaRpcHandlers(
            replica,
            self._writes.coordinate,
            self._writes.coordinate_update,
            self_node=self_node,
            hints=self.hints,
            read_reply_budget=read_reply_budget,
        )

    # --- introspection ------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this node serves to peers' coordinators (see ``replica_rpc``)."""
        return self._rpc.handlers()

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats``."""
        return [
            ("kai_read_repairs", self._reads.read_repairs),
            ("kai_forwarded_writes", self._writes.forwarded_writes),
            ("kai_replica_timeouts", self._peers.timeouts),
            ("kai_replica_errors", self._peers.errors),
            ("kai_stand_in_writes", self._writes.stand_in_writes),
        ]

    @property
    def peers(self) -> PeerCaller:
        """How this node calls its peers (deadlines, failure-detector feedback, counters):
        the one way for every other service of the node to call them too."""
        return self._peers

    def members(self) -> list[str]:
        """The ring's members as ``host:rpc_port``, sorted."""
        return sorted(str(node) for node in self.ring().nodes)

    # --- reads and writes ---------------------------------------------------------------------

    def get(self, keys: Sequence[bytes]) -> Step[list[SiblingSet]]:
        """Quorum-read ``keys`` (any number, duplicates allowed): the merged sibling set of
        each, in their order.

        Any node coordinates a read, primary or not: reads build no clock, so there is
        nothing to gain from a forwarding hop. Each primary is asked once for all the keys it
        holds; each key needs R replies (a not-found counts).

        Raises (at once, or from the pending step):
            QuorumUnavailable: too many replicas of some key failed to ever reach R.
            QuorumTimeout: some key did not get R replies within ``request_timeout``.
        """
        unique = keys if len(keys) == 1 else list(dict.fromkeys(keys))
        ring, quorum = self._placement()
        n, primaries_of = quorum.n, ring.primaries_of
        if len(unique) == 1:
            replicas = [primaries_of(unique[0], n)]
        else:
            replicas = [primaries_of(key, n) for key in unique]
        if self.down and self.sloppy:
            replicas = [
                self._standing_in(ring, key, of) for key, of in zip(unique, replicas, strict=True)
            ]
        read_local = self.hints.reader(self.replica.read_record)
        round_ = ReadRound(unique, replicas, quorum.r, self.self_node, read_local)
        decided = self._reads.read(round_)
        if decided is not None:
            return Pending(_results_when_decided(keys, round_, decided))
        return round_.merged if unique is keys else _results(keys, round_)

    def put(self, key: bytes, payload: Payload, context: VClock | None = None) -> Step[Version]:
        """Write ``payload`` as a new version of ``key`` with W acks (a delete when the value
        is None), superseding every version its coordinating primary knows (a memcached
        ``set``), or, given a client's ``context``, exactly the versions it covers (Dynamo's
        put: what was written concurrently stays as a sibling).

        A failed write may still have landed on some replicas (the Dynamo contract): a
        timeout or unavailability only means fewer than W acknowledged it in time.
        """
        return self._writes.write(key, payload, context)

    def update(self, key: bytes, update: Update) -> Step[Applied]:
        """Carry out a conditional write (cas, add, replace, append, prepend, incr, decr,
        touch, delete) at ``key``'s coordinating primary: the first of its primaries that is
        up reads it, checks the condition and writes, under its lock for the key.

        Raises (from the pending step): as :meth:`put`; a failed write may have landed too.
        """
        return self._writes.update(key, update)

    def flush_all(self, at: int) -> Step[None]:
        """Make every version written before unix time ``at`` (microseconds) invisible,
        here at once and on every other member best-effort."""
        return self._writes.flush_all(at)

    # --- plumbing -----------------------------------------------------------------------------

    def _standing_in(
        self, ring: Ring, key: bytes, primaries: tuple[NodeId, ...]
    ) -> tuple[NodeId, ...]:
        """``primaries`` with each one that is down replaced by the next fallback that is
        not (sloppy quorum: a fallback answers with the hints it keeps)."""
        down = self.down
        if not any(node in down for node in primaries):
            return primaries
        preference = ring.preference_list(ring.partition_for_key(key))
        fallbacks = (node for node in preference[len(primaries) :] if node not in down)
        replicas = []
        for node in primaries:
            if node in down:
                node = next(fallbacks, node)  # none left: ask the primary anyway
            replicas.append(node)
        return tuple(replicas)

    def _is_primary(self, key: bytes, node: NodeId) -> bool:
        ring, quorum = self._placement()
        return node in ring.primaries_of(key, quorum.n)

    def _placement(self) -> tuple[Ring, Quorum]:
        """The current ring, and the quorum capped at its member count."""
        ring = self.ring()
        placed = self._placed
        if placed is not None and placed[0] is ring:
            return placed
        members = len(ring.nodes)
        if not members:
            raise QuorumUnavailable("the ring has no members")
        quorum = self._capped.get(members)
        if quorum is None:
            quorum = self._capped[members] = self.quorum.capped(members)
        self._placed = ring, quorum
        return ring, quorum


async def _results_when_decided(
    keys: Sequence[bytes], round_: ReadRound, decided: Pending[None]
) -> list[SiblingSet]:
    await decided
    return _results(keys, round_)


def _results(keys: Sequence[bytes], round_: ReadRound) -> list[SiblingSet]:
    if len(round_.keys) == len(keys):
        return round_.merged
    by_key = dict(zip(round_.keys, round_.merged, strict=True))
    return [by_key[key] for key in keys]
