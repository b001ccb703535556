"""The gossip loop, over the in-process :class:`~kai.testing.network.FakeNetwork`, in virtual time.

Every node registers its ``gossip`` handler and a ``ping`` on the network; a crashed node
(:meth:`Gossipers.crash`) refuses connections, a hung one (``network.hang``) never answers.
Each message takes :data:`ONE_WAY` seconds, so an exchange takes :data:`ROUND_TRIP`.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from kai.core.errors import RpcBadRequest, RpcConnectionError
from kai.core.membership import Member, MembershipView
from kai.core.ring import NodeId
from kai.membership.detector import FailureDetector
from kai.membership.gossip import Membership
from kai.rpc.server import Handler
from kai.rpc.transport import Transport
from kai.testing.network import FakeNetwork, Faults

NODES = [NodeId("127.0.0.1", 11011 + index) for index in range(6)]
A, B, C, D, E, F = NODES

INTERVAL = 1.0
CALL_TIMEOUT = 0.5
#: Powers of two, so that sums of them in virtual time are exact.
ONE_WAY = 1 / 256
ROUND_TRIP = 2 * ONE_WAY


@attrs.frozen
class Call:
    at: float
    source: NodeId
    peer: NodeId
    method: str


@attrs.frozen
class RecordingTransport:
    """A node's transport on the network that notes every call it makes, answered or not.

    Not a second fake: calls still go through FakeNetwork, which counts only the calls it
    delivers, while these tests need the attempts too (to a hung or crashed node) and when.
    """

    transport: Transport
    source: NodeId
    calls: list[Call]

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        self.calls.append(Call(trio.current_time(), self.source, peer, method))
        return await self.transport.call(peer, method, *params)


def pong() -> str:
    return "pong"


class Gossipers:
    """Memberships on one `FakeNetwork`, each persisting its view through ``on_change``."""

    def __init__(
        self,
        network: FakeNetwork,
        *,
        interval: float = INTERVAL,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.network = network
        self.interval = interval
        self.call_timeout = call_timeout
        self.nodes: dict[NodeId, Membership] = {}
        self.calls: list[Call] = []
        self.persisted: dict[NodeId, MembershipView] = {}
        self.changes: dict[NodeId, int] = {}
        self.detectors: dict[NodeId, FailureDetector] = {}
        self._scopes: dict[NodeId, trio.CancelScope] = {}
        self._waiters: list[tuple[Callable[[], bool], trio.Event]] = []

    def __getitem__(self, node: NodeId) -> Membership:
        return self.nodes[node]

    def add(
        self, node: NodeId, view: MembershipView | None = None, seeds: Iterable[NodeId] = ()
    ) -> Membership:
        """Start ``node`` listening (replacing an earlier registration), its loop not running."""
        detector = FailureDetector()
        membership = Membership(
            node,
            MembershipView.single(node) if view is None else view,
            transport=RecordingTransport(self.network.transport_for(node), node, self.calls),
            detector=detector,
            seeds=tuple(seeds),
            interval=self.interval,
            call_timeout=self.call_timeout,
            rng=random.Random(f"gossip test {node}"),
            on_change=functools.partial(self._changed, node),
        )
        self.nodes[node] = membership
        self.network.register(node, self.handlers(node))
        self.detectors[node] = detector
        self.persisted[node] = membership.view
        self.changes[node] = 0
        return membership

    def handlers(self, node: NodeId) -> dict[str, Handler]:
        return {"gossip": self.nodes[node].handle_gossip, "ping": pong}

    def calls_from(self, source: NodeId, method: str = "gossip") -> list[Call]:
        return [call for call in self.calls if call.source == source and call.method == method]

    async def start(self, nursery: trio.Nursery, node: NodeId) -> None:
        await nursery.start(self._run, self[node])

    def stop(self, node: NodeId) -> None:
        """Crash ``node``: its loop stops and nobody can reach it."""
        self._scopes.pop(node).cancel()
        self.crash(node)

    def crash(self, node: NodeId) -> None:
        """Make ``node`` refuse connections (its loop, if running, goes on)."""
        self.network.unregister(node)

    def restore(self, node: NodeId) -> None:
        """Make a crashed ``node`` reachable again, with its state."""
        self.network.register(node, self.handlers(node))

    async def _run(
        self,
        membership: Membership,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self._scopes[membership.self_node] = scope
            await membership.run(task_status=task_status)

    def _changed(self, node: NodeId, view: MembershipView) -> None:
        view.check_invariants()
        self.persisted[node] = view
        self.changes[node] += 1
        for predicate, event in self._waiters:
            if predicate():
                event.set()

    async def wait_until(self, predicate: Callable[[], bool], *, within: float) -> float:
        """Wait (virtual time) until a view change makes ``predicate`` true; return the wait."""
        start = trio.current_time()
        if not predicate():
            event = trio.Event()
            self._waiters.append((predicate, event))
            with trio.fail_after(within):
                await event.wait()
            self._waiters.remove((predicate, event))
        return trio.current_time() - start

    def views(self, nodes: Iterable[NodeId]) -> list[MembershipView]:
        return [self[node].view for node in nodes]

    def agree(self, nodes: Iterable[NodeId], expected: MembershipView) -> bool:
        return all(view == expected for view in self.views(nodes))


@asynccontextmanager
async def gossipers(
    *, interval: float = INTERVAL, call_timeout: float = CALL_TIMEOUT
) -> AsyncIterator[Gossipers]:
    faults = Faults(delay=(ONE_WAY, ONE_WAY))
    async with FakeNetwork.running(random.Random(0), faults) as network:
        yield Gossipers(network, interval=interval, call_timeout=call_timeout)


def full_view(nodes: Iterable[NodeId]) -> MembershipView:
    return MembershipView(tuple(Member(node, "valid", 1) for node in sorted(nodes)))


def node_a(view: MembershipView, seen: list[MembershipView] | None = None) -> Membership:
    """Node A's membership on a network of its own, recording its view changes in ``seen``."""
    return Membership(
        A,
        view,
        transport=FakeNetwork(random.Random(0)).transport_for(A),  # never called
        detector=FailureDetector(clock=lambda: 0.0),
        rng=random.Random(1),
        on_change=(lambda view: None) if seen is None else seen.append,
    )


