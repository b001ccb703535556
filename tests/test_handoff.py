"""Hinted handoff over the in-process cluster: hints reach their owner with no client traffic,
in acknowledged batches that resume after a crash of either side."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from kai.cluster.transfers import Transfers
from kai.core.config import Quorum
from kai.core.errors import RpcBadRequest
from kai.core.ring import NodeId
from kai.core.versions import Payload, encode_siblings
from kai.testing.cluster import HarnessNode, InProcessCluster

pytestmark = pytest.mark.trio

KEYS = [b"key-%03d" % index for index in range(60)]
#: 8 KiB/s with records of about 100 bytes: a batch of 256 keys takes a few seconds, so a
#: handoff can be interrupted halfway.
SLOW_HANDOFF = {
    "buckets": 16,
    "handoff_interval": 200,
    "anti_entropy": False,
    "transfer_rate": 8192,
}


def holds_every_key(node: HarnessNode, keys: list[bytes], value: bytes = b"v") -> bool:
    """Whether ``node``'s own replica (not a quorum read) holds ``value`` for every key."""
    return all([version.value for version in node.replica.read(key)] == [value] for key in keys)


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` in virtual time until it holds (at most a virtual minute)."""
    with trio.fail_after(60):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def write(cluster: InProcessCluster, via: int, keys: list[bytes], value: bytes) -> None:
    for key in keys:
        reply = await cluster.request(via, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        assert reply == b"STORED\r\n", reply


#: The id of node 1's handoff to node 3 (the one the restart test watches).
HINTS_ID = "hints:127.0.0.1:11013"


async def test_a_restarted_node_gets_every_write_it_missed_without_client_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = {"buckets": 16, "handoff_interval": 1000, "anti_entropy": False}
    async with InProcessCluster.running(3, quorum=Quorum(3, 2, 2), settings=settings) as cluster:
        cluster.crash(2)
        await write(cluster, 0, KEYS, b"v")
        await write(cluster, 1, KEYS[:10], b"v")
        kept = [node.cluster.coordinator.hints.pending for node in cluster.nodes[:2]]
        assert sum(kept) >= len(KEYS)  # every key is kept for node 2 by its coordinator
        restarted = await cluster.start_node(2)
        assert not holds_every_key(restarted, KEYS)
        await wait_for(lambda: holds_every_key(restarted, KEYS))
        await wait_for(lambda: all(n.cluster.coordinator.hints.pending == 0 for n in cluster.nodes))
        delivered = sum(n.cluster.handoff.store.delivered for n in cluster.nodes[:2])
        assert delivered == sum(kept)
        transfers = cluster.nodes[0].cluster.transfers
        # The transfer ends when it finds nothing after its last acknowledged batch.
        await wait_for(lambda: bool(transfers.status()) and not transfers.is_running(HINTS_ID))
        status = transfers.status()
        assert status[0]["id"] == HINTS_ID
        assert status[0]["state"] == "done"
        assert status[0]["to"] == "127.0.0.1:11013"


async def test_writes_succeed_through_fallbacks_and_reach_the_primaries_when_they_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = {"buckets": 16, "handoff_interval": 1000, "anti_entropy": False}
    async with InProcessCluster.running(5, quorum=Quorum(3, 2, 2), settings=settings) as cluster:
        key = KEYS[0]
        ring = cluster.nodes[0].cluster.ring()
        preference = ring.preference_list(ring.partition_for_key(key))
        index = {node.node_id: i for i, node in enumerate(cluster.nodes)}
        first, second, third, *fallbacks = (index[node] for node in preference)
        cluster.crash(second)
        cluster.crash(third)
        await write(cluster, first, [key], b"v")
        assert all(cluster.nodes[i].replica.read(key) == () for i in fallbacks)
        assert sum(cluster.nodes[i].cluster.coordinator.hints.pending for i in fallbacks) >= 1
        for returning in (second, third):
            await cluster.start_node(returning)
        await wait_for(
            lambda: all(holds_every_key(cluster.nodes[i], [key]) for i in (second, third))
        )
        # With the fallbacks gone, the key reads back from its primaries.
        for fallback in fallbacks:
            cluster.crash(fallback)
        reply = await cluster.request(second, b"get %s\r\n" % key)
        assert reply == b"VALUE %s 0 1\r\nv\r\nEND\r\n" % key


async def test_a_handoff_interrupted_by_a_crash_of_the_sender_resumes_without_resending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = SLOW_HANDOFF
    keys = [b"many-%04d" % index for index in range(1200)]
    async with InProcessCluster.running(3, quorum=Quorum(3, 2, 2), settings=settings) as cluster:
        cluster.crash(2)
        await write(cluster, 0, keys, b"v")
        kept = cluster.nodes[0].cluster.coordinator.hints.pending
        assert kept == len(keys)
        receiver = await cluster.start_node(2)
        sender = cluster.nodes[0].cluster.transfers
        await wait_for(lambda: sender.batches_acked >= 2)
        acked_before = sender.keys_sent
        cluster.crash(0)
        restarted = await cluster.start_node(0)
        await wait_for(lambda: restarted.cluster.coordinator.hints.pending == 0)
        resumed = restarted.cluster.transfers.status()
        received = receiver.cluster.transfers.keys_received
    assert resumed[-1]["resumed"] is True
    # Acknowledged batches were never sent again: at most the batch in flight at the crash.
    assert acked_before + restarted.cluster.transfers.keys_sent == kept
    assert kept <= received <= kept + 256
    assert holds_every_key(receiver, keys)


async def test_a_handoff_interrupted_by_a_crash_of_the_receiver_resumes_when_it_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = SLOW_HANDOFF
    keys = [b"many-%04d" % index for index in range(800)]
    async with InProcessCluster.running(3, quorum=Quorum(3, 2, 2), settings=settings) as cluster:
        cluster.crash(2)
        await write(cluster, 0, keys, b"v")
        await cluster.start_node(2)
        sender = cluster.nodes[0].cluster.transfers
        await wait_for(lambda: sender.batches_acked >= 1)
        cluster.crash(2)
        await wait_for(lambda: not sender.is_running("hints:127.0.0.1:11013"))
        assert sender.status()[0]["state"] == "paused"
        sent_before = sender.keys_sent
        receiver = await cluster.start_node(2)
        await wait_for(lambda: cluster.nodes[0].cluster.coordinator.hints.pending == 0)
    assert sender.keys_sent == len(keys)  # no acknowledged key was sent twice
    assert sent_before < len(keys)
    assert holds_every_key(receiver, keys)


async def test_a_receiver_refuses_a_malformed_batch_and_merges_nothing() -> None:
    from kai.core.stats import NodeStats
    from kai.storage.memory import MemoryEngine
    from kai.storage.replica import LocalReplica

    replica = LocalReplica(MemoryEngine(), actor=b"a", buckets=16, stats=NodeStats())
    other = LocalReplica(MemoryEngine(), actor=b"b", buckets=16, stats=NodeStats())
    version = other.coordinate_write(b"k", Payload(0, 0, b"v"), None)
    good = [b"k", encode_siblings((version,))]
    transfers = Transfers(
        self_node=NodeId("127.0.0.1", 1),
        replica=replica,
        engine=replica.engine,
        peers=None,  # type: ignore[arg-type]  # receiving calls nobody
        limit=1,
        rate=0,
        request_timeout=1,
    )
    for params in [
        (1, "hints", [good]),
        ("t", "hints", []),
        ("t", "hints", [good, [b"", good[1]]]),
        ("t", "hints", [good, [b"k2", b"not a record"]]),
        ("t", "hints", [good, [b"k2"]]),
    ]:
        with pytest.raises(RpcBadRequest):
            transfers.transfer_batch(*params)
    assert replica.read(b"k") == ()
    assert transfers.transfer_batch("t", "hints", [good]) == 1
    assert transfers.transfer_batch("t", "hints", [good]) == 0  # merging twice changes nothing
    assert replica.read(b"k") == (version,)
