"""Ownership transfer in the in-process cluster (virtual time): nodes join and leave a loaded
cluster while clients write and read through every node, and no acknowledged key is missed,
lost or left behind on a node that no longer owns it.

The clients check every read against the value last acknowledged for the key (or one being
written when the read was sent), so a miss or an old value fails the test at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio
import trio.testing

from kai.core.ring import NodeId
from kai.core.transition import SETTLED
from kai.testing.cluster import InProcessCluster

KEYS = 300
CLIENTS = 4


class Load:
    """Clients writing and reading verified values through the given nodes."""

    def __init__(self, cluster: InProcessCluster, keys: Sequence[bytes], seed: int) -> None:
        self.cluster = cluster
        self.keys = list(keys)
        self.rng = random.Random(seed)
        #: key -> the last acknowledged value, and the values written but not yet answered.
        self.acknowledged: dict[bytes, bytes] = {}
        self.in_flight: dict[bytes, set[bytes]] = {key: set() for key in keys}
        self.reads = self.writes = 0
        self.errors: list[str] = []
        self.nodes: list[int] = [0, 1, 2]

    async def write(self, key: bytes, value: bytes) -> None:
        node = self.rng.choice(self.nodes)
        self.in_flight[key].add(value)
        raw = b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)
        reply = await self.cluster.request(node, raw)
        self.in_flight[key].discard(value)
        if reply == b"STORED\r\n":
            self.acknowledged[key] = value
            self.writes += 1
        else:
            self.errors.append(f"set {key!r} through node {node}: {reply!r}")

    async def read(self, key: bytes) -> None:
        node = self.rng.choice(self.nodes)
        expected = {self.acknowledged[key], *self.in_flight[key]}
        reply = await self.cluster.request(node, b"get %s\r\n" % key)
        self.reads += 1
        if reply == b"END\r\n":
            self.errors.append(f"get {key!r} through node {node} missed")
            return
        value = reply.split(b"\r\n")[1]
        # A value acknowledged after this read was sent is fine too.
        if value not in expected | {self.acknowledged[key], *self.in_flight[key]}:
            self.errors.append(f"get {key!r} through node {node}: {value!r}, not {expected}")

    async def load(self) -> None:
        for key in self.keys:
            await self.write(key, b"v0-" + key)

    async def run(self, client: int, stop: trio.Event) -> None:
        rng = random.Random(client)
        count = 0
        mine = self.keys[client::CLIENTS]  # one writer per key: its last ack is its value
        while not stop.is_set() and count < 20_000:
            count += 1
            if rng.random() < 0.5:
                key = rng.choice(mine)
                await self.write(key, b"v%d-%d-%s" % (client, count, key))
            else:
                await self.read(rng.choice(self.keys))
            await trio.sleep(0.01)


def settled(cluster: InProcessCluster, indexes: Sequence[int], members: set[NodeId]) -> bool:
    """Whether the nodes ``indexes`` all see a settled placement over exactly ``members``,
    and every one has deleted what it no longer owns."""
    for index in indexes:
        node = cluster.nodes[index].cluster
        placement = node.placement()
        if placement.phase != SETTLED or set(placement.ring.nodes) != members:
            return False
        if node.ownership._cleaned != placement.mark:
            return False
    return True


def holders(cluster: InProcessCluster, indexes: Sequence[int], key: bytes) -> set[NodeId]:
    return {cluster.nodes[i].node_id for i in indexes if cluster.nodes[i].replica.read(key)}


def check_placed(cluster: InProcessCluster, load: Load, indexes: Sequence[int]) -> None:
    """Every key is on exactly its primaries, and each holds its last acknowledged value."""
    ring = cluster.nodes[indexes[0]].cluster.ring()
    by_id = {cluster.nodes[i].node_id: cluster.nodes[i] for i in indexes}
    for key, value in load.acknowledged.items():
        primaries = set(ring.primaries_of(key, 3))
        assert holders(cluster, indexes, key) == primaries, key
        for node in primaries:
            values = {version.value for version in by_id[node].replica.read(key)}
            assert value in values, (key, node)


async def run_change(
    cluster: InProcessCluster, load: Load, change: object, wait_for: tuple[list[int], set[NodeId]]
) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as clients:
        for client in range(CLIENTS):
            clients.start_soon(load.run, client, stop)
        await trio.sleep(1)
        await change()  # type: ignore[operator]
        with trio.fail_after(120):
            while not settled(cluster, *wait_for):  # noqa: ASYNC110 (virtual time)
                await trio.sleep(0.2)
        await trio.sleep(1)
        stop.set()


async def test_growing_and_shrinking_a_loaded_cluster_misses_and_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [b"key:%04d" % index for index in range(KEYS)]
    # Slow copies, so that clients write while partitions are on their way; no anti-entropy
    # and no read repair would do the transfers' work: every copy is the transfers' own.
    settings = {"transfer_rate": 2000, "anti_entropy": False}
    async with InProcessCluster.running(3, settings=settings) as cluster:
        load = Load(cluster, keys, seed=1)
        await load.load()
        ids = [cluster.node_id(i) for i in range(5)]

        async def grow() -> None:
            await cluster.start_node(3)
            await cluster.start_node(4)

        await run_change(cluster, load, grow, ([0, 1, 2, 3, 4], set(ids)))
        check_placed(cluster, load, range(5))
        load.nodes = [0, 1, 2, 3, 4]
        grown = {node.node_id: node.cluster.ownership.copies_done for node in cluster.nodes}
        dropped_after_growth = sum(node.cluster.ownership.records_dropped for node in cluster.nodes)

        async def shrink() -> None:
            # Two nodes leave, as `kai-admin leave` on each would stage and commit it.
            cluster.nodes[0].cluster.membership.set_statuses({ids[1]: "leaving", ids[3]: "leaving"})

        load.nodes = [0, 2, 4]
        await run_change(cluster, load, shrink, ([0, 1, 2, 3, 4], {ids[0], ids[2], ids[4]}))
        check_placed(cluster, load, range(5))
        left = [cluster.nodes[i].cluster.membership.view.member(ids[i]) for i in (1, 3)]
    assert load.errors == [], load.errors[:5]
    assert load.reads > 1000
    assert load.writes > 300
    assert sum(grown.values()) > 0  # partitions were copied, not left to read repair
    assert dropped_after_growth > 0  # the old owners deleted what moved away
    assert [member.status for member in left if member is not None] == ["left", "left"]
