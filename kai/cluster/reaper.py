"""Reaping (DESIGN §3, §8): keys whose every version has been dead for ``tombstone_grace``
are deleted for good, on every primary.

A version is dead when it is a tombstone (since its timestamp), expired (since its expiry)
or flushed (since the flush cutoff). The first primary of a partition scans it, one
partition every ``interval``, in chunks with a checkpoint between them, and for each batch of
dead keys asks every other primary for its records (``replica_read``). Only if all N
primaries answered, and each holds the byte-identical record or nothing, does it ask each
of them to ``reap`` the keys, and it reaps its own copy of the keys every one of them
confirmed. A write that lands meanwhile wins: every replica deletes a key only if its record
is still exactly the one that was checked (:meth:`~kai.storage.replica.LocalReplica.reap`).

Nothing reaped comes back: merges refuse versions older than the grace that a replica never
saw (:meth:`~kai.storage.replica.LocalReplica.apply`), so a node away for longer than the
grace must be wiped and rejoined.

``reap(items: list[[key, record]]) -> list[bool]``
    The RPC a first primary calls on the others: delete each key whose stored record is
    byte for byte ``record``, provided that record is dead past the grace by this node's own
    clock and flushes; True for each key that is absent here afterwards.

It must never reap a key unless every primary answered for it, never delete a record that
differs from the one checked, never delete for a peer a record that is not dead past the
grace here, and never stall the event loop with a long scan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import msgpack
import trio
import trio.lowlevel

from kai.cluster.fanout import PeerCaller
from kai.core.config import Quorum
from kai.core.ring import NodeId, Ring
from kai.core.versions import SiblingSet, Version, decode_siblings
from kai.core.wire import records_from_wire
from kai.rpc.server import Handler
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: Records read from storage per chunk of a partition scan (a checkpoint follows each).
SCAN_CHUNK = 256
#: A batch of keys offered to the other primaries stops growing at this many record bytes.
BATCH_BYTES = 1 << 20
#: The most items one ``reap`` call may carry (what a node accepts).
MAX_REAP_BATCH = 1024

#: One key to reap and the record that was found dead on every primary.
Candidate = tuple[bytes, bytes]


def dead_since(version: Version, now: float, flushed_before: int) -> int | None:
    """When (unix microseconds) ``version`` became invisible for good, or None if it is not.

    Never earlier than the version's own timestamp, so that a reaped version is always older
    than the grace when it is offered again (and refused).

    Args:
        version: the version.
        now: the current unix time in seconds.
        flushed_before: the flush cutoff in effect (microseconds, 0 = none).
    """
    if version.value is None:
        return version.timestamp
    deaths = []
    if version.timestamp <= flushed_before:
        deaths.append(flushed_before)
    if version.expiry and now >= version.expiry:
        deaths.append(max(version.timestamp, version.expiry * 1_000_000))
    return min(deaths) if deaths else None


def reapable(siblings: SiblingSet, now: float, flushed_before: int, grace: float) -> bool:
    """Whether every version of ``siblings`` (at least one) has been dead for longer than
    ``grace`` seconds at unix time ``now``."""
    if not siblings:
        return False
    cutoff = int((now - grace) * 1_000_000)
    for version in siblings:
        since = dead_since(version, now, flushed_before)
        if since is None or since >= cutoff:
            return False
    return True


class Reaper:
    """Reaps the dead keys of the partitions this node is the first primary of.

    Args:
        self_node: this node's ring identity.
        replica: this node's replica (its clock, flushes and ``tombstone_grace`` decide what
            is dead).
        peers: how to call the other primaries.
        ring: the current ring.
        quorum: the configured quorum (N, capped at the member count, is the primaries).
        interval: seconds between two rounds; each round scans one partition.
        request_timeout: seconds each call to a peer may take.
        settled: whether no ownership transition is under way (reaping waits for one).
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        peers: PeerCaller,
        ring: Callable[[], Ring],
        quorum: Quorum,
        interval: float,
        request_timeout: float,
        settled: Callable[[], bool] = lambda: True,
    ) -> None:
        self.self_node = self_node
        self.settled = settled
        self.replica = replica
        self.peers = peers
        self.ring = ring
        self.quorum = quorum
        self.interval = interval
        self.request_timeout = request_timeout
        #: Partition rounds done.
        self.rounds = 0
        #: Dead keys left for a later round: a primary did not answer, held another record,
        #: or a write came in between.
        self.deferred = 0
        self._next_partition = 0
        self._led: tuple[Ring, list[int]] | None = None

    def handlers(self) -> dict[str, Handler]:
        """The RPC method a first primary calls on the other primaries."""
        return {"reap": self.reap}

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats`` (reaped keys are ``kai_tombstones_reaped``)."""
        return [("kai_reap_rounds", self.rounds), ("kai_reap_deferred", self.deferred)]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap one partition every ``interval`` until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.reap_round()

    # --- the first primary's side -----------------------------------------------------------

    async def reap_round(self) -> int:
        """Scan the next partition this node is the first primary of; the keys reaped."""
        ring = self.ring()
        partition = self._next_led_partition(ring)
        if partition is None or not self.settled():
            return 0  # nothing led here, or data is moving: its owners may not all hold it
        self.rounds += 1
        primaries = ring.preference_list(partition)[: self.quorum.capped(len(ring.nodes)).n]
        engine = self.replica.engine
        reaped = 0
        after: bytes | None = None
        while chunk := engine.scan(partition, start_after=after, limit=SCAN_CHUNK):
            after = chunk[-1][0]
            for batch in _batches(self._candidates(chunk)):
                if self.ring() is not ring or not self.settled():
                    return reaped  # the members changed: the next round looks again
                reaped += await self._reap_everywhere(primaries, batch)
            if len(chunk) < SCAN_CHUNK:
                break
            await trio.lowlevel.checkpoint()
        return reaped

    def _next_led_partition(self, ring: Ring) -> int | None:
        """The next partition (round robin) whose first primary is this node."""
        if self._led is None or self._led[0] is not ring:
            led = [p for p in range(ring.buckets) if ring.preference_list(p)[0] == self.self_node]
            self._led = ring, led
        led = self._led[1]
        if not led:
            return None
        for partition in led:
            if partition >= self._next_partition:
                break
        else:
            partition = led[0]
        self._next_partition = partition + 1
        return partition

    def _candidates(self, chunk: Sequence[tuple[bytes, bytes]]) -> list[Candidate]:
        """The keys of ``chunk`` whose record is dead past the grace here (a record that does
        not decode is never one)."""
        replica = self.replica
        now = replica.wall_clock()
        flushed = replica.flushed_before(now)
        grace = replica.tombstone_grace
        candidates = []
        for key, record in chunk:
            try:
                siblings = decode_siblings(record)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                logger.warning("reap: the stored record of %r does not decode (kept): %s", key, exc)
                continue
            if reapable(siblings, now, flushed, grace):
                candidates.append((key, record))
        return candidates

    async def _reap_everywhere(self, primaries: Sequence[NodeId], batch: list[Candidate]) -> int:
        """Reap ``batch`` on every primary that holds it byte for byte (or holds nothing),
        if all of them answer; the keys reaped here."""
        others = [node for node in primaries if node != self.self_node]
        keys = [key for key, _record in batch]
        same = [True] * len(batch)
        for peer in others:
            held = await self._read(peer, keys)
            if held is None:
                self.deferred += len(batch)
                return 0
            for index, theirs in enumerate(held):
                if theirs is not None and theirs != batch[index][1]:
                    same[index] = False
        agreed = [item for item, agrees in zip(batch, same, strict=True) if agrees]
        # This copy goes last, once every other primary confirmed: until then a later round
        # finds it again and retries.
        confirmed = await self._reap_on_others(others, agreed)
        reaped = sum(self.replica.reap(key, record) for key, record in confirmed)
        self.deferred += len(batch) - reaped
        return reaped

    async def _reap_on_others(
        self, others: Sequence[NodeId], items: list[Candidate]
    ) -> list[Candidate]:
        """Ask every other primary to reap ``items``; those that are absent on all of them
        afterwards (none if one did not answer)."""
        for peer in others:
            if not items:
                break
            absent = await self._reap_on(peer, items)
            if absent is None:
                return []
            items = [item for item, gone in zip(items, absent, strict=True) if gone]
        return items

    async def _read(self, peer: NodeId, keys: list[bytes]) -> list[bytes | None] | None:
        """``peer``'s record of each key (None: absent there), asking again for what an
        answer left out; None if it did not answer them all."""
        records: list[bytes | None] = []
        deadline = trio.current_time() + self.request_timeout
        while len(records) < len(keys):
            rest = keys[len(records) :]
            answer = await self.peers.call(peer, "replica_read", (rest,), deadline)
            result = answer.result
            if not answer.ok or not _is_record_list(result, len(rest)):
                logger.debug("reap: %s did not answer replica_read: %s", peer, answer)
                return None
            assert isinstance(result, list | tuple)  # _is_record_list checked it
            records.extend(result)
        return records

    async def _reap_on(self, peer: NodeId, items: list[Candidate]) -> list[bool] | None:
        """Ask ``peer`` to reap ``items``: for each, whether it is absent there now; None if
        it did not answer."""
        deadline = trio.current_time() + self.request_timeout
        params = ([[key, record] for key, record in items],)
        answer = await self.peers.call(peer, "reap", params, deadline)
        result = answer.result
        if (
            not answer.ok
            or not isinstance(result, list | tuple)
            or len(result) != len(items)
            or not all(isinstance(done, bool) for done in result)
        ):
            logger.debug("reap: %s did not answer reap: %s", peer, answer)
            return None
        return list(result)

    # --- the other primaries' side ----------------------------------------------------------

    def reap(self, items: object) -> list[bool]:
        """Delete each ``[key, record]`` whose stored record is still ``record``, if that
        record is dead past the grace here too; whether each key is absent here afterwards.

        Raises:
            RpcBadRequest: ``items`` is not a list of 1 to :data:`MAX_REAP_BATCH` pairs of a
                valid key and a well-formed record (nothing is reaped).
        """
        checked = records_from_wire(items, MAX_REAP_BATCH)
        replica = self.replica
        now = replica.wall_clock()
        flushed = replica.flushed_before(now)
        grace = replica.tombstone_grace
        absent = []
        for key, siblings, record in checked:
            if reapable(siblings, now, flushed, grace) and replica.reap(key, record):
                absent.append(True)
            else:
                absent.append(replica.read_record(key)[1] is None)
        return absent


def _batches(candidates: list[Candidate]) -> list[list[Candidate]]:
    """``candidates`` cut into batches of about :data:`BATCH_BYTES` record bytes (the first
    of each always goes in)."""
    batches: list[list[Candidate]] = []
    size = BATCH_BYTES
    for candidate in candidates:
        if size + len(candidate[1]) > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(candidate)
        size += len(candidate[1])
    return batches


def _is_record_list(result: object, most: int) -> bool:
    """Whether ``result`` is a ``replica_read`` answer for 1 to ``most`` keys."""
    return (
        isinstance(result, list | tuple)
        and 1 <= len(result) <= most
        and all(record is None or isinstance(record, bytes) for record in result)
    )
