"""The staged membership changes of one node: the admin RPC methods that stage ``join``,
``leave``, ``remove`` and ``replace``, show their ``plan`` and ``commit`` them (DESIGN §8,
``riak-admin cluster`` style), and the read-only methods other nodes ask them of.

The decisions are :mod:`kai.admin.staging`'s (pure); this is their shell: it counts records,
asks peers, keeps the staged changes in the node's metadata. It never changes data, and
changes the membership view only in a commit, by member statuses alone: gossip carries them
and the ownership service moves the data.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import trio
import trio.lowlevel

from kai.admin.staging import (
    NOTHING_STAGED,
    ChangeRefused,
    Plan,
    StagedChange,
    StagedChanges,
    check_alone_and_empty,
    check_join,
    check_leave,
    check_remove,
    check_replace,
    check_seed,
    plan_changes,
    transition_of,
)
from kai.cluster.ownership import partition_size
from kai.core.errors import RpcBadRequest, RpcError, RpcMethodNotFound, RpcRemoteError
from kai.core.membership import MembershipView
from kai.core.pending import Pending, waits
from kai.core.ring import NodeId
from kai.core.storage import StorageEngine
from kai.rpc.server import Handler

if TYPE_CHECKING:
    from kai.cluster.wiring import Cluster

logger = logging.getLogger(__name__)

#: Seconds a peer may take to answer a staging, plan or commit question (its view, its
#: record count, its partition sizes).
PEER_TIMEOUT = 5.0
#: Metadata name of the changes staged on this node.
STAGED_META = "staged_changes"


async def count_records(engine: StorageEngine, buckets: int) -> int:
    """Every data record of the node, counted partition by partition in chunks."""
    total = 0
    for partition in range(buckets):
        total += (await partition_size(engine, partition))[0]
        await trio.lowlevel.checkpoint()
    return total


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A refused change goes back to ``kai-admin`` as a bad request, its reason the message."""
    try:
        yield
    except ChangeRefused as error:
        raise RpcBadRequest(str(error)) from None


def _node_param(value: object, what: str) -> NodeId:
    if not isinstance(value, str):
        raise RpcBadRequest(f"{what} as a HOST:PORT string")
    try:
        return NodeId.parse(value)
    except ValueError as error:
        raise RpcBadRequest(str(error)) from None


def _commit_param(value: object) -> bool:
    if not isinstance(value, bool):
        raise RpcBadRequest(f"commit must be true or false, not {value!r:.40}")
    return value


