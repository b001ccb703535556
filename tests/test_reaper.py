"""Tombstone and expiry collection: the replica's reap, its refusal of stale versions it never
saw, and the reaper over the in-process cluster (nothing reaped ever comes back)."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import trio
import trio.testing

from kai.cluster.fanout import Answer, PeerCaller
from kai.cluster.reaper import Reaper, dead_since, reapable
from kai.core.config import Quorum
from kai.core.errors import RpcBadRequest, RpcConnectionError
from kai.core.ring import NodeId, Ring
from kai.core.stats import NodeStats
from kai.core.vclock import VClock
from kai.core.versions import Payload, Version, context_of, decode_siblings, encode_siblings
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica
from kai.testing.cluster import HarnessNode, InProcessCluster

NOW = 1_700_000_000.0
GRACE = 100.0
#: A timestamp (microseconds) older than the grace, and one younger.
OLD = int((NOW - GRACE - 1) * 1_000_000)
FRESH = int((NOW - GRACE + 1) * 1_000_000)


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_replica(clock: Clock | None = None, cache_bytes: int = 1 << 20) -> LocalReplica:
    return LocalReplica(
        MemoryEngine(),
        actor=b"actor-a",
        buckets=64,
        stats=NodeStats(),
        cache_bytes=cache_bytes,
        wall_clock=clock if clock is not None else Clock(),
        tombstone_grace=GRACE,
    )


def version(actor: bytes, timestamp: int, value: bytes | None = b"v", counter: int = 1) -> Version:
    return Version((actor, counter), VClock(), timestamp, 0, 0, value)


# --- reap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_reap_deletes_only_the_identical_record(cache_bytes: int) -> None:
    replica = make_replica(cache_bytes=cache_bytes)
    changes: list[tuple[int, bytes, bytes | None, bytes | None]] = []
    replica.on_change = lambda *change: changes.append(change)
    replica.coordinate_write(b"k", Payload(0, 0, b"value"), None)
    replica.coordinate_write(b"k", Payload(), None)  # a tombstone
    _siblings, record = replica.read_record(b"k")
    assert record is not None
    changes.clear()
    assert replica.reap(b"k", record + b"x") is False
    assert replica.reap(b"k", encode_siblings((version(b"other", OLD, None),))) is False
    assert replica.read_record(b"k") == (_siblings, record)
    assert changes == []
    assert replica.stats.kai_tombstones_reaped == 0
    partition = replica.partition(b"k")
    assert replica.reap(b"k", record) is True
    assert replica.engine.get(partition, b"k") is None
    assert replica.read_record(b"k") == ((), None)
    assert changes == [(partition, b"k", record, None)]
    assert replica.stats.kai_tombstones_reaped == 1
    assert replica.reap(b"k", record) is False  # already gone
    assert replica.stats.kai_tombstones_reaped == 1


def test_reaping_an_expired_value_uncounts_it() -> None:
    replica = make_replica()
    replica.coordinate_write(b"k", Payload(0, 1, b"abc"), None)  # expired long ago
    replica.coordinate_write(b"other", Payload(0, 0, b"xy"), None)
    assert (replica.items, replica.item_bytes) == (2, 5)
    _siblings, record = replica.read_record(b"k")
    assert record is not None
    assert replica.reap(b"k", record)
    assert (replica.items, replica.item_bytes) == (1, 2)


def test_reaping_a_tombstone_leaves_the_counts() -> None:
    replica = make_replica()
    replica.coordinate_write(b"other", Payload(0, 0, b"xy"), None)
    replica.apply(b"k", (version(b"b", FRESH, None),))
    _siblings, record = replica.read_record(b"k")
    assert record is not None
    assert replica.reap(b"k", record)
    assert (replica.items, replica.item_bytes) == (1, 2)


# --- stale versions are refused ---------------------------------------------------------------


def test_an_old_version_this_replica_never_saw_is_refused_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replica = make_replica()
    old = version(b"b", OLD)
    assert replica.apply(b"k", (old,), encode_siblings((old,))) is False
    assert replica.read_record(b"k") == ((), None)
    assert replica.engine.get(replica.partition(b"k"), b"k") is None
    assert replica.stats.kai_stale_refused == 1
    assert "tombstone_grace" in caplog.text
    assert "wiped and rejoined" in caplog.text


def test_refusal_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    replica = make_replica()
    for index in range(5):
        replica.apply(b"k%d" % index, (version(b"b", OLD),))
    assert replica.stats.kai_stale_refused == 5
    assert caplog.text.count("wiped and rejoined") == 1


def test_an_old_version_already_covered_is_a_no_op() -> None:
    replica = make_replica()
    old = version(b"b", OLD)
    newer = Version((b"c", 1), context_of((old,)), FRESH, 0, 0, b"newer")
    assert replica.apply(b"k", (newer,))
    assert replica.apply(b"k", (old,)) is False
    assert replica.read(b"k") == (newer,)
    assert replica.stats.kai_stale_refused == 0


def test_an_old_version_stored_already_is_a_no_op() -> None:
    clock = Clock(NOW - 2 * GRACE)
    replica = make_replica(clock)
    old = version(b"b", OLD)
    assert replica.apply(b"k", (old,))  # not yet older than the grace
    clock.now = NOW
    assert replica.apply(b"k", (old,), encode_siblings((old,))) is False
    assert replica.read(b"k") == (old,)
    assert replica.stats.kai_stale_refused == 0


def test_a_fresh_version_is_accepted() -> None:
    replica = make_replica()
    fresh = version(b"b", FRESH)
    record = encode_siblings((fresh,))
    assert replica.apply(b"k", (fresh,), record)
    assert replica.read_record(b"k") == ((fresh,), record)
    assert replica.stats.kai_stale_refused == 0


def test_only_the_old_unseen_versions_of_a_mix_are_dropped() -> None:
    replica = make_replica()
    known_old = version(b"a", OLD - 5)
    seen = Version((b"a", 2), context_of((known_old,)), FRESH, 0, 0, b"seen")
    replica.apply(b"k", (seen,))
    fresh = version(b"b", FRESH, b"fresh")
    unseen_old = version(b"c", OLD, b"unseen")
    incoming = (known_old, fresh, unseen_old)
    # The record fast path must not store the dropped version.
    assert replica.apply(b"k", incoming, encode_siblings(incoming))
    stored, record = replica.read_record(b"k")
    assert [v.value for v in stored] == [b"seen", b"fresh"]
    assert record == encode_siblings(stored)
    assert replica.stats.kai_stale_refused == 1


def test_the_record_fast_path_is_not_used_when_a_version_was_dropped() -> None:
    replica = make_replica()
    fresh = version(b"b", FRESH, b"fresh")
    incoming = (fresh, version(b"c", OLD, b"unseen"))
    assert replica.apply(b"k", incoming, encode_siblings(incoming))
    assert replica.read_record(b"k") == ((fresh,), encode_siblings((fresh,)))
    assert replica.engine.get(replica.partition(b"k"), b"k") == encode_siblings((fresh,))


def test_writes_coordinated_here_are_not_refused() -> None:
    clock = Clock()
    replica = make_replica(clock)
    old = version(b"b", OLD, None)
    clock.now = NOW - 2 * GRACE
    replica.apply(b"k", (old,))
    clock.now = NOW
    written = replica.coordinate_write(b"k", Payload(0, 0, b"new"), context_of((old,)))
    assert replica.read(b"k") == (written,)
    assert replica.stats.kai_stale_refused == 0


# --- what is dead -----------------------------------------------------------------------------


def test_dead_since_tombstones_expiry_and_flushes() -> None:
    now_us = int(NOW * 1_000_000)
    assert dead_since(version(b"a", 5, None), NOW, 0) == 5
    assert dead_since(version(b"a", 5), NOW, 0) is None
    assert dead_since(version(b"a", 5), NOW, 4) is None  # written after the flush
    assert dead_since(version(b"a", 5), NOW, 7) == 7
    expired = Version((b"a", 1), VClock(), 5, 0, int(NOW) - 10, b"v")
    assert dead_since(expired, NOW, 0) == now_us - 10_000_000
    assert dead_since(expired, NOW - 10, 0) == now_us - 10_000_000
    assert dead_since(expired, NOW - 11, 0) is None  # not expired yet
    # Written already expired: dead since it was written, never earlier.
    born_dead = Version((b"a", 1), VClock(), now_us, 0, 1, b"v")
    assert dead_since(born_dead, NOW, 0) == now_us


def test_reapable_needs_every_version_dead_past_the_grace() -> None:
    old_tombstone = version(b"a", OLD, None)
    young_tombstone = version(b"b", FRESH, None)
    assert reapable((old_tombstone,), NOW, 0, GRACE)
    assert not reapable((young_tombstone,), NOW, 0, GRACE)
    assert not reapable((old_tombstone, young_tombstone), NOW, 0, GRACE)
    assert not reapable((old_tombstone, version(b"c", OLD)), NOW, 0, GRACE)
    assert reapable((old_tombstone, version(b"c", OLD)), NOW, OLD, GRACE)  # flushed
    assert not reapable((old_tombstone, version(b"c", OLD)), NOW, FRESH, GRACE)
    assert not reapable((), NOW, 0, GRACE)


# --- the first primary's decisions, with scripted peers ---------------------------------------

SELF, PEER_B, PEER_C = (NodeId("127.0.0.1", 11011 + index) for index in range(3))


class ScriptedPeers:
    """Stands in for the :class:`PeerCaller`: answers each call from a script per peer and
    method (a list of results, the last one repeated; None answers a connection error)."""

    def __init__(self, script: dict[tuple[NodeId, str], list[object]]) -> None:
        self.script = script
        self.calls: list[tuple[NodeId, str, tuple[object, ...]]] = []

    async def call(
        self, peer: NodeId, method: str, params: tuple[object, ...], deadline: float
    ) -> Answer:
        self.calls.append((peer, method, params))
        results = self.script[peer, method]
        result = results.pop(0) if len(results) > 1 else results[0]
        if result is None:
            return Answer(peer, error=RpcConnectionError("unreachable"))
        return Answer(peer, result=result)


def led_keys(ring: Ring, count: int) -> list[bytes]:
    """``count`` keys of one partition whose first primary is SELF."""
    by_partition: dict[int, list[bytes]] = {}
    for index in range(10_000):
        key = b"key-%d" % index
        partition = ring.partition_for_key(key)
        if ring.preference_list(partition)[0] == SELF:
            keys = by_partition.setdefault(partition, [])
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError("no partition led by SELF")


async def reap_with(
    script: dict[tuple[NodeId, str], list[object]], count: int = 1
) -> tuple[Reaper, list[bytes]]:
    """A reaper of a three-node ring whose replica holds ``count`` keys of one partition,
    each the same tombstone (so one record), dead past the grace; every partition is
    scanned once with ``script`` answering for the peers."""
    ring = Ring((SELF, PEER_B, PEER_C), buckets=8, virtual_nodes=16)
    replica = LocalReplica(
        MemoryEngine(),
        actor=b"actor-a",
        buckets=8,
        stats=NodeStats(),
        wall_clock=Clock(),
        tombstone_grace=GRACE,
    )
    keys = led_keys(ring, count)
    for key in keys:
        replica.apply(key, (version(b"b", FRESH, None),))
    replica.wall_clock = Clock(NOW + GRACE)
    record = replica.read_record(keys[0])[1]
    filled = {
        name: [_filled(result, record) for result in results] for name, results in script.items()
    }
    reaper = Reaper(
        self_node=SELF,
        replica=replica,
        peers=cast(PeerCaller, ScriptedPeers(filled)),
        ring=lambda: ring,
        quorum=Quorum(3, 2, 2),
        interval=1.0,
        request_timeout=1.0,
    )
    led = [p for p in range(ring.buckets) if ring.preference_list(p)[0] == SELF]
    for _ in led:  # one round per partition SELF leads: each is scanned once
        await reaper.reap_round()
    return reaper, keys


def _filled(result: object, record: bytes | None) -> object:
    """A scripted answer with each ``"record"`` replaced by the reaped key's record."""
    if isinstance(result, list):
        return [record if item == "record" else item for item in result]
    return result


