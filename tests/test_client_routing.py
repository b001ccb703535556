"""kai.client's routing: a key's primaries are the ring's, failed nodes go last, the ring is
read again when due. Pure and deterministic: rings and keys come from seeded generators,
times are plain numbers."""

from __future__ import annotations

import math
import random

import pytest

from kai.client.records import Address, RingDescription, RingMember
from kai.client.routing import FAILED_FOR, RING_RETRY_AFTER, Router, ring_of
from kai.core.ring import NodeId, Ring

SEEDS = (Address("127.0.0.1", 11211),)


def describe(
    count: int,
    *,
    replicas: int = 3,
    buckets: int = 64,
    virtual_nodes: int = 16,
    unaddressed: frozenset[int] = frozenset(),
    fingerprint: str = "f",
) -> RingDescription:
    """A ring of ``count`` nodes; node i has RPC port 7000+i and memcached port 11000+i."""
    return RingDescription(
        fingerprint,
        buckets,
        virtual_nodes,
        min(replicas, count),
        tuple(
            RingMember(
                NodeId("127.0.0.1", 7000 + index),
                None if index in unaddressed else Address("127.0.0.1", 11000 + index),
            )
            for index in range(count)
        ),
    )


def address_of(node: NodeId) -> Address:
    return Address("127.0.0.1", node.port - 7000 + 11000)


def routed(description: RingDescription, now: float = 0.0) -> Router:
    router = Router(SEEDS, refresh_interval=10.0)
    router.ring_described(description, now)
    return router


def test_a_keys_primaries_are_the_rings_own_for_seeded_rings_and_keys() -> None:
    rng = random.Random(20261204)
    for _ in range(40):
        count = rng.randint(1, 7)
        hosts = {f"127.0.{rng.randint(0, 3)}.{rng.randint(1, 254)}" for _ in range(count)}
        nodes = [NodeId(host, rng.randint(1024, 65535)) for host in hosts]
        buckets = 2 ** rng.randint(0, 12)
        virtual_nodes = rng.randint(1, 64)
        n = rng.randint(1, 5)
        rng.shuffle(nodes)  # the order a node lists them in does not matter
        description = RingDescription(
            "f",
            buckets,
            virtual_nodes,
            min(n, len(nodes)),
            tuple(RingMember(node, Address(node.host, node.port + 1)) for node in nodes),
        )
        router = routed(description)
        server_ring = Ring(nodes, buckets=buckets, virtual_nodes=virtual_nodes)
        assert ring_of(description) == server_ring
        for _ in range(25):
            key = rng.randbytes(rng.randint(1, 40))
            primaries = server_ring.primaries_of(key, n)
            assert tuple(member.node for member in router.primaries(key)) == primaries
            candidates = router.candidates(key, now=0.0)
            assert candidates[: len(primaries)] == tuple(
                Address(node.host, node.port + 1) for node in primaries
            )
            preference = server_ring.preference_list(server_ring.partition_for_key(key))
            assert candidates == tuple(Address(node.host, node.port + 1) for node in preference)


def test_a_failed_primary_goes_last_until_its_time_is_up() -> None:
    router = routed(describe(5))
    key = b"cart:42"
    first, second, third, *others = router.candidates(key, now=0.0)
    router.node_failed(first, now=100.0)
    assert router.candidates(key, now=100.0) == (second, third, *others, first)
    router.node_failed(second, now=101.0)
    assert router.candidates(key, now=101.0) == (third, *others, first, second)
    assert router.candidates(key, now=100.0 + FAILED_FOR) == (first, third, *others, second)
    assert router.candidates(key, now=101.0 + FAILED_FOR) == (first, second, third, *others)


def test_a_node_that_answers_is_not_failed_any_more() -> None:
    router = routed(describe(3))
    first, *rest = router.candidates(b"k", now=0.0)
    router.node_failed(first, now=0.0)
    assert router.is_failed(first, now=1.0)
    router.node_answered(first)
    assert not router.is_failed(first, now=1.0)
    assert router.candidates(b"k", now=1.0) == (first, *rest)


