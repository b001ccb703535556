"""A three-node cluster of real processes on loopback (N=3, R=2, W=2).

Nodes 2 and 3 join through node 1 as a seed. The tests check that every key written through
one node is readable through the others and held by three replicas with equal clocks, that
killing a node neither loses nor hides an acknowledged write, that read repair brings a
restarted node up to date, that too few replicas give SERVER_ERROR within the request
timeout, that memccapable passes against a cluster member, and that a client without the
cluster secret can do nothing.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kai.core.errors import RpcError
from kai.rpc.client import RpcClient
from kai.testing.process import KaiProcess, free_port

from .conftest import assert_serving, make_client, require_binaries, wait_for

pytestmark = pytest.mark.system

#: Short enough that unavailability tests finish quickly, long enough for a loaded machine.
REQUEST_TIMEOUT_MS = 2000
CONFIG = f"""
quorum = "3,2,2"
request_timeout = {REQUEST_TIMEOUT_MS}
membership_interval = 200
"""


def start_node(base: Path, name: str, *, rpc_port: int, seed: int | None) -> KaiProcess:
    extra = ["--seed", f"127.0.0.1:{seed}"] if seed is not None else []
    node = KaiProcess(base / name, rpc_port=rpc_port, config=CONFIG, extra_args=extra)
    node.start()
    return node


def restart(node: KaiProcess, seed: int | None = None) -> KaiProcess:
    extra = ["--seed", f"127.0.0.1:{seed}"] if seed is not None else []
    revived = KaiProcess(
        node.data_dir, port=node.port, rpc_port=node.rpc_port, config=CONFIG, extra_args=extra
    )
    revived.start()
    return revived


def admin(node: KaiProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kai.admin",
            "--node",
            f"127.0.0.1:{node.rpc_port}",
            "--secret-file",
            str(node.data_dir / "cluster.secret"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def members_seen_by(node: KaiProcess) -> set[str]:
    """The members in the node's ``kai_curr_nodes`` stat (read raw: the value has spaces)."""
    try:
        reply = raw_request(node.port, b"stats\r\n", terminator=b"END\r\n")
    except OSError:
        return set()  # a node still starting is polled again
    for line in reply.split(b"\r\n"):
        if line.startswith(b"STAT kai_curr_nodes "):
            return set(line.decode().split()[2:])
    return set()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[KaiProcess]]:
    rpc_ports = [free_port() for _ in range(3)]
    nodes: list[KaiProcess] = []
    try:
        nodes.append(start_node(tmp_path, "n1", rpc_port=rpc_ports[0], seed=None))
        # Every node shares node 1's secret: copy it before the others start.
        secret = (nodes[0].data_dir / "cluster.secret").read_bytes()
        for index in (1, 2):
            data_dir = tmp_path / f"n{index + 1}"
            data_dir.mkdir(parents=True)
            secret_path = data_dir / "cluster.secret"
            secret_path.write_bytes(secret)
            secret_path.chmod(0o600)
            nodes.append(
                start_node(tmp_path, f"n{index + 1}", rpc_port=rpc_ports[index], seed=rpc_ports[0])
            )
        everyone = {f"127.0.0.1:{port}" for port in rpc_ports}
        for node in nodes:
            wait_for(
                lambda node=node: members_seen_by(node) == everyone,  # type: ignore[misc]
                timeout=30,
                what=f"node {node.rpc_port} to see all three members",
            )
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_writes_through_one_node_are_read_through_every_node(cluster: list[KaiProcess]) -> None:
    records = {f"cluster-{index:05d}": b"value-%d" % index for index in range(2000)}
    writer = make_client(cluster[0].port)
    try:
        for start in range(0, 2000, 500):
            batch = dict(list(records.items())[start : start + 500])
            assert writer.set_many(batch) == []
    finally:
        writer.close()
    for node in cluster[1:]:
        reader = make_client(node.port)
        try:
            found: dict[str, bytes] = {}
            keys = list(records)
            for start in range(0, len(keys), 500):
                found.update(reader.get_many(keys[start : start + 500]))
            assert found == records
        finally:
            reader.close()
    for key in ("cluster-00000", "cluster-01234", "cluster-01999"):
        located = admin(cluster[1], "--json", "locate", key)
        assert located.returncode == 0, located.stderr
        replicas = json.loads(located.stdout)["replicas"]
        assert len(replicas) == 3
        dots = [replica["versions"][0]["dot"] for replica in replicas]
        assert all(replica["holds"] for replica in replicas)
        assert dots[0] == dots[1] == dots[2]


