"""Staged membership changes (DESIGN §8): what an operator asked for, and what it would move.

``kai-admin join | leave | remove | replace`` stage a change on the node they talk to;
``plan`` shows what the staged changes would move before anything does, and ``commit``
applies them, as ``riak-admin cluster plan | commit`` do. This module holds the staged
changes and their stored form, the checks that refuse a change that cannot be made, and the
plan of moves computed from membership views.

It must never do I/O, read a clock or import trio (the admin handlers do, around it), and
never change a view it is given: it returns new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Final, Literal

import attrs
import msgpack

from kai.core.membership import MembershipView, Status
from kai.core.ring import NodeId
from kai.core.transition import (
    CURRENT_STATUSES,
    NEXT_STATUSES,
    PHASE_NAMES,
    SETTLED,
    Moves,
    Placement,
)

#: What an operator can stage.
Action = Literal["join", "leave", "remove", "replace"]
ACTIONS: Final[tuple[Action, ...]] = ("join", "leave", "remove", "replace")

#: Actions whose change names a second node: the seed of a join, the replacement of a replace.
_WITH_PEER: Final = frozenset({"join", "replace"})


class ChangeRefused(ValueError):
    """A membership change cannot be made; the message says why and what to do instead."""


@attrs.frozen
class StagedChange:
    """One change an operator staged.

    Attributes:
        action: ``join`` (``node`` joins ``peer``'s cluster), ``leave`` (``node``, the node
            staging it, hands its data off and retires), ``remove`` (``node``, usually a
            dead member, is retired and its data copied from the survivors) or ``replace``
            (``node`` is retired and ``peer``, a new empty node, takes its place).
        node: the node that joins, leaves, is removed or is replaced.
        peer: the seed of a join, the replacement of a replace; None otherwise.

    Raises:
        ValueError: if the action is unknown, or ``peer`` is missing for a join or a replace,
            given for a leave or a remove, or equal to ``node``.
    """

    action: Action = attrs.field()
    node: NodeId = attrs.field(validator=attrs.validators.instance_of(NodeId))
    peer: NodeId | None = attrs.field(default=None)

    @action.validator
    def _check_action(self, _attribute: object, action: object) -> None:
        if action not in ACTIONS:
            raise ValueError(f"a staged change is one of {', '.join(ACTIONS)}, not {action!r}")

    @peer.validator
    def _check_peer(self, _attribute: object, peer: object) -> None:
        if self.action not in _WITH_PEER:
            if peer is not None:
                raise ValueError(f"a staged {self.action} names one node, not {peer!r} too")
        elif not isinstance(peer, NodeId):
            raise ValueError(f"a staged {self.action} needs a second node, not {peer!r}")
        elif peer == self.node and self.action == "join":
            raise ChangeRefused(f"{peer} cannot join itself: name a member of the cluster to join")
        elif peer == self.node:
            raise ChangeRefused(f"{peer} cannot replace itself: name a new node to replace it")

    def __str__(self) -> str:
        if self.action == "join":
            return f"join {self.node} to the cluster of {self.peer}"
        if self.action == "replace":
            return f"replace {self.node} with {self.peer}"
        return f"{self.action} {self.node}"

    def statuses(self) -> dict[NodeId, Status]:
        """The statuses the change gives, per node."""
        if self.action == "join":
            return {self.node: "joining"}
        if self.action == "replace":
            assert self.peer is not None
            return {self.node: "leaving", self.peer: "joining"}
        return {self.node: "leaving"}

    def nodes(self) -> frozenset[NodeId]:
        """The nodes whose status the change sets."""
        return frozenset(self.statuses())

    def describe(self) -> dict[str, object]:
        """The change as plain values: action, node, seed or replacement, statuses."""
        entry: dict[str, object] = {"action": self.action, "node": str(self.node)}
        if self.action == "join":
            entry["seed"] = str(self.peer)
        elif self.action == "replace":
            entry["replacement"] = str(self.peer)
        entry["statuses"] = {str(node): status for node, status in self.statuses().items()}
        return entry


@attrs.frozen
class StagedChanges:
    """The changes staged on one node, in the order they were staged; at most one per node
    (staging a change drops the earlier ones that set the status of one of its nodes)."""

    changes: tuple[StagedChange, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def with_change(self, change: StagedChange) -> StagedChanges:
        """These changes with ``change`` staged last, instead of any that sets the status
        of one of its nodes."""
        kept = tuple(old for old in self.changes if not old.nodes() & change.nodes())
        return StagedChanges((*kept, change))

    def without(self, dropped: Iterable[StagedChange]) -> StagedChanges:
        """These changes except ``dropped``."""
        gone = set(dropped)
        return StagedChanges(tuple(change for change in self.changes if change not in gone))

    def statuses(self) -> dict[NodeId, Status]:
        """The status each change gives, per node."""
        return {node: status for c in self.changes for node, status in c.statuses().items()}

    def peers(self) -> tuple[NodeId, ...]:
        """The nodes whose views a plan or a commit merges first: each join's seed (the
        cluster joined) and each replacement (so its own entry's version is known)."""
        return tuple(dict.fromkeys(c.peer for c in self.changes if c.peer is not None))

    def describe(self) -> list[dict[str, object]]:
        """Every change as plain values (see :meth:`StagedChange.describe`)."""
        return [change.describe() for change in self.changes]

    def to_bytes(self) -> bytes:
        """The stored form: msgpack ``[[action, host, port, peer host, peer port], ...]``
        (the peer's fields are nil when there is none)."""
        rows = [
            [
                c.action,
                c.node.host,
                c.node.port,
                None if c.peer is None else c.peer.host,
                None if c.peer is None else c.peer.port,
            ]
            for c in self.changes
        ]
        packed: bytes = msgpack.packb(rows, use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> StagedChanges:
        """Rebuild what :meth:`to_bytes` stored.

        Raises:
            ValueError: if ``data`` is not of that form; no other exception, whatever it is.
        """
        try:
            rows = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as error:
            raise ValueError(f"staged changes are not msgpack: {error}") from None
        if not isinstance(rows, list):
            raise ValueError("staged changes must be a list")
        changes = StagedChanges()
        for row in rows:
            if not isinstance(row, list) or len(row) != 5:
                raise ValueError(f"a staged change must be a list of 5 fields, not {row!r:.200}")
            action, host, port, peer_host, peer_port = row
            try:
                node = NodeId(host, port)
                peer = None if peer_host is None else NodeId(peer_host, peer_port)
                changes = changes.with_change(StagedChange(action, node, peer))
            except (TypeError, ValueError) as error:
                raise ValueError(f"bad staged change {row!r:.200}: {error}") from None
        return changes


def _records(count: int) -> str:
    return f"{count} record{'' if count == 1 else 's'}"


def _others(node: NodeId, view: MembershipView) -> list[NodeId]:
    """The members of ``view`` other than ``node`` that have not left."""
    return [m.node for m in view.members if m.node != node and m.status != "left"]


def check_alone_and_empty(node: NodeId, view: MembershipView, records: int, *, what: str) -> None:
    """Refuse unless ``node``, by its own ``view`` and record count, is a fresh node: alone
    and empty (only such a node can join a cluster or replace a member).

    Args:
        what: what the node would do ("join", "replace 127.0.0.1:11013"), for the message.
    """
    if records > 0:
        raise ChangeRefused(
            f"{node} holds {_records(records)}; only an empty node can {what}: start it on "
            "a fresh data directory"
        )
    others = _others(node, view)
    if others:
        raise ChangeRefused(
            f"{node} is already in a cluster, with {', '.join(map(str, others))}; only a node "
            f"on its own can {what}"
        )


def check_join(node: NodeId, view: MembershipView, records: int) -> None:
    """Refuse a join of ``node`` (by its own ``view``, holding ``records``) to another
    cluster if it is not alone and empty."""
    check_alone_and_empty(node, view, records, what="join a cluster")


def check_seed(seed: NodeId, seed_view: MembershipView) -> None:
    """Refuse ``seed`` (by its own view) as the member whose cluster a node joins if it has
    left that cluster."""
    entry = seed_view.member(seed)
    if entry is None or entry.status == "left":
        raise ChangeRefused(f"{seed} has left its cluster: name a current member as the seed")


def _check_valid(node: NodeId, view: MembershipView, what: str) -> None:
    """Refuse unless ``node`` is a valid member by ``view``."""
    entry = view.member(node)
    if entry is None:
        members = ", ".join(str(m.node) for m in view.members if m.status != "left")
        raise ChangeRefused(f"{node} is not a member of this cluster (members: {members})")
    if entry.status == "joining":
        raise ChangeRefused(
            f"{node} is still joining: wait until `kai-admin status` shows phase settled, "
            f"then {what} it"
        )
    if entry.status == "leaving":
        raise ChangeRefused(f"{node} is already leaving; nothing to stage")
    if entry.status == "left":
        raise ChangeRefused(f"{node} has left the cluster already")


def check_leave(node: NodeId, view: MembershipView) -> None:
    """Refuse a leave of ``node`` (the node asked) that cannot be made."""
    _check_valid(node, view, "retire")


def check_remove(self_node: NodeId, view: MembershipView, target: NodeId) -> None:
    """Refuse a remove of ``target``, asked of ``self_node``, that cannot be made."""
    if target == self_node:
        raise ChangeRefused(
            f"{target} is the node asked; to retire it, use leave (`kai-admin --node "
            f"{target} leave`), or remove it through another member"
        )
    _check_valid(target, view, "remove")


def check_replace(view: MembershipView, old: NodeId, new: NodeId) -> None:
    """Refuse a replace of ``old`` by ``new`` that cannot be made by ``view``, the view of
    the node asked (then ask ``new`` itself: see :func:`check_alone_and_empty`)."""
    _check_valid(old, view, "replace")
    entry = view.member(new)
    if entry is not None and entry.status != "left":
        raise ChangeRefused(
            f"{new} is already a member of this cluster ({entry.status}); a replacement must "
            "be a new node"
        )


@attrs.frozen
class Move:
    """One copy a transition makes: ``partition`` from ``source`` to ``target``.

    Attributes:
        source: the first current owner of the partition that is up (the one that sends it,
            as the ownership service chooses), or None if none is.
    """

    partition: int
    source: NodeId | None
    target: NodeId


@attrs.frozen(eq=False)
class Plan:
    """What committing staged changes would do.

    Attributes:
        changes: the staged changes.
        view: the view the commit would make (the node's, merged with its peers', with the
            staged statuses).
        n: replicas per key.
        current: the nodes that hold the data now (valid and leaving, in ``view``).
        next: the nodes that will (joining and valid).
        moves: every copy, by partition then target.
        refusal: why a commit would be refused, or None.
    """

    changes: StagedChanges
    view: MembershipView
    n: int
    current: tuple[NodeId, ...]
    next: tuple[NodeId, ...]
    moves: tuple[Move, ...]
    refusal: str | None

    def sources(self) -> dict[NodeId, list[int]]:
        """The partitions each sending node sends (what to ask it the sizes of), sorted."""
        sent: dict[NodeId, set[int]] = {}
        for move in self.moves:
            if move.source is not None:
                sent.setdefault(move.source, set()).add(move.partition)
        return {node: sorted(partitions) for node, partitions in sorted(sent.items())}

    def summary(self) -> dict[str, object]:
        """The changes and how much moves, as plain values (no per-move list)."""
        return {
            "staged": self.changes.describe(),
            "n": self.n,
            "current_ring": [str(node) for node in self.current],
            "next_ring": [str(node) for node in self.next],
            "partitions_moving": len({move.partition for move in self.moves}),
            "copies": len(self.moves),
            "refusal": self.refusal,
        }

    def describe(self, sizes: Mapping[tuple[NodeId, int], tuple[int, int]]) -> dict[str, object]:
        """:meth:`summary`, with every move and the keys and bytes moving.

        Args:
            sizes: ``(source, partition) -> (keys, bytes)`` as each source counted them; a
                move whose source was not (or could not be) asked has null sizes, and is
                counted in ``sizes_unknown`` instead of the totals.
        """
        moves: list[dict[str, object]] = []
        keys = size = unknown = 0
        for move in self.moves:
            counted = None if move.source is None else sizes.get((move.source, move.partition))
            if counted is None:
                unknown += 1
            else:
                keys, size = keys + counted[0], size + counted[1]
            moves.append(
                {
                    "partition": move.partition,
                    "from": None if move.source is None else str(move.source),
                    "to": str(move.target),
                    "keys": None if counted is None else counted[0],
                    "bytes": None if counted is None else counted[1],
                }
            )
        return {
            **self.summary(),
            "keys": keys,
            "bytes": size,
            "sizes_unknown": unknown,
            "moves": moves,
        }


#: Why a commit of nothing is refused.
NOTHING_STAGED: Final = (
    "nothing is staged: stage a change first with join, leave, remove or replace"
)


def staged_view(
    view: MembershipView, peer_views: Iterable[MembershipView], changes: StagedChanges
) -> MembershipView:
    """``view`` merged with ``peer_views``, then with the staged statuses, each at a version
    above every one merged (so it wins when gossiped to any of them)."""
    merged = view
    for peer_view in peer_views:
        merged = merged.merge(peer_view)
    return merged.with_statuses(changes.statuses())


def plan_changes(
    view: MembershipView,
    peer_views: Iterable[MembershipView],
    changes: StagedChanges,
    *,
    n: int,
    buckets: int,
    virtual_nodes: int,
    is_up: Callable[[NodeId], bool],
) -> Plan:
    """The plan of committing ``changes`` on a node whose view is ``view``.

    Args:
        peer_views: the views of the changes' :meth:`~StagedChanges.peers`.
        n: replicas per key (the configured N).
        is_up: whether a node is up, for choosing each copy's source.
    """
    target = staged_view(view, peer_views, changes)
    moves = Moves.of(target, n, buckets=buckets, virtual_nodes=virtual_nodes)
    current = tuple(m.node for m in target.members if m.status in CURRENT_STATUSES)
    following = tuple(m.node for m in target.members if m.status in NEXT_STATUSES)
    planned: list[Move] = []
    for partition, owners in sorted(moves.owners.items()):
        source = moves.sender(partition, is_up)
        planned += (Move(partition, source, owner) for owner in sorted(owners))
    refusal: str | None = None
    if not changes:
        refusal = NOTHING_STAGED
    elif not following:
        refusal = (
            "the staged changes would leave no node on the ring: keep at least one member, "
            "or replace the last one"
        )
    return Plan(changes, target, n, current, following, tuple(planned), refusal)


def transition_of(placement: Placement) -> dict[str, object] | None:
    """The transition a node's placement is in, as plain values; None when settled."""
    if placement.phase == SETTLED:
        return None
    moves = placement.moves
    return {
        "phase": PHASE_NAMES[placement.phase],
        "copies": moves.count(),
        "copies_missing": len(placement.missing),
        "current_ring": [str(node) for node in moves.current.nodes],
        "next_ring": [str(node) for node in moves.next.nodes],
    }
