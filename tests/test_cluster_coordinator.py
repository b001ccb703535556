"""The quorum coordinator over the verified in-process network: forwarding, quorums,
timeouts, read repair.

Every test runs in virtual time (``autojump_clock``) on
:class:`~kai.testing.network.FakeNetwork`, which encodes params and results with the real RPC
framing (the handlers see real wire types) and takes the coordinator's fan-out path
(``start_call``). A crashed node (``unregister``) refuses calls at once; a hung node or a
partition leaves them unanswered until the caller's deadline; a slow node answers late.
Background work (replication, late replies, read repair) runs in a nursery the test owns:
leaving it waits for exactly that work, so checks after it need no sleeps. The network
stops after it, so calls a test makes itself go inside the block.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NoReturn

import attrs
import msgpack
import pytest
import trio
import trio.testing

from kai.cluster import reads as reads_module
from kai.cluster.coordinator import Coordinator
from kai.cluster.hints import HintStore
from kai.cluster.replica_rpc import READ_REPLY_BUDGET, ReplicaRpcHandlers
from kai.core.config import Quorum
from kai.core.errors import (
    QuorumTimeout,
    QuorumUnavailable,
    RpcBadRequest,
)
from kai.core.pending import Pending, resolve
from kai.core.quorum import ReadRound
from kai.core.ring import NodeId, Ring
from kai.core.stats import NodeStats
from kai.core.updates import Applied, Outcome, Update
from kai.core.vclock import VClock
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    cas_unique,
    context_of,
    decode_siblings,
    encode_siblings,
)
from kai.core.wire import siblings_from_wire
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica
from kai.testing.network import FakeNetwork

TIMEOUT = 5.0
BUCKETS = 64
EPOCH = 1_700_000_000.0


def wall_clock() -> float:
    return EPOCH + trio.current_time()


class Cluster:
    """Nodes 127.0.0.1:11011.. sharing one ring, network and background nursery."""

    def __init__(
        self,
        network: FakeNetwork,
        background: trio.Nursery,
        size: int,
        quorum: Quorum,
        *,
        down: set[NodeId] | None = None,
        siblings_maximum: int = 100,
        read_reply_budget: int = READ_REPLY_BUDGET,
        sloppy: bool = True,
    ) -> None:
        self.network = network
        self.nodes = [NodeId("127.0.0.1", 11011 + index) for index in range(size)]
        self.ring = Ring(self.nodes, buckets=BUCKETS, virtual_nodes=16)
        self.down = down if down is not None else set()
        self.failures: list[NodeId] = []
        self.successes: list[NodeId] = []
        self.flushes: list[tuple[NodeId, int]] = []
        self.coordinators: dict[NodeId, Coordinator] = {}
        for index, node in enumerate(self.nodes):
            replica = LocalReplica(
                MemoryEngine(),
                actor=f"actor-{index}".encode(),
                buckets=BUCKETS,
                stats=NodeStats(),
                siblings_maximum=siblings_maximum,
                wall_clock=wall_clock,
            )
            coordinator = Coordinator(
                self_node=node,
                replica=replica,
                transport=network.transport_for(node),
                ring=lambda: self.ring,
                quorum=quorum,
                is_up=lambda peer: peer not in self.down,
                on_success=self.successes.append,
                on_failure=self.failures.append,
                request_timeout=TIMEOUT,
                on_flush=self._flush_recorder(node),
                background=background,
                read_reply_budget=read_reply_budget,
                down=self.down,
                sloppy=sloppy,
            )
            self.coordinators[node] = coordinator
            network.register(node, coordinator.handlers())

    def _flush_recorder(self, node: NodeId) -> Callable[[int], None]:
        return lambda at: self.flushes.append((node, at))

    def crash(self, node: NodeId) -> None:
        """Stop ``node`` listening: calls to it are refused at once."""
        self.network.unregister(node)

    def restart(self, node: NodeId) -> None:
        """Bring a crashed ``node`` back, its coordinator and replica as they were."""
        self.network.register(node, self.coordinators[node].handlers())

    def __getitem__(self, node: NodeId) -> Client:
        return Client(self.coordinators[node])

    def primaries(self, key: bytes) -> tuple[NodeId, ...]:
        return self.ring.primaries(self.ring.partition_for_key(key), 3)

    def others(self, key: bytes) -> list[NodeId]:
        primaries = self.primaries(key)
        return [node for node in self.nodes if node not in primaries]

    def stored(self, node: NodeId, key: bytes) -> tuple[Version, ...]:
        return self.coordinators[node].replica.read(key)


@attrs.frozen
class Read:
    """What a read of one key found, with the context and cas token a client gets."""

    key: bytes
    siblings: SiblingSet

    @property
    def context(self) -> VClock:
        return context_of(self.siblings)

    @property
    def cas_unique(self) -> int:
        return cas_unique(self.key, self.context)


class Client:
    """Awaits a coordinator's steps, as the memcached front end does."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.replica = coordinator.replica
        self.handlers = coordinator.handlers
        self.statistics = coordinator.statistics
        self.flushed_before = coordinator.flushed_before

    async def get(self, key: bytes) -> Read:
        (siblings,) = await resolve(self.coordinator.get((key,)))
        return Read(key, siblings)

    async def get_many(self, keys: list[bytes]) -> list[Read]:
        found = await resolve(self.coordinator.get(keys))
        return [Read(key, siblings) for key, siblings in zip(keys, found, strict=True)]

    async def put(self, key: bytes, payload: Payload, context: VClock | None = None) -> Version:
        return await resolve(self.coordinator.put(key, payload, context))

    async def update(self, key: bytes, update: Update) -> Applied:
        return await resolve(self.coordinator.update(key, update))

    async def flush_all(self, at: int) -> None:
        await resolve(self.coordinator.flush_all(at))