def test_killing_a_node_loses_no_acknowledged_write(cluster: list[KaiProcess]) -> None:
    acknowledged: dict[str, bytes] = {}
    failures: list[str] = []
    stop = threading.Event()

    def write_load() -> None:
        client = make_client(cluster[0].port)
        try:
            for index in range(20_000):  # bounded in count and by the stop event
                if stop.is_set():
                    return
                key, value = f"load-{index:05d}", b"v%d" % index
                try:
                    if client.set(key, value):
                        acknowledged[key] = value
                except Exception as error:  # noqa: BLE001 - recorded and asserted below
                    failures.append(repr(error))
                    client.close()
        finally:
            client.close()

    thread = threading.Thread(target=write_load)
    thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 300, timeout=30, what="300 writes before the kill")
        cluster[2].kill()
        count_at_kill = len(acknowledged)
        wait_for(
            lambda: len(acknowledged) >= count_at_kill + 500,
            timeout=60,
            what="writes to keep succeeding after the kill",
        )
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(failures) <= 2, failures  # at most the writes in flight at the kill

    reader = make_client(cluster[1].port)
    try:
        keys = list(acknowledged)
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            found.update(reader.get_many(keys[start : start + 500]))
        missing = [key for key in keys if found.get(key) != acknowledged[key]]
        assert missing == [], f"{len(missing)} acknowledged writes not readable, e.g. {missing[:5]}"
    finally:
        reader.close()

    # Bring the node back: reads through it see the latest values, and reads repair it.
    revived = restart(cluster[2])
    cluster[2] = revived
    latest_keys = list(acknowledged)[-200:]
    client = make_client(revived.port)
    try:
        wait_for(lambda: len(members_seen_by(revived)) == 3, timeout=30, what="rejoin")
        found = client.get_many(latest_keys)
        assert found == {key: acknowledged[key] for key in latest_keys}
    finally:
        client.close()

    def repaired(key: str) -> bool:
        located = admin(revived, "--json", "locate", key)
        replicas = json.loads(located.stdout)["replicas"]
        versions = [
            json.dumps(replica["versions"], sort_keys=True)
            for replica in replicas
            if replica["holds"]
        ]
        return len(versions) == 3 and len(set(versions)) == 1

    for key in latest_keys[-5:]:
        wait_for(lambda key=key: repaired(key), timeout=20, what=f"read repair of {key}")  # type: ignore[misc]


def test_too_few_replicas_answer_server_error_in_time(cluster: list[KaiProcess]) -> None:
    client = make_client(cluster[0].port)
    try:
        assert client.set(b"before", b"1") is True
    finally:
        client.close()
    # Paused nodes accept TCP connections but never answer: the worst case for a timeout.
    for node in cluster[1:]:
        node.signal(signal.SIGSTOP)
    try:
        for command, expected_prefix in (
            (b"get before\r\n", b"SERVER_ERROR"),
            (b"set after 0 0 1\r\nx\r\n", b"SERVER_ERROR"),
        ):
            started = time.monotonic()
            reply = raw_request(cluster[0].port, command)
            elapsed = time.monotonic() - started
            assert reply.startswith(expected_prefix), reply
            assert elapsed < REQUEST_TIMEOUT_MS / 1000 + 3, elapsed
        assert_serving_version(cluster[0].port)
    finally:
        for node in cluster[1:]:
            node.signal(signal.SIGCONT)


def raw_request(port: int, command: bytes, *, terminator: bytes = b"\r\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(command)
        reply = b""
        while not reply.endswith(terminator):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


def assert_serving_version(port: int) -> None:
    assert raw_request(port, b"version\r\n").startswith(b"VERSION ")


def test_memccapable_passes_against_a_cluster_member(cluster: list[KaiProcess]) -> None:
    require_binaries("memccapable")
    result = subprocess.run(
        ["memccapable", "-h", "127.0.0.1", "-p", str(cluster[1].port), "-a", "-t", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All tests passed" in output
    assert_serving(cluster[1].port)


def test_a_client_without_the_secret_can_do_nothing(cluster: list[KaiProcess]) -> None:
    node = cluster[0]
    client = make_client(node.port)
    try:
        assert client.set(b"guarded", b"original") is True
    finally:
        client.close()

    async def attempt(method: str, *params: object) -> str:
        with trio.fail_after(10):
            async with RpcClient("127.0.0.1", node.rpc_port, b"w" * 32) as rpc:
                try:
                    await rpc.call(method, *params)
                except RpcError as error:
                    return type(error).__name__
        return "succeeded"

    calls: list[tuple[str, tuple[object, ...]]] = [
        ("replica_read", ([b"guarded"],)),
        ("coordinate_put", (b"guarded", 0, 0, b"forged")),
        ("gossip", ({"members": [], "flush_times": []},)),
        ("join", ("127.0.0.1:1",)),
    ]
    for method, params in calls:
        assert trio.run(attempt, method, *params) == "RpcAuthenticationError", method
    client = make_client(node.port)
    try:
        assert client.get(b"guarded") == b"original"
    finally:
        client.close()
    assert members_seen_by(node) == {f"127.0.0.1:{n.rpc_port}" for n in cluster}


def test_kai_admin_join_adds_a_running_node(cluster: list[KaiProcess], tmp_path: Path) -> None:
    data_dir = tmp_path / "n4"
    data_dir.mkdir()
    secret = data_dir / "cluster.secret"
    secret.write_bytes((cluster[0].data_dir / "cluster.secret").read_bytes())
    secret.chmod(0o600)
    fourth = KaiProcess(data_dir, config=CONFIG)
    fourth.start()
    try:
        assert members_seen_by(fourth) == {f"127.0.0.1:{fourth.rpc_port}"}
        joined = admin(fourth, "join", f"127.0.0.1:{cluster[0].rpc_port}", "--commit")
        assert joined.returncode == 0, joined.stderr
        everyone = {f"127.0.0.1:{node.rpc_port}" for node in [*cluster, fourth]}
        for node in [*cluster, fourth]:
            wait_for(
                lambda node=node: members_seen_by(node) == everyone,  # type: ignore[misc]
                timeout=30,
                what=f"node {node.rpc_port} to see the fourth member",
            )
        members = json.loads(admin(cluster[1], "--json", "members").stdout)
        assert sorted(member["node"] for member in members) == sorted(everyone)

        def statuses() -> set[str]:
            members = json.loads(admin(cluster[1], "--json", "members").stdout)
            return {member["status"] for member in members}

        # Joining until its partitions are copied, then valid.
        wait_for(lambda: statuses() == {"valid"}, timeout=60, what="the fourth member to be valid")
    finally:
        fourth.stop()
