"""Concurrent read-modify-write on one key loses no acknowledged element (five real nodes).

Five nodes on loopback (N=3, R=2, W=2, ``siblings = "all"``) join through node 1 as a seed.
Four client threads then grow one shared set under one key: each reads the key with ``gets``
through a random node (every sibling is its own ``VALUE`` line, all with the key's cas
unique), takes the union of the siblings' elements, adds one new element and writes the
result back with ``cas`` (``add`` while the key is missing) through another random node,
re-reading on ``EXISTS``/``NOT_STORED``/``SERVER_ERROR``. An element counts as acknowledged
once its write was answered ``STORED``. Afterwards a quorum read through every node must show
every acknowledged element in the union of the key's siblings.

The set is the value itself: comma-separated element names such as ``c2-17`` (client 2's
element 17). Clients pick nodes with seeded generators; the interleaving still depends on
the scheduler, so this test finds a lost write often rather than always.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kai.testing.process import KaiProcess, free_port

from .conftest import RawConnection, wait_for

pytestmark = pytest.mark.system

NODES = 5
CLIENTS = 4
KEY = b"causality-set"
#: How long the clients write, and the most read-modify-write rounds each one tries.
WRITE_SECONDS = 6.0
MAX_ROUNDS_PER_CLIENT = 5_000
#: Fewer acknowledged elements than this means the workload did not really run.
MIN_ACKNOWLEDGED = 50
CONFIG = """
quorum = "3,2,2"
siblings = "all"
request_timeout = 2000
membership_interval = 200
"""


@attrs.frozen
class Read:
    """What one ``gets`` of the key returned: every sibling's elements and the cas unique."""

    siblings: tuple[frozenset[str], ...]
    cas_unique: int | None

    @property
    def elements(self) -> frozenset[str]:
        return frozenset().union(*self.siblings)


class UnexpectedReply(Exception):
    """A reply the loop cannot use; ``retriable`` when reading again can help (SERVER_ERROR)."""

    def __init__(self, reply: bytes, *, why: str = "unexpected reply") -> None:
        super().__init__(f"{why}: {reply!r}")
        self.retriable = reply.startswith(b"SERVER_ERROR ")


def decode_elements(value: bytes) -> frozenset[str]:
    return frozenset(value.decode("ascii").split(",")) if value else frozenset()


def encode_elements(elements: frozenset[str]) -> bytes:
    return ",".join(sorted(elements)).encode("ascii")


def read_key(connection: RawConnection) -> Read:
    """``gets`` the key and parse every ``VALUE`` line up to ``END``.

    Raises :class:`UnexpectedReply` on any other reply (``SERVER_ERROR`` when no quorum).
    """
    connection.send(b"gets " + KEY + b"\r\n")
    siblings: list[frozenset[str]] = []
    cas_uniques: set[int] = set()
    while True:
        line = connection.read_line()
        if line == b"END\r\n":
            break
        fields = line.split()
        if len(fields) != 5 or fields[0] != b"VALUE" or fields[1] != KEY:
            raise UnexpectedReply(line)
        data = connection.read_exact(int(fields[3]) + 2)
        siblings.append(decode_elements(data[:-2]))
        cas_uniques.add(int(fields[4]))
    if len(cas_uniques) > 1:
        raise UnexpectedReply(repr(cas_uniques).encode(), why="siblings with different cas")
    return Read(tuple(siblings), cas_uniques.pop() if cas_uniques else None)


def write_key(connection: RawConnection, value: bytes, cas_unique: int | None) -> bytes:
    """``add`` (no cas unique: the key is missing) or ``cas`` the value; returns the reply line."""
    if cas_unique is None:
        command = b"add %s 0 0 %d\r\n" % (KEY, len(value))
    else:
        command = b"cas %s 0 0 %d %d\r\n" % (KEY, len(value), cas_unique)
    return connection.request(command + value + b"\r\n")


def start_node(base: Path, name: str, *, rpc_port: int, seed: int | None) -> KaiProcess:
    extra = ["--seed", f"127.0.0.1:{seed}"] if seed is not None else []
    node = KaiProcess(base / name, rpc_port=rpc_port, config=CONFIG, extra_args=extra)
    node.start()
    return node


