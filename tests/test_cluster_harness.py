"""The cluster in one process, in virtual time: partitions, siblings, quorum failures, loss."""

from __future__ import annotations

import random

import trio

from kai.core.config import Quorum
from kai.core.versions import check_sibling_set
from kai.testing.cluster import InProcessCluster
from kai.testing.network import Faults
from tests.test_commands import MIX, FakeClock, MemcachedModel, parse_one


def token_of(reply: bytes) -> int:
    return int(reply.split(b"\r\n")[0].split()[-1])


async def test_partitioned_writes_become_siblings_and_cas_resolves_them(autojump_clock) -> None:
    # N=2, W=1: each side of the partition can accept a write; R=2 reads see both sides.
    async with InProcessCluster.running(2, quorum=Quorum(2, 2, 1)) as cluster:
        assert await cluster.request(0, b"set k 0 0 4\r\nbase\r\n") == b"STORED\r\n"
        cluster.partition([0], [1])
        assert await cluster.request(0, b"set k 1 0 4\r\nleft\r\n") == b"STORED\r\n"
        await trio.sleep(0.5)  # the right side writes later: its version is the newer one
        assert await cluster.request(1, b"set k 2 0 5\r\nright\r\n") == b"STORED\r\n"
        cluster.heal()
        everything = await cluster.request(0, b"get k\r\n", all_siblings=True)
        assert everything == b"VALUE k 2 5\r\nright\r\nVALUE k 1 4\r\nleft\r\nEND\r\n"
        assert await cluster.request(1, b"get k\r\n") == b"VALUE k 2 5\r\nright\r\nEND\r\n"
        reply = await cluster.request(1, b"gets k\r\n")
        token = token_of(reply)
        resolved = b"cas k 0 0 4 %d\r\nboth\r\n" % token
        assert await cluster.request(0, resolved) == b"STORED\r\n"
        await trio.sleep(2)  # replication and read repair, in virtual time
        for node in cluster.nodes:
            stored = node.replica.read(b"k")
            check_sibling_set(stored)
            assert [version.value for version in stored] == [b"both"]
        assert await cluster.request(1, b"get k\r\n", all_siblings=True) == (
            b"VALUE k 0 4\r\nboth\r\nEND\r\n"
        )


async def test_unreachable_replicas_answer_server_error_in_time(autojump_clock) -> None:
    async with InProcessCluster.running(3, request_timeout_ms=1000) as cluster:
        assert await cluster.request(0, b"set k 0 0 1\r\nx\r\n") == b"STORED\r\n"
        cluster.partition([0], [1, 2])
        started = trio.current_time()
        assert (await cluster.request(0, b"get k\r\n")).startswith(b"SERVER_ERROR")
        assert trio.current_time() - started <= 1.0 + 1e-9
        started = trio.current_time()
        assert (await cluster.request(0, b"set k 0 0 1\r\ny\r\n")).startswith(b"SERVER_ERROR")
        assert trio.current_time() - started <= 1.0 + 1e-9
        # The majority side keeps serving reads and writes.
        assert await cluster.request(1, b"set k 0 0 1\r\nz\r\n") == b"STORED\r\n"
        assert await cluster.request(2, b"get k\r\n") == b"VALUE k 0 1\r\nz\r\nEND\r\n"


async def test_a_crashed_node_loses_no_acknowledged_write(autojump_clock) -> None:
    async with InProcessCluster.running(3) as cluster:
        acknowledged = {}
        for index in range(100):
            key = b"key-%d" % index
            if index == 50:
                cluster.crash(2)
            reply = await cluster.request(index % 2, b"set %s 0 0 2\r\nv%d\r\n" % (key, index % 10))
            assert reply == b"STORED\r\n", (index, reply)
            acknowledged[key] = b"v%d" % (index % 10)
        for key, value in acknowledged.items():
            assert await cluster.request(1, b"get %s\r\n" % key) == (
                b"VALUE %s 0 2\r\n%s\r\nEND\r\n" % (key, value)
            )
        # The node comes back with its old data and catches up through read repair.
        await cluster.start_node(2)
        with trio.fail_after(30):
            await cluster.wait_converged()
        for key, value in acknowledged.items():
            assert await cluster.request(2, b"get %s\r\n" % key) == (
                b"VALUE %s 0 2\r\n%s\r\nEND\r\n" % (key, value)
            )
        await trio.sleep(2)
        for key in acknowledged:
            held = {node.replica.read(key) for node in cluster.nodes}
            assert len(held) == 1, key


