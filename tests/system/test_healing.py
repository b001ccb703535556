"""Self-healing with real processes on loopback: hinted handoff and sloppy quorum.

Each test checks replicas one by one through their own ``replica_read`` (never a quorum
read, which would repair what it reads) and sends no client traffic while it waits.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kai.core.ring import NodeId, Ring
from kai.testing.process import KaiProcess, free_port
from kai.testing.replicas import read_replica

from .conftest import RawConnection, make_client, stats_of_server, wait_for

pytestmark = pytest.mark.system
logger = logging.getLogger(__name__)

SYNC_INTERVAL_MS = 1000
HANDOFF_INTERVAL_MS = 1000
BUCKETS = 64


def config(**extra: object) -> str:
    settings: dict[str, object] = {
        "quorum": '"3,2,2"',
        "request_timeout": 2000,
        "membership_interval": 200,
        "sync_interval": SYNC_INTERVAL_MS,
        "handoff_interval": HANDOFF_INTERVAL_MS,
        "buckets": BUCKETS,
        **extra,
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


class Nodes:
    """Real nodes on loopback sharing one secret, the first one the others' seed."""

    def __init__(self, base: Path, size: int, settings: str) -> None:
        self.base = base
        self.settings = settings
        self.rpc_ports = [free_port() for _ in range(size)]
        self.ports = [free_port() for _ in range(size)]
        self.processes: list[KaiProcess | None] = [None] * size
        self.secret = b""

    def start(self, index: int) -> KaiProcess:
        data_dir = self.base / f"n{index + 1}"
        if index and not (data_dir / "cluster.secret").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "cluster.secret").write_bytes(self.secret)
            (data_dir / "cluster.secret").chmod(0o600)
        seed = [] if index == 0 else ["--seed", f"127.0.0.1:{self.rpc_ports[0]}"]
        node = KaiProcess(
            data_dir,
            port=self.ports[index],
            rpc_port=self.rpc_ports[index],
            config=self.settings,
            extra_args=seed,
        )
        node.start()
        self.processes[index] = node
        if index == 0:
            self.secret = (data_dir / "cluster.secret").read_bytes()
        return node

    def __getitem__(self, index: int) -> KaiProcess:
        node = self.processes[index]
        assert node is not None, f"node {index} is not running"
        return node

    def kill(self, index: int) -> None:
        """kill -9: no shutdown at all."""
        self[index].signal(signal.SIGKILL)
        self[index].stop()
        self.processes[index] = None

    def stop(self, index: int) -> None:
        self[index].stop()
        self.processes[index] = None

    def stop_all(self) -> None:
        for index, node in enumerate(self.processes):
            if node is not None:
                node.stop()
                self.processes[index] = None

    def node_id(self, index: int) -> NodeId:
        return NodeId("127.0.0.1", self.rpc_ports[index])

    def stats(self, index: int) -> dict[str, str]:
        return stats_of_server(self[index].port)

    def replica(self, index: int, keys: Sequence[bytes]) -> list[bytes | None]:
        return read_replica("127.0.0.1", self.rpc_ports[index], self.secret, keys)

    def wait_converged(self) -> None:
        """Wait until every running node lists every member."""
        self.wait_converged_among(
            [index for index, node in enumerate(self.processes) if node is not None]
        )

    def wait_converged_among(self, indexes: Sequence[int]) -> None:
        """Wait until the nodes ``indexes`` list every member, with no transition under way."""
        everyone = " ".join(sorted(str(self.node_id(i)) for i in range(len(self.processes))))

        def settled(index: int) -> bool:
            stats = self.stats(index)
            return stats.get("kai_curr_nodes") == everyone and stats["kai_ownership_phase"] == "0"

        for index in indexes:
            node = self.processes[index]
            if node is not None:
                wait_for(
                    lambda index=index: settled(index),  # type: ignore[misc]
                    timeout=30,
                    what=f"node {index + 1} to see every member, settled",
                )


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nodes]:
    size, settings = request.param
    cluster = Nodes(tmp_path, size, settings)
    try:
        for index in range(size):
            cluster.start(index)
        cluster.wait_converged()
        yield cluster
    finally:
        cluster.stop_all()


def admin_of(node: KaiProcess, *args: str) -> subprocess.CompletedProcess[str]:
    secret = node.data_dir / "cluster.secret"
    command = [sys.executable, "-m", "kai.admin", "--node", f"127.0.0.1:{node.rpc_port}"]
    command += ["--secret-file", str(secret), *args]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    return completed


def write_all(port: int, keys: Sequence[bytes], value: bytes) -> None:
    """Set every key (pipelined 100 at a time); each must be acknowledged STORED."""
    with RawConnection(port, timeout=30) as connection:
        for start in range(0, len(keys), 100):
            chunk = keys[start : start + 100]
            connection.send(
                b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value) for key in chunk)
            )
            for key in chunk:
                assert connection.read_line() == b"STORED\r\n", key