async def test_five_nodes_that_know_one_seed_converge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = NODES[:5]
    expected = full_view(nodes)
    async with gossipers() as cluster, trio.open_nursery() as nursery:
        cluster.add(A)
        for node in nodes[1:]:
            cluster.add(node, seeds=[A])
        for node in nodes:
            await cluster.start(nursery, node)
        waited = await cluster.wait_until(lambda: cluster.agree(nodes, expected), within=30)
        nursery.cancel_scope.cancel()
    # Round 0 brings everyone to the seed; a few random rounds spread the rest.
    assert waited <= 4 * INTERVAL + 2 * ROUND_TRIP
    assert all(view == expected for view in cluster.persisted.values())


async def test_seeds_that_are_members_are_not_gossiped_every_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = NODES[:5]
    async with gossipers() as cluster:
        for node in nodes:
            cluster.add(node, full_view(nodes))
        a = cluster.add(A, full_view(nodes), seeds=[B, C])
        for _ in range(20):
            await a.gossip_once()
    calls = cluster.calls_from(A)
    assert len(calls) == 20, "one random member per round, no seeds"
    assert sum(call.peer == B for call in calls) < 10
    assert {call.peer for call in calls} == set(nodes) - {A}


async def test_seeds_that_are_not_members_are_gossiped_every_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, full_view([A, B]), seeds=[A, F])  # F never answers; A is ourselves
        cluster.add(B, full_view([A, B]))
        for _ in range(3):
            await a.gossip_once()
    calls = cluster.calls_from(A)
    assert [call.peer for call in calls].count(F) == 3
    assert [call.peer for call in calls].count(B) == 3
    assert a.view == full_view([A, B]), "an unreachable seed is not added to the view"


