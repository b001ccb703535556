"""kai.client against real nodes: a cluster of three processes on loopback (N=2, R=2, W=2).

N is below the node count, so a third of the keys have each node as a non-primary and
routing shows: writes the client sends are never forwarded (``kai_forwarded_writes`` stays
put on every node), while the same writes sent with pymemcache to a non-primary are. Both
flavours round-trip get, put, delete and update; two puts in one context leave two siblings
that an ``update`` with a union merge resolves into one. A killed node is failed over, and
the errors say whether a retry can help; the client reads the ring again after a node joins.
Every wait has a deadline; every process is stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio

from kai.client import (
    AsyncClient,
    Client,
    ClientError,
    ConnectionFailed,
    Context,
    ServerError,
    Sibling,
)
from kai.client.records import Address
from kai.core.ring import NodeId, Ring

from .conftest import RawConnection, make_client, wait_for
from .test_elastic import settled_with
from .test_healing import BUCKETS, Nodes, config

pytestmark = pytest.mark.system

#: A node gives up on a quorum after this long; the client waits longer, so it hears why.
REQUEST_TIMEOUT_MS = 2000
CLIENT_TIMEOUT = 3 * REQUEST_TIMEOUT_MS / 1000
SETTINGS = config(quorum='"2,2,2"', request_timeout=REQUEST_TIMEOUT_MS)
N = 2


def ring_addresses_known(nodes: Nodes, indexes: Sequence[int]) -> bool:
    """Whether every node ``indexes`` lists the memcached address of every node in its
    ``stats kai_ring`` (a node publishes its own; the others learn it by gossip)."""
    for index in indexes:
        with RawConnection(nodes[index].port) as connection:
            reply = connection.request(b"stats kai_ring\r\n", terminator=b"END\r\n")
        node_lines = [line for line in reply.split(b"\r\n") if line.startswith(b"STAT node ")]
        if len(node_lines) != len(indexes) or any(line.endswith(b" -") for line in node_lines):
            return False
    return True


def wait_ready(nodes: Nodes, indexes: Sequence[int]) -> None:
    wait_for(
        lambda: settled_with(nodes, indexes, indexes) and ring_addresses_known(nodes, indexes),
        timeout=60,
        interval=0.1,
        what=f"nodes {list(indexes)} to settle and publish their memcached addresses",
    )


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Three running nodes, room for a fourth."""
    cluster = Nodes(tmp_path, 4, SETTINGS)
    try:
        for index in range(3):
            cluster.start(index)
        wait_ready(cluster, range(3))
        yield cluster
    finally:
        cluster.stop_all()


def seeds(nodes: Nodes, indexes: Sequence[int] = (0,)) -> list[str]:
    return [f"127.0.0.1:{nodes[index].port}" for index in indexes]


def forwarded_writes(nodes: Nodes, indexes: Sequence[int]) -> int:
    return sum(int(nodes.stats(index)["kai_forwarded_writes"]) for index in indexes)


def primaries_by_index(nodes: Nodes, members: Sequence[int], key: bytes) -> list[int]:
    """The indexes of ``key``'s primaries, by the ring of the nodes ``members``."""
    by_id = {nodes.node_id(index): index for index in members}
    ring = Ring(by_id, buckets=BUCKETS)
    return [by_id[node] for node in ring.primaries_of(key, N)]


def union(siblings: Sequence[Sibling]) -> bytes:
    items: set[bytes] = set()
    for sibling in siblings:
        items |= set(sibling.value.split(b","))
    return b",".join(sorted(items - {b""}))


def adding(item: bytes) -> Callable[[bytes | None], bytes]:
    return lambda current: union([Sibling(current or b""), Sibling(item)])


def test_get_put_delete_and_update_round_trip(nodes: Nodes) -> None:
    with Client(seeds(nodes), timeout=CLIENT_TIMEOUT) as client:
        fetched = client.get("cart:1")
        assert fetched.siblings == ()
        context = client.put("cart:1", b"book", context=fetched.context, flags=12, ttl=3600)
        assert isinstance(context, Context)
        (sibling,) = client.get("cart:1").siblings
        assert (sibling.value, sibling.flags) == (b"book", 12)
        assert sibling.ttl is not None
        assert 3500 < sibling.ttl <= 3600
        assert client.update("cart:1", adding(b"pen"), merge=union) == b"book,pen"
        assert client.get("cart:1").values == (b"book,pen",)
        client.delete("cart:1", context=client.get("cart:1").context)
        assert client.get("cart:1").siblings == ()
        # A key memcached would refuse travels in base64, and reads back the same.
        odd = "a key with spaces\tand a tab"
        client.put(odd, b"odd", context=client.get(odd).context)
        assert client.get(odd).values == (b"odd",)


async def test_the_trio_client_round_trips_too(nodes: Nodes) -> None:
    async with AsyncClient(seeds(nodes), timeout=CLIENT_TIMEOUT) as client:
        fetched = await client.get(b"cart:2")
        await client.put(b"cart:2", b"lamp", context=fetched.context)
        assert (await client.get(b"cart:2")).values == (b"lamp",)
        assert await client.update(b"cart:2", adding(b"mug"), merge=union) == b"lamp,mug"
        await client.delete(b"cart:2", context=(await client.get(b"cart:2")).context)
        assert (await client.get(b"cart:2")).siblings == ()


