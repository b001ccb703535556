"""Transfers (DESIGN §8): stream records to another node in key order, one acknowledged batch
at a time, resumable after a crash of either side.

One mechanism for every bulk movement of data, as riak_core's handoff: hinted handoff today,
ownership transfer and re-replication later. What moves is a :class:`Source` (the hints kept
for one node, say): it yields items in a fixed order, each with a *cursor* (its position in
that order). A transfer sends a batch, the receiver merges every record with the one write
rule (:meth:`~kai.storage.replica.LocalReplica.apply`) and answers, and only then does the
sender tell the source the batch is delivered (a hint is deleted) and persist the cursor, so
after a crash of either side it resumes from the last acknowledged batch and never sends one
again. At most ``limit`` transfers run at once on a node; each is throttled to ``rate`` bytes
per second and can be cancelled.

Receiving is idempotent (merging a record twice changes nothing), so a batch whose answer was
lost is simply sent again. It must never tell a source that a batch is delivered before the
receiver answered for it, run more than ``limit`` transfers, or stall the event loop with a
large batch (the receiver merges it in chunks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import attrs
import msgpack
import trio
import trio.lowlevel

from kai.cluster.fanout import PeerCaller
from kai.core.errors import RpcBadRequest, TooManySiblings
from kai.core.pending import Pending, Step
from kai.core.ring import NodeId
from kai.core.storage import StorageEngine
from kai.core.wire import Record, records_from_wire
from kai.rpc.server import Handler
from kai.storage.replica import LocalReplica

logger = logging.getLogger(__name__)

#: A position in a source's order: ``(partition, key)``.
Cursor = tuple[int, bytes]
#: One record to move: its cursor, its key, and the record (an encoded sibling set).
Item = tuple[Cursor, bytes, bytes]

#: Most records in one batch.
BATCH_KEYS = 256
#: A batch stops growing once its records reach this many bytes (the first always goes in).
BATCH_BYTES = 1 << 20
#: The most records one ``transfer_batch`` call may carry (what a receiver accepts).
MAX_BATCH_KEYS = 4096
#: Records a receiver merges between two checkpoints of the event loop.
APPLY_CHUNK = 64
#: Metadata name prefix of a transfer's persisted cursor.
CURSOR_META = "transfer-cursor:"
#: How many finished transfers ``status`` still lists.
FINISHED_KEPT = 16


class Source(Protocol):
    """What a transfer streams: items in a fixed order, from a cursor on."""

    #: What is moved (``"hints"``, ``"partition"``): shown in ``kai-admin transfers``.
    kind: str
    #: The partition moved, or None for a source that spans partitions (hints).
    partition: int | None

    def remaining(self) -> tuple[int, int]:
        """Records and bytes still to send (an estimate, for progress)."""
        ...

    def read(self, after: Cursor | None, keys: int, size: int) -> list[Item]:
        """Up to ``keys`` items after ``after`` (from the start when None), stopping once they
        reach ``size`` bytes; empty when there is nothing more."""
        ...

    def delivered(self, items: list[Item]) -> None:
        """The target stored ``items``: forget what no longer needs to be kept."""
        ...


@attrs.define(eq=False)
class Transfer:
    """One transfer and its progress (what ``kai-admin transfers`` shows)."""

    id: str
    target: NodeId
    source: Source
    keys_total: int = 0
    bytes_total: int = 0
    keys_done: int = 0
    bytes_done: int = 0
    batches_acked: int = 0
    #: The cursor it resumed after (None: from the start).
    resumed_after: Cursor | None = None
    state: str = "running"
    error: str = ""
    started: float = attrs.field(factory=time.time)
    #: trio time at the start (the throttle's clock).
    began: float = attrs.field(factory=trio.current_time)
    finished: float | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def describe(self, self_node: NodeId) -> dict[str, object]:
        """This transfer as plain values (rates in records and bytes per second)."""
        elapsed = max((self.finished or time.time()) - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        left = max(self.bytes_total - self.bytes_done, 0)
        return {
            "id": self.id,
            "kind": self.source.kind,
            "partition": self.source.partition,
            "from": str(self_node),
            "to": str(self.target),
            "state": self.state,
            "keys_done": self.keys_done,
            "keys_total": self.keys_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "batches_acked": self.batches_acked,
            "resumed": self.resumed_after is not None,
            "keys_per_second": round(self.keys_done / elapsed, 1),
            "bytes_per_second": round(rate, 1),
            "eta_seconds": round(left / rate, 1) if rate and self.state == "running" else None,
            "error": self.error,
        }


class Transfers:
    """Runs this node's outgoing transfers and receives other nodes' batches.

    Args:
        self_node: this node's ring identity.
        replica: where received records are merged.
        engine: where each transfer's cursor is persisted (metadata).
        peers: how to call the receiving node.
        limit: the most transfers running at once.
        rate: bytes per second each transfer sends at most (0: unthrottled).
        request_timeout: seconds a batch waits for its acknowledgement.
        wall_clock: unix time in seconds.
    """

    def __init__(
        self,
        *,
        self_node: NodeId,
        replica: LocalReplica,
        engine: StorageEngine,
        peers: PeerCaller,
        limit: int,
        rate: int,
        request_timeout: float,
        batch_keys: int = BATCH_KEYS,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.self_node = self_node
        self.replica = replica
        self.engine = engine
        self.peers = peers
        self.limit = limit
        self.rate = rate
        self.request_timeout = request_timeout
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        self._running: dict[str, Transfer] = {}
        self._finished: list[Transfer] = []
        self._nursery: trio.Nursery | None = None
        #: Told of each transfer that ends (done, paused, failed or cancelled).
        self.on_finished: Callable[[Transfer], None] = lambda transfer: None
        self.batches_sent = 0
        self.batches_acked = 0
        self.keys_sent = 0
        self.bytes_sent = 0
        self.batches_received = 0
        self.keys_received = 0
        self.completed = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery transfers run in, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- sending ------------------------------------------------------------------------------

    def offer(self, transfer_id: str, target: NodeId, source: Source) -> bool:
        """Start streaming ``source`` to ``target`` unless a transfer with that id runs
        already or ``limit`` are running; whether it started."""
        if self._nursery is None or transfer_id in self._running:
            return False
        if len(self._running) >= self.limit:
            return False
        keys, size = source.remaining()
        if not keys:
            return False
        transfer = Transfer(transfer_id, target, source, keys_total=keys, bytes_total=size)
        self._running[transfer_id] = transfer
        self._nursery.start_soon(self._send, transfer)
        return True

    def has_room(self) -> bool:
        """Whether another transfer could start now."""
        return self._nursery is not None and len(self._running) < self.limit

    def cancel(self, transfer_id: str) -> bool:
        """Stop a running transfer after its current batch; whether one was running. Its
        cursor stays: offered again, it goes on where it stopped."""
        transfer = self._running.get(transfer_id)
        if transfer is None:
            return False
        transfer.state = "cancelled"
        transfer.scope.cancel()
        return True

    def is_running(self, transfer_id: str) -> bool:
        """Whether the transfer ``transfer_id`` is running."""
        return transfer_id in self._running

    async def _send(self, transfer: Transfer) -> None:
        meta = CURSOR_META + transfer.id
        cursor = _cursor_from_meta(self.engine.get_meta(meta))
        transfer.resumed_after = cursor
        if cursor is not None:
            logger.info("transfer %s resumes after %r", transfer.id, cursor)
        try:
            with transfer.scope:
                while True:
                    items = transfer.source.read(cursor, self.batch_keys, self.batch_bytes)
                    if not items:
                        transfer.state = "done"
                        self.completed += 1
                        self.engine.put_meta(meta, b"")
                        break
                    if not await self._deliver(transfer, items):
                        break
                    transfer.source.delivered(items)
                    cursor = items[-1][0]
                    self.engine.put_meta(meta, _cursor_to_meta(cursor))
                    await self._throttle(transfer)
        finally:
            transfer.finished = time.time()
            del self._running[transfer.id]
            self._finished = [*self._finished, transfer][-FINISHED_KEPT:]
            if transfer.state == "done":
                logger.info(
                    "transfer %s to %s done: %d records, %d bytes",
                    transfer.id,
                    transfer.target,
                    transfer.keys_done,
                    transfer.bytes_done,
                )
            self.on_finished(transfer)

    async def _deliver(self, transfer: Transfer, items: list[Item]) -> bool:
        """Send one batch; whether the target acknowledged it."""
        batch = [[key, record] for _cursor, key, record in items]
        size = sum(len(record) for _cursor, _key, record in items)
        self.batches_sent += 1
        deadline = trio.current_time() + self.request_timeout
        answer = await self.peers.call(
            transfer.target,
            "transfer_batch",
            (transfer.id, transfer.source.kind, batch),
            deadline,
        )
        if not answer.ok:
            transfer.state = "paused"
            transfer.error = "timed out" if answer.timed_out else str(answer.error)
            logger.info(
                "transfer %s to %s paused: %s", transfer.id, transfer.target, transfer.error
            )
            return False
        self.batches_acked += 1
        self.keys_sent += len(items)
        self.bytes_sent += size
        transfer.batches_acked += 1
        transfer.keys_done += len(items)
        transfer.bytes_done += size
        return True

    async def _throttle(self, transfer: Transfer) -> None:
        if not self.rate:
            await trio.lowlevel.checkpoint()
            return
        due = transfer.began + transfer.bytes_done / self.rate
        await trio.sleep_until(due)

    # --- receiving ----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC method a sending node calls."""
        return {"transfer_batch": self.transfer_batch}

    def transfer_batch(self, transfer_id: object, kind: object, batch: object) -> Step[int]:
        """Merge a batch of records sent by another node's transfer; the number that changed
        something here.

        Raises:
            RpcBadRequest: bad parameters (nothing of the batch is merged).
        """
        if not isinstance(transfer_id, str) or not isinstance(kind, str):
            raise RpcBadRequest("transfer id and kind must be strings")
        records = records_from_wire(batch, MAX_BATCH_KEYS)
        self.batches_received += 1
        self.keys_received += len(records)
        return merge_records(self.replica, records, "transfer", from_owner=kind == "partition")

    # --- observability ------------------------------------------------------------------------

    def status(self) -> list[dict[str, object]]:
        """Every running transfer, then the last finished ones, as plain values."""
        return [
            transfer.describe(self.self_node)
            for transfer in [*self._running.values(), *reversed(self._finished)]
        ]

    def statistics(self) -> list[tuple[str, object]]:
        """Counters for memcached ``stats``."""
        return [
            ("kai_transfers_active", len(self._running)),
            ("kai_transfers_completed", self.completed),
            ("kai_transfer_batches_sent", self.batches_sent),
            ("kai_transfer_batches_acked", self.batches_acked),
            ("kai_transfer_keys_sent", self.keys_sent),
            ("kai_transfer_bytes_sent", self.bytes_sent),
            ("kai_transfer_batches_received", self.batches_received),
            ("kai_transfer_keys_received", self.keys_received),
        ]


