"""Three kai nodes in network namespaces of their own, for the tests that cut them apart.

Each node runs in a namespace of a :class:`kai.testing.netns.NetnsLab`, listening on that
namespace's address, which is also its ring identity; every node uses the same ports. Node 1
seeds the other two, which share its cluster secret. The ``lab`` fixture (tests/system/
conftest.py) makes the namespaces, or skips where they cannot be made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kai.core.ring import NodeId, Ring
from kai.testing.netns import NetnsLab
from kai.testing.process import KaiProcess
from kai.testing.replicas import read_replica

from .conftest import RawConnection, stats_of_server, wait_for

#: Every node has an address of its own, so every node uses the same ports.
PORT = 11211
RPC_PORT = 7411


class NetnsCluster:
    """One node per namespace of ``lab``, each with ``config``; node 1 seeds."""

    def __init__(self, lab: NetnsLab, base: Path, config: str) -> None:
        self.lab = lab
        self.base = base
        self.config = config
        self.nodes: list[KaiProcess] = []
        self.secret = b""

    @property
    def memcached_addresses(self) -> list[str]:
        return [f"{address}:{PORT}" for address in self.lab.addresses]

    def start(self) -> None:
        for index, address in enumerate(self.lab.addresses):
            data_dir = self.base / f"n{index + 1}"
            if index:
                data_dir.mkdir(parents=True)
                (data_dir / "cluster.secret").write_bytes(self.secret)
                (data_dir / "cluster.secret").chmod(0o600)
            seed = ["--seed", f"{self.lab.addresses[0]}:{RPC_PORT}"] if index else []
            node = KaiProcess(
                data_dir,
                host=address,
                port=PORT,
                rpc_port=RPC_PORT,
                config=self.config,
                extra_args=seed,
                wrapper=self.lab.wrapper(index),
            )
            self.nodes.append(node)
            node.start()
            if index == 0:
                self.secret = (data_dir / "cluster.secret").read_bytes()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def stats(self, index: int) -> dict[str, str]:
        return stats_of_server(PORT, host=self.lab.addresses[index])

    def ring(self) -> Ring:
        """The ring node 1 publishes in ``stats kai_ring``."""
        with RawConnection(PORT, host=self.lab.addresses[0]) as connection:
            reply = connection.request(b"stats kai_ring\r\n", terminator=b"END\r\n")
        fields: dict[str, str] = {}
        nodes = []
        for line in reply.decode().split("\r\n"):
            parts = line.split(" ")
            if parts[:2] == ["STAT", "node"]:
                nodes.append(NodeId.parse(parts[2]))
            elif len(parts) == 3 and parts[0] == "STAT":
                fields[parts[1]] = parts[2]
        return Ring(
            nodes, buckets=int(fields["buckets"]), virtual_nodes=int(fields["virtual_nodes"])
        )

    def replica(self, index: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Node ``index``'s own records of ``keys`` (asking again for what a partial answer
        left out), never a quorum read."""
        return read_replica(self.lab.addresses[index], RPC_PORT, self.secret, keys)


@contextmanager
def running(lab: NetnsLab, base: Path, config: str) -> Iterator[NetnsCluster]:
    """A started cluster whose every node sees every member; stopped on the way out."""
    nodes = NetnsCluster(lab, base, config)
    try:
        nodes.start()
        everyone = " ".join(sorted(f"{address}:{RPC_PORT}" for address in lab.addresses))
        for index in range(len(lab.addresses)):
            wait_for(
                lambda index=index: nodes.stats(index).get("kai_curr_nodes") == everyone,  # type: ignore[misc]
                timeout=30,
                interval=0.1,
                what=f"node {index + 1} to see every member",
            )
        yield nodes
    finally:
        nodes.stop()
