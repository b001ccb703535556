"""Benchmark one anti-entropy exchange: a partition of ``--keys`` keys, ``--differ`` of them
differing, between two replicas on real LevelDB.

Both replicas are built in one process (``buckets = 1``: one partition holds every key) and
their ``AntiEntropy`` services talk over the in-process network (:mod:`kai.testing.network`),
which encodes every message as the TCP transport does; the bytes counted are the msgpack
encodings of every request's parameters and every answer. Half the differing keys exist
only on the first replica, half have a newer version on the second. The exchange is timed
from the first call to the last merge (both trees already built, as on a running node), and
the replicas are checked afterwards: every root equal.

Example::

    python -m bench.exchange                    # 100,000 keys, 1% differing, 1 KB values
    python -m bench.exchange --keys 20000 --json /tmp/exchange.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import trio

from kai.cluster.antientropy import AntiEntropy
from kai.cluster.fanout import PeerCaller
from kai.cluster.hints import HintStore
from kai.cluster.replica_rpc import ReplicaRpcHandlers
from kai.core.config import Quorum
from kai.core.errors import RpcError
from kai.core.ring import NodeId, Ring
from kai.core.stats import NodeStats
from kai.core.versions import Payload
from kai.rpc.transport import CancelCall, FanOutTransport, OnDone
from kai.storage.leveldb import LevelDBEngine
from kai.storage.replica import LocalReplica
from kai.testing.network import FakeNetwork

NODES = (NodeId("127.0.0.1", 1), NodeId("127.0.0.1", 2))


class CountingTransport:
    """A transport that counts the msgpack bytes of every request and answer it carries."""

    def __init__(self, inner: FanOutTransport) -> None:
        self.inner = inner
        self.bytes = 0
        self.calls = 0

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall:
        self.calls += 1
        self.bytes += len(msgpack.packb([method, list(params)], use_bin_type=True))

        def done(result: object, error: RpcError | None) -> None:
            self.bytes += len(msgpack.packb(result, use_bin_type=True))
            on_done(result, error)

        return self.inner.start_call(peer, method, params, done)

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        return await self.inner.call(peer, method, *params)


def fill(replicas: Sequence[LocalReplica], keys: int, differ: int, value_size: int) -> None:
    """Every key on both replicas, then ``differ`` keys made to differ."""
    rng = random.Random(0)
    value = bytes(rng.randrange(256) for _ in range(value_size))
    first, second = replicas
    differing = set(rng.sample(range(keys), differ))
    only_first = set(sorted(differing)[: differ // 2])
    for index in range(keys):
        key = b"key:%09d" % index
        version = first.coordinate_write(key, Payload(0, 0, value), None)
        if index not in only_first:
            second.apply(key, (version,))
        if index in differing and index not in only_first:
            second.coordinate_write(key, Payload(0, 0, value[::-1]), None)


def _no_forwarding(*args: object) -> NoReturn:
    raise AssertionError("an exchange forwards no write")


async def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    ring = Ring(NODES, buckets=1)
    replicas = [
        LocalReplica(
            LevelDBEngine(scratch / f"n{index}"),
            actor=b"actor-%d" % index,
            buckets=1,
            stats=NodeStats(),
        )
        for index in range(2)
    ]
    started = time.monotonic()
    fill(replicas, args.keys, args.differ, args.value_size)
    fill_seconds = time.monotonic() - started
    async with FakeNetwork.running(random.Random(0)) as network, trio.open_nursery() as nursery:
        transports = [CountingTransport(network.transport_for(node)) for node in NODES]
        services = [
            AntiEntropy(
                self_node=node,
                replica=replica,
                peers=PeerCaller(
                    transport,
                    nursery,
                    on_success=lambda node: None,
                    on_failure=lambda node: None,
                ),
                ring=lambda: ring,
                quorum=Quorum(2, 1, 1),
                is_up=lambda node: True,
                interval=3600,
                request_timeout=600,
            )
            for node, replica, transport in zip(NODES, replicas, transports, strict=True)
        ]
        for node, service, replica in zip(NODES, services, replicas, strict=True):
            reads = ReplicaRpcHandlers(
                replica,
                _no_forwarding,
                _no_forwarding,
                self_node=node,
                hints=HintStore(replica.engine, buckets=1),
            )
            network.register(node, {**reads.handlers(), **service.handlers()})
        built = time.monotonic()
        for service in services:
            await service.build()
        build_seconds = time.monotonic() - built
        cpu, wall = time.process_time(), time.monotonic()
        assert await services[0].exchange(NODES[1])
        exchange = {"seconds": time.monotonic() - wall, "cpu_seconds": time.process_time() - cpu}
        roots = [service.trees.root(0) for service in services]
        nursery.cancel_scope.cancel()
    for replica in replicas:
        replica.engine.close()
    if roots[0] != roots[1]:
        raise RuntimeError("the replicas still differ after the exchange")
    return {
        "keys": args.keys,
        "differing": args.differ,
        "value_size": args.value_size,
        "fill_seconds": fill_seconds,
        "tree_build_seconds_both": build_seconds,
        "exchange_seconds": exchange["seconds"],
        "exchange_cpu_seconds": exchange["cpu_seconds"],
        "bytes": sum(transport.bytes for transport in transports),
        "calls": sum(transport.calls for transport in transports),
        "keys_repaired": services[0].keys_repaired,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the partition")
    parser.add_argument("--differ", type=int, default=1000, help="keys that differ (1%%)")
    parser.add_argument("--value-size", type=int, default=1024, help="value bytes (1024)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kai-bench-exchange-") as scratch:
        result = trio.run(measure, args, Path(scratch))
    print(
        f"{result['keys']:,} keys, {result['differing']:,} differing: one exchange took "
        f"{result['exchange_seconds']:.2f} s ({result['exchange_cpu_seconds']:.2f} s of CPU for "
        f"both sides), {result['bytes']:,} bytes in {result['calls']} calls, "
        f"{result['keys_repaired']} keys repaired; trees built in "
        f"{result['tree_build_seconds_both']:.2f} s (both)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