def holding(nodes: Nodes, index: int, keys: Sequence[bytes], value: bytes) -> list[bytes]:
    """The keys whose record on node ``index``'s own replica holds ``value``."""
    records = nodes.replica(index, keys)
    return [key for key, record in zip(keys, records, strict=True) if record and value in record]


@pytest.mark.parametrize("nodes", [(3, config())], indirect=True)
def test_a_node_killed_during_writes_gets_them_all_back_with_no_client_traffic(
    nodes: Nodes,
) -> None:
    keys = [b"healing:%05d" % index for index in range(2000)]
    value = b"acknowledged-while-node-3-was-dead"
    nodes.kill(2)
    write_all(nodes[0].port, keys[:1000], value)
    write_all(nodes[1].port, keys[1000:], value)
    assert holding(nodes, 0, keys, value) == keys
    nodes.start(2)
    restarted = time.monotonic()
    budget = (SYNC_INTERVAL_MS + HANDOFF_INTERVAL_MS) / 1000
    wait_for(
        lambda: len(holding(nodes, 2, keys, value)) == len(keys),
        timeout=budget + 20,  # the budget, plus slack for a loaded machine
        interval=0.2,
        what="node 3 to hold every key it missed",
    )
    took = time.monotonic() - restarted
    for index in range(3):
        assert holding(nodes, index, keys, value) == keys, f"node {index + 1}"
    # Anti-entropy may have brought node 3 some keys before their hints: the hints still go.
    wait_for(
        lambda: [int(nodes.stats(index)["kai_hints_pending"]) for index in range(3)] == [0, 0, 0],
        timeout=HANDOFF_INTERVAL_MS / 1000 + 20,
        interval=0.2,
        what="every hint to be handed off",
    )
    delivered = sum(int(nodes.stats(index)["kai_hints_delivered"]) for index in range(2))
    assert delivered >= len(keys)
    # What an operator sees: the finished handoffs to node 3, and anti-entropy at work.
    handoffs = [
        transfer
        for index in range(2)
        for transfer in json.loads(admin_of(nodes[index], "transfers", "--json").stdout)[
            "transfers"
        ]
    ]
    assert {t["to"] for t in handoffs} == {str(nodes.node_id(2))}
    assert {t["kind"] for t in handoffs} == {"hints"}
    assert all(t["state"] == "done" for t in handoffs)
    assert sum(t["keys_done"] for t in handoffs) == delivered
    assert "hints pending 0" in admin_of(nodes[0], "transfers").stdout
    wait_for(
        lambda: json.loads(admin_of(nodes[2], "aae-status", "--json").stdout)["exchanges"] > 0,
        timeout=20,
        what="node 3 to run an anti-entropy exchange",
    )
    aae = json.loads(admin_of(nodes[2], "aae-status", "--json").stdout)
    assert aae["enabled"] is True
    assert len(aae["partitions"]) == BUCKETS  # three nodes, N=3: a primary of every partition
    assert any(p["seconds_since_compared"] is not None for p in aae["partitions"])
    assert "partitions compared:" in admin_of(nodes[2], "aae-status").stdout
    logger.info(
        "node 3 held all %d keys %.2f s after its restart (budget %s s)", len(keys), took, budget
    )


def keys_with_primaries(nodes: Nodes, owners: set[NodeId], count: int) -> list[bytes]:
    """``count`` keys each of whose primaries include every node of ``owners``."""
    ring = Ring([nodes.node_id(i) for i in range(len(nodes.processes))], buckets=BUCKETS)
    wanted = None
    keys = []
    for index in range(100_000):
        key = b"sloppy:%06d" % index
        primaries = set(ring.primaries_of(key, 3))
        if owners <= primaries and (wanted is None or primaries == wanted):
            wanted = primaries
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError("no such keys")


