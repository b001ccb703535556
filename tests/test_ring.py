"""Tests for the consistent-hash ring: Kai's golden values, laws, balance and validation."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kai.core.ring import (
    HASH_SPACE,
    NodeId,
    Ring,
    key_hash,
    node_tokens,
    partition_of,
)

N1 = NodeId("127.0.0.1", 11011)
N2 = NodeId("127.0.0.2", 11011)
N3 = NodeId("127.0.0.3", 11011)


# --- Golden values from the original Kai's kai_hash_SUITE --------------------------------


def test_golden_tokens() -> None:
    assert set(node_tokens(N1, 2)) == {2311136591, 3495790055}
    assert set(node_tokens(N2, 2)) == {1471129163, 2213434410}
    assert set(node_tokens(N3, 2)) == {401940458, 1548361913}


def test_golden_key_hashes_and_partitions() -> None:
    ring = Ring([N1, N2, N3], buckets=4, virtual_nodes=2)
    assert key_hash(b"key1") == 3266172564
    assert key_hash(b"key2") == 2029528490
    assert key_hash(b"key3") == 909203333
    assert ring.partition_for_key(b"key1") == 3
    assert ring.partition_for_key(b"key2") == 1
    assert ring.partition_for_key(b"key3") == 0
    assert partition_of(3266172564, 4) == 3


def test_golden_preference_lists() -> None:
    ring = Ring([N1, N2, N3], buckets=4, virtual_nodes=2)
    assert [ring.primaries(partition, 2) for partition in range(4)] == [
        (N3, N2),
        (N2, N3),
        (N2, N1),
        (N1, N3),
    ]
    # The full lists continue with the one remaining member as the fallback.
    assert ring.preference_list(0) == (N3, N2, N1)
    assert ring.preference_list(3) == (N1, N3, N2)
    ring.check_invariants()


def test_walk_starts_strictly_after_the_partition_start_and_wraps() -> None:
    # With 2**32 buckets every ring position starts a partition, so a partition can start
    # exactly on a token. Clockwise order of the golden tokens:
    # 401940458 n3, 1471129163 n2, 1548361913 n3, 2213434410 n2, 2311136591 n1, 3495790055 n1.
    ring = Ring([N1, N2, N3], buckets=HASH_SPACE, virtual_nodes=2)
    assert ring.preference_list(2213434409) == (N2, N1, N3)
    assert ring.preference_list(2213434410) == (N1, N3, N2)  # not n2: strictly after
    assert ring.preference_list(1471129163) == (N3, N2, N1)
    assert ring.preference_list(3495790055) == (N3, N2, N1)  # wraps round to the smallest
    assert ring.preference_list(HASH_SPACE - 1) == (N3, N2, N1)
    assert ring.preference_list(0) == (N3, N2, N1)


def test_token_collision_breaks_ties_by_node_order() -> None:
    # A real MD5 collision, found by search: 10.0.0.15:11011 token 3333 and
    # 10.0.0.25:11011 token 2980 are both 585681746.
    low, high = NodeId("10.0.0.15", 11011), NodeId("10.0.0.25", 11011)
    collision = 585681746
    assert node_tokens(low, 3333)[3332] == collision
    assert node_tokens(high, 2980)[2979] == collision
    # With 2**32 buckets, partition 585681745 starts one position before the shared token,
    # so its walk meets the two equal tokens first; the member that sorts first wins.
    for order in ([low, high], [high, low]):
        ring = Ring(order, buckets=HASH_SPACE, virtual_nodes=3333)
        assert ring.preference_list(collision - 1) == (low, high)
        assert ring.tokens.count((collision, low)) == 1
        assert ring.tokens.count((collision, high)) == 1


# --- NodeId ------------------------------------------------------------------------------


def test_node_id_str_and_parse_round_trip() -> None:
    node = NodeId.parse("192.168.1.20:11011")
    assert node == NodeId("192.168.1.20", 11011)
    assert str(node) == "192.168.1.20:11011"
    assert NodeId.parse(str(N1)) == N1
    assert NodeId.parse("10.0.0.1:1").port == 1
    assert NodeId.parse("10.0.0.1:65535").port == 65535


def test_node_id_orders_by_host_then_port() -> None:
    assert NodeId("10.0.0.1", 2) < NodeId("10.0.0.1", 10) < NodeId("10.0.0.2", 1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:",
        ":11011",
        "localhost:11011",
        "127.0.0:11011",
        "127.0.0.256:11011",
        "127.0.0.01:11011",
        "::1:11011",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:+80",
        "127.0.0.1:8o",
        "127.0.0.1:١٢٣",
        " 127.0.0.1:11011",
    ],
)
def test_node_id_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"IPv4|port"):
        NodeId.parse(text)


@pytest.mark.parametrize(
    ("host", "port"),
    [("example.com", 1), ("1.2.3.4", 0), ("1.2.3.4", 70000), ("1.2.3.4", True)],
)
def test_node_id_validates_on_construction(host: str, port: int) -> None:
    with pytest.raises(ValueError, match=r"IPv4|port"):
        NodeId(host, port)


# --- Ring validation ---------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [0, -4, 3, 6, 1000, 2**33, True])
def test_ring_rejects_bad_buckets(buckets: int) -> None:
    with pytest.raises(ValueError, match="buckets must be a power of two"):
        Ring([N1], buckets=buckets)


@pytest.mark.parametrize("virtual_nodes", [0, -1, 2**16, False])
def test_ring_rejects_bad_virtual_nodes(virtual_nodes: int) -> None:
    with pytest.raises(ValueError, match="virtual_nodes must be"):
        Ring([N1], virtual_nodes=virtual_nodes)
    with pytest.raises(ValueError, match="virtual_nodes must be"):
        node_tokens(N1, virtual_nodes)


def test_ring_rejects_bad_partition_and_n() -> None:
    ring = Ring([N1, N2], buckets=8, virtual_nodes=4)
    for partition in (-1, 8):
        with pytest.raises(ValueError, match="partition must be in range"):
            ring.preference_list(partition)
    with pytest.raises(ValueError, match="replica count"):
        ring.primaries(0, 0)


def test_ring_edge_cases() -> None:
    empty = Ring([], buckets=4)
    assert empty.nodes == ()
    assert empty.preference_list(3) == ()
    empty.check_invariants()
    single = Ring([N1], buckets=1, virtual_nodes=1)
    assert single.partition_for_key(b"anything") == 0
    assert single.primaries(0, 3) == (N1,)
    # Duplicates count once; adding a member or removing a non-member is a no-op.
    ring = Ring([N2, N1, N2], buckets=4, virtual_nodes=2)
    assert ring.nodes == (N1, N2)
    assert ring.with_node(N1) is ring
    assert ring.without_node(N3) is ring
    assert ring.with_node(N3) == Ring([N1, N2, N3], buckets=4, virtual_nodes=2)
    assert ring.with_node(N3).without_node(N3) == ring
    assert hash(ring) == hash(Ring([N1, N2], buckets=4, virtual_nodes=2))
    assert ring != Ring([N1, N2], buckets=8, virtual_nodes=2)
    assert repr(ring) == "Ring([127.0.0.1:11011, 127.0.0.2:11011], buckets=4, virtual_nodes=2)"


def test_preference_list_is_cached() -> None:
    ring = Ring([N1, N2, N3])
    assert ring.preference_list(7) is ring.preference_list(7)


def test_ring_module_stays_pure() -> None:
    code = (
        "import sys, kai.core.ring; "
        "print(sorted(m for m in ('trio', 'plyvel', 'socket', 'asyncio') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- Laws (Hypothesis) -------------------------------------------------------------------

# A small address pool makes shared hosts and ports, and so order ties, common.
node_ids = st.builds(
    NodeId,
    host=st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.10", "192.168.7.3", "172.16.0.9"]),
    port=st.sampled_from([1, 11011, 11012, 65535]),
)
node_sets = st.sets(node_ids, min_size=1, max_size=8)
ring_shapes = st.tuples(st.sampled_from([1, 2, 8, 32]), st.integers(1, 6))
replica_counts = st.integers(1, 5)


@given(nodes=node_sets, shape=ring_shapes, data=st.data())
def test_preference_lists_do_not_depend_on_node_order(
    nodes: set[NodeId], shape: tuple[int, int], data: st.DataObject
) -> None:
    buckets, virtual_nodes = shape
    shuffled = data.draw(st.permutations(sorted(nodes)))
    ring = Ring(sorted(nodes), buckets=buckets, virtual_nodes=virtual_nodes)
    other = Ring(shuffled, buckets=buckets, virtual_nodes=virtual_nodes)
    assert ring == other
    assert ring.tokens == other.tokens
    for partition in range(buckets):
        assert ring.preference_list(partition) == other.preference_list(partition)


@given(nodes=node_sets, shape=ring_shapes, n=replica_counts)
def test_preference_lists_hold_every_member_once_and_primaries_are_a_prefix(
    nodes: set[NodeId], shape: tuple[int, int], n: int
) -> None:
    buckets, virtual_nodes = shape
    ring = Ring(nodes, buckets=buckets, virtual_nodes=virtual_nodes)
    ring.check_invariants()
    for partition in range(buckets):
        preference_list = ring.preference_list(partition)
        assert len(set(preference_list)) == len(preference_list) == len(nodes)
        primaries = ring.primaries(partition, n)
        assert len(primaries) == min(n, len(nodes))
        assert preference_list[: len(primaries)] == primaries


@given(nodes=node_sets, shape=ring_shapes, n=replica_counts, key=st.binary(min_size=1, max_size=20))
def test_the_primaries_of_a_key_are_those_of_its_partition(
    nodes: set[NodeId], shape: tuple[int, int], n: int, key: bytes
) -> None:
    buckets, virtual_nodes = shape
    ring = Ring(nodes, buckets=buckets, virtual_nodes=virtual_nodes)
    assert ring.primaries_of(key, n) == ring.primaries(ring.partition_for_key(key), n)


@given(nodes=node_sets, shape=ring_shapes, key=st.binary(max_size=20))
def test_preference_list_starts_after_the_partition_start(
    nodes: set[NodeId], shape: tuple[int, int], key: bytes
) -> None:
    buckets, virtual_nodes = shape
    ring = Ring(nodes, buckets=buckets, virtual_nodes=virtual_nodes)
    partition = ring.partition_for_key(key)
    assert ring.partition_start(partition) <= key_hash(key)
    start = ring.partition_start(partition)
    # The first member owns the first token strictly after the start, wrapping to the
    # smallest token when none is larger.
    after = [entry for entry in ring.tokens if entry[0] > start]
    first_token, first_node = (after or list(ring.tokens))[0]
    assert ring.preference_list(partition)[0] == first_node
    assert first_token in node_tokens(first_node, virtual_nodes)


@given(nodes=node_sets, newcomer=node_ids, shape=ring_shapes, n=replica_counts)
def test_adding_a_node_only_inserts_it(
    nodes: set[NodeId], newcomer: NodeId, shape: tuple[int, int], n: int
) -> None:
    buckets, virtual_nodes = shape
    before = Ring(nodes - {newcomer}, buckets=buckets, virtual_nodes=virtual_nodes)
    after = before.with_node(newcomer)
    for partition in range(buckets):
        # The whole walk is the old walk with the newcomer inserted once.
        old_list = before.preference_list(partition)
        new_list = after.preference_list(partition)
        assert tuple(node for node in new_list if node != newcomer) == old_list
        # So per N-set: old primaries that stay keep their order, at most one leaves,
        # and any change is the newcomer coming in.
        old_primaries = before.primaries(partition, n)
        new_primaries = after.primaries(partition, n)
        staying = tuple(node for node in new_primaries if node != newcomer)
        assert old_primaries[: len(staying)] == staying
        assert len(set(old_primaries) - set(new_primaries)) <= 1
        assert set(new_primaries) - set(old_primaries) <= {newcomer}
        if set(new_primaries) != set(old_primaries):
            assert newcomer in new_primaries


@given(nodes=node_sets, shape=ring_shapes, n=replica_counts, data=st.data())
def test_removing_a_node_only_affects_its_partitions(
    nodes: set[NodeId], shape: tuple[int, int], n: int, data: st.DataObject
) -> None:
    buckets, virtual_nodes = shape
    leaver = data.draw(st.sampled_from(sorted(nodes)))
    before = Ring(nodes, buckets=buckets, virtual_nodes=virtual_nodes)
    after = before.without_node(leaver)
    for partition in range(buckets):
        old_list = before.preference_list(partition)
        assert after.preference_list(partition) == tuple(
            node for node in old_list if node != leaver
        )
        old_primaries = before.primaries(partition, n)
        new_primaries = after.primaries(partition, n)
        if leaver not in old_primaries:
            assert new_primaries == old_primaries
        else:
            # The leaver's place goes to the next fallback in line, if there is one.
            assert new_primaries == tuple(node for node in old_list[: n + 1] if node != leaver)[:n]


class RingMembershipMachine(RuleBasedStateMachine):
    """Members join and leave in any order; the ring always equals one built from scratch."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = Ring([], buckets=16, virtual_nodes=4)
        self.members: set[NodeId] = set()

    @rule(node=node_ids)
    def join(self, node: NodeId) -> None:
        self.ring = self.ring.with_node(node)
        self.members.add(node)

    @precondition(lambda self: bool(self.members))
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.members)))
        self.ring = self.ring.without_node(node)
        self.members.discard(node)

    @invariant()
    def ring_is_consistent(self) -> None:
        self.ring.check_invariants()
        assert self.ring == Ring(self.members, buckets=16, virtual_nodes=4)
        assert self.ring.tokens == Ring(self.members, buckets=16, virtual_nodes=4).tokens