class MembershipChanges:
    """The membership changes staged on this node, and the admin RPC methods that stage,
    plan, commit and clear them (``riak-admin cluster`` style).

    Staged changes live in memory and in the node's metadata (:data:`STAGED_META`), so a
    restart keeps them. A change is checked when it is staged and again when it is
    committed; nothing but a commit changes the view, and a commit sets member statuses
    only. It must never commit a change it would refuse to stage, nor leave a view in
    which this node is valid in a cluster whose data it does not hold.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.staged = _load_staged(cluster.engine)
        self._lock = trio.Lock()

    def handlers(self) -> dict[str, Handler]:
        """Method name -> handler, for the RPC server."""
        return {
            "stage_join": self.stage_join,
            "stage_leave": self.stage_leave,
            "stage_remove": self.stage_remove,
            "stage_replace": self.stage_replace,
            "plan": self.plan,
            "commit": self.commit,
            "clear_staged": self.clear_staged,
            "join": self.join,
            "membership_view": self.membership_view,
            "record_count": self.record_count,
            "partition_sizes": self.partition_sizes,
        }

    # --- staging ------------------------------------------------------------------------------

    @waits
    async def stage_join(self, seed: object, commit: object = False) -> dict[str, object]:
        """Stage this node joining the cluster of ``seed`` (``commit``: join at once).
        Refused unless this node is alone and empty and ``seed`` answers as a member."""
        seed_node = _node_param(seed, "join takes the seed")
        now = _commit_param(commit)
        async with self._lock:
            with _refusals():
                change = StagedChange("join", self.cluster.self_node, seed_node)
                return await self._stage(change, await self._checked(change), now)

    def join(self, seed: object) -> Pending[dict[str, object]]:
        """Join the cluster of ``seed`` at once: :meth:`stage_join` with ``commit`` (the
        one-command form, as older ``kai-admin`` versions call it)."""
        return self.stage_join(seed, True)

    @waits
    async def stage_leave(self, commit: object = False) -> dict[str, object]:
        """Stage this node leaving: its partitions are copied to their next owners, then it
        is ``left`` and deletes them."""
        now = _commit_param(commit)
        async with self._lock:
            with _refusals():
                change = StagedChange("leave", self.cluster.self_node)
                return await self._stage(change, await self._checked(change), now)

    @waits
    async def stage_remove(self, node: object, commit: object = False) -> dict[str, object]:
        """Stage ``node`` (a member other than this one, usually a dead one) leaving: its
        partitions are copied from the other owners that are up."""
        target = _node_param(node, "remove takes the node")
        now = _commit_param(commit)
        async with self._lock:
            with _refusals():
                change = StagedChange("remove", target)
                return await self._stage(change, await self._checked(change), now)

    @waits
    async def stage_replace(
        self, old: object, new: object, commit: object = False
    ) -> dict[str, object]:
        """Stage ``old`` leaving and ``new`` (a running node, alone and empty) joining."""
        old_node = _node_param(old, "replace takes the node to replace")
        new_node = _node_param(new, "replace takes the new node")
        now = _commit_param(commit)
        async with self._lock:
            with _refusals():
                change = StagedChange("replace", old_node, new_node)
                return await self._stage(change, await self._checked(change), now)

    def clear_staged(self) -> dict[str, object]:
        """Drop every staged change; the ones dropped."""
        cleared = self.staged.describe()
        self._save(StagedChanges())
        return {"cleared": cleared}

    async def _stage(
        self, change: StagedChange, peer_view: MembershipView | None, now: bool
    ) -> dict[str, object]:
        """Stage ``change``, checked; with ``now``, commit it alone at once instead (the
        other staged changes stay staged, except one it supersedes)."""
        staged = self.staged.with_change(change)
        if not now:
            self._save(staged)
            logger.info("staged: %s (%d changes staged)", change, len(staged))
            return {
                "node": str(self.cluster.self_node),
                "change": change.describe(),
                "staged": staged.describe(),
                "committed": False,
            }
        views = {} if peer_view is None or change.peer is None else {change.peer: peer_view}
        return await self._apply(
            StagedChanges((change,)), views, remaining=staged.without([change])
        )

    async def _checked(self, change: StagedChange) -> MembershipView | None:
        """Refuse ``change`` (:class:`ChangeRefused`) if it cannot be made now; the view of
        its peer (a join's seed, a replacement), asked for the checks.

        Raises:
            RpcRemoteError: if the peer cannot be asked.
        """
        cluster = self.cluster
        me, view = cluster.self_node, cluster.membership.view
        if change.action == "leave":
            check_leave(me, view)
            return None
        if change.action == "remove":
            check_remove(me, view, change.node)
            return None
        peer = change.peer
        assert peer is not None
        if change.action == "join":
            check_join(me, view, await count_records(cluster.engine, cluster.config.buckets))
            seed_view = await self._view_of(peer)
            check_seed(peer, seed_view)
            return seed_view
        check_replace(view, change.node, peer)
        new_view = await self._view_of(peer)
        records = await self._ask(peer, "record_count")
        if not isinstance(records, int):
            raise RpcRemoteError(f"{peer} answered record_count with {records!r:.60}")
        check_alone_and_empty(peer, new_view, records, what=f"replace {change.node}")
        return new_view

    # --- plan and commit ----------------------------------------------------------------------

    @waits
    async def plan(self) -> dict[str, object]:
        """The staged changes, what committing them would move (per copy: partition, from,
        to, keys and bytes, as the sending node counts them; null when it cannot be asked)
        and why a commit would be refused; then the transition under way, if any."""
        staged = self.staged
        views = [await self._view_of(peer) for peer in staged.peers()]
        plan = self._plan(staged, views)
        sizes = await self._sizes(plan)
        return {**plan.describe(sizes), "transition": transition_of(self.cluster.placement())}

    @waits
    async def commit(self) -> dict[str, object]:
        """Apply every staged change (each checked again) and clear them; the plan summary
        committed. Refused when nothing is staged, when a staged change no longer applies
        (it is dropped, the others stay staged) or when no node would be left on the ring."""
        async with self._lock:
            staged = self.staged
            with _refusals():
                if not staged:
                    raise ChangeRefused(NOTHING_STAGED)
                views: dict[NodeId, MembershipView] = {}
                for change in staged.changes:
                    try:
                        peer_view = await self._checked(change)
                    except ChangeRefused as error:
                        self._save(staged.without([change]))
                        raise ChangeRefused(
                            f"nothing was committed: the staged {change} no longer applies "
                            f"({error}), so it was dropped; see `kai-admin plan`, then commit "
                            "again"
                        ) from None
                    if peer_view is not None and change.peer is not None:
                        views[change.peer] = peer_view
                return await self._apply(staged, views, remaining=StagedChanges())

    async def _apply(
        self,
        changes: StagedChanges,
        views: dict[NodeId, MembershipView],
        *,
        remaining: StagedChanges,
    ) -> dict[str, object]:
        """Commit ``changes`` (checked) and keep ``remaining`` staged."""
        cluster = self.cluster
        plan = self._plan(changes, views.values())
        if plan.refusal is not None:
            raise ChangeRefused(plan.refusal)
        # One merge, with nothing awaited since the plan was made: the peers' views and the
        # new statuses at once. Merging a seed's view first on its own would make this node
        # a valid member, for a moment, of a cluster whose data it does not hold.
        cluster.membership.merge(plan.view)
        self._save(remaining)
        logger.info(
            "committed: %s; %d partition copies",
            "; ".join(map(str, changes.changes)),
            len(plan.moves),
        )
        warnings: list[str] = []
        for change in changes.changes:
            peer = change.peer
            if peer is None:
                continue
            if change.action == "join":
                try:
                    await cluster.membership.join(peer)  # also makes the seed a gossip peer
                except RpcError as error:
                    warnings.append(f"{error}; gossip keeps trying")
            elif not await cluster.membership.gossip_with(peer):
                warnings.append(f"{peer} did not answer gossip yet; gossip keeps trying")
        return {**plan.summary(), "committed": True, "warnings": warnings}

    def _plan(self, changes: StagedChanges, views: Iterable[MembershipView]) -> Plan:
        cluster = self.cluster
        config = cluster.config
        me = cluster.self_node
        return plan_changes(
            cluster.membership.view,
            views,
            changes,
            n=config.quorum.n,
            buckets=config.buckets,
            virtual_nodes=config.virtual_nodes,
            is_up=lambda node: node == me or cluster.detector.is_up(node),
        )

    async def _sizes(self, plan: Plan) -> dict[tuple[NodeId, int], tuple[int, int]]:
        """``(source, partition) -> (keys, bytes)`` for every move's source that answers."""
        cluster = self.cluster
        sizes: dict[tuple[NodeId, int], tuple[int, int]] = {}

        async def ask(node: NodeId, partitions: list[int]) -> None:
            if node == cluster.self_node:
                for partition in partitions:
                    sizes[node, partition] = await partition_size(cluster.engine, partition)
                return
            try:
                with trio.fail_after(PEER_TIMEOUT):
                    reply = await cluster.transport.call(node, "partition_sizes", partitions)
            except (RpcError, trio.TooSlowError) as error:
                logger.info("plan: no partition sizes from %s: %r", node, error)
                return
            if not isinstance(reply, dict):
                logger.warning("plan: %s answered partition_sizes with %.60r", node, reply)
                return
            for partition in partitions:
                counted = reply.get(partition)
                if isinstance(counted, list) and len(counted) == 2:
                    keys, size = counted
                    if isinstance(keys, int) and isinstance(size, int):
                        sizes[node, partition] = (keys, size)

        async with trio.open_nursery() as nursery:
            for node, partitions in plan.sources().items():
                nursery.start_soon(ask, node, partitions)
        return sizes

    # --- what other nodes ask -----------------------------------------------------------------

    def membership_view(self) -> dict[str, object]:
        """This node's membership view, in wire form (read-only: unlike ``gossip``, it merges
        nothing)."""
        return self.cluster.membership.view.to_wire()

    @waits
    async def record_count(self) -> int:
        """How many data records this node holds (hints excluded), counted in chunks."""
        return await count_records(self.cluster.engine, self.cluster.config.buckets)

    @waits
    async def partition_sizes(self, partitions: object) -> dict[int, list[int]]:
        """``{partition: [keys, bytes]}`` of this node's data, for each of ``partitions``."""
        buckets = self.cluster.config.buckets
        if (
            not isinstance(partitions, list)
            or len(partitions) > buckets
            or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 <= p < buckets
                for p in partitions
            )
        ):
            raise RpcBadRequest(
                f"partition_sizes takes a list of at most {buckets} partitions, each from 0 "
                f"to {buckets - 1}"
            )
        sizes: dict[int, list[int]] = {}
        for partition in dict.fromkeys(partitions):
            sizes[partition] = list(await partition_size(self.cluster.engine, partition))
        return sizes

    # --- helpers ------------------------------------------------------------------------------

    async def _ask(self, peer: NodeId, method: str, *params: object) -> object:
        """Call ``method`` on ``peer`` within :data:`PEER_TIMEOUT`.

        Raises:
            RpcRemoteError: if it cannot be asked, saying why (for ``kai-admin`` to print).
        """
        try:
            with trio.fail_after(PEER_TIMEOUT):
                return await self.cluster.transport.call(peer, method, *params)
        except trio.TooSlowError:
            raise RpcRemoteError(
                f"{peer} did not answer {method} within {PEER_TIMEOUT:g} s; nothing changed"
            ) from None
        except RpcMethodNotFound:
            raise RpcRemoteError(
                f"{peer} runs a version of Kai without {method}: upgrade it first"
            ) from None
        except RpcError as error:
            raise RpcRemoteError(
                f"cannot ask {peer} ({method}): {error}; nothing changed"
            ) from None

    async def _view_of(self, peer: NodeId) -> MembershipView:
        reply = await self._ask(peer, "membership_view")
        try:
            return MembershipView.from_wire(reply)
        except ValueError as error:
            raise RpcRemoteError(f"{peer} sent a bad membership view: {error}") from None

    def _save(self, staged: StagedChanges) -> None:
        self.staged = staged
        self.cluster.engine.put_meta(STAGED_META, staged.to_bytes())


def _load_staged(engine: StorageEngine) -> StagedChanges:
    """The staged changes kept in ``engine``'s metadata; none if there are none, or if they
    cannot be read (said in the log)."""
    raw = engine.get_meta(STAGED_META)
    if raw is None:
        return StagedChanges()
    try:
        return StagedChanges.from_bytes(raw)
    except ValueError as error:
        logger.warning("staged membership changes are unreadable, dropped: %s", error)
        return StagedChanges()
