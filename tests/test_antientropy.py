"""Active anti-entropy over the in-process cluster, in virtual time.

Replicas that missed writes (a partition, a write made on one node only, deletes) converge
with no client traffic: every check reads each replica directly, never through a quorum read
(that would repair by itself). Hints the coordinators kept for the cut-off node are dropped
before the heal, as if those coordinators had lost them, so that anti-entropy is the only
way the data can travel; a control run with anti-entropy off shows the data does not.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing

from kai.cluster import antientropy
from kai.cluster.fanout import PeerCaller
from kai.core.config import Quorum
from kai.core.errors import RpcBadRequest
from kai.core.merkle import SEGMENTS, HashTrees
from kai.core.ring import NodeId, Ring, key_hash, partition_of
from kai.core.stats import NodeStats
from kai.core.vclock import VClock
from kai.core.versions import Payload, Version, encode_siblings
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica
from kai.testing.cluster import EPOCH, InProcessCluster
from kai.testing.network import FakeNetwork

SETTINGS = {"buckets": 16, "sync_interval": 200, "handoff_interval": 3_600_000}
KEYS = [b"key-%03d" % index for index in range(60)]
#: Virtual seconds a test waits for convergence at most.
CONVERGENCE = 60


def running(anti_entropy: bool = True) -> AbstractAsyncContextManager[InProcessCluster]:
    return InProcessCluster.running(
        3, quorum=Quorum(3, 2, 2), seed=7, settings={**SETTINGS, "anti_entropy": anti_entropy}
    )


def records(cluster: InProcessCluster, index: int, keys: Sequence[bytes]) -> list[bytes | None]:
    """Node ``index``'s own records of ``keys``."""
    return [cluster.nodes[index].replica.read_record(key)[1] for key in keys]


def converged(cluster: InProcessCluster, keys: Sequence[bytes]) -> bool:
    """Whether every replica holds a byte-equal record of every key."""
    first = records(cluster, 0, keys)
    if None in first:
        return False
    return all(records(cluster, index, keys) == first for index in range(1, len(cluster.nodes)))


async def wait_converged(cluster: InProcessCluster, keys: Sequence[bytes]) -> None:
    with trio.fail_after(CONVERGENCE):
        while not converged(cluster, keys):  # noqa: ASYNC110 (virtual time: polling is free)
            await trio.sleep(0.1)


def forget_hints(cluster: InProcessCluster) -> None:
    """Drop every hint every node keeps (hinted handoff then has nothing to deliver)."""
    for node in cluster.nodes:
        store = node.cluster.coordinator.hints
        for owner in store.owners():
            store.remove_delivered(owner, store.source(owner).read(None, 10**6, 10**12))
        assert store.pending == 0


async def write_while_cut_off(cluster: InProcessCluster, command: bytes) -> None:
    """Run ``command % key`` for every key through node 0 while node 2 is cut off, then
    heal (the hints kept for node 2 dropped)."""
    cluster.partition([0, 1], [2])
    for key in KEYS:
        reply = await cluster.request(0, command % key)
        if reply.startswith(b"SERVER_ERROR"):
            # Forwarded to node 2 before node 0 noticed it is cut off: now it goes elsewhere.
            reply = await cluster.request(0, command % key)
        assert reply in (b"STORED\r\n", b"DELETED\r\n"), reply
    await trio.sleep(2)  # the calls to node 2 time out (1 s), leaving hints behind
    forget_hints(cluster)
    assert all(record is None for record in records(cluster, 2, KEYS)) or b"delete" in command
    cluster.heal()


def statistics(cluster: InProcessCluster, index: int) -> dict[str, object]:
    return dict(cluster.nodes[index].cluster.anti_entropy.statistics())


async def test_writes_a_node_missed_reach_it_with_no_client_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as cluster:
        await write_while_cut_off(cluster, b"set %s 0 0 5\r\nhello\r\n")
        await wait_converged(cluster, KEYS)
        repaired = sum(node.cluster.anti_entropy.keys_repaired for node in cluster.nodes)
        assert repaired >= len(KEYS)
        assert all(statistics(cluster, index)["kai_aae_trees_ready"] == 16 for index in range(3))
        # Converged trees agree, root by root.
        trees = [cluster.nodes[index].cluster.anti_entropy.trees for index in range(3)]
        for partition in range(16):
            assert trees[0].root(partition) == trees[1].root(partition) == trees[2].root(partition)
        status = cluster.nodes[2].cluster.anti_entropy.status()
        assert status["keys_repaired"] == statistics(cluster, 2)["kai_aae_keys_repaired"]
        partitions = status["partitions"]
        assert isinstance(partitions, list)
        assert len(partitions) == 16  # N = 3 of 3 nodes: a primary of every partition
        assert all(entry["ready"] for entry in partitions)