def members_seen_by(node: KaiProcess) -> set[str]:
    """The members in the node's ``kai_curr_nodes`` stat."""
    try:
        with RawConnection(node.port, timeout=2) as connection:
            reply = connection.request(b"stats\r\n", terminator=b"END\r\n")
    except OSError:
        return set()  # a node still starting is polled again
    for line in reply.split(b"\r\n"):
        if line.startswith(b"STAT kai_curr_nodes "):
            return set(line.decode().split()[2:])
    return set()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[KaiProcess]]:
    rpc_ports = [free_port() for _ in range(NODES)]
    nodes: list[KaiProcess] = []
    try:
        nodes.append(start_node(tmp_path, "n1", rpc_port=rpc_ports[0], seed=None))
        # Every node shares node 1's secret: copy it before the others start.
        secret = (nodes[0].data_dir / "cluster.secret").read_bytes()
        for index in range(1, NODES):
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
                timeout=15,
                what=f"node {node.rpc_port} to see all {NODES} members",
            )
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@attrs.define
class SetAddClient:
    """One client thread's loop: read the set through a random node, add one element, cas it."""

    number: int
    ports: list[int]
    stop_at: float
    acknowledged: list[str] = attrs.Factory(list)
    retries: int = 0
    errors: list[str] = attrs.Factory(list)

    def run(self) -> None:
        rng = random.Random(1000 + self.number)
        connections = [RawConnection(port) for port in self.ports]
        try:
            next_element = f"c{self.number}-0"
            for _ in range(MAX_ROUNDS_PER_CLIENT):  # bounded in count and in time
                if time.monotonic() >= self.stop_at:
                    return
                try:
                    read = read_key(rng.choice(connections))
                except UnexpectedReply as error:
                    if not error.retriable:
                        raise
                    self.retries += 1  # no read quorum: read again
                    continue
                value = encode_elements(read.elements | {next_element})
                reply = write_key(rng.choice(connections), value, read.cas_unique)
                if reply == b"STORED\r\n":
                    self.acknowledged.append(next_element)
                    next_element = f"c{self.number}-{len(self.acknowledged)}"
                elif reply in (b"EXISTS\r\n", b"NOT_STORED\r\n", b"NOT_FOUND\r\n") or (
                    reply.startswith(b"SERVER_ERROR ")
                ):
                    self.retries += 1  # not acknowledged: read again and retry the element
                else:
                    self.errors.append(f"write answered {reply!r}")
                    return
        except (OSError, UnexpectedReply) as error:  # recorded and asserted on
            self.errors.append(repr(error))
        finally:
            for connection in connections:
                connection.close()


def elements_through(node: KaiProcess) -> frozenset[str] | None:
    """The union of every sibling's elements, read through ``node`` (None on SERVER_ERROR)."""
    with RawConnection(node.port) as connection:
        try:
            return read_key(connection).elements
        except UnexpectedReply as error:
            if not error.retriable:
                raise
            return None


def test_concurrent_set_adds_lose_no_acknowledged_element(cluster: list[KaiProcess]) -> None:
    stop_at = time.monotonic() + WRITE_SECONDS
    ports = [node.port for node in cluster]
    clients = [SetAddClient(number, ports, stop_at) for number in range(CLIENTS)]
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WRITE_SECONDS + 15)
    assert not any(thread.is_alive() for thread in threads), "a client did not stop in time"
    errors = [error for client in clients for error in client.errors]
    assert errors == [], errors

    acknowledged = {element for client in clients for element in client.acknowledged}
    assert len(acknowledged) > MIN_ACKNOWLEDGED, (
        f"only {len(acknowledged)} elements acknowledged "
        f"({sum(client.retries for client in clients)} retries)"
    )

    # Reads are quorum reads (R=2 of N=3 after W=2 writes), so every node must show every
    # acknowledged element at once; the few retries only cover a SERVER_ERROR under load.
    missing_by_node: dict[int, set[str] | None] = {}
    deadline = time.monotonic() + 5
    while True:
        missing_by_node = {}
        for node in cluster:
            seen = elements_through(node)
            missing = None if seen is None else acknowledged - seen
            if missing is None or missing:
                missing_by_node[node.port] = missing
        if not missing_by_node or time.monotonic() >= deadline:
            break
        time.sleep(0.1)  # poll interval of a deadline-bounded wait
    assert not missing_by_node, (
        f"{len(acknowledged)} elements acknowledged; through node (port): "
        + "; ".join(
            f"{port}: SERVER_ERROR"
            if missing is None
            else f"{port}: {len(missing)} missing, e.g. {sorted(missing)[:20]}"
            for port, missing in missing_by_node.items()
        )
    )
