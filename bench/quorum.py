"""CPU cost of the coordinator's quorum get and set, without sockets: peers answer at once.

Run: .venv/bin/python -m bench.quorum [--ops N] [--value-size B]

Three replicas (N=3 R=2 W=2) live in this process on in-memory engines. A coordinator on the
first one reads and writes keys; its calls to the two others go through the coordinator's
real fan-out, and a transport runs the peer's real RPC handler and delivers the answer on the
next scheduler pass (no sockets, no serialisation of the RPC message itself). It prints the
CPU microseconds per request: the coordinator's work, both peers' handlers and the trio
scheduling in between, i.e. what the cluster pays per request besides the network and the
memcached front end. Compare figures from one run; nothing here is a timed assertion.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import NoReturn

import trio

from kai.cluster.coordinator import Coordinator
from kai.cluster.hints import HintStore
from kai.cluster.replica_rpc import ReplicaRpcHandlers
from kai.core.config import Quorum
from kai.core.pending import Step, resolve
from kai.core.ring import NodeId, Ring
from kai.core.stats import NodeStats
from kai.core.versions import Payload
from kai.rpc.server import Handler
from kai.rpc.transport import CancelCall, OnDone
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica

NODES = [NodeId("127.0.0.1", 11011 + index) for index in range(3)]
BUCKETS = 1024


class InProcessPeers:
    """A fan-out transport whose peers are handler tables in this process."""

    def __init__(self, handlers: dict[NodeId, dict[str, Handler]]) -> None:
        self.handlers = handlers
        self.answers: list[tuple[OnDone, object]] = []

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        return self.handlers[peer][method](*params)

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall:
        self.answers.append((on_done, self.handlers[peer][method](*params)))
        return lambda: None

    async def deliver_forever(self) -> None:
        """Hand every answer to its caller on the next scheduler pass, as a reader would."""
        while True:
            answers, self.answers = self.answers, []
            for on_done, result in answers:
                on_done(result, None)
            await trio.lowlevel.checkpoint()


async def measure(ops: int, value_size: int) -> dict[str, float]:
    ring = Ring(NODES, buckets=BUCKETS)
    replicas = {
        node: LocalReplica(
            MemoryEngine(),
            actor=b"actor%03d" % index,
            buckets=BUCKETS,
            stats=NodeStats(),
            cache_bytes=64 << 20,
        )
        for index, node in enumerate(NODES)
    }
    peers = InProcessPeers(
        {
            node: ReplicaRpcHandlers(
                replicas[node],
                _no_forwarding,
                _no_forwarding,
                self_node=node,
                hints=HintStore(replicas[node].engine, buckets=BUCKETS),
            ).handlers()
            for node in NODES
        }
    )
    keys = [b"key:%028d" % index for index in range(10_000)]
    payload = Payload(0, 0, b"v" * value_size)
    results: dict[str, float] = {}
    async with trio.open_nursery() as background:
        coordinator = Coordinator(
            self_node=NODES[0],
            replica=replicas[NODES[0]],
            transport=peers,
            ring=lambda: ring,
            quorum=Quorum(3, 2, 2),
            background=background,
        )
        background.start_soon(peers.deliver_forever)
        for key in keys:
            await resolve(coordinator.put(key, payload))
        requests: dict[str, Callable[[bytes], Step[object]]] = {
            "get": lambda key: coordinator.get((key,)),
            "set": lambda key: coordinator.put(key, payload),
        }
        for label, request in requests.items():
            started = time.process_time()
            for index in range(ops):
                await resolve(request(keys[index % len(keys)]))
            for _ in range(3):  # the last requests' late answers
                await trio.lowlevel.checkpoint()
            results[label] = (time.process_time() - started) / ops * 1e6
        background.cancel_scope.cancel()
    return results


def _no_forwarding(*_args: object) -> NoReturn:
    raise AssertionError("every node is a primary here: nothing is forwarded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=20_000, help="requests of each kind (20000)")
    parser.add_argument("--value-size", type=int, default=1024, help="value bytes (1024)")
    args = parser.parse_args()
    results = trio.run(measure, args.ops, args.value_size)
    for label, micros in results.items():
        print(f"{label}: {micros:.1f} us of CPU per request (coordinator and both peers)")


if __name__ == "__main__":
    main()
