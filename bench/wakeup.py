"""What a wake-up costs: a server answering requests that arrive one at a time.

Run: .venv/bin/python -m bench.wakeup [--requests 20000] [--batches 1,16]

In open loop a server that is not saturated handles about one request per wake-up: it sleeps
in ``epoll_wait``, the kernel wakes it for one request, it answers and sleeps again. That
costs more than the same request inside a busy batch (caches gone cold, the scheduler, one
whole round of the event loop for one request). This script measures that cost on this
machine for kai and, to tell kai's share from the floor under it, for simpler servers. Over
one TCP loopback connection the client sends ``batch`` pipelined ``version\\r\\n`` requests,
waits for every reply, and repeats; the server sleeps during each round trip. Servers:

- ``plain``: a bare ``select.epoll`` loop in Python that answers each read at once;
- ``trio``: the same in trio, waiting with ``trio.lowlevel.wait_readable``;
- ``netpoll``: the same in trio, answering in the callback of kai's edge-triggered poller
  (:class:`kai.memcache.netpoll.ReadPoller`, as kai's memcached listener does), so no
  connection task is woken at all;
- ``kai``: a real kai node (one node, default settings);
- ``memcached``: ``memcached -t 1``, if installed.

It prints each server's CPU time (user + system, from ``/proc/<pid>/stat``) per request, and
the client's round trips. A batch of 1 is the open-loop case, one request per wake-up; a
batch of 16 shares one wake-up, one receive and one send among 16 requests, as a busy server
does. With two or more CPUs the client runs on CPU 0 and the server on CPU 1 (``--no-pin``
leaves placement to the kernel). Every run has a deadline (``--timeout``); servers are
stopped and their directories removed at the end. Compare figures from one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench._common import markdown_table, percentile
from bench._results import add_output_options, publish
from bench._servers import module_command, module_env
from kai.memcache import netpoll
from kai.testing.process import KaiProcess, MemcachedProcess, ServerProcess, free_port

SERVERS = ("plain", "trio", "netpoll", "kai", "memcached")
REQUEST = b"version\r\n"
REPLY = b"VERSION wakeup-echo\r\n"
README_BLOCK = "wakeup results"
WARMUP_REQUESTS = 500
CLIENT_CPU, SERVER_CPU = 0, 1


# --- the echo servers (run as ``python -m bench.wakeup --serve MODE PORT``) ---------------


def serve_plain(listener: socket.socket) -> None:
    epoll = select.epoll()
    while True:
        connection, _ = listener.accept()
        connection.setblocking(False)
        epoll.register(connection.fileno(), select.EPOLLIN)
        while True:
            epoll.poll()
            data = connection.recv(65536)
            if not data:
                break
            connection.send(REPLY * data.count(b"\n"))
        epoll.unregister(connection.fileno())
        connection.close()


async def serve_trio(listener: socket.socket, use_netpoll: bool) -> None:
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        poller = netpoll.ReadPoller() if use_netpoll else None
        if poller is not None:
            nursery.start_soon(poller.run)
        while True:
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            with connection:
                connection.setblocking(False)
                if poller is None:
                    await echo(connection)
                else:
                    await echo_from_poller(poller, connection)


async def echo(connection: socket.socket) -> None:
    """Answer one connection's requests until it closes, waiting in its own task."""
    while True:
        await trio.lowlevel.wait_readable(connection)
        data = connection.recv(65536)
        if not data:
            return
        connection.send(REPLY * data.count(b"\n"))


async def echo_from_poller(poller: netpoll.ReadPoller, connection: socket.socket) -> None:
    """Answer one connection's requests in the poller's callback until it closes."""
    closed = trio.Event()

    def on_readable() -> None:
        while True:  # edge-triggered: read until nothing is left
            try:
                data = connection.recv(65536)
            except BlockingIOError:
                return
            if not data:
                closed.set()
                return
            connection.send(REPLY * data.count(b"\n"))

    watch = poller.watch(connection, on_readable)
    try:
        await closed.wait()
    finally:
        watch.close()