def test_two_puts_in_one_context_are_siblings_and_update_merges_them(nodes: Nodes) -> None:
    with Client(seeds(nodes, [1]), timeout=CLIENT_TIMEOUT) as client:
        client.put("cart:3", b"book", context=client.get("cart:3").context)
        seen = client.get("cart:3")
        client.put("cart:3", b"book,lamp", context=seen.context)  # one tab
        client.put("cart:3", b"book,mug", context=seen.context)  # the other, concurrently
        siblings = client.get("cart:3").siblings
        assert sorted(sibling.value for sibling in siblings) == [b"book,lamp", b"book,mug"]
        written = client.update("cart:3", adding(b"pen"), merge=union)
        assert written == b"book,lamp,mug,pen"
        assert client.get("cart:3").values == (written,)
        # A put without a context supersedes nothing: it is a sibling of what is there.
        client.put("cart:3", b"stray")
        assert sorted(client.get("cart:3").values) == [written, b"stray"]


def test_writes_the_client_sends_are_never_forwarded_unlike_writes_to_a_non_primary(
    nodes: Nodes,
) -> None:
    everyone = range(3)
    keys = [b"routed:%03d" % number for number in range(60)]
    before = forwarded_writes(nodes, everyone)
    with Client(seeds(nodes), timeout=CLIENT_TIMEOUT) as client:
        for key in keys:
            client.put(key, b"v", context=client.get(key).context)
        assert client.router.description is not None
        assert len(client.router.description.members) == 3
        for key in keys:
            ports = [
                member.address.port for member in client.router.primaries(key) if member.address
            ]
            assert ports == [nodes[i].port for i in primaries_by_index(nodes, everyone, key)]
    assert forwarded_writes(nodes, everyone) == before

    sent_to_non_primary = 0
    for key in keys:
        non_primary = next(i for i in everyone if i not in primaries_by_index(nodes, everyone, key))
        memcache = make_client(nodes[non_primary].port)
        try:
            assert memcache.set(key, b"w") is True
        finally:
            memcache.close()
        sent_to_non_primary += 1
    assert forwarded_writes(nodes, everyone) - before == sent_to_non_primary > 0


def test_a_killed_node_is_failed_over_and_errors_say_whether_a_retry_can_help(
    nodes: Nodes,
) -> None:
    everyone = range(3)
    on_node_2 = [
        key
        for key in (b"victim:%03d" % number for number in range(200))
        if primaries_by_index(nodes, everyone, key)[0] == 2
    ][:10]
    assert on_node_2
    dead = Address("127.0.0.1", nodes[2].port)
    with Client(seeds(nodes, everyone), timeout=CLIENT_TIMEOUT) as client:
        for key in on_node_2:
            client.put(key, b"before", context=client.get(key).context)
        nodes.kill(2)
        wait_for(
            lambda: all(str(nodes.node_id(2)) in nodes.stats(i)["kai_down_nodes"] for i in (0, 1)),
            timeout=30,
            what="the survivors to see node 3 down",
        )
        for key in on_node_2:  # the first primary refuses: the next one coordinates
            assert client.get(key).values == (b"before",)
            client.put(key, b"after", context=client.get(key).context)
            assert client.get(key).values == (b"after",)
        assert client.router.is_failed(dead, time.monotonic())

        # One node left of three: no write quorum (W=2) even with a stand-in.
        context = client.get(on_node_2[0]).context
        nodes.kill(1)
        with pytest.raises(ServerError) as raised:
            client.put(on_node_2[0], b"alone", context=context)
        assert raised.value.outcome_unknown  # the write may have landed on the survivor
        assert not raised.value.retryable

        with pytest.raises(ClientError, match="bad causal context") as refused:
            client.put(on_node_2[0], b"x", context=Context(b"bm90LWEtY29udGV4dA"))
        assert not refused.value.retryable
        assert not refused.value.outcome_unknown

        nodes.kill(0)
        with pytest.raises(ConnectionFailed) as unreachable:
            client.put(on_node_2[0], b"nobody")
        assert unreachable.value.retryable  # nothing was sent anywhere


def test_the_client_reads_the_ring_again_after_a_node_joins(nodes: Nodes) -> None:
    with Client(seeds(nodes), timeout=CLIENT_TIMEOUT, ring_refresh=0.5) as client:
        client.get("k")
        first = client.router.description
        assert first is not None
        assert len(first.members) == 3
        nodes.start(3)
        wait_ready(nodes, range(4))

        def sees_four() -> bool:
            client.get("k")  # reads the ring when it is due
            description = client.router.description
            return description is not None and len(description.members) == 4

        wait_for(sees_four, timeout=30, what="the client to read the ring of four")
        description = client.router.description
        assert description is not None
        assert description.fingerprint != first.fingerprint
        assert NodeId.parse(str(nodes.node_id(3))) in {m.node for m in description.members}

        before = forwarded_writes(nodes, range(4))
        for number in range(40):
            key = b"grown:%03d" % number
            client.put(key, b"v", context=client.get(key).context)
        assert forwarded_writes(nodes, range(4)) == before


def test_the_trio_client_fails_over_a_killed_node(nodes: Nodes) -> None:
    everyone = range(3)
    key = next(
        key
        for key in (b"async-victim:%03d" % number for number in range(200))
        if primaries_by_index(nodes, everyone, key)[0] == 1
    )

    async def main() -> None:
        async with AsyncClient(seeds(nodes, everyone), timeout=CLIENT_TIMEOUT) as client:
            await client.put(key, b"before", context=(await client.get(key)).context)
            nodes.kill(1)
            await trio.to_thread.run_sync(
                lambda: wait_for(
                    lambda: all(
                        str(nodes.node_id(1)) in nodes.stats(i)["kai_down_nodes"] for i in (0, 2)
                    ),
                    timeout=30,
                    what="the survivors to see node 2 down",
                )
            )
            assert (await client.get(key)).values == (b"before",)
            await client.put(key, b"after", context=(await client.get(key)).context)
            assert (await client.get(key)).values == (b"after",)

    trio.run(main)
