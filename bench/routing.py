"""Benchmark the client's routing: each key sent to a primary, against a node drawn at random.

For each ``--quorum`` it starts a fresh local 3-node cluster (``bench._servers``: free
loopback ports, a temporary data directory each, node 1's secret copied to the others),
waits until every node sees every member, writes every key once through ``kai.client``,
then runs the same workload three times, ``--warmup`` + ``--duration`` seconds each (and at
most ``--max-pairs`` pairs per thread), with ``--threads`` threads:

``client``
    ``kai.client.Client`` (one, shared by the threads): it reads the ring from ``stats
    kai_ring`` and sends each key to its first primary.
``routed``
    The bare driver: the client's own protocol module (:mod:`kai.client.protocol`, the same
    requests byte for byte) over one blocking socket per node per thread, each request sent
    to the node the client's router picks for its key. It differs from ``random`` in the
    node chosen only, and from ``client`` in the client's own overhead only.
``random``
    The bare driver, each request sent to a node drawn at random (seeded), as a client that
    cannot route does.

One pair is a read of a key's siblings and its context (``mg <key> K``) followed by a write
of a new value in that context (``ms <key> <len> K<token>``), the cycle of
``Client.update``; keys are drawn uniformly. Reported per side: pairs and requests per
second, p50/p99 latency of the get and of the put in context, the writes the nodes forwarded
to a primary (``kai_forwarded_writes`` in each node's ``stats``, summed, the change over the
side's run), and the share of requests that landed on a node that is not one of the key's
primaries (from the ring, ``kai.core.ring``). With N equal to the node count every node is a
primary of every key, so routing can save no hop: that run is the control.

Nodes and temporary directories are always cleaned up, and every wait has a deadline. The
JSON goes to ``bench/results/routing.json``; ``--update-readme`` puts the table into
bench/README.md.

Example::

    python -m bench.routing                                # N=3 and N=2 on 3 nodes
    python -m bench.routing --quorum 2,1,1 --duration 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import format_count, format_ms, latency_summary, markdown_table
from bench._results import add_output_options, publish
from bench._servers import (
    HOST,
    effective_quorum,
    memcache_stats,
    node_config,
    parse_quorum,
    start_cluster,
    wait_until_formed,
)
from kai.client import Client, Context, Fetched, KaiError
from kai.client.framing import CLOSED, NEED_DATA, Reply, ReplyParser
from kai.client.protocol import DescribeRing, ReadSiblings, WriteInContext, wire_key
from kai.client.records import Address, RingDescription
from kai.client.routing import Router, ring_of
from kai.testing.process import KaiProcess

SIDES = ("client", "routed", "random")
DEFAULT_QUORUMS = ("3,2,2", "2,1,1")
#: Seconds to wait for the cluster to form.
FORM_TIMEOUT = 60.0
#: Seconds one request of the bare driver (or the client) may take.
REQUEST_TIMEOUT = 5.0
#: Seconds a side's threads may run past their duration before the run is called stuck.
JOIN_SLACK = 30.0
HEADER = (
    "N,R,W",
    "side",
    "pairs/s",
    "requests/s",
    "get p50 ms",
    "get p99 ms",
    "put p50 ms",
    "put p99 ms",
    "forwarded writes",
    "on a non-primary",
    "errors",
)
README_BLOCK = "routing results"


def make_key(index: int) -> bytes:
    return b"route:%06d" % index


# --- where each key goes ------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where each key of the workload lives and where the client sends it.

    Attributes:
        addresses: every node's memcached address.
        primaries: per key index, the addresses of its primaries.
        routed: per key index, the address the client's router sends it to.
    """

    addresses: tuple[Address, ...]
    primaries: tuple[frozenset[Address], ...]
    routed: tuple[Address, ...]


def describe_ring(address: Address) -> RingDescription:
    """``stats kai_ring`` of one node, parsed by the client's protocol module."""
    with NodeSockets([address]) as sockets:
        request = DescribeRing()
        return request.interpret(sockets.exchange(address, request.encode()), node=str(address))


def placement_of(description: RingDescription, keys: int) -> Placement:
    """Each key's primaries on the described ring (``kai.core.ring``), and the node the
    client's router picks for it (its first candidate, with no node failed)."""
    ring = ring_of(description)
    by_node = {member.node: member.address for member in description.members}
    known = {node: address for node, address in by_node.items() if address is not None}
    if len(known) < len(by_node):
        raise RuntimeError(f"the ring does not name every node's address yet: {description}")
    router = Router(tuple(known.values()))
    router.ring_described(description, 0.0)
    primaries: list[frozenset[Address]] = []
    routed: list[Address] = []
    for index in range(keys):
        key = make_key(index)
        nodes = ring.primaries_of(key, description.replicas)
        primaries.append(frozenset(known[node] for node in nodes))
        routed.append(router.candidates(key, 0.0)[0])
    return Placement(tuple(router.seeds), tuple(primaries), tuple(routed))