def held(reaper: Reaper, keys: list[bytes]) -> bool:
    """Whether the reaper's replica still holds every one of ``keys``."""
    return all(reaper.replica.read_record(key)[1] is not None for key in keys)


async def test_the_first_primary_reaps_its_copy_once_every_other_primary_did() -> None:
    reaper, keys = await reap_with(
        {
            (PEER_B, "replica_read"): [["record"]],
            (PEER_C, "replica_read"): [[None]],
            (PEER_B, "reap"): [[True]],
            (PEER_C, "reap"): [[True]],
        }
    )
    record = encode_siblings((version(b"b", FRESH, None),))
    assert reaper.replica.read_record(keys[0]) == ((), None)
    assert reaper.replica.stats.kai_tombstones_reaped == 1
    assert reaper.deferred == 0
    calls = cast(ScriptedPeers, reaper.peers).calls
    reaps = [(peer, params) for peer, method, params in calls if method == "reap"]
    assert sorted(reaps) == [(PEER_B, ([[keys[0], record]],)), (PEER_C, ([[keys[0], record]],))]


async def test_a_partial_replica_read_answer_is_asked_again() -> None:
    reaper, keys = await reap_with(
        {
            (PEER_B, "replica_read"): [["record"], ["record", "record"]],
            (PEER_C, "replica_read"): [["record", "record", None]],
            (PEER_B, "reap"): [[True, True, True]],
            (PEER_C, "reap"): [[True, True, True]],
        },
        count=3,
    )
    assert all(reaper.replica.read_record(key) == ((), None) for key in keys)
    assert reaper.replica.stats.kai_tombstones_reaped == 3
    calls = cast(ScriptedPeers, reaper.peers).calls
    asked_b = [
        params for peer, method, params in calls if (peer, method) == (PEER_B, "replica_read")
    ]
    assert asked_b == [(keys,), (keys[1:],)]