@pytest.mark.parametrize("nodes", [(5, config(anti_entropy="false"))], indirect=True)
@pytest.mark.parametrize("stopped", [[3, 4], [2, 3, 4]], ids=["two primaries", "every primary"])
def test_writes_succeed_through_fallbacks_and_read_back_from_the_primaries(
    nodes: Nodes, stopped: list[int]
) -> None:
    # With every primary stopped, the node the client writes to stands in as the coordinator.
    keys = keys_with_primaries(nodes, {nodes.node_id(i) for i in stopped}, 200)
    ring = Ring([nodes.node_id(i) for i in range(5)], buckets=BUCKETS)
    primaries = {i for i in range(5) if nodes.node_id(i) in ring.primaries_of(keys[0], 3)}
    live_primary = min(primaries)
    fallbacks = sorted(set(range(5)) - primaries)
    for index in stopped:
        nodes.stop(index)
    value = b"written-with-two-primaries-stopped"
    write_all(nodes[fallbacks[0]].port, keys, value)
    # Hints on the fallbacks, none of it in their data.
    hints = sum(int(nodes.stats(index)["kai_hints_pending"]) for index in fallbacks)
    assert hints >= len(keys)
    stand_ins = int(nodes.stats(fallbacks[0])["kai_stand_in_writes"])
    assert stand_ins == (len(keys) if primaries == set(stopped) else 0)
    assert holding(nodes, fallbacks[0], keys, value) == holding(nodes, fallbacks[1], keys, value)
    for index in stopped:
        nodes.start(index)
    wait_for(
        lambda: all(int(nodes.stats(i)["kai_hints_pending"]) == 0 for i in fallbacks),
        timeout=30,
        interval=0.2,
        what="the fallbacks to hand their hints off",
    )
    for index in fallbacks:
        nodes.stop(index)
    for index in primaries:
        assert holding(nodes, index, keys, value) == keys, f"primary {index + 1}"
    client = make_client(nodes[live_primary].port)
    try:
        found = client.get_many(keys)
    finally:
        client.close()
    assert found == dict.fromkeys(keys, value)


def hand_off_halfway(nodes: Nodes, keys: Sequence[bytes], value: bytes) -> int:
    """Kill node 3, write ``keys`` through node 1 (which keeps a hint for each), start node 3
    again and return once two batches of the handoff are acknowledged: the hints kept."""
    nodes.kill(2)
    write_all(nodes[0].port, keys, value)
    wait_for(  # the last acknowledged writes' hints may still be on their way
        lambda: int(nodes.stats(0)["kai_hints_pending"]) == len(keys),
        timeout=10,
        what="a hint for every key",
    )
    nodes.start(2)
    wait_for(
        lambda: int(nodes.stats(0)["kai_transfer_batches_acked"]) >= 2,
        timeout=30,
        what="two acknowledged batches",
    )
    return len(keys)


@pytest.mark.parametrize("nodes", [(3, config(transfer_rate=20_000))], indirect=True)
def test_a_handoff_resumes_after_kill_9_of_the_sender_without_resending(nodes: Nodes) -> None:
    keys = [b"resume:%05d" % index for index in range(3000)]
    value = b"x" * 40
    kept = hand_off_halfway(nodes, keys, value)
    nodes.kill(0)
    left = kept - int(nodes.stats(2)["kai_transfer_keys_received"])
    nodes.start(0)
    wait_for(
        lambda: int(nodes.stats(0)["kai_hints_pending"]) == 0,
        timeout=60,
        interval=0.2,
        what="the restarted sender to finish its handoff",
    )
    sent_after_restart = int(nodes.stats(0)["kai_transfer_keys_sent"])
    received = int(nodes.stats(2)["kai_transfer_keys_received"])
    # Acknowledged batches were not sent again: the restarted sender sent only what was
    # left (plus at most the batch in flight at the kill).
    assert left <= sent_after_restart <= left + 256
    assert kept <= received <= kept + 256
    assert holding(nodes, 2, keys, value) == keys


GRACE_MS = 3000
GRACE_SETTINGS = config(tombstone_grace=GRACE_MS, sync_interval=200, buckets=8)


def reads_through(nodes: Nodes, index: int, keys: Sequence[bytes]) -> dict[bytes, bytes]:
    client = make_client(nodes[index].port)
    try:
        return dict(client.get_many(keys))
    finally:
        client.close()


def delete_all(port: int, keys: Sequence[bytes]) -> None:
    with RawConnection(port, timeout=30) as connection:
        for key in keys:
            assert connection.request(b"delete %s\r\n" % key) == b"DELETED\r\n", key


def absent_everywhere(nodes: Nodes, indexes: Sequence[int], keys: Sequence[bytes]) -> bool:
    """Whether no replica among ``indexes`` holds anything (not even a tombstone) for keys."""
    return all(record is None for i in indexes for record in nodes.replica(i, keys))


