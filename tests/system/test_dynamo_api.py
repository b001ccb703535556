"""The Dynamo API over memcached (docs/dynamo-api.md) on real processes, raw bytes.

A three-node cluster on loopback: ``stats kai_ring`` on every node lists every node with
its memcached address; writes in one read's context through different nodes become
siblings that a write in the context of a read of both resolves; and real
memcached refuses the ``K`` flag, so a memcached client can never send it by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from kai.core.ring import NodeId, Ring
from kai.testing.process import KaiProcess, free_port

from .conftest import RawConnection, Server, wait_for

pytestmark = pytest.mark.system

CONFIG = """
quorum = "3,2,2"
request_timeout = 2000
membership_interval = 200
"""
_READ = re.compile(rb"VA (\d+) K(\S+)\r\n")
_ENTRY = re.compile(rb"VA (\d+) f\d+ t-?\d+\r\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[KaiProcess]]:
    base = tmp_path_factory.mktemp("dynamo-api")
    first = free_port()
    nodes: list[KaiProcess] = []
    try:
        for index in range(3):
            seed = [] if index == 0 else ["--seed", f"127.0.0.1:{first}"]
            if index:  # every node shares the first one's secret
                secret = base / f"n{index}" / "cluster.secret"
                secret.parent.mkdir()
                secret.write_bytes((base / "n0" / "cluster.secret").read_bytes())
                secret.chmod(0o600)
            node = KaiProcess(
                base / f"n{index}",
                rpc_port=first if index == 0 else free_port(),
                config=CONFIG,
                extra_args=seed,
            )
            node.start()
            nodes.append(node)
        wait_for(
            lambda: all(len(ring_of(node)[1]) == 3 for node in nodes),
            timeout=30,
            what="every node's kai_ring to list three nodes with their addresses",
        )
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def ring_of(node: KaiProcess) -> tuple[dict[str, str], dict[str, str]]:
    """(the scalar fields, {rpc address: memcached address}) of ``stats kai_ring``."""
    with RawConnection(node.port) as raw:
        reply = raw.request(b"stats kai_ring\r\n", terminator=b"END\r\n").decode()
    fields: dict[str, str] = {}
    addresses: dict[str, str] = {}
    for line in reply.splitlines()[:-1]:
        _, name, value = line.split(" ", 2)
        if name == "node":
            rpc, memcached = value.split(" ")
            if memcached != "-":
                addresses[rpc] = memcached
        else:
            fields[name] = value
    return fields, addresses


def read(node: KaiProcess, key: bytes) -> tuple[bytes, list[bytes]]:
    with RawConnection(node.port) as raw:
        match = _READ.fullmatch(raw.request(b"mg %b K\r\n" % key))
        assert match is not None
        block = raw.read_exact(int(match[1]) + 2)[:-2]
    values = []
    while block:
        entry = _ENTRY.match(block)
        assert entry is not None, block
        size = int(entry[1])
        values.append(block[entry.end() : entry.end() + size])
        block = block[entry.end() + size + 2 :]
    return match[2], sorted(values)


def write(node: KaiProcess, key: bytes, token: bytes, value: bytes) -> bytes:
    with RawConnection(node.port) as raw:
        reply = raw.request(b"ms %b %d K%b\r\n%b\r\n" % (key, len(value), token, value))
    match = re.fullmatch(rb"HD K(\S+)\r\n", reply)
    assert match is not None, reply
    return match[1]


def test_every_node_describes_the_same_ring_with_every_memcached_address(
    cluster: list[KaiProcess],
) -> None:
    described = [ring_of(node) for node in cluster]
    assert all(found == described[0] for found in described)
    fields, addresses = described[0]
    assert addresses == {f"127.0.0.1:{n.rpc_port}": f"127.0.0.1:{n.port}" for n in cluster}
    assert (fields["replicas"], fields["buckets"]) == ("3", "1024")
    assert re.fullmatch(r"[0-9a-f]{16}", fields["ring"])


def test_writes_in_one_context_through_different_nodes_are_siblings_until_resolved(
    cluster: list[KaiProcess],
) -> None:
    fields, addresses = ring_of(cluster[0])
    ring = Ring(
        [NodeId.parse(rpc) for rpc in addresses],
        buckets=int(fields["buckets"]),
        virtual_nodes=int(fields["virtual_nodes"]),
    )
    key = b"dynamo-api-cart"
    assert len(ring.primaries_of(key, 3)) == 3  # every node is a primary of every key
    token, values = read(cluster[0], key)
    assert values == []
    write(cluster[1], key, token, b"apple")
    write(cluster[2], key, token, b"pear")
    both, values = read(cluster[0], key)
    assert values == [b"apple", b"pear"]
    write(cluster[0], key, both, b"apple,pear")
    for node in cluster:
        assert read(node, key)[1] == [b"apple,pear"]


def test_memcached_refuses_the_k_flag_and_kai_answers_it(server: Server) -> None:
    with RawConnection(server.port) as raw:
        reply = raw.request(b"mg dynamo-api-refused K\r\n")
        if server.name == "memcached":
            assert reply == b"CLIENT_ERROR invalid flag\r\n"
        else:
            assert _READ.fullmatch(reply), reply
            assert raw.read_exact(2) == b"\r\n"
        raw.assert_quiet()