async def test_a_record_that_does_not_decode_is_kept_and_the_scan_goes_on() -> None:
    script: dict[tuple[NodeId, str], list[object]] = {
        (PEER_B, "replica_read"): [[None]],
        (PEER_C, "replica_read"): [[None]],
        (PEER_B, "reap"): [[True]],
        (PEER_C, "reap"): [[True]],
    }
    ring = Ring((SELF, PEER_B, PEER_C), buckets=8, virtual_nodes=16)
    first, second = led_keys(ring, 2)
    engine = MemoryEngine()
    engine.put(ring.partition_for_key(first), first, b"\x02garbage")
    replica = LocalReplica(engine, actor=b"a", buckets=8, stats=NodeStats(), wall_clock=Clock())
    replica.apply(second, (version(b"b", FRESH, None),))
    replica.tombstone_grace = GRACE
    replica.wall_clock = Clock(NOW + GRACE)
    reaper = Reaper(
        self_node=SELF,
        replica=replica,
        peers=cast(PeerCaller, ScriptedPeers(script)),
        ring=lambda: ring,
        quorum=Quorum(3, 2, 2),
        interval=1.0,
        request_timeout=1.0,
    )
    while reaper.rounds < 8:
        await reaper.reap_round()
    assert engine.get(ring.partition_for_key(first), first) == b"\x02garbage"
    assert replica.read_record(second) == ((), None)