@asynccontextmanager
async def cluster_of(
    size: int, quorum: Quorum | None = None, **kwargs: object
) -> AsyncIterator[Cluster]:
    """A cluster on a perfect network whose background work has all finished when the block
    is left; the network stops then too."""
    async with (
        FakeNetwork.running(random.Random(0)) as network,
        trio.open_nursery() as background,
    ):
        yield Cluster(network, background, size, quorum or Quorum(3, 2, 2), **kwargs)  # type: ignore[arg-type]


def values(result_siblings: tuple[Version, ...]) -> set[bytes | None]:
    return {version.value for version in result_siblings}


# --- writes -----------------------------------------------------------------------------------


async def test_a_write_via_a_non_primary_is_forwarded_once_and_lands_on_n_replicas(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster_of(4) as cluster:
        key = b"forwarded"
        outsider = cluster.others(key)[0]
        written = await cluster[outsider].put(key, Payload(7, 0, b"v"))
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == 0  # replication finished without any waiting
        for node in cluster.primaries(key):
            assert cluster.stored(node, key) == (written,)
    assert cluster.network.attempts("coordinate_put") == [(outsider, cluster.primaries(key)[0])]
    assert cluster[outsider].statistics()[1] == ("kai_forwarded_writes", 1)
    for node in cluster.primaries(key):
        assert cluster.stored(node, key) == (written,)
    assert cluster.stored(outsider, key) == ()
    assert written.flags == 7
    assert written.actor == cluster[cluster.primaries(key)[0]].replica.actor


async def test_forwarding_skips_a_primary_that_is_down_and_fails_over_on_connection_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"failover"
    async with cluster_of(4) as cluster:
        first, second, third = cluster.primaries(key)
        outsider = cluster.others(key)[0]
        cluster.down.add(first)
        cluster.crash(second)  # refuses the forward at once: a connection error
        written = await cluster[outsider].put(key, Payload(0, 0, b"v"))
    # Up primaries first (second, third), the one marked down last.
    assert cluster.network.attempts("coordinate_put") == [(outsider, second), (outsider, third)]
    assert written.actor == cluster[third].replica.actor
    assert second in cluster.failures


async def test_a_forwarded_write_reports_the_primarys_quorum_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"lonely primary"
    async with cluster_of(4, sloppy=False) as cluster:
        first, second, third = cluster.primaries(key)
        outsider = cluster.others(key)[0]
        # The other replicas refuse the primary's calls: it knows at once W cannot be met.
        cluster.crash(second)
        cluster.crash(third)
        cluster.down.update({second, third})
        with pytest.raises(QuorumUnavailable):
            await cluster[outsider].put(key, Payload(0, 0, b"v"))
        assert trio.current_time() == 0
    # The primary stored it (the Dynamo contract: a failed write may have landed).
    assert values(cluster.stored(first, key)) == {b"v"}


async def test_fallbacks_stand_in_for_unreachable_primaries_and_keep_hints_for_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"lonely primary"
    async with cluster_of(5) as cluster:
        first, second, third = cluster.primaries(key)
        cluster.crash(second)
        cluster.crash(third)
        written = await cluster[first].put(key, Payload(0, 0, b"v"))
        fallbacks = [cluster.coordinators[node] for node in cluster.others(key)]
    assert values((written,)) == {b"v"}
    # Each fallback keeps the write for one of the primaries, and not as its own data.
    kept = sorted(owner for fallback in fallbacks for owner in fallback.hints.owners())
    assert kept == sorted([second, third])
    for fallback in fallbacks:
        assert fallback.replica.read(key) == ()
        assert len(fallback.hints.owners()) == 1
        assert fallback.hints.record_for(key) == encode_siblings(cluster.stored(first, key))
    assert cluster.coordinators[first].hints.pending == 0


async def test_a_primary_known_to_be_down_is_not_called_and_a_fallback_takes_its_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"known down"
    async with cluster_of(4) as cluster:
        first, second, third = cluster.primaries(key)
        (fallback,) = cluster.others(key)
        cluster.crash(third)
        cluster.down.add(third)
        await cluster[first].put(key, Payload(0, 0, b"v"))
        assert {target for _, target in cluster.network.attempts("replica_apply")} == {second}
        assert [target for _, target in cluster.network.attempts("hint_apply")] == [fallback]
        # A read asks the fallback in the down primary's place, and it answers with the hint.
        cluster.crash(second)
        cluster.down.add(second)
        read = await cluster[first].get(key)
    assert values(read.siblings) == {b"v"}
    assert cluster.coordinators[fallback].hints.owners() == [third]
    assert cluster.stored(fallback, key) == ()  # read repair never writes into a fallback


async def test_without_sloppy_quorum_only_primaries_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"strict"
    async with cluster_of(5, sloppy=False) as cluster:
        first, second, third = cluster.primaries(key)
        cluster.crash(second)
        cluster.crash(third)
        with pytest.raises(QuorumUnavailable):
            await cluster[first].put(key, Payload(0, 0, b"v"))
    assert cluster.network.attempts("hint_apply") == []
    # The coordinator keeps the write for both, to hand it off when they are back.
    assert sorted(cluster.coordinators[first].hints.owners()) == sorted([second, third])


@pytest.mark.parametrize("known_down", [True, False], ids=["known down", "unreachable"])
async def test_a_write_no_primary_can_take_is_coordinated_by_a_stand_in(
    autojump_clock: trio.testing.MockClock, known_down: bool
) -> None:
    key = b"every primary gone"
    async with cluster_of(5, Quorum(3, 1, 2)) as cluster:
        primaries = cluster.primaries(key)
        outsider, other = cluster.others(key)
        for primary in primaries:
            cluster.crash(primary)
        if known_down:
            cluster.down.update(primaries)
        written = await cluster[outsider].put(key, Payload(7, 0, b"v"))
        cluster.down.update(primaries)  # as the failed calls make the failure detector do
        # With R=1 a fallback's own answer decides: it answers from the hint it keeps.
        read = await cluster[other].get(key)
    assert (written.flags, written.value) == (7, b"v")
    assert values(read.siblings) == {b"v"}
    # Its dot is of an actor no replica uses, and the primaries were never sent the version.
    assert written.actor not in {c.replica.actor for c in cluster.coordinators.values()}
    if known_down:
        assert cluster.network.attempts("coordinate_put") == []
    # Each fallback, the stand-in included, keeps it for a primary. No fallback is left for
    # the third primary: it is tried once more, and the stand-in keeps its hint as well.
    stand_in, fallback = cluster.coordinators[outsider].hints, cluster.coordinators[other].hints
    assert sorted([*stand_in.owners(), *fallback.owners()]) == sorted(primaries)
    assert len(fallback.owners()) == 1
    ((_, tried),) = cluster.network.attempts("replica_apply")
    assert tried in stand_in.owners()
    for hints in (stand_in, fallback):
        assert hints.record_for(key) == encode_siblings((written,))
    assert all(cluster.stored(node, key) == () for node in cluster.nodes)
    assert cluster.coordinators[outsider].statistics()[-1] == ("kai_stand_in_writes", 1)


async def test_a_stand_in_never_repeats_a_dot_and_supersedes_what_its_hints_hold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"twice"
    async with cluster_of(5) as cluster:
        primaries = cluster.primaries(key)
        outsider, _other = cluster.others(key)
        for primary in primaries:
            cluster.crash(primary)
        cluster.down.update(primaries)
        first = await cluster[outsider].put(key, Payload(0, 0, b"v1"))
        second = await cluster[outsider].put(key, Payload(0, 0, b"v2"))
        # Its hints are delivered and forgotten: the next stand-in write knows nothing.
        hints = cluster.coordinators[outsider].hints
        for owner in hints.owners():
            source = hints.source(owner)
            source.delivered(source.read(None, 100, 1 << 20))
        assert not hints.kept
        third = await cluster[outsider].put(key, Payload(0, 0, b"v3"))
    assert len({first.dot, second.dot, third.dot}) == 3
    assert second.supersedes(first)
    # A counter of one actor would have made the third look like it followed the second.
    assert not third.supersedes(second)
    assert not second.supersedes(third)


async def test_conditional_writes_and_strict_quorums_refuse_when_no_primary_can_be_reached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"undecidable"
    async with cluster_of(5) as cluster, cluster_of(5, sloppy=False) as strict:
        for nodes in (cluster, strict):
            for primary in nodes.primaries(key):
                nodes.crash(primary)
        outsider = cluster.others(key)[0]
        with pytest.raises(QuorumUnavailable, match="no primary could be reached"):
            await cluster[outsider].update(key, Update("delete"))
        with pytest.raises(QuorumUnavailable, match="no primary could be reached"):
            await strict[outsider].put(key, Payload(0, 0, b"v"))
    for nodes in (cluster, strict):
        assert nodes.network.attempts("hint_apply") == []
        assert all(not c.hints.kept for c in nodes.coordinators.values())


async def test_a_primary_no_fallback_could_replace_gets_a_hint_from_the_coordinator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"three nodes"
    async with cluster_of(3) as cluster:
        first, _second, third = cluster.primaries(key)
        cluster.crash(third)
        await cluster[first].put(key, Payload(0, 0, b"v1"))
        await cluster[first].put(key, Payload(0, 0, b"v2"))
        hints = cluster.coordinators[first].hints
        assert hints.owners() == [third]
        assert hints.pending_for(third)[0] == 1  # one hint per key, merged
        record = hints.record_for(key)
    assert record is not None
    assert decode_siblings(record) == cluster.stored(first, key)
    assert values(cluster.stored(first, key)) == {b"v2"}


async def test_a_primary_coordinates_a_forwarded_write_even_when_rings_disagree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"ring moved"
    async with cluster_of(4) as cluster:
        outsider = cluster.others(key)[0]
        pending = cluster[outsider].handlers()["coordinate_put"](key, 1, 0, b"v")
        assert isinstance(pending, Pending)
        record = await pending
    assert cluster.network.attempts("coordinate_put") == []  # never forwarded again
    assert values(cluster.stored(outsider, key)) == {b"v"}
    for node in cluster.primaries(key):
        assert cluster.stored(node, key) == cluster.stored(outsider, key)
    assert isinstance(record, bytes)


async def test_unreachable_replicas_fail_a_write_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3) as cluster:
        coordinator, *others = cluster.primaries(key)
        for node in others:
            cluster.crash(node)
        with pytest.raises(QuorumUnavailable):
            await cluster[coordinator].put(key, Payload(0, 0, b"v"))
        assert trio.current_time() == 0
        assert sorted(cluster.failures) == sorted(others)


