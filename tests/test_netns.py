"""The network-namespace lab's pure helpers: names, subnets, partition rules (no root needed).

The lab itself is exercised by tests/system/test_partition_healing.py.
"""

from __future__ import annotations

import pytest

from kai.testing.netns import (
    MAX_INTERFACE_NAME,
    PARTITION_CHAIN,
    NetnsError,
    drop_rules,
    lab_names,
    lab_run_id,
    pick_subnet,
)

ADDRESSES = ["10.213.9.1", "10.213.9.2", "10.213.9.3"]


def test_names_are_unique_per_run_and_fit_linux_interface_names() -> None:
    bridge, namespaces, root_sides, node_sides = lab_names(4_194_304, 9)
    names = [bridge, *root_sides, *node_sides]
    assert max(len(name) for name in names) <= MAX_INTERFACE_NAME
    assert len(set(names)) == len(names)
    assert len(set(namespaces)) == 9
    other = lab_names(4_194_305, 9)
    assert not {bridge, *namespaces, *root_sides} & {other[0], *other[1], *other[2]}


def test_names_too_long_for_linux_are_refused() -> None:
    with pytest.raises(ValueError, match="over 15 characters"):
        lab_names(1_234_567_890_123, 3)


def test_every_name_a_lab_makes_carries_its_run_id() -> None:
    bridge, namespaces, root_sides, node_sides = lab_names(31337, 3)
    for name in [bridge, *namespaces, *root_sides, *node_sides]:
        assert lab_run_id(name) == 31337, name
    assert lab_run_id("kai-31337-probe") == 31337
    assert lab_run_id("k31337pb") == 31337
    for foreign in ("eth0", "lo", "docker0", "kai-x-n1", "k12", "kai-1-n1x", "veth1234"):
        assert lab_run_id(foreign) is None, foreign


def test_a_subnet_in_use_is_skipped() -> None:
    assert pick_subnet(0, "") == "10.213.1"
    assert pick_subnet(253, "") == "10.213.254"
    in_use = "4: k1br    inet 10.213.1.254/24 scope global k1br\n10.213.2.0/24 dev x\n"
    assert pick_subnet(0, in_use) == "10.213.3"
    # Only a whole third octet counts: 10.213.10.x does not take 10.213.1.
    assert pick_subnet(0, "inet 10.213.10.254/24") == "10.213.1"


def test_no_free_subnet_says_what_to_do() -> None:
    every = " ".join(f"10.213.{third}.1" for third in range(1, 255))
    with pytest.raises(NetnsError, match="remove a stale lab"):
        pick_subnet(7, every)


def test_isolating_a_node_drops_both_ways_on_both_sides() -> None:
    rules = drop_rules(ADDRESSES, [[0, 1], [2]])
    as_text = {" ".join(rule) for rule in rules}
    chain = PARTITION_CHAIN
    assert as_text == {
        f"0 -A {chain} -s 10.213.9.3 -j DROP",
        f"0 -A {chain} -d 10.213.9.3 -j DROP",
        f"1 -A {chain} -s 10.213.9.3 -j DROP",
        f"1 -A {chain} -d 10.213.9.3 -j DROP",
        f"2 -A {chain} -s 10.213.9.1 -j DROP",
        f"2 -A {chain} -d 10.213.9.1 -j DROP",
        f"2 -A {chain} -s 10.213.9.2 -j DROP",
        f"2 -A {chain} -d 10.213.9.2 -j DROP",
    }
    assert len(rules) == len(as_text)


def test_one_group_drops_nothing() -> None:
    assert drop_rules(ADDRESSES, [[0, 1, 2]]) == []


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([[0, 1]], r"nodes \[2\] are in no group"),
        ([[0, 1], [1, 2]], "node 1 is in two groups"),
        ([[0, 1, 2], [3]], "node 3 is not one of the 3 nodes"),
    ],
)
def test_groups_must_cover_every_node_once(groups: list[list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        drop_rules(ADDRESSES, groups)
