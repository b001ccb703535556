"""Per-request CPU cost of kai's own code, without sockets: parse + execute on LevelDB.

Run: .venv/bin/python -m bench.hotpath [--ops N] [--profile]
Reports microseconds per get and per set so optimisations can be compared before/after
without the noise of the network path or other processes' load.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import tempfile
import time
from pathlib import Path

import trio

from kai.cluster.coordinator import Coordinator
from kai.core.config import Quorum
from kai.core.memcache import protocol as mc
from kai.core.memcache.report import NodeInfo
from kai.core.pending import Pending
from kai.core.ring import NodeId, Ring
from kai.core.stats import NodeStats
from kai.memcache.commands import CommandExecutor
from kai.storage.leveldb import LevelDBEngine
from kai.storage.replica import LocalReplica
from kai.testing.network import FakeNetwork


async def run(ops: int, data_dir: Path, cache_bytes: int) -> dict[str, float]:
    async with trio.open_nursery() as background:
        results = await _run_node(ops, data_dir, cache_bytes, background)
        background.cancel_scope.cancel()
    return results


async def _run_node(
    ops: int, data_dir: Path, cache_bytes: int, background: trio.Nursery
) -> dict[str, float]:
    """A node of one (the node's own coordinator on a ring of one) parsing and executing."""
    engine = LevelDBEngine(data_dir / "db")
    stats = NodeStats()
    replica = LocalReplica(
        engine, actor=b"12345678", buckets=1024, stats=stats, cache_bytes=cache_bytes
    )
    node = NodeId("127.0.0.1", 11011)
    ring = Ring([node], buckets=1024)
    coordinator = Coordinator(
        self_node=node,
        replica=replica,
        transport=FakeNetwork(random.Random(0)).transport_for(node),  # never called
        ring=lambda: ring,
        quorum=Quorum(3, 2, 2),
        background=background,
    )
    info = NodeInfo(
        node="127.0.0.1:11011",
        quorum="1,1,1",
        buckets=1024,
        virtual_nodes=128,
        store="leveldb",
        max_connections=1024,
        max_item_size=1 << 20,
        settings={},
    )
    executor = CommandExecutor(coordinator, stats, info)
    value = b"v" * 100
    keys = [b"key:%028d" % i for i in range(10_000)]
    sets = [b"set %s 0 0 100\r\n%s\r\n" % (k, value) for k in keys]
    gets = [b"get %s\r\n" % k for k in keys]
    results = {}
    for label, requests in (("set", sets), ("get", gets)):
        parser = mc.MemcacheParser()
        started = time.perf_counter()
        for i in range(ops):
            parser.receive_data(requests[i % len(requests)])
            event = parser.next_event()
            assert not isinstance(event, type)
            # As the listener drives it: the reply at once, or a pending step to await.
            reply = executor.execute(event)
            if isinstance(reply, Pending):
                reply = await reply
            assert reply
        results[label] = (time.perf_counter() - started) / ops * 1e6
    engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--cache-size", type=int, default=64 << 20, help="replica cache bytes (0 disables)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
        results = trio.run(run, args.ops, Path(tmp), args.cache_size)
        if args.profile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    for label, micros in results.items():
        print(f"{label}: {micros:.1f} us/op")


if __name__ == "__main__":
    main()
