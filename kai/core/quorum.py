"""Quorum bookkeeping: counting replies towards R or W, and merging what a read found.

Pure code (no I/O, no trio): the coordinator feeds it each replica's answer as it arrives and
asks whether the quorum is met, can no longer be met, and which replicas need a read repair.
It must never decide a quorum from fewer replies than required, and never count one replica
twice for the same key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from kai.core.errors import CoordinatorError, QuorumTimeout, QuorumUnavailable
from kai.core.ring import NodeId
from kai.core.versions import SiblingSet, merge


class Tally:
    """Replies towards one quorum.

    Args:
        required: how many replies meet the quorum (R or W).
        replicas: how many replicas were asked (replies can never exceed this).
    """

    __slots__ = ("outstanding", "replies", "required", "timed_out")

    def __init__(self, required: int, replicas: int) -> None:
        self.required = required
        self.outstanding = replicas
        self.replies = 0
        self.timed_out = False

    def reply(self) -> None:
        """Count one replica's answer."""
        self.outstanding -= 1
        self.replies += 1

    def fail(self, *, timed_out: bool) -> None:
        """Count one replica that will not answer (``timed_out``: it did not answer in time)."""
        self.outstanding -= 1
        self.timed_out = self.timed_out or timed_out

    @property
    def met(self) -> bool:
        """Whether enough replicas answered."""
        return self.replies >= self.required

    @property
    def lost(self) -> bool:
        """Whether the quorum can no longer be met, however the outstanding replicas answer."""
        return self.replies + self.outstanding < self.required

    def error(self, what: str) -> CoordinatorError:
        """The error for a quorum that was not met.

        :class:`QuorumUnavailable` when replicas failed outright so that the quorum is lost;
        :class:`QuorumTimeout` when it is not lost yet (the deadline passed) or when a
        replica that was too slow is one of the reasons it is lost.
        """
        message = (
            f"{what}: {self.replies} of {self.required} required replies "
            f"({self.outstanding} outstanding)"
        )
        if self.timed_out or not self.lost:
            return QuorumTimeout(message)
        return QuorumUnavailable(message)


#: Reads one key from the coordinator's own replica: its sibling set and its record as stored
#: (None when absent).
LocalRead = Callable[[bytes], tuple[SiblingSet, bytes | None]]


class KeyRead(Tally):
    """One key of a read round that waits for other replicas: its replies towards R and what
    each replica that answered holds.

    A key whose every replica answered as the round was made (the coordinator's own replica
    was its only one) needs none: it is met, and one answer is never stale.
    """

    __slots__ = ("answers", "local")

    def __init__(self, required: int, replicas: int) -> None:
        self.required = required
        self.outstanding = replicas
        self.replies = 0
        self.timed_out = False
        #: What each replica that answered holds.
        self.answers: dict[NodeId, SiblingSet] = {}
        #: The coordinator's own record of the key as stored and its sibling set, if it
        #: holds one: a peer that answers the same bytes holds the same versions, so its
        #: answer needs no decoding.
        self.local: tuple[bytes, SiblingSet] | None = None