async def test_hung_replicas_time_a_write_out_after_exactly_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3) as cluster:
        coordinator, *others = cluster.primaries(key)
        for node in others:
            cluster.network.hang(node)
        with pytest.raises(QuorumTimeout):
            await cluster[coordinator].put(key, Payload(0, 0, b"v"))
        assert trio.current_time() == TIMEOUT
    assert cluster[coordinator].statistics()[2] == ("kai_replica_timeouts", 2)


async def test_a_forwarded_write_to_hung_primaries_times_out_within_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(4) as cluster:
        for node in cluster.primaries(key):
            cluster.network.hang(node)
        with pytest.raises(QuorumTimeout):
            await cluster[cluster.others(key)[0]].put(key, Payload(0, 0, b"v"))
        assert trio.current_time() == TIMEOUT


async def test_a_write_answers_after_w_acks_without_waiting_for_slow_replicas(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3) as cluster:
        coordinator, slow, hung = cluster.primaries(key)
        cluster.network.slow(slow, 0.25)
        cluster.network.hang(hung)
        written = await cluster[coordinator].put(key, Payload(0, 0, b"v"))
        assert trio.current_time() == 0.25
    assert trio.current_time() == TIMEOUT  # the hung replica's call was bounded
    assert cluster.stored(slow, key) == (written,)
    assert cluster.stored(hung, key) == ()


