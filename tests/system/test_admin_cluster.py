"""kai-admin's staged membership changes against real nodes on loopback: a fresh node is
staged to join, the plan shows what will move before anything has, a commit moves it; then a
member leaves, another is replaced by a fresh node; and the refusals an operator reads. Every
key written before the changes reads back through the remaining nodes after each step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kai.core.ring import key_hash, partition_of
from kai.testing.process import KaiProcess

from .conftest import RawConnection, make_client, wait_for
from .test_admin import admin_of, one_error_line
from .test_healing import BUCKETS, Nodes, config, write_all

pytestmark = pytest.mark.system

#: Seconds a whole transition (copies, switch, finalize, cleanup) may take here.
SETTLE_TIMEOUT = 90
VALUE = b"written-before-any-membership-change"


class Cluster(Nodes):
    """:class:`Nodes`, plus nodes started on their own (no seed) that share the secret."""

    def start_alone(self, index: int) -> KaiProcess:
        data_dir = self.base / f"n{index + 1}"
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "cluster.secret").write_bytes(self.secret)
        (data_dir / "cluster.secret").chmod(0o600)
        node = KaiProcess(
            data_dir, port=self.ports[index], rpc_port=self.rpc_ports[index], config=self.settings
        )
        node.start()
        self.processes[index] = node
        return node

    def name(self, index: int) -> str:
        return str(self.node_id(index))


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Nodes 1 to ``size`` slots; the first ``seeded`` started, 2.. with node 1 as seed."""
    size, seeded = request.param
    cluster = Cluster(tmp_path, size, config())
    try:
        for index in range(seeded):
            cluster.start(index)
        settled(cluster, range(seeded), range(seeded))
        yield cluster
    finally:
        cluster.stop_all()