def merge_records(
    replica: LocalReplica, records: list[Record], what: str, *, from_owner: bool = False
) -> Step[int]:
    """Merge received records with the one write rule; how many changed something. A batch
    of more than :data:`APPLY_CHUNK` is merged chunk by chunk, letting other work run in
    between. A record that would leave too many siblings is logged (``what`` says whose)
    and skipped. ``from_owner``: see :meth:`LocalReplica.apply`."""
    if len(records) <= APPLY_CHUNK:
        return _merge(replica, records, what, from_owner)
    return Pending(_merge_in_chunks(replica, records, what, from_owner))


def _merge(replica: LocalReplica, records: list[Record], what: str, from_owner: bool) -> int:
    changed = 0
    for key, siblings, record in records:
        try:
            changed += replica.apply(key, siblings, record, from_owner=from_owner)
        except TooManySiblings as exc:
            logger.warning("%s: %r not merged: %s", what, key, exc)
    return changed


async def _merge_in_chunks(
    replica: LocalReplica, records: list[Record], what: str, from_owner: bool
) -> int:
    changed = 0
    for start in range(0, len(records), APPLY_CHUNK):
        if start:
            await trio.lowlevel.checkpoint()
        changed += _merge(replica, records[start : start + APPLY_CHUNK], what, from_owner)
    return changed


def _cursor_to_meta(cursor: Cursor) -> bytes:
    packed: bytes = msgpack.packb(list(cursor), use_bin_type=True)
    return packed


def _cursor_from_meta(raw: bytes | None) -> Cursor | None:
    if not raw:
        return None
    try:
        partition, key = msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException):
        logger.warning("an unreadable transfer cursor was ignored: the transfer starts over")
        return None
    if not isinstance(partition, int) or not isinstance(key, bytes) or not key:
        return None
    return partition, key