async def test_restarted_node_rejoins_from_its_persisted_view_without_seeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster, trio.open_nursery() as nursery:
        cluster.add(A)
        cluster.add(B, seeds=[A])
        cluster.add(C, seeds=[A])
        for node in (A, B, C):
            await cluster.start(nursery, node)
        await cluster.wait_until(lambda: cluster.agree([A, B, C], full_view([A, B, C])), within=10)

        cluster.stop(C)
        d = cluster.add(D)
        await d.join(A)
        cluster[A].add_flush(42)
        await cluster.start(nursery, D)
        # A node that joins a cluster is joining (the cluster's ownership service, not run
        # here, would make it valid once its share of the data is copied).
        after = attrs.evolve(
            full_view([A, B, C]).merge(MembershipView((Member(D, "joining", 2),))),
            flush_times=(42,),
        )
        await cluster.wait_until(lambda: cluster.agree([A, B, D], after), within=10)
        assert cluster.persisted[C] == full_view([A, B, C]), "C missed the news"

        # C comes back with what it persisted and no seeds at all.
        cluster.add(C, cluster.persisted[C])
        await cluster.start(nursery, C)
        waited = await cluster.wait_until(lambda: cluster.agree([A, B, C, D], after), within=10)
        assert waited <= 3 * INTERVAL
        nursery.cancel_scope.cancel()


async def test_hung_peer_does_not_stall_a_round_beyond_the_call_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, full_view([A, B]), seeds=[C])
        cluster.add(B, full_view([A, B]))
        cluster.add(C)
        cluster.network.hang(B)
        start = trio.current_time()
        await a.gossip_once()
        assert trio.current_time() - start == CALL_TIMEOUT
    assert a.view == full_view([A, B, C]), "the seed's exchange finished meanwhile"
    assert cluster.detectors[A].statuses() == {B: False, C: True}


async def test_rounds_start_every_interval_even_with_a_hung_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers(call_timeout=0.25) as cluster:
        a = cluster.add(A, full_view([A, B]))
        cluster.add(B, full_view([A, B]))
        cluster.network.hang(B)
        with trio.move_on_after(3.5):
            await a.run()
    assert [call.at for call in cluster.calls_from(A)] == [0.0, 1.0, 2.0, 3.0]
    # Each round's probe pings B once the round's exchange has timed out.
    assert [call.at for call in cluster.calls_from(A, "ping")] == [0.25, 1.25, 2.25, 3.25]


async def test_unreachable_peer_is_marked_down_never_evicted_and_up_when_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = [A, B, C]
    async with gossipers() as cluster, trio.open_nursery() as nursery:
        for node in nodes:
            cluster.add(node, full_view(nodes))
        cluster.crash(B)
        for node in nodes:
            await cluster.start(nursery, node)
        await trio.sleep_until(20.5)  # B refuses connections for 20 rounds
        assert not cluster.detectors[A].is_up(B)
        assert not cluster.detectors[C].is_up(B)
        assert cluster.views(nodes) == [full_view(nodes)] * 3, "B stays a valid member"
        assert cluster.changes == {A: 0, B: 0, C: 0}

        cluster.restore(B)
        # The round at 21 probes B: one round trip for the exchange, one for the ping.
        await trio.sleep_until(21 + 2.5 * ROUND_TRIP)
        assert cluster.detectors[A].is_up(B)
        assert cluster.detectors[C].is_up(B)
        nursery.cancel_scope.cancel()
    assert cluster.detectors[A].transitions() == 2


async def test_down_members_are_tried_now_and_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, full_view([A, B, C]))
        cluster.add(B, full_view([A, B, C]))
        cluster.add(C, full_view([A, B, C]))
        cluster.crash(B)
        cluster.detectors[A].record_failure(B)
        for _ in range(50):
            await a.gossip_once()
    peers = [call.peer for call in cluster.calls_from(A)]
    assert len(peers) == 50
    assert 0 < peers.count(B) < peers.count(C)


async def test_flush_times_spread_to_every_node(autojump_clock: trio.testing.MockClock) -> None:
    nodes = NODES[:5]
    flushed = attrs.evolve(full_view(nodes), flush_times=(1_000, 2_000))
    async with gossipers() as cluster, trio.open_nursery() as nursery:
        for node in nodes:
            cluster.add(node, full_view(nodes))
        for node in nodes:
            await cluster.start(nursery, node)
        cluster[A].add_flush(2_000)
        cluster[D].add_flush(1_000)
        waited = await cluster.wait_until(lambda: cluster.agree(nodes, flushed), within=30)
        nursery.cancel_scope.cancel()
    assert waited <= 5 * INTERVAL
    assert all(view == flushed for view in cluster.persisted.values())