# --- reads ------------------------------------------------------------------------------------


async def test_read_your_write_from_every_node(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster_of(4) as cluster:
        key = b"everywhere"
        written = await cluster[cluster.nodes[0]].put(key, Payload(3, 0, b"hello"))
        for node in cluster.nodes:
            result = await cluster[node].get(key)
            assert result.siblings == (written,)
            assert result.cas_unique == (await cluster[cluster.nodes[0]].get(key)).cas_unique
        missing = await cluster[cluster.nodes[1]].get(b"never written")
        assert missing.siblings == ()
        assert trio.current_time() == 0


async def test_a_read_repairs_a_stale_and_a_missing_replica(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stale_key, missing_key = b"stale", b"missing"
    async with cluster_of(3, Quorum(3, 2, 2)) as cluster:
        a, b, c = cluster.nodes  # with three nodes, every node is a primary of every key
        old = cluster[a].replica.coordinate_write(stale_key, Payload(0, 0, b"old"), None)
        for node in (b, c):
            cluster[node].replica.apply(stale_key, (old,))
        cluster.crash(c)
        new = await cluster[a].put(stale_key, Payload(0, 0, b"new"))
        only = await cluster[a].put(missing_key, Payload(0, 0, b"x"))
        cluster.restart(c)
        assert values(cluster.stored(c, stale_key)) == {b"old"}
        assert cluster.stored(c, missing_key) == ()
        # c answers late: the read is answered by a and b, c's reply arrives afterwards.
        cluster.network.slow(c, 1.0)
        results = await cluster[b].get_many([stale_key, missing_key])
        assert trio.current_time() == 0
        assert [result.siblings for result in results] == [(new,), (only,)]
        # One second for c's late reply, then one more for each repair (one after the other).
        await trio.sleep(2.5)
        assert (cluster.stored(c, stale_key), cluster.stored(c, missing_key)) != ((new,), (only,))
        await trio.sleep(0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == 3.0
    assert cluster.stored(c, stale_key) == (new,)
    assert cluster.stored(c, missing_key) == (only,)
    assert ("kai_read_repairs", 2) in cluster[b].statistics()


async def test_replies_equal_to_the_local_record_are_not_decoded_again(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[object] = []
    real = siblings_from_wire

    def counting(record: object) -> tuple[Version, ...]:
        decoded.append(record)
        return real(record)

    monkeypatch.setattr(reads_module, "siblings_from_wire", counting)
    async with cluster_of(3, Quorum(3, 2, 2)) as cluster:
        a, b, c = cluster.nodes
        same = await cluster[a].put(b"same", Payload(0, 0, b"v"))
        old = cluster[a].replica.coordinate_write(b"differs", Payload(0, 0, b"old"), None)
        cluster[b].replica.apply(b"differs", (old,))
        cluster[c].replica.coordinate_write(b"differs", Payload(0, 0, b"new"), None)
        await trio.testing.wait_all_tasks_blocked()
        decoded.clear()
        results = await cluster[a].get_many([b"same", b"differs"])
        await trio.testing.wait_all_tasks_blocked()
    assert results[0].siblings == (same,)
    assert old in results[1].siblings  # and newer too if c was among the first R replies
    assert len(decoded) == 1  # only c's record of "differs" (holding newer) was decoded


async def test_a_read_repairs_the_coordinators_own_replica(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3) as cluster:
        a, b, _ = cluster.nodes
        cluster.crash(a)
        written = await cluster[b].put(key, Payload(0, 0, b"v"))
        cluster.restart(a)
        assert (await cluster[a].get(key)).siblings == (written,)
    assert cluster.stored(a, key) == (written,)
    assert ("kai_read_repairs", 1) in cluster[a].statistics()


async def test_unreachable_replicas_fail_a_read_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3) as cluster:
        reader, *others = cluster.primaries(key)
        for node in others:
            cluster.crash(node)
        with pytest.raises(QuorumUnavailable):
            await cluster[reader].get(key)
        assert trio.current_time() == 0


async def test_hung_replicas_time_a_read_out_after_exactly_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3) as cluster:
        reader, *others = cluster.primaries(key)
        for node in others:
            cluster.network.hang(node)
        with pytest.raises(QuorumTimeout):
            await cluster[reader].get_many([key, b"other"])
        assert trio.current_time() == TIMEOUT


async def test_hung_and_down_replicas_do_not_delay_a_read_past_the_first_r_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(5, sloppy=False) as cluster:  # no fallback answers for ``third``
        first, second, third = cluster.primaries(key)
        reader = cluster.others(key)[0]
        await cluster[first].put(key, Payload(0, 0, b"v"))
        start = trio.current_time()
        cluster.network.slow(first, 0.5)
        cluster.network.slow(second, 0.25)
        cluster.network.hang(third)
        cluster.down.add(third)
        result = await cluster[reader].get(key)
        assert trio.current_time() == start + 0.5
        assert values(result.siblings) == {b"v"}
    assert (reader, third) in cluster.network.attempts("replica_read")  # it might be back


async def test_get_many_of_two_thousand_keys_makes_one_call_per_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [b"key-%d" % index for index in range(2000)]
    async with cluster_of(5, Quorum(3, 2, 3)) as cluster:  # W=3: no replica lags behind
        writer = cluster.nodes[0]
        for key in keys[:50]:
            await cluster[writer].put(key, Payload(0, 0, key))
        reader = cluster.nodes[1]
        cluster.network.log.clear()
        results = await cluster[reader].get_many([*keys, keys[0]])
    reads = cluster.network.attempts("replica_read")
    assert sorted(target for _, target in reads) == sorted(set(cluster.nodes) - {reader})
    assert all(source == reader for source, _ in reads)
    assert [values(result.siblings) for result in results[:50]] == [{key} for key in keys[:50]]
    assert all(result.siblings == () for result in results[50:-1])
    assert results[-1] == results[0]
    assert cluster.network.attempts("replica_apply") == []  # nothing was stale


async def test_a_peer_answers_a_large_multi_get_in_parts_within_its_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Records of 1 KiB with a 4 KiB budget: each peer answers ~4 keys per replica_read."""
    keys = [b"big-%d" % index for index in range(40)]
    async with cluster_of(3, Quorum(3, 3, 3), read_reply_budget=4096) as cluster:
        a, b, c = cluster.nodes
        for index, key in enumerate(keys):
            await cluster[a].put(key, Payload(0, 0, bytes([index]) * 1024))
        cluster.network.log.clear()
        results = await cluster[b].get_many(keys)  # R=3: every part of every answer counts
    assert [values(result.siblings) for result in results] == [
        {bytes([index]) * 1024} for index in range(40)
    ]
    reads = cluster.network.attempts("replica_read")
    assert {target for _, target in reads} == {a, c}
    assert len(reads) >= 2 * 40 // 4  # several parts per peer
    assert cluster.network.attempts("replica_apply") == []  # nothing was stale


def _no_forwarded_writes(*args: object) -> NoReturn:
    raise AssertionError("these tests forward no write")


def _handlers(
    replica: LocalReplica, *, read_reply_budget: int = READ_REPLY_BUDGET
) -> ReplicaRpcHandlers:
    return ReplicaRpcHandlers(
        replica,
        _no_forwarded_writes,
        _no_forwarded_writes,
        self_node=NodeId("127.0.0.1", 1),
        hints=HintStore(replica.engine, buckets=replica.buckets),
        read_reply_budget=read_reply_budget,
    )


def test_replica_read_stops_at_its_budget_but_always_answers_one_key() -> None:
    replica = LocalReplica(MemoryEngine(), actor=b"solo", buckets=BUCKETS, stats=NodeStats())
    for index in range(5):
        replica.coordinate_write(b"k%d" % index, Payload(0, 0, b"v" * 1000), None)

    keys = [b"k%d" % index for index in range(5)]
    small = _handlers(replica, read_reply_budget=2500)
    answer = small.replica_read([b"absent", *keys])
    assert isinstance(answer, list)
    assert answer[0] is None  # a missing key costs nothing against the budget
    assert len(answer) == 3  # two records of ~1 KB fit in 2,500 bytes, the third does not
    tiny = _handlers(replica, read_reply_budget=1)
    assert tiny.replica_read(keys) == answer[1:2]  # one record even over the budget
    whole = _handlers(replica)
    complete = whole.replica_read(keys)
    assert isinstance(complete, list)
    assert len(complete) == 5
    assert complete[:2] == answer[1:3]


async def test_a_replica_read_of_many_keys_in_chunks_also_stops_at_its_budget() -> None:
    replica = LocalReplica(MemoryEngine(), actor=b"solo", buckets=BUCKETS, stats=NodeStats())
    keys = [b"k%d" % index for index in range(1500)]  # more than one READ_CHUNK
    for key in keys:
        replica.coordinate_write(key, Payload(0, 0, b"v" * 10), None)

    record_size = len(encode_siblings(replica.read(keys[0])))
    for budget, expected in ((1, 1), (record_size * 1100, 1100), (READ_REPLY_BUDGET, 1500)):
        pending = _handlers(replica, read_reply_budget=budget).replica_read(keys)
        assert isinstance(pending, Pending)
        records = await pending
        assert len(records) == expected
        assert all(record is not None for record in records)


# --- siblings ---------------------------------------------------------------------------------


async def test_partitioned_writes_become_siblings_and_a_write_with_the_context_resolves_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"contended"
    # W=1 lets both sides of the partition write (their replication across the cut is lost);
    # R=3 makes the read see every replica whatever order the replies (and b's background
    # replication to c) come in.
    async with cluster_of(3, Quorum(3, 3, 1)) as cluster:
        a, b, c = cluster.nodes
        cluster.network.partition({a}, {b, c})
        left = await cluster[a].put(key, Payload(0, 0, b"left"))
        right = await cluster[b].put(key, Payload(0, 0, b"right"))
        cluster.network.heal()
        result = await cluster[a].get(key)
        assert set(result.siblings) == {left, right}
        # A cas with the read's token, sent through any node, resolves both.
        token = result.cas_unique
        applied = await cluster[c].update(key, Update("cas", value=b"both", cas=token))
    assert applied.outcome is Outcome.STORED
    resolved = applied.version
    assert resolved is not None
    for node in cluster.nodes:
        assert cluster.stored(node, key) == (resolved,)
    assert resolved.supersedes(left)
    assert resolved.supersedes(right)


@pytest.mark.parametrize("through", ["primary", "non-primary", "stand-in"])
async def test_a_write_in_context_supersedes_exactly_what_the_context_covers(
    autojump_clock: trio.testing.MockClock, through: str
) -> None:
    """Dynamo's put: two clients that read the same state and write in its context make two
    siblings (neither is lost), and a write in the context of a read of both resolves
    them, wherever it is sent (coordinated by a primary, forwarded to one with the context
    as a token, or coordinated by a stand-in when no primary can be reached)."""
    key = b"cart"
    async with cluster_of(5, Quorum(3, 2, 2)) as cluster:
        primaries = cluster.primaries(key)
        outsider, other = cluster.others(key)
        sender = primaries[0] if through == "primary" else outsider
        first = await cluster[sender].put(key, Payload(0, 0, b"a"))
        read = await cluster[other].get(key)
        left = await cluster[sender].put(key, Payload(0, 0, b"a+b"), read.context)
        right = await cluster[sender].put(key, Payload(0, 0, b"a+c"), read.context)
        both = await cluster[other].get(key)
        assert set(both.siblings) == {left, right}
        assert left.supersedes(first)
        assert right.supersedes(first)
        if through == "stand-in":
            for primary in primaries:
                cluster.crash(primary)
            cluster.down.update(primaries)
        resolved = await cluster[sender].put(key, Payload(0, 0, b"a+b+c"), both.context)
        assert resolved.supersedes(left)
        assert resolved.supersedes(right)
        after = await cluster[other].get(key)
        assert after.siblings == (resolved,)
        # A write in an empty context supersedes nothing: it becomes a sibling.
        blind = await cluster[sender].put(key, Payload(0, 0, b"blind"), VClock())
        assert set((await cluster[other].get(key)).siblings) == {resolved, blind}
    if through == "non-primary":
        forwards = cluster.network.attempts("coordinate_put")
        assert forwards
        assert all(sent_from == outsider for sent_from, _ in forwards)
    if through == "stand-in":
        assert cluster.coordinators[sender].statistics()[-1] == ("kai_stand_in_writes", 2)


async def test_a_forwarded_write_with_a_malformed_context_token_is_a_bad_request() -> None:
    async with cluster_of(3) as cluster:
        handlers = cluster[cluster.nodes[0]].handlers()
        with pytest.raises(RpcBadRequest, match="causal context"):
            handlers["coordinate_put"](b"k", 0, 0, b"v", b"!!not a token!!")
        with pytest.raises(RpcBadRequest, match="token"):
            handlers["coordinate_put"](b"k", 0, 0, b"v", 12)


async def test_a_late_stale_replica_apply_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3, Quorum(3, 2, 3)) as cluster:  # W=3: b holds each write at once
        a, b, _ = cluster.nodes
        first = await cluster[a].put(key, Payload(0, 0, b"1"))
        second = await cluster[a].put(key, Payload(0, 0, b"2"))
        assert cluster.stored(b, key) == (second,)
        late = encode_siblings((first,))
        stored = await cluster.network.call(a, b, "replica_apply", key, late)
    assert stored is False
    assert cluster.stored(b, key) == (second,)


# --- flush_all and a cluster of one -----------------------------------------------------------


async def test_flush_all_reaches_every_member_and_does_not_wait_for_down_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    at = int(EPOCH * 1_000_000)
    async with cluster_of(4) as cluster:
        a, b, c, d = cluster.nodes
        cluster.network.hang(d)
        cluster.down.add(d)
        await cluster[a].flush_all(at)
        assert trio.current_time() == 0
        assert cluster.flushes == [(a, at)]
        for node in (a, b, c):
            assert cluster[node].flushed_before(EPOCH + 1) == at
        assert cluster[d].flushed_before(EPOCH + 1) == 0  # gossip's job


async def test_a_ring_of_one_answers_without_waiting_without_calling_peers() -> None:
    node = NodeId("127.0.0.1", 11011)
    async with (
        FakeNetwork.running(random.Random(0)) as network,
        trio.open_nursery() as background,
    ):
        coordinator = Coordinator(
            self_node=node,
            replica=LocalReplica(MemoryEngine(), actor=b"solo", buckets=BUCKETS, stats=NodeStats()),
            transport=network.transport_for(node),
            ring=lambda: Ring([node], buckets=BUCKETS),
            quorum=Quorum(3, 2, 2),
            background=background,
        )
        written = coordinator.put(b"k", Payload(0, 0, b"v"))
        assert isinstance(written, Version)
        assert coordinator.get((b"k",)) == [(written,)]
        assert coordinator.get((b"k", b"x", b"k")) == [(written,), (), (written,)]
        assert coordinator.flush_all(1) is None
        assert coordinator.members() == ["127.0.0.1:11011"]
    assert network.log == []  # not a call to a peer, nor to itself


async def test_a_node_with_peers_hands_back_pending_steps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster_of(3) as cluster:
        coordinator = cluster.coordinators[cluster.nodes[0]]
        read = coordinator.get((b"k",))
        assert isinstance(read, Pending)
        assert await read == [()]
        write = coordinator.put(b"k", Payload(0, 0, b"v"))
        assert isinstance(write, Pending)
        version = await write
    assert all(cluster.stored(node, b"k") == (version,) for node in cluster.nodes)


# --- handlers ---------------------------------------------------------------------------------

GOOD_RECORD = encode_siblings(())


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("replica_read", ("not a list",)),
        ("replica_read", ([b""],)),
        ("replica_read", ([b"x" * 251],)),
        ("replica_read", (["text"],)),
        ("replica_apply", (b"k", "text")),
        ("replica_apply", ("k", GOOD_RECORD)),
        ("replica_apply", (b"k", b"\x09garbage")),
        ("replica_apply", (b"k", b"\x01\xc1")),
        ("replica_apply", (b"k", b"\x01" + msgpack.packb([[[], 1, b"a", 0, 0]]))),
        ("replica_apply", (b"k", b"\x01" + msgpack.packb([[[[b"a", 0, 1]], 1, b"a", 0, 0, b"v"]]))),
        ("replica_apply", (b"k", b"\x01" + msgpack.packb([[[["a", 1, 1]], 1, b"a", 0, 0, b"v"]]))),
        ("replica_apply", (b"k", b"\x01" + msgpack.packb([[[], 1, b"a", 0, 0, "text"]]))),
        (
            "replica_apply",
            (b"k", b"\x02" + msgpack.packb([[b"a", 2, [[b"a", 2, 1]], 1, 0, 0, b"v"]])),
        ),
        ("replica_apply", (b"k", b"\x02" + msgpack.packb([[b"a", 0, [], 1, 0, 0, b"v"]]))),
        ("replica_apply", (b"k", b"\x02" + msgpack.packb([["a", 1, [], 1, 0, 0, b"v"]]))),
        ("replica_apply", (b"k", b"\x02" + msgpack.packb([[b"a", 1, [[b"b", 1]], 1, 0, 0, b"v"]]))),
        ("coordinate_put", (b"k", -1, 0, b"v")),
        ("coordinate_put", (b"k", 0, True, b"v")),
        ("coordinate_put", (b"k", 0, 0, "text")),
        ("coordinate_update", (b"k", "cas")),
        ("coordinate_update", (b"k", ["swap", 0, 0, b"v", 0, 0, False, 1024])),
        ("coordinate_update", (b"k", ["cas", -1, 0, b"v", 0, 0, False, 1024])),
        ("coordinate_update", (b"k", ["cas", 0, 0, "text", 0, 0, False, 1024])),
        ("coordinate_update", (b"k", ["incr", 0, 0, b"", 0, -1, False, 1024])),
        ("coordinate_update", (b"k", ["add", 0, 0, b"v", 0, 0, 1, 1024])),
        ("coordinate_update", (b"k", ["add", 0, 0, b"v", 0, 0, False])),
        ("flush", ("soon",)),
        ("flush", (-1,)),
    ],
)
async def test_bad_handler_params_are_bad_requests(
    autojump_clock: trio.testing.MockClock, method: str, params: tuple[object, ...]
) -> None:
    async with cluster_of(3) as cluster:
        a, b, _ = cluster.nodes
        with pytest.raises(RpcBadRequest):
            await cluster.network.call(a, b, method, *params)
        assert len(cluster.network.log) == 1  # refused without side effects
        assert cluster.stored(b, b"k") == ()


async def test_too_many_siblings_in_a_replica_apply_is_a_bad_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"k"
    async with cluster_of(3, siblings_maximum=1) as cluster:
        a, b, _ = cluster.nodes
        cluster[a].replica.coordinate_write(key, Payload(0, 0, b"a"), None)
        concurrent = cluster[b].replica.coordinate_write(key, Payload(0, 0, b"b"), None)
        with pytest.raises(RpcBadRequest):
            cluster[a].handlers()["replica_apply"](key, encode_siblings((concurrent,)))


def test_a_read_round_counts_each_replica_once_per_key() -> None:
    a, b, c = (NodeId("127.0.0.1", port) for port in (1, 2, 3))
    round_ = ReadRound([b"x", b"y"], [(a, b, c), (a, b)], r=2)
    assert round_.batch(a) == [b"x", b"y"]
    assert round_.batch(c) == [b"x"]
    round_.record_reply(a, [(), ()])
    round_.record_reply(a, [(), ()])
    assert (round_.unmet, round_.lost_index) == (2, None)  # a's second answer did not count
    round_.record_failure(c, timed_out=False)
    assert (round_.unmet, round_.lost_index) == (2, None)
    round_.record_failure(b, timed_out=False)
    assert round_.decided
    assert isinstance(round_.error(), QuorumUnavailable)