async def test_a_peer_that_kept_its_copy_keeps_the_first_primarys_too() -> None:
    # Peer B's record changed after it was read (a write came in between): it kept it.
    reaper, keys = await reap_with(
        {
            (PEER_B, "replica_read"): [["record"]],
            (PEER_C, "replica_read"): [["record"]],
            (PEER_B, "reap"): [[False]],
            (PEER_C, "reap"): [[True]],
        }
    )
    assert held(reaper, keys)
    assert reaper.deferred == 1


@pytest.mark.parametrize(
    "script",
    [
        {(PEER_B, "replica_read"): [None], (PEER_C, "replica_read"): [["record"]]},
        {(PEER_B, "replica_read"): [[b"\x02other"]], (PEER_C, "replica_read"): [["record"]]},
        {(PEER_B, "replica_read"): [["not", "a", "list"]], (PEER_C, "replica_read"): [[None]]},
        {
            (PEER_B, "replica_read"): [["record"]],
            (PEER_C, "replica_read"): [[None]],
            (PEER_B, "reap"): [[True]],
            (PEER_C, "reap"): [None],
        },
    ],
    ids=["unreachable", "other-record", "malformed-answer", "reap-unanswered"],
)
async def test_nothing_is_reaped_here_unless_every_primary_agreed(
    script: dict[tuple[NodeId, str], list[object]],
) -> None:
    reaper, keys = await reap_with(script)
    assert held(reaper, keys)
    assert reaper.replica.stats.kai_tombstones_reaped == 0
    assert reaper.deferred == 1