async def test_join_exchanges_views_with_the_seed_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster:
        cluster.add(A, full_view([A, B]))
        cluster.add(B, full_view([A, B]))
        c = cluster.add(C)
        await c.join(A)
        assert trio.current_time() == ROUND_TRIP
    joined = full_view([A, B]).merge(MembershipView((Member(C, "joining", 2),)))
    assert c.view == cluster[A].view == joined
    assert cluster.persisted[C] == c.view


async def test_join_raises_when_the_seed_cannot_be_reached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A)
        cluster.add(B)
        cluster.network.hang(B)
        with pytest.raises(RpcConnectionError, match=r"127\.0\.0\.1:11012"):
            await a.join(B)
        assert trio.current_time() == CALL_TIMEOUT
        with pytest.raises(RpcConnectionError):
            await a.join(F)  # nothing there
    # Still joining: a later join may be retried.
    assert a.view == MembershipView((Member(A, "joining", 2),))


async def test_join_self_only_marks_valid(autojump_clock: trio.testing.MockClock) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, MembershipView((Member(A, "left", 3),)))
        await a.join(A)
        assert a.view.members == (Member(A, "valid", 4),)
        assert cluster.calls == []
        await a.join(A)
    assert cluster.changes[A] == 1, "already valid: nothing to change"


def test_a_node_asserts_its_own_membership_unless_it_has_left() -> None:
    membership = node_a(full_view([B]))
    assert membership.view == full_view([A, B])
    # Others marking us as leaving or left is an explicit change; we accept it.
    assert membership.merge(MembershipView((Member(A, "left", 2),)))
    assert membership.view.member(A) == Member(A, "left", 2)
    assert membership.view.ring_nodes() == (B,)
    # A stale entry for us changes nothing.
    assert not membership.merge(full_view([A, B]))


def test_merge_reports_changes_to_on_change_only() -> None:
    seen: list[MembershipView] = []
    membership = node_a(MembershipView.single(A), seen)
    assert not membership.merge(MembershipView.single(A))
    assert membership.merge(full_view([B]))
    assert seen == [full_view([A, B])]
    membership.set_status("leaving")
    assert seen[-1].member(A) == Member(A, "leaving", 2)
    membership.add_flush(7)
    membership.add_flush(7)
    assert len(seen) == 3
    assert seen[-1].flush_times == (7,)


def test_handle_gossip_refuses_a_bad_view_and_keeps_ours() -> None:
    seen: list[MembershipView] = []
    membership = node_a(MembershipView.single(A), seen)
    with pytest.raises(RpcBadRequest, match="bad membership view"):
        membership.handle_gossip({"members": [["127.0.0.1", 1, "bogus", 1]], "flush_times": []})
    assert membership.view == MembershipView.single(A)
    assert seen == []
    assert MembershipView.from_wire(membership.handle_gossip(full_view([B]).to_wire())) == (
        full_view([A, B])
    )


def junk_view(wire: object) -> object:
    return {"members": "nope"}


async def test_a_bad_reply_fails_the_exchange_but_the_peer_is_up(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, full_view([A, B]))
        cluster.network.register(B, {"gossip": junk_view})
        with caplog.at_level(logging.WARNING, logger="kai.membership.gossip"):
            assert not await a.gossip_with(B)
    assert cluster.detectors[A].statuses() == {B: True}
    assert a.view == full_view([A, B])
    assert "bad membership view" in caplog.text


async def test_a_peer_that_answers_with_an_error_is_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, full_view([A, B]))
        cluster.network.register(B, {})  # every call gets "no such method"
        cluster.detectors[A].record_failure(B)
        assert not await a.gossip_with(B)
    assert cluster.detectors[A].statuses() == {B: True}
    assert a.view == full_view([A, B])


async def test_left_members_are_not_gossiped_with(autojump_clock: trio.testing.MockClock) -> None:
    async with gossipers() as cluster:
        a = cluster.add(A, MembershipView((Member(A, "valid", 1), Member(B, "left", 2))))
        cluster.add(B)
        await a.gossip_once()
    assert cluster.calls == []