TestRingMembership = RingMembershipMachine.TestCase
TestRingMembership.settings = settings(max_examples=50, stateful_step_count=20)


# --- Balance (seeded, fixed data) --------------------------------------------------------

# Each member's share of primary slots (N=3, 1024 partitions, 128 virtual nodes), for
# members 10.0.0.1..10.0.0.k on port 11011. Measured worst deviation from the mean:
#   3 members:  0.0%  (every member is a primary of every partition: 1024 each)
#   5 members:  7.3%  (590..659 slots against a mean of 614.4)
#   10 members: 6.4%  (289..327 slots against a mean of 307.2)
# With 128 tokens a member's share of the ring has a relative spread of about
# 1/sqrt(128) = 8.8%, and the three arcs of an N-set smooth that a little, so the 15% bound
# leaves about twice the measured worst case as margin while still catching a real
# regression (a broken token formula or walk typically skews shares by far more).
BALANCE_TOLERANCE = 0.15


@pytest.mark.parametrize("member_count", [3, 5, 10])
def test_primary_partitions_are_balanced(member_count: int) -> None:
    members = [NodeId(f"10.0.0.{index}", 11011) for index in range(1, member_count + 1)]
    ring = Ring(members, buckets=1024, virtual_nodes=128)
    shares = Counter(node for partition in range(1024) for node in ring.primaries(partition, 3))
    mean = 3 * 1024 / member_count
    assert set(shares) == set(members)
    for node, share in shares.items():
        assert abs(share - mean) <= BALANCE_TOLERANCE * mean, (node, share, mean)
