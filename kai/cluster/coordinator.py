"""The quorum coordinator (DESIGN §5): N/R/W fan-out over the ring, forwarding, read repair.

The memcached front end calls it through the :class:`~kai.coordinator.Coordinator` interface,
exactly as it calls the single-node coordinator. A key's replicas are its N primaries on the
ring (``ring().primaries(partition, N)``, with N, R and W capped at the member count).

* Reads are coordinated by whichever node received them: every primary is asked in parallel
  (this node's replica directly, peers with one ``replica_read`` per peer for all the keys it
  holds), the answer goes out as soon as R replies per key are in, and the replies that come
  later are still collected in the background to repair stale or missing replicas
  (:mod:`kai.cluster.reads`; this module finds the replicas and builds the read's round).
* Writes are coordinated by a primary, because the replica builds the new clock atomically
  with its local store. A node that is not a primary forwards the write once, to the first
  primary that is up; the primary never forwards it again.
* ``flush_all`` is recorded locally, handed to the membership view (``on_flush``) so it
  reaches nodes that are down, and sent best-effort to every other member.

What it must never do: answer a read from fewer than R replies or acknowledge a write with
fewer than W acks; forward a write more than once; let a slow or dead replica delay an answer
once the quorum is in; run a task outside the nurseries it was given; use the transport at
all in a cluster of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from kai.cluster.fanout import PeerCaller
from kai.cluster.reads import QuorumReader
from kai.cluster.replica_rpc import (
    READ_REPLY_BUDGET,
    ReplicaRpcHandlers,
    context_to_wire,
    raise_forwarded,
    siblings_from_wire,
)
from kai.coordinator import Coordinator, ReadResult
from kai.core.config import Quorum
from kai.core.errors import (
    QuorumTimeout,
    QuorumUnavailable,
    RpcBadRequest,
    RpcConnectionError,
)
from kai.core.quorum import KeyRound, ReadRound, Tally
from kai.core.ring import NodeId, Ring
from kai.core.vclock import VClock
from kai.core.versions import Version
from kai.rpc.server import Handler
from kai.rpc.transport import FanOutTransport
from kai.storage.replica import LocalReplica, Payload

logger = logging.getLogger(__name__)


class ClusterCoordinator(Coordinator):
    """Coordinates reads and writes across the cluster's replicas.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica.
        transport: how to call peers.
        ring: the current ring (asked once per request, so membership changes apply to the
            next request).
        quorum: the configured N, R, W (capped at the member count per request).
        is_up: the failure detector's opinion; nodes it calls down are still asked for reads
            and writes (they may be back), but forwarding tries them last.
        on_success: told of every peer that answered a call (even with an error).
        on_failure: told of every peer that could not be reached or did not answer in time.
        request_timeout: seconds a read, write or forward waits for its quorum; also bounds
            the background collection of late replies and each read repair round.
        on_flush: told of every ``flush_all`` this node coordinates (the membership view
            gossips it to nodes that are down).
        background: the nursery that runs replication, late replies and read repair.
        wall_clock: unix time in seconds (injectable for tests).
        read_reply_budget: bytes of records this node puts in one ``replica_read`` answer
            before it stops and lets the caller ask for the rest.
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        transport: FanOutTransport,
        ring: Callable[[], Ring],
        quorum: Quorum,
        is_up: Callable[[NodeId], bool] = lambda node: True,
        on_success: Callable[[NodeId], None] = lambda node: None,
        on_failure: Callable[[NodeId], None] = lambda node: None,
        request_timeout: float = 5.0,
        on_flush: Callable[[int], None] = lambda at: None,
        background: trio.Nursery,
        wall_clock: Callable[[], float] = time.time,
        read_reply_budget: int = READ_REPLY_BUDGET,
    ) -> None:
        self.self_node = self_node
        self.replica = replica
        self.transport = transport
        self.ring = ring
        self.quorum = quorum
        self._capped: dict[int, Quorum] = {}
        self.is_up = is_up
        self.on_success = on_success
        self.on_failure = on_failure
        self.request_timeout = request_timeout
        self.on_flush = on_flush
        self.background = background
        self.wall_clock = wall_clock
        self.forwarded_writes = 0
        self._peers = PeerCaller(
            transport, background, on_success=on_success, on_failure=on_failure
        )
        self._rpc = ReplicaRpcHandlers(
            replica, self._coordinate_write, read_reply_budget=read_reply_budget
        )
        self._reads = QuorumReader(
            self_node=self_node,
            replica=replica,
            peers=self._peers,
            request_timeout=request_timeout,
        )

    # --- introspection ------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this node serves to peers' coordinators (see ``replica_rpc``)."""
        return self._rpc.handlers()

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats``."""
        return [
            ("kai_read_repairs", self._reads.read_repairs),
            ("kai_forwarded_writes", self.forwarded_writes),
            ("kai_replica_timeouts", self._peers.timeouts),
            ("kai_replica_errors", self._peers.errors),
        ]

    def members(self) -> list[str]:
        """The ring's members as ``host:rpc_port``, sorted."""
        return sorted(str(node) for node in self.ring().nodes)

    def flushed_before(self, now: float) -> int:
        """The local flush cutoff (flushes reach every node by RPC or by gossip)."""
        return self.replica.flushed_before(now)

    # --- reads --------------------------------------------------------------------------------

    async def get(self, key: bytes) -> ReadResult:
        """Quorum-read one key (see :meth:`get_many`)."""
        at_once = self.get_at_once(key)
        if at_once is not None:
            return at_once
        ring, quorum = self._ring_and_quorum()
        replicas = ring.primaries(ring.partition_for_key(key), quorum.n)
        if replicas == (self.self_node,):
            return ReadResult(self.replica.read(key))
        round_ = KeyRound(key, replicas, quorum.r)
        await self._reads.read(round_)
        return ReadResult(round_.merged[0])

    def get_at_once(self, key: bytes) -> ReadResult | None:
        """The local read while this node is the only member; None otherwise."""
        return ReadResult(self.replica.read(key)) if self._alone() else None

    async def get_many(self, keys: Sequence[bytes]) -> list[ReadResult]:
        """Quorum-read keys; results are in the order of ``keys``.

        Any node coordinates a read, primary or not: reads build no clock, so there is
        nothing to gain from a forwarding hop. Each primary is asked once for all the keys it
        holds; each key needs R replies (a not-found counts). Once every key has them the
        answer goes out; later replies are collected in the background (bounded by
        ``request_timeout``) and stale or missing replicas are sent the merged sibling set.

        Raises:
            QuorumUnavailable: too many replicas of some key failed to ever reach R.
            QuorumTimeout: some key did not get R replies within ``request_timeout``.
        """
        unique = list(dict.fromkeys(keys))
        if not unique:
            return []
        ring, quorum = self._ring_and_quorum()
        replicas = [ring.primaries(ring.partition_for_key(key), quorum.n) for key in unique]
        self_only = (self.self_node,)
        if all(nodes == self_only for nodes in replicas):
            read = self.replica.read  # a cluster of one: exactly the local coordinator
            by_key = {key: ReadResult(read(key)) for key in unique}
            return [by_key[key] for key in keys]

        round_ = ReadRound(unique, replicas, quorum.r)
        await self._reads.read(round_)
        by_key = {
            key: ReadResult(siblings) for key, siblings in zip(unique, round_.merged, strict=True)
        }
        return [by_key[key] for key in keys]

    # --- writes -------------------------------------------------------------------------------

    async def put(self, key: bytes, payload: Payload, *, context: VClock | None) -> Version:
        """Write a new version of ``key`` with W acks.

        A primary of ``key`` coordinates the write itself; any other node forwards it once
        to the first primary that is up (then to the others, in preference order, while
        they cannot be reached). The forward is a single hop: the primary never forwards.

        A failed write may still have landed on some replicas (the Dynamo contract): a
        timeout or unavailability only means fewer than W acknowledged it in time.

        Raises:
            QuorumUnavailable: fewer than W replicas can acknowledge the write.
            QuorumTimeout: W acks did not arrive within ``request_timeout``.
            TooManySiblings: the write would leave too many siblings.
        """
        at_once = self.put_at_once(key, payload, context=context)
        if at_once is not None:
            return at_once
        ring, quorum = self._ring_and_quorum()
        primaries = ring.primaries(ring.partition_for_key(key), quorum.n)
        if self.self_node in primaries:
            return await self._coordinate_write(key, payload, context, primaries)
        return await self._forward_write(key, payload, context, primaries)

    def put_at_once(
        self, key: bytes, payload: Payload, *, context: VClock | None
    ) -> Version | None:
        """The local write while this node is the only member; None otherwise."""
        return self.replica.coordinate_write(key, payload, context) if self._alone() else None

    async def _coordinate_write(
        self,
        key: bytes,
        payload: Payload,
        context: VClock | None,
        primaries: Sequence[NodeId] | None = None,
    ) -> Version:
        """Build, store and replicate a new version here, whatever the ring says.

        Also serves ``coordinate_put`` for forwarded writes. If rings briefly disagree and
        this node is no longer a primary, it still coordinates the write (forwarding again
        could loop): the version is stored here too, but only the primaries' acks count
        towards W.
        """
        ring, quorum = self._ring_and_quorum()
        if primaries is None:  # forwarded here: look them up in this node's ring
            primaries = ring.primaries(ring.partition_for_key(key), quorum.n)
        version, record = self.replica.coordinate_write_record(key, payload, context)
        others = [node for node in primaries if node != self.self_node]
        if not others:
            return version
        tally = Tally(min(quorum.w, len(primaries)), len(primaries))
        if len(others) < len(primaries):
            tally.reply()  # the local store is one ack
        deadline = trio.current_time() + self.request_timeout
        answers = self._peers.fan_out(
            [(peer, "replica_apply", (key, record)) for peer in others], deadline
        )
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

    async def _forward_write(
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

    # --- flush_all ----------------------------------------------------------------------------

    async def flush_all(self, at: int) -> None:
        """Flush here, hand the flush to gossip, and tell every other member best-effort.

        Waits (at most ``request_timeout``) only for the members the failure detector
        thinks are up; the others hear of it by gossip when they are back.
        """
        self.replica.flush(at)
        self.on_flush(at)
        peers = [node for node in self.ring().nodes if node != self.self_node]
        if not peers:
            return
        deadline = trio.current_time() + self.request_timeout
        waiting = {peer for peer in peers if self.is_up(peer)}
        answers = self._peers.fan_out([(peer, "flush", (at,)) for peer in peers], deadline)
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

    # --- plumbing -----------------------------------------------------------------------------

    def _alone(self) -> bool:
        """Whether this node is the only member: then every request is purely local."""
        nodes = self.ring().nodes
        return len(nodes) == 1 and nodes[0] == self.self_node

    def _ring_and_quorum(self) -> tuple[Ring, Quorum]:
        ring = self.ring()
        members = len(ring.nodes)
        if not members:
            raise QuorumUnavailable("the ring has no members")
        quorum = self._capped.get(members)
        if quorum is None:
            quorum = self._capped[members] = self.quorum.capped(members)
        return ring, quorum