async def test_without_anti_entropy_the_missed_writes_stay_missing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(anti_entropy=False) as cluster:
        await write_while_cut_off(cluster, b"set %s 0 0 5\r\nhello\r\n")
        await trio.sleep(10)
        assert records(cluster, 2, KEYS) == [None] * len(KEYS)


async def test_a_key_only_one_node_holds_spreads_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as cluster:
        lonely = cluster.nodes[2].replica
        for key in KEYS[:10]:
            lonely.coordinate_write(key, Payload(7, 0, b"only here"), None)
        assert records(cluster, 0, KEYS[:10]) == [None] * 10
        await wait_converged(cluster, KEYS[:10])
        assert [version.value for version in cluster.nodes[0].replica.read(KEYS[0])] == [
            b"only here"
        ]


async def test_deletes_spread_as_tombstones(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as cluster:
        for key in KEYS:
            assert await cluster.request(0, b"set %s 0 0 1\r\nv\r\n" % key) == b"STORED\r\n"
        await wait_converged(cluster, KEYS)
        await write_while_cut_off(cluster, b"delete %s\r\n")
        assert all(cluster.nodes[2].replica.read(key)[0].value == b"v" for key in KEYS)
        await wait_converged(cluster, KEYS)
        for key in KEYS:
            (version,) = cluster.nodes[2].replica.read(key)
            assert version.value is None  # the tombstone, not a physical delete


async def test_trees_built_at_start_concurrently_with_writes_are_exact(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(antientropy, "BUILD_CHUNK", 4)  # many chunks, writes in between
    async with running() as cluster:
        cluster.crash(2)
        engine_keys = [b"stored-%03d" % index for index in range(300)]
        for key in engine_keys:
            cluster.nodes[0].replica.coordinate_write(key, Payload(0, 0, b"old"), None)
            record = cluster.nodes[0].replica.read_record(key)[1]
            assert record is not None
            cluster.nodes[2].engine.put(cluster.nodes[0].replica.partition(key), key, record)
        node = await cluster.start_node(2)
        service = node.cluster.anti_entropy
        assert service.trees.ready_count < 16  # still building
        written = 0
        while service.trees.building is not None:
            key = engine_keys[(written * 37) % len(engine_keys)]
            node.replica.coordinate_write(key, Payload(0, 0, b"new %d" % written), None)
            node.replica.coordinate_write(b"fresh-%03d" % written, Payload(0, 0, b"x"), None)
            written += 1
            await trio.lowlevel.checkpoint()
        assert written > 10
        scratch = HashTrees(16)
        scratch.start()
        for partition in range(16):
            scratch.scanned(node.engine.scan(partition))
            scratch.finish_partition()
        for partition in range(16):
            assert service.trees.root(partition) == scratch.root(partition), partition


async def test_an_exchange_never_runs_while_another_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(anti_entropy=False) as cluster:
        service = cluster.nodes[0].cluster.anti_entropy
        node_1 = cluster.node_id(1)
        await service.build()
        await cluster.nodes[1].cluster.anti_entropy.build()
        results: list[bool] = []

        async def exchange() -> None:
            results.append(await service.exchange(node_1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(exchange)
            nursery.start_soon(exchange)
        assert sorted(results) == [False, True]
        assert service.exchanges == 1
        assert await service.exchange(node_1) is True  # and the next one runs again
        assert service.exchanges == 2


async def test_a_peer_that_is_cut_off_ends_the_exchange_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(anti_entropy=False) as cluster:
        service = cluster.nodes[0].cluster.anti_entropy
        await service.build()
        cluster.partition([0], [1, 2])
        assert await service.exchange(cluster.node_id(1)) is True
        assert (service.exchanges, service.exchanges_failed) == (0, 1)


async def test_garbage_parameters_are_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as cluster:
        node = cluster.nodes[1]
        service = node.cluster.anti_entropy
        key = b"some-key"
        partition = node.replica.partition(key)
        other = (partition + 1) % 16
        good = encode_siblings(
            (cluster.nodes[0].replica.coordinate_write(key, Payload(0, 0, b"v"), None),)
        )
        bad_calls = [
            ("aae_roots", ("not a list",)),
            ("aae_roots", ([16],)),
            ("aae_roots", ([True],)),
            ("aae_roots", (list(range(17)),)),
            ("aae_leaves", (-1,)),
            ("aae_leaves", (b"0",)),
            ("aae_segment_keys", (0, [], None)),
            ("aae_segment_keys", (0, [SEGMENTS], None)),
            ("aae_segment_keys", (0, [1], b"")),
            ("aae_segment_keys", (0, "all", None)),
            ("aae_apply", (partition, [])),
            ("aae_apply", (partition, [[key]])),
            ("aae_apply", (partition, [[key, b"not a record"]])),
            ("aae_apply", (partition, [[key, good], [b"", good]])),
            ("aae_apply", (other, [[key, good]])),  # a key of another partition
            ("aae_apply", (partition, [[key, good]] * (antientropy.MAX_APPLY_KEYS + 1))),
        ]
        handlers = service.handlers()
        for method, params in bad_calls:
            with pytest.raises(RpcBadRequest):
                handlers[method](*params)
            # The same through the network: the caller hears a bad request.
            answer = await cluster.nodes[0].cluster.coordinator.peers.call(
                node.node_id, method, params, trio.current_time() + 1
            )
            assert isinstance(answer.error, RpcBadRequest), (method, params)
        assert node.replica.read(key) == ()  # nothing of a refused batch was merged
        assert handlers["aae_apply"](partition, [[key, good]]) == 1
        assert node.replica.read_record(key)[1] == good


def key_of(partition: object) -> bytes:
    """A key of ``partition`` (of 16)."""
    return next(
        key
        for key in (b"k%d" % index for index in range(10_000))
        if partition_of(key_hash(key), 16) == partition
    )


#: The leaves of a peer whose every segment differs from an empty tree's.
FULL_LEAVES = bytes(range(256)) * 32
#: A peer whose every root differs and every segment lists one key.
DIFFERING: dict[str, Callable[..., object]] = {
    "aae_roots": lambda partitions: [1] * len(partitions),
    "aae_leaves": lambda partition: FULL_LEAVES,
    "aae_segment_keys": lambda partition, segments, after: [[[key_of(partition), 1]], None],
    "replica_read": lambda keys: [encode_siblings((version_of(key),)) for key in keys],
    "aae_apply": lambda partition, batch: 0,
}
#: Answers of a confused or hostile peer; each must end the exchange quietly.
LIES: dict[str, dict[str, Callable[..., object]]] = {
    "roots of the wrong length": {"aae_roots": lambda partitions: []},
    "a root that is no integer": {"aae_roots": lambda partitions: ["x"] * len(partitions)},
    "leaves of the wrong size": {**DIFFERING, "aae_leaves": lambda partition: b"short"},
    "an empty key": {
        **DIFFERING,
        "aae_segment_keys": lambda partition, segments, after: [[[b"", 1]], None],
    },
    "a key of another partition": {
        **DIFFERING,
        "aae_segment_keys": lambda partition, segments, after: [
            [[key_of((partition + 1) % 16), 1]],
            None,
        ],
    },
    "a cursor that does not advance": {
        **DIFFERING,
        "aae_segment_keys": lambda partition, segments, after: [[], b"same"],
    },
    "an empty read": {**DIFFERING, "replica_read": lambda keys: []},
    "a record that is not one": {**DIFFERING, "replica_read": lambda keys: [b"junk"] * len(keys)},
}


async def exchange_with(handlers: dict[str, Callable[..., object]]) -> antientropy.AntiEntropy:
    """One exchange of a node with an empty replica with a peer served by ``handlers``."""
    me, peer = NodeId("127.0.0.1", 11011), NodeId("127.0.0.1", 11012)
    ring = Ring((me, peer), buckets=16, virtual_nodes=8)
    replica = LocalReplica(
        MemoryEngine(), actor=b"me", buckets=16, stats=NodeStats(), wall_clock=lambda: EPOCH
    )
    async with FakeNetwork.running(random.Random(1)) as network, trio.open_nursery() as nursery:
        network.register(peer, handlers)
        service = antientropy.AntiEntropy(
            self_node=me,
            replica=replica,
            peers=PeerCaller(
                network.transport_for(me), nursery, on_success=_ignore, on_failure=_ignore
            ),
            ring=lambda: ring,
            quorum=Quorum(3, 2, 2),
            is_up=lambda node: True,
            interval=1.0,
            request_timeout=1.0,
        )
        await service.build()
        assert await service.exchange(peer) is True
        nursery.cancel_scope.cancel()
    return service


def _ignore(node: NodeId) -> None:
    pass


@pytest.mark.parametrize("lie", sorted(LIES))
async def test_a_peer_answering_nonsense_ends_the_exchange_and_nothing_is_stored(
    autojump_clock: trio.testing.MockClock, lie: str
) -> None:
    service = await exchange_with(LIES[lie])
    assert (service.exchanges, service.exchanges_failed) == (0, 1)
    assert service.replica.engine.count() == 0


async def test_a_peer_answering_sense_is_merged(autojump_clock: trio.testing.MockClock) -> None:
    # The control of the test above: the same peer without a lie completes the exchange.
    service = await exchange_with(DIFFERING)
    assert (service.exchanges, service.exchanges_failed) == (1, 0)
    assert service.replica.engine.count() == 16  # one key of every shared partition
    assert service.keys_repaired == 16


def version_of(key: bytes) -> Version:
    """A one-version sibling set's version of ``key`` (as a peer coordinated it)."""
    return Version((b"peer", 1), VClock(), timestamp=int(EPOCH * 1_000_000), value=b"v" + key)