@pytest.mark.parametrize("nodes", [(3, GRACE_SETTINGS)], indirect=True)
def test_a_key_deleted_while_a_node_was_cut_off_is_reaped_everywhere_and_stays_deleted(
    nodes: Nodes,
) -> None:
    keys = [b"reaped:%03d" % index for index in range(20)]
    write_all(nodes[0].port, keys, b"doomed")
    nodes[2].signal(signal.SIGSTOP)  # cut off: its connections stay open, it answers nothing
    try:
        # Once the others see it down, deletes are decided without it (hinted for it).
        for index in (0, 1):
            wait_for(
                lambda index=index: (
                    str(nodes.node_id(2))  # type: ignore[misc]
                    in nodes.stats(index).get("kai_down_nodes", "")
                ),
                timeout=30,
                what=f"node {index + 1} to see node 3 down",
            )
        delete_all(nodes[0].port, keys)
    finally:
        nodes[2].signal(signal.SIGCONT)
    wait_for(
        lambda: absent_everywhere(nodes, range(3), keys),
        timeout=GRACE_MS / 1000 + 30,
        interval=0.2,
        what="every replica to drop the tombstones once the grace is over",
    )
    reaped = sum(int(nodes.stats(index)["kai_tombstones_reaped"]) for index in range(3))
    assert reaped == 3 * len(keys)
    for index in range(3):
        nodes.stop(index)
    for index in range(3):
        nodes.start(index)
    nodes.wait_converged()
    assert absent_everywhere(nodes, range(3), keys)  # read from LevelDB: nothing came back
    for index in range(3):
        assert reads_through(nodes, index, keys) == {}


@pytest.mark.parametrize("nodes", [(4, GRACE_SETTINGS)], indirect=True)
def test_a_node_kept_down_past_the_grace_does_not_bring_a_reaped_key_back(nodes: Nodes) -> None:
    ring = Ring([nodes.node_id(i) for i in range(4)], buckets=8)
    index_of = {nodes.node_id(i): i for i in range(4)}
    key = b"resurrection"
    first, second, third, fallback = (
        index_of[node] for node in ring.preference_list(ring.partition_for_key(key))
    )
    write_all(nodes[first].port, [key], b"v1")
    nodes.stop(third)
    write_all(nodes[first].port, [key], b"v2")  # the fallback keeps it as a hint for ``third``
    wait_for(  # W was met by ``second``: the stand-in may still be on its way
        lambda: int(nodes.stats(fallback)["kai_hints_pending"]) == 1,
        timeout=10,
        what="the fallback to keep the write for the stopped primary",
    )
    nodes.stop(fallback)  # ... and is kept down, hint and all
    nodes.start(third)
    nodes.wait_converged_among([first, second, third])
    delete_all(nodes[first].port, [key])
    wait_for(
        lambda: absent_everywhere(nodes, [first, second, third], [key]),
        timeout=GRACE_MS / 1000 + 30,
        interval=0.2,
        what="the primaries to reap the tombstone",
    )
    nodes.start(fallback)  # back long after the grace: it hands its old hint off
    wait_for(
        lambda: int(nodes.stats(fallback)["kai_hints_pending"]) == 0,
        timeout=30,
        interval=0.2,
        what="the fallback to hand its hint off",
    )
    assert int(nodes.stats(third)["kai_stale_refused"]) >= 1
    assert absent_everywhere(nodes, [first, second, third, fallback], [key])
    for index in range(4):
        assert reads_through(nodes, index, [key]) == {}


@pytest.mark.parametrize("nodes", [(3, config(transfer_rate=20_000))], indirect=True)
def test_a_handoff_resumes_after_kill_9_of_the_receiver_without_resending(nodes: Nodes) -> None:
    keys = [b"receiver:%05d" % index for index in range(3000)]
    value = b"y" * 40
    kept = hand_off_halfway(nodes, keys, value)
    # Cancelled by the operator, then paused by the receiver's death: both stop it.
    listed = json.loads(admin_of(nodes[0], "transfers", "--json").stdout)["transfers"]
    running = [t["id"] for t in listed if t["state"] == "running"]
    assert running == [f"hints:{nodes.node_id(2)}"]
    cancelled = json.loads(admin_of(nodes[0], "cancel-transfer", running[0], "--json").stdout)
    assert cancelled == {"id": running[0], "cancelled": True}
    wait_for(
        lambda: (
            json.loads(admin_of(nodes[0], "transfers", "--json").stdout)["transfers"][0]["state"]
            == "cancelled"
        ),
        timeout=10,
        what="the transfer to show as cancelled",
    )
    wait_for(  # the handoff loop offers it again, from where it stopped
        lambda: int(nodes.stats(0)["kai_transfers_active"]) == 1,
        timeout=10,
        what="the handoff to be offered again",
    )
    nodes.kill(2)
    wait_for(
        lambda: int(nodes.stats(0)["kai_transfers_active"]) == 0,
        timeout=30,
        what="the handoff to pause",
    )
    sent_before = int(nodes.stats(0)["kai_transfer_keys_sent"])
    assert 0 < sent_before < kept
    nodes.start(2)
    wait_for(
        lambda: int(nodes.stats(0)["kai_hints_pending"]) == 0,
        timeout=60,
        interval=0.2,
        what="the handoff to finish once the receiver is back",
    )
    # Every acknowledged record was sent once: the sender's count is exactly what it kept.
    assert int(nodes.stats(0)["kai_transfer_keys_sent"]) == kept
    assert holding(nodes, 2, keys, value) == keys
