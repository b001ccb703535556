"""Conditional writes through a five-node cluster, in virtual time: decided once, at the key's
coordinating primary, so no acknowledged write is lost to another client's (the issue's
scenario: two cas with one token, each through a node that is not a primary of the key)."""

from __future__ import annotations

import trio

from kai.core.config import Quorum
from kai.testing.cluster import InProcessCluster


def token_of(reply: bytes) -> int:
    return int(reply.split(b"\r\n")[0].split()[-1])


def values_of(reply: bytes) -> list[bytes]:
    """The values of a get reply's VALUE lines, in order."""
    return reply.split(b"\r\n")[1:-2:2]


def roles(cluster: InProcessCluster, key: bytes) -> tuple[list[int], list[int]]:
    """The indexes of ``key``'s primaries (in preference order) and of the other nodes."""
    ring = cluster.nodes[0].cluster.ring()
    index_of = {cluster.node_id(index): index for index in range(len(cluster.nodes))}
    primaries = [index_of[node] for node in ring.primaries_of(key, 3)]
    others = [index for index in range(len(cluster.nodes)) if index not in primaries]
    return primaries, others


async def cas_both(
    cluster: InProcessCluster, key: bytes, through: dict[bytes, int], token: int
) -> dict[bytes, bytes]:
    """Send ``cas key`` with one token, each value through its node, at the same moment."""
    replies: dict[bytes, bytes] = {}

    async def cas(value: bytes, index: int) -> None:
        request = b"cas %s 0 0 %d %d\r\n%s\r\n" % (key, len(value), token, value)
        replies[value] = await cluster.request(index, request)

    async with trio.open_nursery() as nursery:
        for value, index in through.items():
            nursery.start_soon(cas, value, index)
    return replies


async def test_two_cas_with_one_token_through_two_non_primaries_store_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"cart"
    async with InProcessCluster.running(5) as cluster:
        primaries, (x, y) = roles(cluster, key)
        assert await cluster.request(x, b"set cart 0 0 4\r\nbase\r\n") == b"STORED\r\n"
        token = token_of(await cluster.request(x, b"gets cart\r\n"))
        assert token_of(await cluster.request(y, b"gets cart\r\n")) == token
        replies = await cas_both(cluster, key, {b"from-x": x, b"from-y": y}, token)
        assert sorted(replies.values()) == [b"EXISTS\r\n", b"STORED\r\n"]
        (winner,) = (value for value, reply in replies.items() if reply == b"STORED\r\n")
        await trio.sleep(1)  # replication to the last primary, in virtual time
        for index in range(5):
            reply = await cluster.request(index, b"gets cart\r\n", all_siblings=True)
            assert values_of(reply) == [winner], index
        for index in primaries:
            assert [v.value for v in cluster.nodes[index].replica.read(key)] == [winner]
        # Both writes were decided by the first primary; neither node coordinated one.
        stats = [dict(node.cluster.coordinator.statistics()) for node in cluster.nodes]
        assert stats[x]["kai_forwarded_writes"] == 2  # the set and the cas
        assert stats[y]["kai_forwarded_writes"] == 1


async def test_two_cas_through_two_primaries_also_store_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The second primary does not decide on its own: it forwards to the first.
    key = b"cart"
    async with InProcessCluster.running(5) as cluster:
        (first, second, third), _others = roles(cluster, key)
        assert await cluster.request(third, b"set cart 0 0 4\r\nbase\r\n") == b"STORED\r\n"
        token = token_of(await cluster.request(third, b"gets cart\r\n"))
        replies = await cas_both(cluster, key, {b"at-2": second, b"at-3": third}, token)
        assert sorted(replies.values()) == [b"EXISTS\r\n", b"STORED\r\n"]
        assert (
            dict(cluster.nodes[first].cluster.coordinator.statistics())["kai_forwarded_writes"] == 0
        )


async def test_primaries_cut_apart_both_decide_and_their_writes_become_siblings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With the first primary cut off from the others, each side has a primary that is up to
    # it: both accept the cas (R=W=1 lets a side of one decide), and nothing is lost: after
    # the heal the two writes are siblings, and one cas of both resolves them.
    key = b"cart"
    async with InProcessCluster.running(5, quorum=Quorum(3, 1, 1)) as cluster:
        (first, second, third), (x, y) = roles(cluster, key)
        assert await cluster.request(x, b"set cart 0 0 4\r\nbase\r\n") == b"STORED\r\n"
        await trio.sleep(1)  # every primary holds "base"
        token = token_of(await cluster.request(x, b"gets cart\r\n"))
        cluster.partition([first, x], [second, third, y])
        first_id = cluster.node_id(first)
        with trio.fail_after(30):
            # y's side must see the first primary down before it fails over to the second.
            while cluster.nodes[y].cluster.detector.is_up(first_id):  # noqa: ASYNC110
                await trio.sleep(0.1)
        replies = await cas_both(cluster, key, {b"left": x, b"right": y}, token)
        assert replies == {b"left": b"STORED\r\n", b"right": b"STORED\r\n"}
        cluster.heal()
        await trio.sleep(5)  # gossip sees everyone up again
        reply = await cluster.request(y, b"gets cart\r\n", all_siblings=True)
        assert sorted(values_of(reply)) == [b"left", b"right"]
        await trio.sleep(1)  # read repair brings the first primary both (it decides on R=1)
        resolved = b"cas cart 0 0 4 %d\r\nboth\r\n" % token_of(reply)
        assert await cluster.request(x, resolved) == b"STORED\r\n"
        await trio.sleep(1)
        for index in (first, second, third):
            assert [v.value for v in cluster.nodes[index].replica.read(key)] == [b"both"]


async def test_concurrent_increments_through_every_node_all_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # incr reads, adds and writes at the coordinating primary: 25 concurrent increments
    # through all five nodes give 25, and each client saw a distinct number.
    async with InProcessCluster.running(5) as cluster:
        assert await cluster.request(0, b"set hits 0 0 1\r\n0\r\n") == b"STORED\r\n"
        seen: list[int] = []

        async def increment(index: int) -> None:
            reply = await cluster.request(index, b"incr hits 1\r\n")
            seen.append(int(reply))

        async with trio.open_nursery() as nursery:
            for count in range(25):
                nursery.start_soon(increment, count % 5)
        assert sorted(seen) == list(range(1, 26))
        assert await cluster.request(3, b"get hits\r\n") == b"VALUE hits 0 2\r\n25\r\nEND\r\n"
