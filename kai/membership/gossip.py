"""The gossip loop: spreads the membership view between nodes (DESIGN §8).

Every ``interval`` a node exchanges its view with one random member (push-pull: it sends its
view in a ``gossip`` RPC and merges the view that comes back) and with every configured seed
that is not yet a member, then pings the peers its failure detector marks down. Because
views merge as a join-semilattice (``kai.core.membership``), repeated, reordered or lost
exchanges only delay convergence, never corrupt it.

This module must never remove a node from the view or change another node's status because
of a failed call: failures only go to the local :class:`~kai.membership.detector.FailureDetector`.
Status changes are explicit (:meth:`Membership.set_status`, used by join and leave). It must
never let one slow peer stall a round: every call runs under ``call_timeout``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, NoReturn

import trio

from kai.core.errors import RpcBadRequest, RpcConnectionError, RpcError
from kai.core.membership import MembershipView, Status
from kai.core.ring import NodeId
from kai.logs import iso_time_us
from kai.membership.detector import FailureDetector
from kai.rpc.transport import Transport

logger = logging.getLogger(__name__)

#: How often a round picks a down member instead of an up one (when both exist), so a down
#: member also gets our view soon after it comes back.
DOWN_PEER_PROBABILITY: Final = 0.2


def _ignore_change(view: MembershipView) -> None:
    """The default ``on_change``: do nothing."""


class Membership:
    """One node's membership view and the gossip that keeps it in step with the cluster.

    Args:
        self_node: This node's RPC address.
        view: The starting view: the persisted one, or ``MembershipView.single(self_node)``.
            If ``self_node`` is missing from it, it is added as valid (see `view`).
        transport: How to call peers.
        detector: The node's failure detector; every exchange's outcome is recorded there.
        seeds: Nodes to gossip with while they are not members of our view (config seeds,
            ``kai --seed``); seeds equal to ``self_node`` are ignored.
        interval: Seconds between the starts of two gossip rounds (``membership_interval``).
        call_timeout: Seconds one exchange (or one round of pings) may take.
        rng: Chooses gossip peers; defaults to a generator seeded with ``self_node``.
        on_change: Called with the new view every time the view changes (the node persists
            it and rebuilds its ring there). Not called for the starting view.
    """

    def __init__(
        self,
        self_node: NodeId,
        view: MembershipView,
        *,
        transport: Transport,
        detector: FailureDetector,
        seeds: Sequence[NodeId] = (),
        interval: float = 1.0,
        call_timeout: float = 1.0,
        rng: random.Random | None = None,
        on_change: Callable[[MembershipView], None] = _ignore_change,
    ) -> None:
        if interval <= 0 or call_timeout <= 0:
            raise ValueError(
                f"gossip interval and call timeout must be positive, not {interval!r} and "
                f"{call_timeout!r}"
            )
        self._self_node = self_node
        self._transport = transport
        self._detector = detector
        self._seeds = tuple(dict.fromkeys(seed for seed in seeds if seed != self_node))
        self._interval = interval
        self._call_timeout = call_timeout
        self._rng = random.Random(str(self_node)) if rng is None else rng
        self._on_change = on_change
        self._view = self._asserting_self(view)

    @property
    def self_node(self) -> NodeId:
        """This node's RPC address."""
        return self._self_node

    @property
    def view(self) -> MembershipView:
        """The current view; it always lists this node (possibly as ``left``)."""
        return self._view

    def merge(self, view: MembershipView) -> bool:
        """Merge ``view`` into ours, calling ``on_change`` if that changed anything.

        If the merged view does not list this node, it is added back as valid: a node
        asserts its own membership unless the view says it has left.

        Returns:
            Whether our view changed.
        """
        return self._replace(self._asserting_self(self._view.merge(view)))

    def handle_gossip(self, wire: object) -> dict[str, object]:
        """The body of the ``gossip`` RPC handler: merge the caller's view, return ours.

        Args:
            wire: The caller's view, as `MembershipView.to_wire` made it.

        Returns:
            Our view after the merge, in wire form (push-pull: the caller merges it).

        Raises:
            RpcBadRequest: If ``wire`` is not a valid view; ours is unchanged.
        """
        try:
            view = MembershipView.from_wire(wire)
        except ValueError as exc:
            raise RpcBadRequest(f"bad membership view: {exc}") from None
        self.merge(view)
        return self._view.to_wire()

    async def gossip_with(self, peer: NodeId) -> bool:
        """Exchange views with ``peer`` once, within ``call_timeout``.

        The outcome goes to the failure detector: a peer that answers is up, even with an
        error; one that cannot be reached (:attr:`~kai.core.errors.RpcError.unreachable`) or
        does not answer in time is down (and stays in the view).

        Returns:
            Whether the exchange succeeded. Never raises for an unreachable, failing or slow
            peer.
        """
        try:
            with trio.fail_after(self._call_timeout):
                reply = await self._transport.call(peer, "gossip", self._view.to_wire())
        except trio.TooSlowError:
            logger.debug("gossip with %s timed out", peer)
            self._detector.record_failure(peer)
            return False
        except RpcError as exc:
            logger.debug("gossip with %s failed: %r", peer, exc)
            self._detector.record_error(peer, exc)
            return False
        # The peer answered, so it is up, even if its answer turns out to be unusable.
        self._detector.record_success(peer)
        try:
            view = MembershipView.from_wire(reply)
        except ValueError as exc:
            logger.warning("%s answered gossip with a bad membership view: %s", peer, exc)
            return False
        self.merge(view)
        return True

    async def gossip_once(self) -> None:
        """Run one gossip round; returns within ``call_timeout``.

        The round exchanges views, concurrently, with one random member other than this
        node (an up one, but now and then a down one so it hears from us when it is back)
        and with every seed that is not a member of our view yet. Members that have left
        are not gossiped with.
        """
        member = self._choose_member()
        peers = [] if member is None else [member]
        peers.extend(
            seed for seed in self._seeds if self._view.member(seed) is None and seed not in peers
        )
        if not peers:
            return
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self.gossip_with, peer)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Gossip forever: a round, then a probe of down nodes, every ``interval`` seconds.

        Rounds start ``interval`` apart; a round that takes longer (at most two call
        timeouts) delays the next one instead of overlapping it. Start it with
        ``await nursery.start(membership.run)``.
        """
        task_status.started()
        while True:
            next_round = trio.current_time() + self._interval
            await self.gossip_once()
            await self._detector.probe_down_nodes(self._transport, timeout=self._call_timeout)
            await trio.sleep_until(next_round)

    @property
    def awaiting_seeds(self) -> bool:
        """Whether this node has seeds and its view lists no other node yet (it has not
        met their cluster)."""
        return bool(self._seeds) and all(
            member.node == self._self_node for member in self._view.members
        )

    async def join(self, seed: NodeId) -> None:
        """Join ``seed``'s cluster: mark this node joining (the cluster copies its share of
        the data to it, then makes it valid) and gossip with ``seed`` at once.

        Joining oneself (the same seed list on every node) only marks this node valid.

        Raises:
            RpcConnectionError: If the exchange with ``seed`` failed (unreachable, timed
                out or a bad answer); this node is still marked joining and a later
                ``join`` may be retried.
        """
        me = self._view.member(self._self_node)
        if seed == self._self_node:
            if me is None or me.status != "valid":
                self.set_status("valid")
            return
        if seed not in self._seeds:
            self._seeds = (*self._seeds, seed)
        if me is None or me.status not in ("joining", "valid"):
            self.set_status("joining")
        elif me.status == "valid" and len(self._view.ring_nodes()) == 1:
            self.set_status("joining")  # a cluster of one joins another
        if not await self.gossip_with(seed):
            raise RpcConnectionError(
                f"could not exchange membership with seed {seed} within "
                f"{self._call_timeout} s; check that it is running and shares our secret"
            )
        logger.info("joined the cluster of %s: %d members", seed, len(self._view.members))

    def set_status(self, status: Status) -> None:
        """Change this node's own status (at a new version) and call ``on_change``."""
        logger.info("%s: own status is now %s", self._self_node, status)
        self._replace(self._view.with_status(self._self_node, status))

    def set_statuses(self, changes: Mapping[NodeId, Status]) -> None:
        """Change the status of each node of ``changes`` (an operator's committed plan, or
        the end of a transition) and call ``on_change``."""
        self._replace(self._view.with_statuses(changes))

    def add_completions(self, copies: Iterable[tuple[int, NodeId]]) -> None:
        """Record that each ``(partition, node)`` of ``copies`` holds its copy of the
        partition in the current transition."""
        self._replace(self._view.with_completions(copies))

    def acknowledge(self, phase: int, mark: int) -> None:
        """Record that this node applies the placement ``mark`` (at ``phase``) now."""
        self._replace(self._view.with_applied(self._self_node, phase, mark))

    def publish_endpoint(self, host: str, port: int) -> None:
        """Publish where this node serves memcached clients (``stats kai_ring`` lists it, so
        clients can send each key to one of its primaries); gossip spreads it."""
        epoch = time.time_ns() // 1000
        self._replace(self._view.with_endpoint(self._self_node, host, port, epoch))

    def add_flush(self, at: int) -> None:
        """Record a cluster-wide flush at ``at`` (unix microseconds); gossip spreads it.

        Calls ``on_change`` unless the view already had it (or it is older than every flush
        time the view keeps).

        Raises:
            ValueError: If ``at`` is not an integer >= 0.
        """
        self._replace(self._view.with_flush(at))

    def _replace(self, view: MembershipView) -> bool:
        if view == self._view:
            return False
        old = self._view
        self._view = view
        _log_changes(old, view)
        self._on_change(view)
        return True

    def _asserting_self(self, view: MembershipView) -> MembershipView:
        if view.member(self._self_node) is not None:
            return view
        logger.info("%s is missing from the membership view; adding it as valid", self._self_node)
        return view.with_status(self._self_node, "valid")

    def _choose_member(self) -> NodeId | None:
        """A random member to gossip with, or ``None`` if there is none but us."""
        candidates = [
            member.node
            for member in self._view.members
            if member.node != self._self_node and member.status != "left"
        ]
        up = [node for node in candidates if self._detector.is_up(node)]
        down = [node for node in candidates if not self._detector.is_up(node)]
        if down and (not up or self._rng.random() < DOWN_PEER_PROBABILITY):
            return self._rng.choice(down)
        return self._rng.choice(up) if up else None


def _log_changes(old: MembershipView, new: MembershipView) -> None:
    old_members = {member.node: member for member in old.members}
    for member in new.members:
        before = old_members.get(member.node)
        if before is None:
            logger.info(
                "new member %s (%s, version %d)", member.node, member.status, member.version
            )
        elif before.status != member.status:
            logger.info(
                "member %s is now %s (was %s; version %d)",
                member.node,
                member.status,
                before.status,
                member.version,
            )
    added = sorted(set(new.flush_times) - set(old.flush_times))
    if added:
        logger.info("cluster-wide flush_all at %s", ", ".join(map(iso_time_us, added)))