# --- the bare driver ----------------------------------------------------------------------


class NodeSockets:
    """One blocking socket per node (opened on first use) and the client's reply parser."""

    def __init__(self, addresses: Sequence[Address], timeout: float = REQUEST_TIMEOUT) -> None:
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self._open: dict[Address, tuple[socket.socket, ReplyParser]] = {}

    def exchange(self, address: Address, request: bytes) -> Reply:
        """Send ``request`` to ``address`` and read the one reply (raise OSError on trouble;
        the socket is closed then, and opened again by the next request)."""
        if address not in self._open:
            sock = socket.create_connection((address.host, address.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._open[address] = (sock, ReplyParser())
        sock, parser = self._open[address]
        try:
            sock.sendall(request)
            while True:
                reply = parser.next_reply()
                if reply is CLOSED:
                    raise ConnectionError(f"{address} closed the connection")
                if reply is not NEED_DATA:
                    assert not isinstance(reply, type)
                    return reply
                parser.receive_data(sock.recv(65536))
        except BaseException:
            self._close(address)
            raise

    def _close(self, address: Address) -> None:
        sock, _ = self._open.pop(address)
        sock.close()

    def close(self) -> None:
        for address in list(self._open):
            self._close(address)

    def __enter__(self) -> NodeSockets:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BareTarget:
    """The bare driver of one thread: the client's requests, sent where ``choose`` says."""

    def __init__(
        self, placement: Placement, choose: Callable[[int], Address], value: bytes
    ) -> None:
        self.placement = placement
        self.choose = choose
        self.value = value
        self.sockets = NodeSockets(placement.addresses)

    def get(self, index: int) -> tuple[Fetched, bool]:
        address = self.choose(index)
        request = ReadSiblings(wire_key(make_key(index)))
        reply = self.sockets.exchange(address, request.encode())
        fetched = request.interpret(reply, node=str(address))
        return fetched, address not in self.placement.primaries[index]

    def put(self, index: int, context: Context) -> bool:
        address = self.choose(index)
        request = WriteInContext(wire_key(make_key(index)), self.value, context)
        reply = self.sockets.exchange(address, request.encode())
        request.interpret(reply, node=str(address))
        return address not in self.placement.primaries[index]

    def close(self) -> None:
        self.sockets.close()


class ClientTarget:
    """``kai.client.Client``, shared by the threads; where it sent a key is computed from
    its router's choice on the same ring (``Placement.routed``)."""

    def __init__(self, client: Client, placement: Placement, value: bytes) -> None:
        self.client = client
        self.placement = placement
        self.value = value

    def landed_off_primary(self, index: int) -> bool:
        return self.placement.routed[index] not in self.placement.primaries[index]

    def get(self, index: int) -> tuple[Fetched, bool]:
        return self.client.get(make_key(index)), self.landed_off_primary(index)

    def put(self, index: int, context: Context) -> bool:
        self.client.put(make_key(index), self.value, context=context)
        return self.landed_off_primary(index)

    def close(self) -> None:
        """The client is shared: it is closed by whoever made it."""


# --- one side's run -----------------------------------------------------------------------


@dataclass
class Tally:
    """What one thread measured."""

    pairs: int = 0
    #: Pairs over warmup and measurement, and how many of their requests landed on a
    #: non-primary (counted as the nodes count forwarded writes: all along).
    all_pairs: int = 0
    get_seconds: list[float] = field(default_factory=list)
    put_seconds: list[float] = field(default_factory=list)
    off_primary: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)


def run_thread(
    target: BareTarget | ClientTarget,
    keys: int,
    seed: int,
    start: float,
    measure_from: float,
    end: float,
    max_pairs: int,
    tally: Tally,
) -> None:
    """Pairs of get + put in context on random keys from ``start`` to ``end`` (at most
    ``max_pairs``), measured from ``measure_from``."""
    rng = random.Random(seed)
    try:
        time.sleep(max(0.0, start - time.monotonic()))  # all threads begin together
        for _ in range(max_pairs):
            began = time.monotonic()
            if began >= end:
                return
            index = rng.randrange(keys)
            try:
                fetched, got_off = target.get(index)
                read = time.monotonic()
                put_off = target.put(index, fetched.context)
                done = time.monotonic()
            except (KaiError, OSError) as error:
                tally.errors[type(error).__name__] += 1
                if len(tally.first_errors) < 5:
                    tally.first_errors.append(str(error))
                continue
            tally.all_pairs += 1
            tally.off_primary += got_off + put_off
            if began >= measure_from:
                tally.pairs += 1
                tally.get_seconds.append(read - began)
                tally.put_seconds.append(done - read)
    finally:
        target.close()


def random_node(addresses: Sequence[Address], rng: random.Random) -> Callable[[int], Address]:
    """A choice of node that ignores the key: one drawn at random for every request."""

    def choose(index: int) -> Address:
        return rng.choice(addresses)

    return choose


def forwarded_writes(nodes: Sequence[KaiProcess]) -> int:
    return sum(int(memcache_stats(node.port).get("kai_forwarded_writes", 0)) for node in nodes)


def measure_side(
    side: str,
    nodes: Sequence[KaiProcess],
    placement: Placement,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """One side's run over every thread; its figures."""
    value = random.Random(seed).randbytes(args.value_size)
    client: Client | None = None
    targets: list[BareTarget | ClientTarget] = []
    if side == "client":
        seeds = [str(address) for address in placement.addresses]
        client = Client(seeds, timeout=REQUEST_TIMEOUT, pool_size=args.threads)
        client.refresh_ring()
        targets = [ClientTarget(client, placement, value) for _ in range(args.threads)]
    else:
        for number in range(args.threads):
            choose = (
                placement.routed.__getitem__
                if side == "routed"
                else random_node(placement.addresses, random.Random(seed * 1000 + number))
            )
            targets.append(BareTarget(placement, choose, value))
    tallies = [Tally() for _ in targets]
    forwarded_before = forwarded_writes(nodes)
    start = time.monotonic() + 0.2
    measure_from = start + args.warmup
    end = measure_from + args.duration
    threads = [
        threading.Thread(
            target=run_thread,
            args=(target, args.keys, seed + n, start, measure_from, end, args.max_pairs, tally),
            name=f"{side}-{n}",
        )
        for n, (target, tally) in enumerate(zip(targets, tallies, strict=True))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, end + JOIN_SLACK - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError(f"{side}: a thread was still running {JOIN_SLACK:g} s after its end")
    finally:
        if client is not None:
            client.close()
    elapsed = min(time.monotonic(), end) - measure_from
    forwarded = forwarded_writes(nodes) - forwarded_before
    pairs = sum(tally.pairs for tally in tallies)
    all_pairs = sum(tally.all_pairs for tally in tallies)
    off_primary = sum(tally.off_primary for tally in tallies)
    errors: Counter[str] = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    result = {
        "side": side,
        "pairs": pairs,
        "seconds": elapsed,
        "pairs_per_sec": pairs / elapsed if elapsed > 0 else 0.0,
        "requests_per_sec": 2 * pairs / elapsed if elapsed > 0 else 0.0,
        "get_ms": latency_summary([s for tally in tallies for s in tally.get_seconds]),
        "put_ms": latency_summary([s for tally in tallies for s in tally.put_seconds]),
        # Counted over warmup and measurement alike, as the nodes count forwarded writes.
        "all_pairs": all_pairs,
        "forwarded_writes": forwarded,
        "forwarded_share_of_puts": forwarded / all_pairs if all_pairs else 0.0,
        "off_primary_requests": off_primary,
        "off_primary_share": off_primary / (2 * all_pairs) if all_pairs else 0.0,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "first_errors": [text for tally in tallies for text in tally.first_errors][:5],
    }
    print(
        f"{side:>6}: {format_count(result['pairs_per_sec'])} pairs/s, get p50/p99 "
        f"{format_ms(result['get_ms']['p50'])}/{format_ms(result['get_ms']['p99'])} ms, put "
        f"{format_ms(result['put_ms']['p50'])}/{format_ms(result['put_ms']['p99'])} ms, "
        f"{forwarded:,} forwarded writes, {result['off_primary_share']:.0%} on a non-primary, "
        f"{result['error_count']:,} errors",
        flush=True,
    )
    return result


def preload(placement: Placement, args: argparse.Namespace) -> float:
    """Write every key once through the client; the seconds it took."""
    value = b"p" * args.value_size
    started = time.monotonic()
    seeds = [str(address) for address in placement.addresses]
    with Client(seeds, timeout=REQUEST_TIMEOUT) as client:
        for index in range(args.keys):
            client.put(make_key(index), value)
    return time.monotonic() - started


def measure_quorum(quorum: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """A fresh 3-node cluster with ``quorum``: every side's run; the cluster always stopped."""
    print(f"\n== 3 nodes, quorum {quorum} ==", flush=True)
    base = scratch / f"quorum-{quorum.replace(',', '-')}"
    base.mkdir()
    run: dict[str, Any] = {"quorum": effective_quorum(quorum, 3), "sides": {}}
    nodes: list[KaiProcess] = []
    try:
        config = node_config(quorum, args.membership_interval)
        config += "".join(f"{setting}\n" for setting in args.setting)
        start_cluster(3, base, config, nodes)
        run["form_seconds"] = wait_until_formed(nodes, args.form_timeout)
        placement = wait_for_placement(nodes, args)
        run["preload_seconds"] = preload(placement, args)
        for number, side in enumerate(args.sides):
            run["sides"][side] = measure_side(side, nodes, placement, args, args.seed + number)
    except (OSError, RuntimeError, TimeoutError, KaiError) as error:
        run["error"] = str(error)
        print(f"quorum {quorum}: {error}", file=sys.stderr)
    finally:
        run["exit_codes"] = [node.stop() for node in nodes]
    return run


def wait_for_placement(nodes: Sequence[KaiProcess], args: argparse.Namespace) -> Placement:
    """The placement, once node 1's ring lists every node with its memcached address."""
    address = Address(HOST, nodes[0].port)
    deadline = time.monotonic() + args.form_timeout
    while True:
        description = describe_ring(address)
        named = [member for member in description.members if member.address is not None]
        if len(named) == len(nodes):
            return placement_of(description, args.keys)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ring did not name every node in time: {description}")
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


# --- report -------------------------------------------------------------------------------


def table_rows(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for run in runs:
        if "error" in run:
            rows.append([run["quorum"], "-", f"failed: {run['error']}"] + [""] * (len(HEADER) - 3))
        for side, result in run["sides"].items():
            rows.append(
                [
                    run["quorum"],
                    side,
                    format_count(result["pairs_per_sec"]),
                    format_count(result["requests_per_sec"]),
                    format_ms(result["get_ms"]["p50"]),
                    format_ms(result["get_ms"]["p99"]),
                    format_ms(result["put_ms"]["p50"]),
                    format_ms(result["put_ms"]["p99"]),
                    f"{format_count(result['forwarded_writes'])} "
                    f"({result['forwarded_share_of_puts']:.1%} of puts)",
                    f"{result['off_primary_share']:.1%}",
                    format_count(result["error_count"]),
                ]
            )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark kai.client's routing (each key to a primary) against requests sent "
            "to a random node, on a local 3-node cluster."
        ),
        epilog="example: python -m bench.routing --quorum 2,1,1 --duration 5",
    )
    add = parser.add_argument
    add(
        "--quorum",
        action="append",
        help="N,R,W of one cluster run (repeatable; default 3,2,2 then 2,1,1)",
    )
    add(
        "--sides",
        default=",".join(SIDES),
        help=f"which sides to run, comma-separated ({','.join(SIDES)})",
    )
    add("--threads", type=int, default=4, help="client threads per side (4)")
    add("--duration", type=float, default=15.0, help="measured seconds per side (15)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds before each side (1)")
    add("--max-pairs", type=int, default=1_000_000, help="most pairs per thread and side")
    add("--keys", type=int, default=1000, help="distinct keys (1000)")
    add("--value-size", type=int, default=1024, help="value bytes (1024)")
    add("--seed", type=int, default=1, help="seed of key choice and random nodes (1)")
    add("--membership-interval", type=int, default=200, help="membership round, ms (200)")
    add("--form-timeout", type=float, default=FORM_TIMEOUT, help="seconds to wait for the ring")
    add(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more node setting as a TOML line (repeatable)",
    )
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quorum = args.quorum or list(DEFAULT_QUORUMS)
    args.sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    if not args.sides or set(args.sides) - set(SIDES):
        parser.error(f"--sides: choose from {', '.join(SIDES)}")
    if args.threads < 1 or args.keys < 1 or args.max_pairs < 1 or args.value_size < 1:
        parser.error("--threads, --keys, --max-pairs and --value-size must be at least 1")
    for quorum in args.quorum:
        try:
            parse_quorum(quorum)
        except ValueError as error:
            parser.error(f"--quorum: {error}")
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the nodes are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="kai-routing-bench-"))
    try:
        runs = [measure_quorum(quorum, args, scratch) for quorum in args.quorum]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()[0]
    table = markdown_table(HEADER, table_rows(runs))
    summary = (
        f"{started}, {os.cpu_count()} CPUs, Python {platform.python_version()}; 3 nodes and "
        f"the client on one machine over loopback; {args.threads} threads per side, "
        f"{args.keys:,} keys, {args.value_size}-byte values, one pair = get + put in its "
        f"context, {args.warmup:g} + {args.duration:g} s per side; "
        f"load average {load_before:.2f} before, {load_after:.2f} after"
    )
    print(f"\n{summary}\n\n{table}")
    document = {
        "started": started,
        "summary": summary,
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "runs": runs,
        "markdown": table,
    }
    publish(
        args.results_dir,
        "routing",
        document,
        readme_block=README_BLOCK if args.update_readme else None,
    )
    failed = any(
        "error" in run or any(side["error_count"] for side in run["sides"].values()) for run in runs
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
