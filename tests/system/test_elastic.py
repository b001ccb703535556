"""Elastic membership with real processes: nodes join a loaded cluster while clients write and
read verified values through every node, a transfer survives kill -9 of its receiver, and
afterwards every key is on exactly its N primaries and on no other node.

A client owns the keys it writes (one writer per key), so the value it last saw acknowledged
is the key's value: a read through any node must return it (or one being written), and a
miss or an older value is an error.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kai.core.ring import Ring

from .conftest import RawConnection, wait_for
from .test_healing import BUCKETS, Nodes, admin_of, config, write_all

pytestmark = pytest.mark.system

KEYS = 20_000
CLIENTS = 4
#: Each client's bound on operations (the load stops earlier when told to).
MAX_OPERATIONS = 200_000


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nodes]:
    """Room for ``total`` nodes, the first ``started`` of them running as one cluster."""
    total, started, settings = request.param
    cluster = Nodes(tmp_path, total, settings)
    try:
        for index in range(started):
            cluster.start(index)
        wait_for(
            lambda: settled_with(cluster, range(started), range(started)),
            timeout=60,
            what=f"{started} nodes to form a cluster",
        )
        yield cluster
    finally:
        cluster.stop_all()


class Load:
    """Client threads writing their own keys and reading everyone's through the given nodes."""

    def __init__(self, keys: Sequence[bytes], value: bytes, ports: Sequence[int]) -> None:
        self.keys = list(keys)
        self.ports = list(ports)
        self.acknowledged = dict.fromkeys(self.keys, value)
        self.in_flight: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        #: (port, what went wrong) for every failed request.
        self.errors: list[tuple[int, str]] = []
        self.reads = self.writes = 0
        self.threads = [
            threading.Thread(target=self._run, args=(client,), daemon=True)
            for client in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self, client: int) -> None:
        rng = random.Random(client)
        mine = self.keys[client::CLIENTS]
        connections: dict[int, RawConnection] = {}
        gone: set[int] = set()  # nodes whose connection broke: this client stops using them
        try:
            for count in range(MAX_OPERATIONS):
                ports = [port for port in self.ports if port not in gone]
                if self.stop.is_set() or not ports:
                    return
                port = rng.choice(ports)
                try:
                    if port not in connections:
                        connections[port] = RawConnection(port, timeout=10)
                    if rng.random() < 0.3:
                        self._write(connections[port], port, rng.choice(mine), client, count)
                    else:
                        self._read(connections[port], port, rng.choice(self.keys))
                except OSError as exc:
                    # A write cut off stays in flight: it may or may not have landed.
                    gone.add(port)
                    if port in connections:
                        connections.pop(port).close()
                    with self.lock:
                        self.errors.append((port, f"client {client}: {exc!r}"))
        except AssertionError as exc:
            with self.lock:
                self.errors.append((0, f"client {client}: {exc!r}"))
        finally:
            for connection in connections.values():
                connection.close()

    def _write(self, connection: RawConnection, port: int, key: bytes, client: int, n: int) -> None:
        value = b"c%d-%d" % (client, n)
        with self.lock:
            self.in_flight[key] = value
        connection.send(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        reply = connection.read_line()
        with self.lock:
            del self.in_flight[key]
            if reply == b"STORED\r\n":
                self.acknowledged[key] = value
                self.writes += 1
            else:
                self.errors.append((port, f"set {key!r}: {reply!r}"))

    def _read(self, connection: RawConnection, port: int, key: bytes) -> None:
        with self.lock:
            before = {self.acknowledged[key], self.in_flight.get(key)}
        connection.send(b"get %s\r\n" % key)
        line = connection.read_line()
        if line == b"END\r\n":
            with self.lock:
                self.errors.append((port, f"get {key!r} missed"))
            return
        value = connection.read_line()[:-2]
        assert connection.read_line() == b"END\r\n"
        with self.lock:
            after = {self.acknowledged[key], self.in_flight.get(key)}
            if value not in before | after:
                self.errors.append((port, f"get {key!r}: {value!r}, not {before}"))
            self.reads += 1


def settled_with(nodes: Nodes, indexes: Sequence[int], members: Sequence[int]) -> bool:
    """Whether the nodes ``indexes`` all serve a settled placement over exactly ``members``
    and have deleted what it took from them."""
    everyone = " ".join(sorted(str(nodes.node_id(i)) for i in members))
    for index in indexes:
        stats = nodes.stats(index)
        if stats.get("kai_curr_nodes") != everyone or stats.get("kai_ownership_phase") != "0":
            return False
        if stats.get("kai_ownership_cleanup_pending") != "0":
            return False
    return True


def check_placement(
    nodes: Nodes, indexes: Sequence[int], members: Sequence[int], load: Load, *, values: bool
) -> None:
    """Every key is on exactly its N primaries and on no other running node; with
    ``values`` (once the clients stopped), each holds the key's acknowledged value."""
    ring = Ring([nodes.node_id(i) for i in members], buckets=BUCKETS)
    by_node = {nodes.node_id(i): i for i in indexes}
    records = {i: nodes.replica(i, load.keys) for i in indexes}
    for position, key in enumerate(load.keys):
        primaries = {by_node[node] for node in ring.primaries_of(key, 3)}
        holding = {i for i in indexes if records[i][position] is not None}
        assert holding == primaries, (key, sorted(holding), sorted(primaries))
        for index in primaries if values else ():
            record = records[index][position]
            assert record is not None
            assert load.acknowledged[key] in record, (key, index)


def write_pipelined(nodes: Nodes, keys: Sequence[bytes], value: bytes) -> None:
    for start in range(0, len(keys), 2000):
        write_all(nodes[0].port, keys[start : start + 2000], value)


def wait_settled(nodes: Nodes, indexes: Sequence[int], members: Sequence[int], what: str) -> None:
    wait_for(
        lambda: settled_with(nodes, indexes, members),
        timeout=240,
        interval=0.5,
        what=what,
    )


@pytest.mark.parametrize("nodes", [(5, 3, config(anti_entropy="false"))], indirect=True)
def test_grow_shrink_and_remove_under_load_miss_and_lose_nothing(nodes: Nodes) -> None:
    keys = [b"elastic:%06d" % index for index in range(KEYS)]
    value = b"loaded-before-the-growth"
    write_pipelined(nodes, keys, value)
    with Load(keys, value, [nodes[i].port for i in range(3)]) as load:
        wait_for(lambda: load.reads > 500, timeout=60, what="the clients to get going")
        # Grow 3 -> 5: `kai --seed` on a fresh data directory joins (the one-command form).
        nodes.start(3)
        nodes.start(4)
        wait_settled(nodes, range(5), range(5), "the cluster to settle on five members")
        load.ports = [nodes[i].port for i in range(5)]
        wait_for(lambda: load.reads > 3000, timeout=60, what="reads through the new nodes")
        check_errors(load)
        grown = sum(int(nodes.stats(i)["kai_transfer_keys_sent"]) for i in range(3))
        # Two nodes leave (staged on each, committed at once); the clients stop using them.
        load.ports = [nodes[i].port for i in (0, 2, 4)]
        for leaving in (1, 3):
            admin_of(nodes[leaving], "leave", "--commit")
        wait_settled(nodes, range(5), [0, 2, 4], "the cluster to settle on three members")
        check_errors(load)
        check_placement(nodes, range(5), [0, 2, 4], load, values=False)
        # One node is killed under load, and removed through another: its data is
        # re-replicated from the survivors. Only its own clients' connections may fail.
        nodes.stop(1)
        nodes.stop(3)
        killed = nodes[4].port
        nodes.kill(4)
        admin_of(nodes[0], "remove", str(nodes.node_id(4)), "--commit")
        wait_settled(nodes, [0, 2], [0, 2], "the survivors to settle on two members")
        reads = load.reads
        wait_for(lambda: load.reads > reads + 2000, timeout=60, what="reads after the removal")
    check_errors(load, allowed=killed)
    check_placement(nodes, [0, 2], [0, 2], load, values=True)
    assert grown >= KEYS  # the new nodes got their share by transfers, not by read repair
    dropped = [int(nodes.stats(i)["kai_ownership_records_dropped"]) for i in (0, 2)]
    assert all(count > 0 for count in dropped)  # old copies were deleted, not left behind


def check_errors(load: Load, *, allowed: int | None = None) -> None:
    """No request failed, except connections to the node at port ``allowed``."""
    with load.lock:
        errors = [error for port, error in load.errors if port != allowed]
    assert errors == [], errors[:10]


#: Few, large partitions copied slowly, one at a time: a copy takes several batches.
SLOW_BUCKETS = 4
SLOW_COPY = config(
    anti_entropy="false", transfer_rate=10_000, transfer_limit=1, buckets=SLOW_BUCKETS
)


@pytest.mark.parametrize("nodes", [(4, 3, SLOW_COPY)], indirect=True)
def test_a_copy_resumes_after_kill_9_of_the_receiver_without_resending(nodes: Nodes) -> None:
    keys = [b"resume:%05d" % index for index in range(3000)]
    value = b"x" * 100
    write_pipelined(nodes, keys, value)
    nodes.start(3)

    def partition_copies(index: int) -> list[dict[str, object]]:
        completed = admin_of(nodes[index], "transfers", "--json")
        found = json.loads(completed.stdout)["transfers"]
        return [t for t in found if t["kind"] == "partition"]

    def acked_somewhere() -> tuple[int, dict[str, object]] | None:
        for index in range(3):
            for copy in partition_copies(index):
                if copy["state"] == "running" and int(copy["batches_acked"]) >= 1:  # type: ignore[call-overload]
                    return index, copy
        return None

    wait_for(lambda: acked_somewhere() is not None, timeout=60, what="a copy under way")
    found = acked_somewhere()
    assert found is not None
    sender, copy = found
    nodes.kill(3)
    wait_for(
        lambda: any(
            t["id"] == copy["id"] and t["state"] == "paused" for t in partition_copies(sender)
        ),
        timeout=60,
        what="the copy to pause (its receiver is gone)",
    )
    nodes.start(3)
    wait_for(
        lambda: any(t["id"] == copy["id"] and t["resumed"] for t in partition_copies(sender)),
        timeout=60,
        what="the copy to resume after its last acknowledged batch",
    )
    wait_for(
        lambda: settled_with(nodes, range(4), range(4)),
        timeout=240,
        interval=0.5,
        what="the cluster to settle on four members",
    )
    ring = Ring([nodes.node_id(i) for i in range(4)], buckets=SLOW_BUCKETS)
    joined = nodes.node_id(3)
    expected = [key for key in keys if joined in ring.primaries_of(key, 3)]
    records = nodes.replica(3, keys)
    assert [key for key, record in zip(keys, records, strict=True) if record] == expected
    # Every key the new node owns was sent and acknowledged exactly once: the batch the kill
    # cut off was not acknowledged, and nothing acknowledged was sent again.
    sent = sum(int(nodes.stats(i)["kai_transfer_keys_sent"]) for i in range(3))
    assert sent == len(expected)
