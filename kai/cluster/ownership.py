"""Ownership transfer (DESIGN §8): the node's part in moving partitions, copy → switch → delete.

The membership view says where keys live (:mod:`kai.core.transition`); this service moves
them there. Every ``interval``, and at once when the view changes, it

* acknowledges the placement this node applies now (its reads and writes follow it from the
  moment the view changed);
* while copying, once every member that is up acknowledged the copying phase, sends each
  partition it is the first current owner of (of those that are up) to each new owner that
  does not have it yet, as a transfer (:mod:`kai.cluster.transfers`): resumable, throttled,
  at most ``transfer_limit`` at once. A finished copy is recorded in the view, and gossip
  carries it to every node;
* once every copy is done and every member that is up acknowledged the switch, finalizes
  the statuses (joining → valid, leaving → left);
* once settled and acknowledged by every member that is up, deletes the partitions this
  node holds data of but does not own.

It must never record a copy as done before the new owner acknowledged its last batch,
finalize before every copy is done, or delete data before every member that is up applied
the settled placement. A node started with seeds does nothing until its view lists one of
them (it would otherwise settle a cluster of one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
import trio.lowlevel

from kai.cluster.transfers import Cursor, Item, Transfer, Transfers
from kai.core.membership import MembershipView
from kai.core.ring import NodeId
from kai.core.storage import StorageEngine
from kai.core.transition import COPYING, SETTLED, SWITCHED, Placement, acknowledged
from kai.membership.gossip import Membership
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: Records a cleanup deletes between two checkpoints of the event loop.
DELETE_CHUNK = 256
#: Records a count reads between two checkpoints of the event loop.
COUNT_CHUNK = 1024
#: Prefix of an ownership transfer's id (the rest: transition, partition, target).
TRANSFER_PREFIX = "own-"


async def partition_size(engine: StorageEngine, partition: int) -> tuple[int, int]:
    """Records and record bytes of one partition of ``engine``, counted in chunks that let
    other work run in between."""
    keys = size = 0
    after: bytes | None = None
    while chunk := engine.scan(partition, start_after=after, limit=COUNT_CHUNK):
        keys += len(chunk)
        size += sum(len(record) for _key, record in chunk)
        after = chunk[-1][0]
        await trio.lowlevel.checkpoint()
    return keys, size


class PartitionSource:
    """One partition of this node's data, in key order, as a transfer source, with its size
    as counted before the copy (:func:`partition_size`). Delivering forgets nothing: the old
    owner deletes its copy only when the transition has settled."""

    kind: str = "partition"

    def __init__(self, engine: StorageEngine, partition: int, size: tuple[int, int]) -> None:
        self.engine = engine
        self.partition: int | None = partition
        self._partition = partition
        self._size = size

    def remaining(self) -> tuple[int, int]:
        """Records and bytes of the partition, as counted before the copy."""
        return self._size

    def read(self, after: Cursor | None, keys: int, size: int) -> list[Item]:
        """The next records after ``after``, up to ``keys`` of them and about ``size`` bytes."""
        start = after[1] if after is not None else None
        items: list[Item] = []
        total = 0
        for key, record in self.engine.scan(self._partition, start_after=start, limit=keys):
            if items and total + len(record) > size:
                break
            items.append(((self._partition, key), key, record))
            total += len(record)
        return items

    def delivered(self, items: list[Item]) -> None:
        """Nothing to forget (see the class)."""


def transfer_id(transition: int, partition: int, target: NodeId) -> str:
    """The id of the copy of ``partition`` to ``target`` in ``transition`` (its cursor's
    name: the same copy resumes, a new transition starts over)."""
    return f"{TRANSFER_PREFIX}{transition:016x}-{partition}-{target}"


class Ownership:
    """Moves this node's partitions as the view's transitions say.

    Args:
        self_node: this node's ring identity.
        membership: the node's view and gossip (acknowledgements, completions, statuses).
        placement: the placement the node applies now (kept current by the node's wiring).
        replica: this node's replica (cleanup deletes through it).
        transfers: the transfer service copies run in.
        is_up: the failure detector's opinion of a node.
        n: replicas per key (the configured N).
        interval: seconds between two steps when nothing changes.
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        membership: Membership,
        placement: Callable[[], Placement],
        replica: LocalReplica,
        transfers: Transfers,
        is_up: Callable[[NodeId], bool],
        n: int,
        interval: float,
    ) -> None:
        self.self_node = self_node
        self.membership = membership
        self.placement = placement
        self.replica = replica
        self.transfers = transfers
        self.is_up = is_up
        self.n = n
        self.interval = interval
        self._changed = trio.Event()
        #: Copies this node started: transfer id -> (transition, partition, target).
        self._copies: dict[str, tuple[int, int, NodeId]] = {}
        #: The partitions of a transition this node found holding data (its copies).
        self._holding: tuple[int, set[int]] = (0, set())
        #: The settled placement whose cleanup is done (or running).
        self._cleaned: int | None = None
        self._cleaning = False
        #: Whether a copy's partition is being counted before it is offered (one at a time).
        self._counting = False
        self._nursery: trio.Nursery | None = None
        transfers.on_finished = self._finished
        #: Partition copies this node sent and saw acknowledged to the end.
        self.copies_done = 0
        #: Records deleted because this node no longer owns their partition.
        self.records_dropped = 0

    def changed(self) -> None:
        """The view changed: step at once."""
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Step every ``interval`` and after every view change, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self.step()
                with trio.move_on_after(self.interval):
                    await self._changed.wait()
                self._changed = trio.Event()

    def step(self) -> None:
        """Acknowledge, and do what the placement's phase allows now."""
        placement = self.placement()
        self.membership.acknowledge(placement.phase, placement.mark)
        if self.membership.awaiting_seeds:
            return
        view = self.membership.view
        up = [node for node in placement.nodes() if self._is_up(node)]
        if not acknowledged(view, placement, up, placement.phase):
            return
        if placement.phase == COPYING:
            self._copy(placement)
        elif placement.phase == SWITCHED:
            changes = placement.finalized(view)
            logger.info(
                "every copy is done: %s",
                ", ".join(f"{node} is {status}" for node, status in sorted(changes.items())),
            )
            self.membership.set_statuses(changes)
        elif placement.phase == SETTLED and self._cleaned != placement.mark:
            self._start_cleanup(placement)

    # --- copies -------------------------------------------------------------------------------

    def _copy(self, placement: Placement) -> None:
        moves = placement.moves
        for copy_id, (transition, _partition, _target) in list(self._copies.items()):
            if transition != moves.transition:
                del self._copies[copy_id]
                if self.transfers.cancel(copy_id):
                    logger.info("copy %s cancelled: the members changed", copy_id)
        empty: list[tuple[int, NodeId]] = []
        engine = self.replica.engine
        if self._holding[0] != moves.transition:
            self._holding = (moves.transition, set())
        holding = self._holding[1]
        for partition, target in placement.missing:
            if moves.sender(partition, self._is_up) != self.self_node:
                continue
            if partition not in holding:
                if not engine.scan(partition, limit=1):
                    # Nothing to copy (writes from now on reach the new owners directly).
                    empty.append((partition, target))
                    continue
                holding.add(partition)  # looked at once per transition, not at every step
            copy_id = transfer_id(moves.transition, partition, target)
            if self.transfers.is_running(copy_id):
                continue
            if self._counting or not self.transfers.has_room() or self._nursery is None:
                break  # a later step offers the rest
            self._copies[copy_id] = (moves.transition, partition, target)
            self._counting = True
            self._nursery.start_soon(self._offer, copy_id, target, partition)
        if empty:
            self.membership.add_completions(empty)

    async def _offer(self, copy_id: str, target: NodeId, partition: int) -> None:
        """Count the partition without stalling the node, then start its copy (a later step
        offers it again if every transfer slot was taken meanwhile)."""
        try:
            engine = self.replica.engine
            size = await partition_size(engine, partition)
            if not size[0]:  # emptied meanwhile: nothing to copy
                copy = self._copies.pop(copy_id, None)
                if copy is not None:
                    self._done(*copy)
                return
            self.transfers.offer(copy_id, target, PartitionSource(engine, partition, size))
        finally:
            self._counting = False

    def _is_up(self, node: NodeId) -> bool:
        return node == self.self_node or self.is_up(node)

    def _finished(self, transfer: Transfer) -> None:
        copy = self._copies.get(transfer.id)
        if copy is None or transfer.state != "done":
            return
        del self._copies[transfer.id]
        self.copies_done += 1
        self._done(*copy)

    def _done(self, transition: int, partition: int, target: NodeId) -> None:
        view: MembershipView = self.membership.view
        if view.transition_id() != transition:
            return  # the members changed meanwhile: the copy is made again for the new ones
        self.membership.add_completions([(partition, target)])
        self.changed()

    # --- cleanup ------------------------------------------------------------------------------

    def _start_cleanup(self, placement: Placement) -> None:
        if self._cleaning or self._nursery is None:
            return
        self._cleaning = True
        self._nursery.start_soon(self._clean_up, placement)

    async def _clean_up(self, placement: Placement) -> None:
        """Delete the records of every partition this node does not own."""
        try:
            ring, engine = placement.ring, self.replica.engine
            dropped = 0
            for partition in range(ring.buckets):
                if self.self_node in ring.primaries(partition, self.n):
                    continue
                after: bytes | None = None
                while chunk := engine.scan(partition, start_after=after, limit=DELETE_CHUNK):
                    if self.placement() is not placement:
                        return  # the placement changed: a later step decides again
                    for key, record in chunk:
                        dropped += self.replica.forget(key, record)
                    after = chunk[-1][0]
                    await trio.lowlevel.checkpoint()
            self._cleaned = placement.mark
            self.records_dropped += dropped
            if dropped:
                logger.info("deleted %d records of partitions this node no longer owns", dropped)
        finally:
            self._cleaning = False

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats``."""
        placement = self.placement()
        return [
            ("kai_ownership_phase", placement.phase),
            ("kai_ownership_copies_pending", len(placement.missing)),
            # 1 until this node has deleted what the current placement took from it.
            ("kai_ownership_cleanup_pending", int(self._cleaned != placement.mark)),
            ("kai_ownership_copies_sent", self.copies_done),
            ("kai_ownership_records_dropped", self.records_dropped),
        ]
