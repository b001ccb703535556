"""The laws of anti-entropy's hash trees (:mod:`kai.core.merkle`).

A tree kept current change by change equals the tree built from scratch of the final
contents, whatever the order of the changes and however a build interleaves with them; and
the segments (and keys) found to differ between two trees are exactly those of the keys
whose records differ.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from kai.core.merkle import (
    EMPTY_ROOT,
    SEGMENTS,
    HashTrees,
    differing_keys,
    differing_segments,
    entries_in,
    leaves_from_bytes,
    leaves_to_bytes,
    segment_of,
)

BUCKETS = 4

#: Contents of a node: partition -> key -> record.
Store = dict[int, dict[bytes, bytes]]

#: Few keys (three per partition), so that changes often hit the key a build just scanned.
keys = st.sampled_from([bytes([first, second]) for first in range(BUCKETS) for second in range(3)])
records = st.binary(max_size=6)
#: A write (a record) or a delete (None) of a key.
changes = st.lists(st.tuples(keys, st.none() | records), max_size=40)


def partition_of(key: bytes) -> int:
    return key[0] % BUCKETS


def apply_change(store: Store, trees: HashTrees | None, key: bytes, new: bytes | None) -> None:
    """Change ``store`` as the replica would, telling ``trees`` first (as on_change does)."""
    partition = partition_of(key)
    contents = store.setdefault(partition, {})
    old = contents.get(key)
    if old is None and new is None:
        return  # nothing stored changes
    if trees is not None:
        trees.change(partition, key, old, new)
    if new is None:
        del contents[key]
    else:
        contents[key] = new


def built(store: Store) -> HashTrees:
    """Trees built from scratch of ``store``."""
    trees = HashTrees(BUCKETS)
    trees.start()
    for partition in range(BUCKETS):
        trees.scanned(sorted(store.get(partition, {}).items()))
        trees.finish_partition()
    return trees


def assert_same(left: HashTrees, right: HashTrees) -> None:
    for partition in range(BUCKETS):
        assert left.root(partition) == right.root(partition), partition
        assert left.leaves(partition) == right.leaves(partition), partition
        assert left.keys(partition) == right.keys(partition), partition


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(keys, records)), changes, st.randoms(use_true_random=False))
def test_incremental_changes_in_any_order_equal_a_build_from_scratch(
    initial: list[tuple[bytes, bytes]],
    later: list[tuple[bytes, bytes | None]],
    rng: object,
) -> None:
    store: Store = {}
    for key, record in initial:
        apply_change(store, None, key, record)
    trees = built(store)
    shuffled = list(later)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    for key, new in shuffled:
        apply_change(store, trees, key, new)
    assert_same(trees, built(store))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(keys, records)),
    st.lists(st.one_of(st.integers(1, 3), st.tuples(keys, st.none() | records)), max_size=60),
)
def test_a_build_interleaved_with_changes_equals_a_build_of_the_final_contents(
    initial: list[tuple[bytes, bytes]],
    steps: list[int | tuple[bytes, bytes | None]],
) -> None:
    store: Store = {}
    for key, record in initial:
        apply_change(store, None, key, record)
    trees = HashTrees(BUCKETS)
    apply_change(store, trees, b"\x00early", b"before the build")  # ignored, then scanned
    trees.start()

    def scan(chunk: int) -> None:
        partition = trees.building
        assert partition is not None
        cursor = trees.cursor
        pairs = sorted(
            (key, record)
            for key, record in store.get(partition, {}).items()
            if cursor is None or key > cursor
        )[:chunk]
        trees.scanned(pairs)
        if len(pairs) < chunk:
            trees.finish_partition()

    for step in steps:
        if isinstance(step, int):
            if trees.building is not None:
                scan(step)
        else:
            apply_change(store, trees, *step)
    while trees.building is not None:
        scan(2)
    assert_same(trees, built(store))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, records), changes)
def test_differing_segments_and_keys_are_exactly_those_of_differing_records(
    contents: dict[bytes, bytes], edits: list[tuple[bytes, bytes | None]]
) -> None:
    mine: Store = {}
    for key, record in contents.items():
        apply_change(mine, None, key, record)
    theirs: Store = {partition: dict(keys) for partition, keys in mine.items()}
    for key, new in edits:
        apply_change(theirs, None, key, new)
    my_trees, their_trees = built(mine), built(theirs)
    everything = frozenset(range(SEGMENTS))
    for partition in range(BUCKETS):
        a, b = mine.get(partition, {}), theirs.get(partition, {})
        differ = sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))
        my_leaves, their_leaves = my_trees.leaves(partition), their_trees.leaves(partition)
        assert my_leaves is not None
        assert their_leaves is not None
        segments = differing_segments(my_leaves, their_leaves)
        assert segments == sorted({segment_of(key) for key in differ})
        assert (my_trees.root(partition) == their_trees.root(partition)) == (not differ)
        listed = differing_keys(
            entries_in(a.items(), everything), entries_in(b.items(), everything)
        )
        assert listed == differ


def test_partitions_are_not_ready_until_their_scan_ends() -> None:
    trees = HashTrees(BUCKETS)
    trees.change(0, b"k", None, b"r")  # before the build: ignored
    assert trees.root(0) is None
    assert trees.ready_count == 0
    trees.start()
    assert (trees.building, trees.root(0)) == (0, None)
    trees.scanned([(b"k", b"r")])
    trees.change(0, b"z", None, b"later")  # after the cursor: ignored, the scan sees it
    assert trees.keys(0) == 1
    trees.finish_partition()
    assert trees.root(0) not in (None, EMPTY_ROOT)
    assert trees.root(1) is None
    assert trees.ready_count == 1
    for _ in range(1, BUCKETS):
        trees.finish_partition()
    assert (trees.building, trees.ready_count) == (None, BUCKETS)
    assert trees.root(3) == EMPTY_ROOT
    assert trees.trees == 1
    trees.change(0, b"k", b"r", None)
    assert trees.root(0) == EMPTY_ROOT
    assert trees.trees == 0


def test_leaves_travel_as_fixed_size_bytes() -> None:
    trees = built({1: {b"a": b"x", b"b": b"y"}})
    leaves = trees.leaves(1)
    assert leaves is not None
    raw = leaves_to_bytes(leaves)
    assert len(raw) == SEGMENTS * 8
    assert leaves_from_bytes(raw) == leaves
    with pytest.raises(ValueError, match="leaves must be"):
        leaves_from_bytes(raw[:-1])