# --- over the in-process cluster --------------------------------------------------------------

SETTINGS = {"tombstone_grace": 2000, "buckets": 16, "sync_interval": 200}


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` in virtual time until it holds (at most a virtual minute)."""
    with trio.fail_after(60):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


def stored(node: HarnessNode, key: bytes) -> bytes | None:
    """``key``'s record in ``node``'s storage engine (not through any cache)."""
    return node.engine.get(node.replica.partition(key), key)


def primaries(cluster: InProcessCluster, key: bytes) -> list[int]:
    """The indexes of ``key``'s primaries, first primary first."""
    ring = cluster.nodes[0].cluster.ring()
    n = cluster.config.quorum.capped(len(ring.nodes)).n
    index = {node.node_id: i for i, node in enumerate(cluster.nodes)}
    return [index[node] for node in ring.preference_list(ring.partition_for_key(key))[:n]]


def reaped(cluster: InProcessCluster) -> int:
    return sum(node.replica.stats.kai_tombstones_reaped for node in cluster.nodes)


async def set_and_delete(cluster: InProcessCluster, keys: list[bytes], via: int = 0) -> None:
    for key in keys:
        assert await cluster.request(via, b"set %s 0 0 1\r\nv\r\n" % key) == b"STORED\r\n"
        assert await cluster.request(via, b"delete %s\r\n" % key) == b"DELETED\r\n"
    await wait_for(lambda: all(stored(node, key) for node in cluster.nodes for key in keys))


async def test_a_deleted_key_is_reaped_everywhere_after_the_grace_and_stays_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [b"gone-%02d" % index for index in range(20)]
    async with InProcessCluster.running(3, settings=SETTINGS) as cluster:
        for key in keys:
            assert await cluster.request(0, b"set %s 0 0 4\r\nlive\r\n" % key) == b"STORED\r\n"
        await wait_for(lambda: all(stored(node, key) for node in cluster.nodes for key in keys))
        live = {key: stored(cluster.nodes[0], key) for key in keys}
        deleted_at = trio.current_time()
        for key in keys:
            assert await cluster.request(1, b"delete %s\r\n" % key) == b"DELETED\r\n"
        await wait_for(
            lambda: all(stored(node, key) is None for node in cluster.nodes for key in keys)
        )
        assert trio.current_time() - deleted_at >= 2.0  # never before the grace
        assert reaped(cluster) == 3 * len(keys)
        for index in range(3):
            for key in keys:
                assert await cluster.request(index, b"get %s\r\n" % key) == b"END\r\n"
        stats = await cluster.request(0, b"stats\r\n")
        assert b"STAT kai_tombstones_reaped %d\r\n" % len(keys) in stats
        assert cluster.nodes[0].cluster.reaper.rounds > 0
        assert ("kai_reap_rounds", cluster.nodes[0].cluster.reaper.rounds) in (
            cluster.nodes[0].cluster.statistics()
        )

        # Nothing reaped comes back: the old live version, offered by RPC or merged directly.
        for node in cluster.nodes:
            replica_apply = node.cluster.handlers()["replica_apply"]
            for key in keys:
                record = live[key]
                assert record is not None
                assert replica_apply(key, record) is False
                assert node.replica.apply(key, decode_siblings(record), record) is False
                assert stored(node, key) is None
            assert node.replica.stats.kai_stale_refused == 2 * len(keys)
        await trio.sleep(5)  # anti-entropy, handoff, read repair: none brings it back
        for index in range(3):
            for key in keys:
                assert await cluster.request(index, b"get %s\r\n" % key) == b"END\r\n"
        assert all(stored(node, key) is None for node in cluster.nodes for key in keys)


async def test_a_tombstone_younger_than_the_grace_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = {**SETTINGS, "tombstone_grace": 5000}
    async with InProcessCluster.running(3, settings=settings) as cluster:
        await set_and_delete(cluster, [b"young"])
        await trio.sleep(4.0)
        for node in cluster.nodes:
            record = stored(node, b"young")
            assert record is not None
            assert [v.value for v in decode_siblings(record)] == [None]
        assert reaped(cluster) == 0
        assert all(node.cluster.reaper.rounds > 0 for node in cluster.nodes)
        await wait_for(lambda: all(stored(node, b"young") is None for node in cluster.nodes))


async def test_expired_and_flushed_values_are_reaped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with InProcessCluster.running(3, settings=SETTINGS) as cluster:
        assert await cluster.request(0, b"set short 0 1 1\r\nv\r\n") == b"STORED\r\n"
        assert await cluster.request(0, b"set flushed 0 0 1\r\nv\r\n") == b"STORED\r\n"
        await wait_for(lambda: all(stored(node, b"flushed") for node in cluster.nodes))
        assert await cluster.request(0, b"flush_all\r\n") == b"OK\r\n"
        assert await cluster.request(0, b"set kept 0 0 1\r\nv\r\n") == b"STORED\r\n"
        keys = [b"short", b"flushed"]
        await wait_for(lambda: all(stored(node, k) is None for node in cluster.nodes for k in keys))
        await trio.sleep(2)
        assert all(stored(node, b"kept") for node in cluster.nodes)
        assert await cluster.request(1, b"get kept\r\n") == b"VALUE kept 0 1\r\nv\r\nEND\r\n"


@pytest.mark.parametrize("fault", ["crash", "partition"])
async def test_nothing_is_reaped_while_a_primary_cannot_answer(
    autojump_clock: trio.testing.MockClock, fault: str
) -> None:
    async with InProcessCluster.running(3, settings=SETTINGS) as cluster:
        key = b"held"
        await set_and_delete(cluster, [key])
        first, _second, third = primaries(cluster, key)
        if fault == "crash":
            cluster.crash(third)
        else:
            cluster.partition([first, _second], [third])
        await trio.sleep(6.0)
        assert all(stored(cluster.nodes[i], key) for i in (first, _second, third))
        assert reaped(cluster) == 0
        assert cluster.nodes[first].cluster.reaper.deferred > 0
        if fault == "crash":
            await cluster.start_node(third)
        else:
            cluster.heal()
        await wait_for(lambda: all(stored(node, key) is None for node in cluster.nodes))
        assert reaped(cluster) == 3


async def test_nothing_is_reaped_while_a_primary_holds_a_live_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No anti-entropy: it would spread the live value, and then no primary holds a dead key.
    settings = {**SETTINGS, "anti_entropy": False}
    async with InProcessCluster.running(3, settings=settings) as cluster:
        key = b"contested"
        await set_and_delete(cluster, [key])
        first, _second, third = primaries(cluster, key)
        # A concurrent live version that only the third primary holds.
        cluster.nodes[third].replica.coordinate_write(key, Payload(0, 0, b"live"), VClock())
        await trio.sleep(6.0)
        assert all(stored(node, key) is not None for node in cluster.nodes)
        assert reaped(cluster) == 0
        assert cluster.nodes[first].cluster.reaper.deferred > 0
        reply = await cluster.request(first, b"get %s\r\n" % key)
        assert reply == b"VALUE contested 0 4\r\nlive\r\nEND\r\n"


async def test_the_reap_rpc_validates_and_lets_a_write_win(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The nodes' own reapers wait an hour for their first round: only the test calls reap.
    settings = {**SETTINGS, "tombstone_grace": 60_000, "sync_interval": 3_600_000}
    async with InProcessCluster.running(3, settings=settings) as cluster:
        await set_and_delete(cluster, [b"k"])
        reaper = cluster.nodes[0].cluster.reaper
        record = stored(cluster.nodes[0], b"k")
        assert record is not None
        for bad in ([], [[b"k"]], [[b"", record]], [[b"k", b"junk"]], "x", [[b"k", record]] * 2000):
            with pytest.raises(RpcBadRequest):
                reaper.reap(bad)
        # Dead, but not for longer than the grace here: kept.
        assert reaper.reap([[b"k", record]]) == [False]
        assert reaper.reap([[b"absent", record]]) == [True]
        await trio.sleep(61)
        # A record other than the stored one (a write came in between) is not reaped.
        other = encode_siblings((version(b"z", 1, None),))
        assert reaper.reap([[b"k", other]]) == [False]
        assert stored(cluster.nodes[0], b"k") == record
        assert reaper.reap([[b"k", record]]) == [True]
        assert stored(cluster.nodes[0], b"k") is None