class ReadRound:
    """One quorum read of one or more keys: every replica's answer, merged per key.

    Each key has its own quorum (its own replicas and R); a replica is asked once for all
    the keys it holds, so one reply or failure counts towards every key in its batch. The
    coordinator's own replica answers while the round is made (it is read, not asked), so a
    round whose keys only it holds is decided as soon as it exists.

    Args:
        keys: the keys read, without duplicates.
        replicas: for each key, the nodes that hold it (its primaries).
        r: the read quorum; capped at each key's replica count.
        local_node: the coordinating node, if it holds some of the keys.
        read_local: reads a key from ``local_node``'s replica.
    """

    __slots__ = ("_answered", "batches", "keys", "lost_index", "merged", "reads", "unmet")

    def __init__(
        self,
        keys: Sequence[bytes],
        replicas: Sequence[Sequence[NodeId]],
        r: int,
        local_node: NodeId | None = None,
        read_local: LocalRead | None = None,
    ) -> None:
        self.keys = keys
        #: For each key, the merge of every answer so far.
        self.merged: list[SiblingSet] = []
        #: For each key, its quorum and answers; None for a key every replica answered.
        self.reads: list[KeyRead | None] = []
        #: For each replica to ask, the indices of the keys it is asked for, in order.
        self.batches: dict[NodeId, list[int]] = {}
        self.lost_index: int | None = None
        # How many keys of its batch each replica has answered (answers come in order);
        # -1 once it failed.
        self._answered: dict[NodeId, int] = {}
        if read_local is None:
            local_node = None
        merged, reads, batches = self.merged, self.reads, self.batches
        unmet = 0
        for index, nodes in enumerate(replicas):
            count = len(nodes)
            if local_node is not None and local_node in nodes:
                assert read_local is not None
                siblings, record = read_local(keys[index])
                merged.append(siblings)
                if count == 1:
                    reads.append(None)  # its one replica answered: met, and nobody to ask
                    continue
                read = KeyRead(r if r < count else count, count - 1)
                read.replies = 1  # the local replica's answer
                read.answers[local_node] = siblings
                if record is not None:
                    read.local = (record, siblings)
                if read.required > 1:
                    unmet += 1
            else:
                read = KeyRead(r if r < count else count, count)
                merged.append(())
                if read.required > 0:
                    unmet += 1
            reads.append(read)
            for node in nodes:
                if node != local_node:
                    batch = batches.get(node)
                    if batch is None:
                        batches[node] = [index]
                    else:
                        batch.append(index)
        self.unmet = unmet

    @property
    def nodes(self) -> Iterable[NodeId]:
        """Every replica to ask for some key (the local one answered already)."""
        return self.batches.keys()

    def batch(self, node: NodeId) -> list[bytes]:
        """The keys to ask ``node`` for: those of its batch it has not answered yet."""
        keys = self.keys
        return [keys[index] for index in self.unanswered(node)]

    def unanswered(self, node: NodeId) -> list[int]:
        """Indices of the keys of ``node``'s batch it has not answered yet, in batch order
        (none once it failed)."""
        answered = self._answered.get(node, 0)
        if answered < 0:
            return []
        return self.batches.get(node, [])[answered:]

    def record_reply(self, node: NodeId, sibling_sets: Sequence[SiblingSet]) -> int:
        """Count ``node``'s answer: one sibling set per key, for the first keys it has not
        answered yet, in batch order. A replica may answer its batch in several parts; an
        answer from a replica that already answered all its keys is a duplicate and ignored.
        Returns how many keys ``node`` still has to answer.

        Raises:
            ValueError: the answer has more sets than the replica has keys left to answer.
        """
        indices = self.unanswered(node)
        if not indices:
            return 0  # a duplicated answer must not count twice
        if len(sibling_sets) > len(indices):
            raise ValueError(f"{node} answered {len(sibling_sets)} keys, not {len(indices)}")
        self._answered[node] = self._answered.get(node, 0) + len(sibling_sets)
        merged, reads = self.merged, self.reads
        for index, siblings in zip(indices, sibling_sets, strict=False):
            read = reads[index]
            assert read is not None  # a key in a batch waits for its replicas
            read.answers[node] = siblings
            current = merged[index]
            if not current:
                merged[index] = siblings  # a stored sibling set is already canonical
            elif siblings and siblings != current:  # equal replicas are the common case
                merged[index] = merge(current, siblings)
            read.reply()
            if read.replies == read.required:
                self.unmet -= 1
        return len(indices) - len(sibling_sets)

    def record_failure(self, node: NodeId, *, timed_out: bool) -> None:
        """Count ``node`` as unable to answer the keys of its batch it has not answered
        (once: a node that failed is not asked again)."""
        if self._answered.get(node, 0) < 0:
            return
        self._answered[node] = -1  # failed: nothing it says later counts
        reads = self.reads
        for index in self.batches.get(node, ()):
            read = reads[index]
            assert read is not None
            if node in read.answers:
                continue
            read.fail(timed_out=timed_out)
            if read.lost and self.lost_index is None:
                self.lost_index = index

    @property
    def decided(self) -> bool:
        """Whether every key met its quorum, or some key never can."""
        return self.unmet == 0 or self.lost_index is not None

    def error(self) -> CoordinatorError | None:
        """Why the read fails (a key lost its quorum, or not every key met it yet), or None."""
        if self.lost_index is None and not self.unmet:
            return None
        if self.lost_index is not None:
            index = self.lost_index
        else:
            index = next(
                index for index, read in enumerate(self.reads) if read is not None and not read.met
            )
        read = self.reads[index]
        assert read is not None
        return read.error(f"read of {self.keys[index]!r}")

    def stale_replicas(self) -> Iterator[tuple[int, NodeId]]:
        """``(key index, replica)`` for every replica that answered with less than the merge.

        A replica that answered not-found for a key others hold is stale too; replicas that
        did not answer are not listed (what they hold is unknown).
        """
        for index, read in enumerate(self.reads):
            merged = self.merged[index]
            if read is None or not merged:
                continue
            for node, siblings in read.answers.items():
                if siblings != merged:
                    yield index, node