def test_nodes_whose_address_is_not_known_are_never_tried() -> None:
    router = routed(describe(4, unaddressed=frozenset({0, 2})))
    for key in (b"a", b"b", b"c", b"d"):
        candidates = router.candidates(key, now=0.0)
        assert set(candidates) == {Address("127.0.0.1", 11001), Address("127.0.0.1", 11003)}
        assert len(candidates) == 2
        assert {member.node.port for member in router.primaries(key)} <= {7000, 7001, 7002, 7003}


def test_without_a_ring_requests_go_to_the_seeds_failed_ones_last() -> None:
    seeds = [Address("127.0.0.1", 11211), Address("127.0.0.1", 11212), Address("127.0.0.1", 11211)]
    router = Router(seeds)
    assert router.description is None
    assert router.candidates(b"k", now=0.0) == tuple(seeds[:2])
    router.node_failed(seeds[0], now=0.0)
    assert router.candidates(b"k", now=0.0) == (seeds[1], seeds[0])
    assert router.primaries(b"k") == ()
    router.ring_described(describe(0), now=0.0)  # a ring without nodes is no help
    assert router.candidates(b"k", now=0.0) == (seeds[1], seeds[0])


def test_a_request_about_no_key_goes_to_the_rings_nodes() -> None:
    router = routed(describe(3))
    assert router.candidates(None, now=0.0) == tuple(
        Address("127.0.0.1", 11000 + index) for index in range(3)
    )


def test_the_ring_is_asked_for_from_its_nodes_then_the_seeds_failed_ones_last() -> None:
    router = Router(SEEDS)
    assert router.ring_sources(now=0.0) == SEEDS
    router.ring_described(describe(2), now=0.0)
    nodes = (Address("127.0.0.1", 11000), Address("127.0.0.1", 11001))
    assert router.ring_sources(now=0.0) == (*nodes, *SEEDS)
    router.node_failed(nodes[0], now=0.0)
    assert router.ring_sources(now=0.0) == (nodes[1], *SEEDS, nodes[0])


def test_the_ring_is_read_at_first_use_then_every_refresh_interval() -> None:
    router = Router(SEEDS, refresh_interval=10.0)
    assert router.claim_refresh(now=0.0)
    assert router.claim_refresh(now=0.0)  # without a ring every caller asks
    router.ring_described(describe(3), now=0.5)
    assert not router.claim_refresh(now=10.4)
    assert router.claim_refresh(now=10.5)
    # One caller at a time: the others go on with the ring they have.
    assert not router.claim_refresh(now=10.5)
    assert not router.claim_refresh(now=10.5 + RING_RETRY_AFTER - 0.01)
    assert router.claim_refresh(now=10.5 + RING_RETRY_AFTER)


def test_the_ring_is_read_again_after_a_node_fails_and_soon_after_no_node_described_it() -> None:
    router = routed(describe(3), now=0.0)
    assert not router.claim_refresh(now=1.0)
    router.node_failed(Address("127.0.0.1", 11000), now=2.0)
    assert router.claim_refresh(now=2.0)
    router.ring_unavailable(now=2.0)
    assert not router.claim_refresh(now=2.0 + RING_RETRY_AFTER - 0.01)
    assert router.claim_refresh(now=2.0 + RING_RETRY_AFTER)


def test_a_new_description_replaces_the_ring() -> None:
    router = routed(describe(3))
    router.ring_described(describe(4, fingerprint="g"), now=1.0)
    assert router.description == describe(4, fingerprint="g")
    assert len(router.candidates(b"k", now=1.0)) == 4


@pytest.mark.parametrize(
    ("seeds", "settings"),
    [
        ((), {}),
        (SEEDS, {"refresh_interval": 0}),
        (SEEDS, {"refresh_interval": math.nan}),
        (SEEDS, {"failed_for": -1}),
    ],
)
def test_a_router_refuses_settings_it_cannot_route_with(
    seeds: tuple[Address, ...], settings: dict[str, float]
) -> None:
    with pytest.raises(ValueError, match=r"give at least one|need refresh_interval"):
        Router(seeds, **settings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:11211", Address("127.0.0.1", 11211)),
        ("localhost:1", Address("localhost", 1)),
        ("[::1]:11211", Address("::1", 11211)),
    ],
)
def test_addresses_parse_and_print_back(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["127.0.0.1", ":11211", "host:", "host:0", "host:65536", "a b:1"])
def test_an_address_that_is_not_host_port_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"host|port"):
        Address.parse(text)
