"""The cluster membership view: who is in the cluster, as a join-semilattice (pure).

A view lists every node the cluster has ever been told about, each with a status
(``joining``, ``valid``, ``leaving`` or ``left``) and a version that grows with every status
change, plus the times of cluster-wide ``flush_all`` commands and the state of an ownership
transition (:mod:`kai.core.transition`): the copies done so far, and the placement state each
node last applied. Views from different nodes are combined with
:meth:`MembershipView.merge`, which is commutative, associative and idempotent, so gossip
converges whatever order views arrive in and however often they are repeated (DESIGN §8).

This module must never do I/O, read a clock or import trio: it is the pure core that the
gossip loop (``kai.membership.gossip``) wraps. It must never drop a node because it is
unreachable; failure detection is separate (``kai.membership.detector``) and a node leaves
the view only by an explicit status change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Final, Literal, TypeGuard, TypeVar, get_args

import attrs
import msgpack

from kai.core.ring import NodeId

#: A member's place in the cluster's life cycle, in the order statuses normally follow.
Status = Literal["joining", "valid", "leaving", "left"]

#: Every status, in life-cycle order; on a version tie the later status wins a merge.
STATUSES: Final[tuple[Status, ...]] = get_args(Status)

#: Statuses whose nodes are on the ring (everything except ``left``).
RING_STATUSES: Final[frozenset[Status]] = frozenset({"joining", "valid", "leaving"})

#: How many cluster-wide flush times a view keeps (the latest ones).
MAX_FLUSH_TIMES: Final = 16

#: The most copy completions a view carries (partitions times new owners of one transition).
MAX_COMPLETIONS: Final = 1 << 20


@attrs.frozen(slots=True, order=True)
class Completion:
    """A finished copy of one partition to one of its new owners, in one transition.

    Attributes:
        generation: the view's :meth:`~MembershipView.generation` when it was recorded; a
            view keeps only the completions of the highest generation it has seen.
        transition: the :meth:`~MembershipView.transition_id` it belongs to.
        partition: the partition copied.
        node: the new owner that holds the whole partition now.
    """

    generation: int
    transition: int
    partition: int
    node: NodeId


@attrs.frozen(slots=True, order=True)
class Applied:
    """The placement state a node last applied to its own requests (it acknowledges it).

    Attributes:
        node: the node.
        generation: its view's :meth:`~MembershipView.generation` then.
        phase: how far the transition had come (see :mod:`kai.core.transition`).
        mark: the state's fingerprint (transition id and phase): equal marks, equal state.
    """

    node: NodeId
    generation: int
    phase: int
    mark: int

    def _merge_key(self) -> tuple[int, int, int]:
        return (self.generation, self.phase, self.mark)


@attrs.frozen(slots=True, order=True)
class Endpoint:
    """Where a node serves memcached clients, as the node itself last published it.

    Attributes:
        node: the node (by its RPC address).
        epoch: when it published this (unix microseconds at its start): the latest wins.
        host: the memcached host clients connect to.
        port: the memcached port.
    """

    node: NodeId
    epoch: int
    host: str
    port: int

    def _merge_key(self) -> tuple[int, str, int]:
        return (self.epoch, self.host, self.port)

    def address(self) -> str:
        """``host:port``, as memcached clients are configured."""
        return f"{self.host}:{self.port}"


_STATUS_RANK: Final[dict[str, int]] = {status: rank for rank, status in enumerate(STATUSES)}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_status(_instance: object, _attribute: object, status: object) -> None:
    if status not in _STATUS_RANK:
        raise ValueError(f"member status must be one of {', '.join(STATUSES)}, not {status!r}")


def _check_version(_instance: object, _attribute: object, version: int) -> None:
    if not _is_int(version) or version < 1:
        raise ValueError(f"member version must be an integer >= 1, not {version!r}")


@attrs.frozen(slots=True)
class Member:
    """One node's entry in the membership view.

    Attributes:
        node: The node, by its RPC address.
        status: Where the node is in its life cycle.
        version: How many status changes the entry has seen; at least 1. The entry with the
            higher version wins a merge.

    Raises:
        ValueError: If the status is unknown or the version is not an integer >= 1.
    """

    node: NodeId = attrs.field(validator=attrs.validators.instance_of(NodeId))
    status: Status = attrs.field(validator=_check_status)
    version: int = attrs.field(validator=_check_version)

    def _merge_key(self) -> tuple[int, int]:
        return (self.version, _STATUS_RANK[self.status])


def _check_members(_instance: object, _attribute: object, members: tuple[Member, ...]) -> None:
    previous: NodeId | None = None
    for member in members:
        if not isinstance(member, Member):
            raise ValueError(f"membership entries must be Member records, not {member!r}")
        if previous is not None and not previous < member.node:
            raise ValueError(
                f"membership entries must be sorted by node without repeats; "
                f"{member.node} follows {previous}"
            )
        previous = member.node


def _check_flush_times(_instance: object, _attribute: object, times: tuple[int, ...]) -> None:
    if len(times) > MAX_FLUSH_TIMES:
        raise ValueError(f"a view keeps at most {MAX_FLUSH_TIMES} flush times, not {len(times)}")
    previous = -1
    for at in times:
        if not _is_int(at) or at < 0:
            raise ValueError(
                f"a flush time must be an integer >= 0 (unix microseconds), not {at!r}"
            )
        if at <= previous:
            raise ValueError("flush times must be sorted without repeats")
        previous = at


def _latest_flush_times(times: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(times))[-MAX_FLUSH_TIMES:])


@attrs.frozen(slots=True)
class MembershipView:
    """An immutable membership view; merge views with :meth:`merge`.

    Attributes:
        members: One entry per node, sorted by node.
        flush_times: Times of cluster-wide ``flush_all`` commands in unix microseconds,
            sorted, without repeats, at most `MAX_FLUSH_TIMES` (the latest ones).

    Raises:
        ValueError: If members are unsorted or repeated, or flush times are out of order,
            negative or too many.
    """

    members: tuple[Member, ...] = attrs.field(default=(), validator=_check_members)
    flush_times: tuple[int, ...] = attrs.field(default=(), validator=_check_flush_times)
    #: Copies done, all of the highest generation recorded (sorted, no repeats).
    completed: frozenset[Completion] = attrs.field(default=frozenset())
    #: One entry per node that acknowledged a placement state, sorted by node.
    applied: tuple[Applied, ...] = attrs.field(default=())
    #: One entry per node that published its memcached address, sorted by node.
    endpoints: tuple[Endpoint, ...] = attrs.field(default=())

    @classmethod
    def single(cls, node: NodeId) -> MembershipView:
        """The view of a brand-new one-node cluster: ``node``, valid, at version 1."""
        return cls((Member(node, "valid", 1),))

    def member(self, node: NodeId) -> Member | None:
        """The entry for ``node``, or ``None`` if the view has never heard of it."""
        for member in self.members:
            if member.node == node:
                return member
        return None

    def with_status(self, node: NodeId, status: Status) -> MembershipView:
        """This view with ``node`` set to ``status`` at a version above its current one.

        Args:
            node: The node to add or update.
            status: Its new status.

        Returns:
            A view in which ``node`` has ``status`` and version old + 1 (1 if it is new), so
            the change wins when merged with any view that has not seen it.

        Raises:
            ValueError: If ``status`` is not a known status.
        """
        current = self.member(node)
        updated = Member(node, status, 1 if current is None else current.version + 1)
        others = (member for member in self.members if member.node != node)
        return attrs.evolve(self, members=tuple(sorted((*others, updated), key=_node_of)))

    def with_flush(self, at: int) -> MembershipView:
        """This view with a cluster-wide flush at ``at`` (unix microseconds) recorded.

        Only the latest `MAX_FLUSH_TIMES` flush times are kept, so recording one older than
        all of them changes nothing.

        Raises:
            ValueError: If ``at`` is not an integer >= 0.
        """
        _check_flush_times(None, None, (at,))
        return attrs.evolve(self, flush_times=_latest_flush_times((*self.flush_times, at)))

    def with_statuses(self, changes: Mapping[NodeId, Status]) -> MembershipView:
        """This view with each node of ``changes`` set to its status (see `with_status`)."""
        view = self
        for node, status in sorted(changes.items()):
            view = view.with_status(node, status)
        return view

    def generation(self) -> int:
        """The sum of the members' versions: it grows with every status change, and a merge
        never lowers it."""
        return sum(member.version for member in self.members)

    def transition_id(self) -> int:
        """A 64-bit fingerprint of every member's status and version: two views with the
        same id agree on the rings (what a copy completion belongs to)."""
        entries = [[str(m.node), m.status, m.version] for m in self.members]
        digest = hashlib.blake2b(msgpack.packb(entries), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def with_completions(self, copies: Iterable[tuple[int, NodeId]]) -> MembershipView:
        """This view with each copy ``(partition, node)`` recorded as done in its current
        transition."""
        generation, transition = self.generation(), self.transition_id()
        done = [Completion(generation, transition, partition, node) for partition, node in copies]
        return attrs.evolve(self, completed=_latest_completions((*self.completed, *done)))

    def completions(self) -> frozenset[tuple[int, NodeId]]:
        """The ``(partition, node)`` copies done in this view's current transition."""
        transition = self.transition_id()
        return frozenset(
            (done.partition, done.node) for done in self.completed if done.transition == transition
        )

    def with_applied(self, node: NodeId, phase: int, mark: int) -> MembershipView:
        """This view with ``node``'s acknowledgement of a placement state (at this view's
        generation); unchanged if it acknowledged that state already."""
        entry = Applied(node, self.generation(), phase, mark)
        if self.applied_by(node) == entry:
            return self
        return attrs.evolve(self, applied=_merge_latest(self.applied, (entry,)))

    def applied_by(self, node: NodeId) -> Applied | None:
        """``node``'s latest acknowledgement, or None."""
        for entry in self.applied:
            if entry.node == node:
                return entry
        return None

    def with_endpoint(self, node: NodeId, host: str, port: int, epoch: int) -> MembershipView:
        """This view with ``node``'s memcached address published at ``epoch``; unchanged
        when it already holds that or a later publication."""
        merged = _merge_latest(self.endpoints, (Endpoint(node, epoch, host, port),))
        return self if merged == self.endpoints else attrs.evolve(self, endpoints=merged)

    def endpoint(self, node: NodeId) -> Endpoint | None:
        """Where ``node`` serves memcached clients, if it has published that."""
        for entry in self.endpoints:
            if entry.node == node:
                return entry
        return None

    def merge(self, other: MembershipView) -> MembershipView:
        """The least upper bound of this view and ``other``.

        Per node, the entry with the higher version wins; on equal versions with different
        statuses the later status in ``joining < valid < leaving < left`` wins, so the
        result never depends on which side is which. Flush times are the union, truncated
        to the latest `MAX_FLUSH_TIMES`. Completions are the union, of the highest
        generation only; acknowledgements and endpoints are per node the highest.

        Returns:
            A view that dominates both inputs; this view itself when ``other`` adds nothing.
        """
        winners: dict[NodeId, Member] = {member.node: member for member in self.members}
        for member in other.members:
            current = winners.get(member.node)
            if current is None or member._merge_key() > current._merge_key():
                winners[member.node] = member
        merged = MembershipView(
            tuple(winners[node] for node in sorted(winners)),
            _latest_flush_times((*self.flush_times, *other.flush_times)),
            _latest_completions((*self.completed, *other.completed)),
            _merge_latest(self.applied, other.applied),
            _merge_latest(self.endpoints, other.endpoints),
        )
        return self if merged == self else merged

    def ring_nodes(self) -> tuple[NodeId, ...]:
        """The nodes on the ring, sorted: every member that is joining, valid or leaving."""
        return tuple(member.node for member in self.members if member.status in RING_STATUSES)

    def to_wire(self) -> dict[str, object]:
        """The view as msgpack-friendly data (lists, str and int only); see `from_wire`."""
        return {
            "members": [
                [member.node.host, member.node.port, member.status, member.version]
                for member in self.members
            ],
            "flush_times": list(self.flush_times),
            "completed": _completions_to_wire(self.completed),
            "applied": [
                [entry.node.host, entry.node.port, entry.generation, entry.phase, entry.mark]
                for entry in self.applied
            ],
            "endpoints": [
                [entry.node.host, entry.node.port, entry.epoch, entry.host, entry.port]
                for entry in self.endpoints
            ],
        }

    @classmethod
    def from_wire(cls, data: object) -> MembershipView:
        """Rebuild and validate a view sent by `to_wire`, possibly by another node.

        Keys it does not know are ignored, so a newer node may add fields without breaking
        older ones.

        Args:
            data: ``{"members": [[host, port, status, version], ...], "flush_times": [...]}``.

        Returns:
            The view that ``data`` describes.

        Raises:
            ValueError: If ``data`` is not of that form or breaks the view's invariants; the
                message says what is wrong. No other exception is raised, whatever ``data`` is.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a membership view must be a map, not {type(data).__name__}")
        raw_members = data.get("members")
        raw_flush_times = data.get("flush_times")
        if not isinstance(raw_members, list):
            raise ValueError("a membership view needs a 'members' list")
        if not isinstance(raw_flush_times, list):
            raise ValueError("a membership view needs a 'flush_times' list")
        members = tuple(_member_from_wire(entry) for entry in raw_members)
        if not all(_is_int(at) for at in raw_flush_times):
            raise ValueError("membership view flush times must be integers")
        raw_completed = data.get("completed", [])
        raw_applied = data.get("applied", [])
        if not isinstance(raw_applied, list) or len(raw_applied) > len(members):
            raise ValueError("'applied' must be a list of at most one entry per member")
        completed = _completions_from_wire(raw_completed)
        if len({done.generation for done in completed}) > 1:
            raise ValueError("completions must all be of one generation")
        applied = tuple(_applied_from_wire(entry) for entry in raw_applied)
        if [entry.node for entry in applied] != sorted({entry.node for entry in applied}):
            raise ValueError("'applied' entries must be sorted by node without repeats")
        raw_endpoints = data.get("endpoints", [])
        if not isinstance(raw_endpoints, list) or len(raw_endpoints) > len(members):
            raise ValueError("'endpoints' must be a list of at most one entry per member")
        endpoints = tuple(_endpoint_from_wire(entry) for entry in raw_endpoints)
        if [entry.node for entry in endpoints] != sorted({entry.node for entry in endpoints}):
            raise ValueError("'endpoints' entries must be sorted by node without repeats")
        return cls(members, tuple(raw_flush_times), completed, applied, endpoints)

    def check_invariants(self) -> None:
        """Check the view's internal consistency.

        Raises:
            AssertionError: If members are unsorted or repeated, an entry is invalid, or the
                flush times are unsorted, repeated, negative or too many.
        """
        nodes = [member.node for member in self.members]
        assert nodes == sorted(set(nodes)), "members unsorted or repeated"
        for member in self.members:
            assert member.status in _STATUS_RANK, f"{member.node}: unknown status"
            assert _is_int(member.version), f"{member.node}: version is not an integer"
            assert member.version >= 1, f"{member.node}: version below 1"
        times = list(self.flush_times)
        assert times == sorted(set(times)), "flush times unsorted or repeated"
        assert len(times) <= MAX_FLUSH_TIMES, "too many flush times"
        assert all(_is_int(at) and at >= 0 for at in times), "bad flush time"
        assert set(self.ring_nodes()) <= set(nodes), "ring nodes are not members"


def _node_of(member: Member) -> NodeId:
    return member.node


def _latest_completions(completions: Iterable[Completion]) -> frozenset[Completion]:
    every = list(completions)
    if not every:
        return frozenset()
    latest = max(done.generation for done in every)
    return frozenset(done for done in every if done.generation == latest)


_Latest = TypeVar("_Latest", Applied, Endpoint)


def _merge_latest(ours: Iterable[_Latest], theirs: Iterable[_Latest]) -> tuple[_Latest, ...]:
    """Per node, the entry with the highest merge key; sorted by node."""
    winners: dict[NodeId, _Latest] = {entry.node: entry for entry in ours}
    for entry in theirs:
        current = winners.get(entry.node)
        if current is None or entry._merge_key() > current._merge_key():
            winners[entry.node] = entry
    return tuple(winners[node] for node in sorted(winners))


def _ints(entry: object, count: int, what: str) -> list[object]:
    if not isinstance(entry, list) or len(entry) != count:
        raise ValueError(f"a {what} entry must be a list of {count} fields, not {entry!r:.200}")
    return entry


def _node_from_wire(host: object, port: object, what: str) -> NodeId:
    if not isinstance(host, str) or not _is_int(port):
        raise ValueError(f"a {what} entry needs a str host and an int port")
    return NodeId(host, port)


def _completions_to_wire(completed: frozenset[Completion]) -> list[list[object]]:
    """``[[generation, transition, host, port, [partition, ...]], ...]``: one entry per
    node and transition."""
    grouped: dict[tuple[int, int, str, int], list[int]] = {}
    for done in completed:
        group = (done.generation, done.transition, done.node.host, done.node.port)
        grouped.setdefault(group, []).append(done.partition)
    return [[*group, sorted(partitions)] for group, partitions in sorted(grouped.items())]


def _completions_from_wire(raw: object) -> frozenset[Completion]:
    if not isinstance(raw, list):
        raise ValueError("'completed' must be a list")
    completed: list[Completion] = []
    for entry in raw:
        generation, transition, host, port, partitions = _ints(entry, 5, "completion")
        if not (_is_int(generation) and _is_int(transition)):
            raise ValueError(f"a completion needs integer fields, not {entry!r:.200}")
        if not isinstance(partitions, list) or not all(_is_int(p) for p in partitions):
            raise ValueError(f"a completion lists integer partitions, not {partitions!r:.200}")
        node = _node_from_wire(host, port, "completion")
        completed += (Completion(generation, transition, p, node) for p in partitions)
        if len(completed) > MAX_COMPLETIONS:
            raise ValueError(f"a view carries at most {MAX_COMPLETIONS} completions")
    return frozenset(completed)


def _applied_from_wire(entry: object) -> Applied:
    host, port, generation, phase, mark = _ints(entry, 5, "applied")
    if not (_is_int(generation) and _is_int(phase) and _is_int(mark)):
        raise ValueError(f"an applied entry needs integer fields, not {entry!r:.200}")
    return Applied(_node_from_wire(host, port, "applied"), generation, phase, mark)


def _endpoint_from_wire(entry: object) -> Endpoint:
    node_host, node_port, epoch, host, port = _ints(entry, 5, "endpoint")
    if not (_is_int(epoch) and epoch >= 0 and isinstance(host, str) and host):
        raise ValueError(f"an endpoint needs an epoch >= 0 and a host, not {entry!r:.200}")
    if not (_is_int(port) and 0 < port < 65536):
        raise ValueError(f"an endpoint needs a port in 1..65535, not {entry!r:.200}")
    return Endpoint(_node_from_wire(node_host, node_port, "endpoint"), epoch, host, port)


def _member_from_wire(entry: object) -> Member:
    if not isinstance(entry, list) or len(entry) != 4:
        raise ValueError(
            f"a membership entry must be [host, port, status, version], not {entry!r:.200}"
        )
    host, port, status, version = entry
    if not isinstance(host, str) or not _is_int(port):
        raise ValueError(f"a membership entry needs a str host and int port, not {entry!r:.200}")
    if not isinstance(status, str) or not _is_int(version):
        raise ValueError(
            f"a membership entry needs a str status and int version, not {entry!r:.200}"
        )
    return Member(NodeId(host, port), _parse_status(status), version)


def _parse_status(text: str) -> Status:
    for status in STATUSES:
        if text == status:
            return status
    raise ValueError(f"member status must be one of {', '.join(STATUSES)}, not {text!r:.100}")