def serve(mode: str, port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    if mode == "plain":
        serve_plain(listener)
    else:
        trio.run(serve_trio, listener, mode == "netpoll")


# --- the client --------------------------------------------------------------------------------


def pin(pid: int, cpu: int) -> None:
    """Put every thread of ``pid`` on ``cpu``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exchange(sock: socket.socket, rounds: int, batch: int, deadline: float) -> list[float]:
    """Send ``batch`` pipelined requests and wait for their replies, ``rounds`` times (or
    until ``deadline``); the round trips in seconds."""
    clock = time.perf_counter
    requests = REQUEST * batch
    round_trips = []
    for _ in range(rounds):
        started = clock()
        sock.sendall(requests)
        replies = 0
        while replies < batch:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            replies += data.count(b"\n")  # every reply is one line
        answered = clock()
        round_trips.append(answered - started)
        if answered > deadline:
            break
    return round_trips


def start(name: str, scratch: Path) -> ServerProcess:
    port = free_port()
    server: ServerProcess
    if name == "memcached":
        server = MemcachedProcess(port=port, threads=1)
    elif name == "kai":
        server = KaiProcess(Path(tempfile.mkdtemp(prefix="kai-node-", dir=scratch)), port=port)
    else:
        argv = module_command("bench.wakeup", "--serve", name, str(port))
        server = ServerProcess(argv, host="127.0.0.1", port=port, env=module_env())
    server.start()
    return server


def measure(name: str, batch: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Requests to ``name`` in batches of ``batch``: its CPU per request, the round trips."""
    server = start(name, scratch)
    try:
        if args.pin:
            pin(server.pid, SERVER_CPU)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            deadline = time.perf_counter() + args.timeout
            rounds = max(1, args.requests // batch)
            exchange(sock, max(1, WARMUP_REQUESTS // batch), batch, deadline)
            before = cpu_seconds(server.pid)
            round_trips = exchange(sock, rounds, batch, deadline)
            used = cpu_seconds(server.pid) - before
    finally:
        server.stop()
    round_trips.sort()
    requests = len(round_trips) * batch
    return {
        "server": name,
        "batch": batch,
        "requests": requests,
        "server_cpu_us_per_request": used / requests * 1e6,
        "round_trip_p50_us": percentile(round_trips, 0.5) * 1e6,
        "round_trip_p99_us": percentile(round_trips, 0.99) * 1e6,
    }


HEADER = (
    "server",
    "requests per round trip",
    "requests",
    "server CPU µs per request",
    "round trip p50 µs",
    "round trip p99 µs",
)


def table(results: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            result["server"],
            str(result["batch"]),
            f"{result['requests']:,}",
            f"{result['server_cpu_us_per_request']:.1f}",
            f"{result['round_trip_p50_us']:.0f}",
            f"{result['round_trip_p99_us']:.0f}",
        ]
        for result in results
    ]
    return markdown_table(HEADER, rows)


def positive_integers(text: str) -> list[int]:
    values = [int(item) for item in text.split(",") if item]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python -m bench.wakeup --servers kai,trio,netpoll --batches 1,4,16",
    )
    add = parser.add_argument
    add("--requests", type=int, default=20_000, help="requests per server and batch (20000)")
    add(
        "--batches",
        type=positive_integers,
        default=[1, 16],
        help="requests sent together per round trip (1,16)",
    )
    add("--servers", default=",".join(SERVERS), help=f"which servers ({','.join(SERVERS)})")
    add("--no-pin", dest="pin", action="store_false", help="do not pin client and server")
    add("--timeout", type=float, default=60.0, help="longest run per server and batch, s (60)")
    add("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    names = [name for name in args.servers.split(",") if name]
    unknown = set(names) - set(SERVERS)
    if unknown:
        raise SystemExit(f"unknown servers: {', '.join(sorted(unknown))}")
    if "memcached" in names and not MemcachedProcess.available():
        print("memcached is not installed; skipping it", file=sys.stderr)
        names.remove("memcached")
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.pin = args.pin and len(os.sched_getaffinity(0)) >= 2
    if args.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="kai-wakeup-"))
    try:
        for batch in args.batches:
            for name in names:
                result = measure(name, batch, args, scratch)
                results.append(result)
                print(
                    f"{name:>9}, {batch:>3} per round trip: "
                    f"{result['server_cpu_us_per_request']:6.1f} µs of server CPU per request",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    placement = "client on CPU 0, server on CPU 1" if args.pin else "placement left to the kernel"
    summary = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; about {args.requests:,} `version` requests per server "
        f"and batch over one TCP loopback connection; {placement}"
    )
    markdown = table(results)
    print(f"\n{summary}\n\n{markdown}")
    document = {"summary": summary, "markdown": markdown, "results": results}
    publish(
        args.results_dir,
        "wakeup",
        document,
        readme_block=README_BLOCK if args.update_readme else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