async def test_acknowledged_writes_survive_a_terrible_network(autojump_clock) -> None:
    faults = Faults(drop=0.05, duplicate=0.05, delay=(0.0, 0.05))
    async with InProcessCluster.running(3, seed=7, faults=faults) as cluster:
        rng = random.Random(7)
        attempts: dict[bytes, list[bytes]] = {}
        last_acknowledged: dict[bytes, int] = {}
        for index in range(200):
            key = b"key-%d" % rng.randrange(40)
            value = b"value-%03d" % index
            attempts.setdefault(key, []).append(value)
            request = b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)
            reply = await cluster.request(rng.randrange(3), request)
            if reply == b"STORED\r\n":
                last_acknowledged[key] = len(attempts[key]) - 1
            else:
                assert reply.startswith(b"SERVER_ERROR"), reply
        assert len(last_acknowledged) > 20
        cluster.network.set_faults(Faults())
        await trio.sleep(5)
        for key, acknowledged_at in last_acknowledged.items():
            reply = await cluster.request(rng.randrange(3), b"get %s\r\n" % key, all_siblings=True)
            shown = reply.split(b"\r\n")[1:-2:2]
            assert shown, (key, reply)
            # Only attempted values appear, and the acknowledged write was not lost: what is
            # visible is that write or one attempted after it.
            positions = [attempts[key].index(value) for value in shown]
            assert max(positions) >= acknowledged_at, (key, shown, attempts[key][acknowledged_at])


async def test_flush_all_reaches_every_node_even_one_that_was_down(autojump_clock) -> None:
    async with InProcessCluster.running(3) as cluster:
        assert await cluster.request(0, b"set k 0 0 1\r\nx\r\n") == b"STORED\r\n"
        cluster.crash(2)
        assert await cluster.request(0, b"flush_all\r\n") == b"OK\r\n"
        assert await cluster.request(1, b"get k\r\n") == b"END\r\n"
        await cluster.start_node(2)  # it missed the flush: gossip brings it
        with trio.fail_after(30):
            while not cluster.nodes[2].replica.flush_times:  # noqa: ASYNC110 - set by gossip
                await trio.sleep(0.1)
        assert await cluster.request(2, b"get k\r\n") == b"END\r\n"
        # Its own replica, read directly, holds only a version the flush hides.
        (version,) = cluster.nodes[2].replica.read(b"k")
        assert not version.is_live(
            cluster.wall_clock(), cluster.nodes[2].replica.flushed_before(cluster.wall_clock())
        )
        assert await cluster.request(2, b"set k 0 0 1\r\ny\r\n") == b"STORED\r\n"
        assert await cluster.request(0, b"get k\r\n") == b"VALUE k 0 1\r\ny\r\nEND\r\n"


async def test_a_healthy_cluster_answers_as_memcached_does(autojump_clock) -> None:
    """The same requests as the node-of-one model test, through random nodes of a 3-node
    cluster (N=3, R=2, W=2): the replies are memcached's, whichever node coordinates."""
    rng = random.Random(7)
    async with InProcessCluster.running(3) as cluster:
        model = MemcachedModel(FakeClock(cluster.wall_clock()))
        for _step in range(300):
            raw = rng.choice(MIX)
            # Time passes between requests, as it does for real clients: the nodes' write
            # stamps never run ahead of each other's clocks by more than a microsecond or so
            # (a flush_all is only as sharp as the members' clocks agree).
            await trio.sleep(0.001 if rng.random() < 0.8 else rng.choice([0.5, 1.0]))
            model.clock.now = cluster.wall_clock()
            reply = await cluster.request(rng.randrange(3), raw)
            assert reply == model.reply(parse_one(raw)), raw