def admin_json(node: KaiProcess, *args: str) -> Any:
    result = admin_of(node, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def settled(cluster: Cluster, indexes: Sequence[int], members: Sequence[int]) -> None:
    """Wait until each of ``indexes`` says its placement is settled over ``members``."""
    everyone = {cluster.name(index) for index in members}

    def done(index: int) -> bool:
        status = admin_json(cluster[index], "status")
        return (status["phase"], status["copies_pending"], set(status["members"])) == (
            "settled",
            0,
            everyone,
        )

    for index in indexes:
        wait_for(
            lambda index=index: done(index),  # type: ignore[misc]
            timeout=SETTLE_TIMEOUT,
            interval=0.2,
            what=f"node {index + 1} to settle over {sorted(everyone)}",
        )


def status_of(cluster: Cluster, asked: int, member: int) -> str:
    members = admin_json(cluster[asked], "members")
    return str(next(m["status"] for m in members if m["node"] == cluster.name(member)))


def values_through(port: int, keys: Sequence[bytes]) -> dict[bytes, bytes]:
    """What multi-key gets through the node on ``port`` answer for ``keys``."""
    found: dict[bytes, bytes] = {}
    with RawConnection(port, timeout=30) as connection:
        for start in range(0, len(keys), 50):
            connection.send(b"get %s\r\n" % b" ".join(keys[start : start + 50]))
            while (line := connection.read_line()) != b"END\r\n":
                _value, key, _flags, size = line.split()
                found[key] = connection.read_exact(int(size) + 2)[:-2]
    return found


def assert_every_key_reads_back(
    cluster: Cluster, indexes: Sequence[int], keys: list[bytes]
) -> None:
    for index in indexes:
        assert values_through(cluster[index].port, keys) == dict.fromkeys(keys, VALUE), index + 1


def partition_copies(cluster: Cluster, indexes: Sequence[int], target: int) -> list[Any]:
    """The ownership copies to node ``target`` that nodes ``indexes`` list in `transfers`."""
    return [
        transfer
        for index in indexes
        for transfer in admin_json(cluster[index], "transfers")["transfers"]
        if transfer["kind"] == "partition" and transfer["to"] == cluster.name(target)
    ]


@pytest.mark.parametrize("nodes", [(6, 3)], indirect=True)
def test_join_plan_commit_then_leave_and_replace_keep_every_key(nodes: Cluster) -> None:
    keys = [b"staged:%04d" % index for index in range(300)]
    write_all(nodes[0].port, keys, VALUE)
    fourth = nodes.start_alone(3)
    names = [nodes.name(index) for index in range(6)]

    # Staged only: the plan shows the moves to node 4, and nothing has moved.
    staged = admin_json(fourth, "join", names[0])
    assert staged["committed"] is False
    assert staged["change"] == {
        "action": "join",
        "node": names[3],
        "seed": names[0],
        "statuses": {names[3]: "joining"},
    }
    plan = admin_json(fourth, "plan")
    assert plan["refusal"] is None
    assert set(plan["current_ring"]) == set(names[:3])
    assert set(plan["next_ring"]) == set(names[:4])
    moves = plan["moves"]
    assert moves
    assert {move["to"] for move in moves} == {names[3]}
    assert {move["from"] for move in moves} <= set(names[:3])
    per_partition: dict[int, int] = {}
    for key in keys:
        partition = partition_of(key_hash(key), BUCKETS)
        per_partition[partition] = per_partition.get(partition, 0) + 1
    for move in moves:
        assert move["keys"] == per_partition.get(move["partition"], 0), move
        assert move["bytes"] >= move["keys"] * len(VALUE), move
    assert plan["sizes_unknown"] == 0
    assert 0 < plan["keys"] == sum(move["keys"] for move in moves) <= len(keys)
    text = admin_of(fourth, "plan").stdout
    assert f"join {names[3]} to the cluster of {names[0]}" in text
    assert f"{len(moves)} partitions move" in text
    assert admin_json(fourth, "status")["items"] == 0
    assert len(admin_json(nodes[0], "members")) == 3

    committed = admin_json(fourth, "commit")
    assert committed["committed"] is True
    assert committed["copies"] == len(moves)
    assert admin_json(fourth, "status")["staged_changes"] == 0
    settled(nodes, range(4), range(4))
    assert_every_key_reads_back(nodes, range(4), keys)
    copies = partition_copies(nodes, range(3), 3)
    assert copies
    assert {copy["state"] for copy in copies} == {"done"}

    # Node 2 leaves in one command; it ends up left, and its keys live on elsewhere.
    left = admin_json(nodes[1], "leave", "--commit")
    assert left["committed"] is True
    assert set(left["next_ring"]) == {names[0], names[2], names[3]}
    wait_for(
        lambda: status_of(nodes, 0, 1) == "left",
        timeout=SETTLE_TIMEOUT,
        interval=0.2,
        what="node 2 to be left",
    )
    settled(nodes, [0, 2, 3], [0, 2, 3])
    assert_every_key_reads_back(nodes, [0, 2, 3], keys)
    nodes.stop(1)

    # Node 3 is replaced by a fresh node 6, staged through node 1.
    sixth = nodes.start_alone(5)
    replace = admin_json(nodes[0], "replace", names[2], names[5])
    assert replace["change"]["statuses"] == {names[2]: "leaving", names[5]: "joining"}
    plan = admin_json(nodes[0], "plan")
    assert plan["moves"]
    assert {move["to"] for move in plan["moves"]} == {names[5]}
    assert admin_json(sixth, "status")["items"] == 0
    admin_json(nodes[0], "commit")
    settled(nodes, [0, 3, 5], [0, 3, 5])
    assert status_of(nodes, 0, 2) == "left"
    assert status_of(nodes, 5, 5) == "valid"
    assert_every_key_reads_back(nodes, [0, 3, 5], keys)
    assert partition_copies(nodes, [0, 2, 3], 5)


@pytest.mark.parametrize("nodes", [(3, 2)], indirect=True)
def test_changes_that_cannot_be_made_are_refused_in_one_line(nodes: Cluster) -> None:
    names = [nodes.name(index) for index in range(3)]
    holder = nodes.start_alone(2)
    client = make_client(holder.port)
    try:
        assert client.set(b"already-here", b"some data") is True
    finally:
        client.close()

    refusals = [
        (holder, ["join", names[0]], f"{names[2]} holds 1 record; only an empty node can join"),
        (nodes[1], ["join", names[0]], f"{names[1]} is already in a cluster, with {names[0]};"),
        (nodes[0], ["remove", names[0]], "use leave"),
        (nodes[0], ["remove", "127.0.0.1:1"], "127.0.0.1:1 is not a member of this cluster"),
        (nodes[0], ["replace", names[1], names[2]], "holds 1 record; only an empty node can"),
        (nodes[0], ["commit"], "nothing is staged"),
    ]
    for node, args, message in refusals:
        result = admin_of(node, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in one_error_line(result), args
    # Nothing was staged or changed by any of them.
    for index in range(2):
        assert admin_json(nodes[index], "plan")["staged"] == []
        assert [m["status"] for m in admin_json(nodes[index], "members")] == ["valid", "valid"]
    assert admin_json(holder, "plan")["staged"] == []
