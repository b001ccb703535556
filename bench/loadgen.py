"""A memcached text-protocol load generator built for throughput on a small machine.

Each worker process drives its share of the connections from one non-blocking event loop on
raw sockets; requests and expected replies are precomputed bytes, so the per-operation cost is
a few list lookups and byte comparisons. Every reply is checked (hits, misses, errors and
unexpected replies are counted), and latencies are recorded per operation type.

Closed loop (default): each connection keeps ``--pipeline`` requests in flight and sends the
next one as soon as a reply arrives. Open loop (``--rate``): requests are due at fixed
intervals whatever the server does, and latency is measured from the time a request was due,
not from when it was finally sent, so a stalled server is not hidden (coordinated omission).

Example::

    python -m bench.loadgen --servers 127.0.0.1:11211 --connections 16 --preload \\
        --get-ratio 0.9 --duration 10 --json /tmp/result.json

It only talks to loopback addresses, and every loop is bounded by a deadline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import select
import socket
import sys
import time
from array import array
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    END,
    GET,
    OP_NAMES,
    SET,
    STORED,
    FramingLost,
    LoadConfig,
    WorkerPlan,
    Workload,
    format_report,
    merge_results,
    parse_reply,
    parse_servers,
    plan_workers,
)

RECV_SIZE = 1 << 18
PRELOAD_BATCH = 100
CONNECT_TIMEOUT = 5.0
DRAIN_TIMEOUT = 1.0
SELECT_FD_LIMIT = 1000
READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
WRITABLE = select.EPOLLOUT


class Stats:
    """What one worker observed; only replies completed inside the measured window count."""

    def __init__(self) -> None:
        self.latencies = (array("d"), array("d"))  # seconds, indexed by op
        self.hits = 0
        self.misses = 0
        self.errors: dict[str, int] = {}
        self.sent = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Budget:
    """How many more requests this worker may send (``--max-ops``), shared by its connections."""

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining


class Connection:
    """One client connection: a FIFO of requests in flight and the reply parser's buffer."""

    __slots__ = (
        "alive",
        "budget",
        "fd",
        "in_flight",
        "interval",
        "next_due",
        "phase",
        "pipeline",
        "position",
        "schedule",
        "sock",
        "stats",
        "unparsed",
        "unsent",
        "workload",
    )

    def __init__(
        self,
        sock: socket.socket,
        workload: Workload,
        server: int,
        offset: int,
        pipeline: int,
        stats: Stats,
        budget: Budget,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.workload = workload
        self.schedule = workload.schedules[server]
        self.position = offset % len(self.schedule)
        self.pipeline = pipeline
        self.stats = stats
        self.budget = budget
        self.in_flight: deque[tuple[int, int, float]] = deque()  # (op, key, start time)
        self.unparsed = b""
        self.unsent = b""
        self.alive = True
        self.phase = 0.0  # open loop: offset of the first due time, in intervals
        self.next_due = 0.0
        self.interval = 0.0

    def fail(self, kind: str) -> None:
        """Count an error that makes the connection unusable, and stop using it."""
        if self.alive:
            self.stats.error(kind)
            self.alive = False
            self.in_flight.clear()

    def on_readable(self, now: float, record: bool) -> None:
        """Consume the replies that have arrived; ``record`` says whether they are measured."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.fail("connection_error")
            return
        if not data:
            self.fail("connection_closed")
            return
        if self.unparsed:
            data = self.unparsed + data
        workload = self.workload
        hit_headers = workload.hit_headers
        hit_tail = workload.hit_tail
        tail_length = len(hit_tail)
        in_flight = self.in_flight
        stats = self.stats
        get_latencies, set_latencies = stats.latencies
        size = len(data)
        pos = 0
        while in_flight and pos < size:
            op, key, started = in_flight[0]
            if op == GET:
                header = hit_headers[key]
                if data.startswith(header, pos):
                    end = pos + len(header) + tail_length
                    if end > size:
                        break
                    if not data.startswith(hit_tail, end - tail_length):
                        end = self._slow_reply(data, pos, op)
                        if end < 0:
                            break
                    elif record:
                        stats.hits += 1
                    pos = end
                elif data.startswith(END, pos):
                    if record:
                        stats.misses += 1
                    pos += len(END)
                else:
                    end = self._slow_reply(data, pos, op)
                    if end < 0:
                        break
                    pos = end
                if record:
                    get_latencies.append(now - started)
            else:
                if data.startswith(STORED, pos):
                    pos += len(STORED)
                else:
                    end = self._slow_reply(data, pos, op)
                    if end < 0:
                        break
                    pos = end
                if record:
                    set_latencies.append(now - started)
            in_flight.popleft()
        if not self.alive:
            return
        self.unparsed = data[pos:] if pos < size else b""
        if self.unparsed and not in_flight:
            self.fail("reply_without_request")

    def _slow_reply(self, data: bytes, pos: int, op: int) -> int:
        """Parse a reply the fast path did not recognise; -1 if it is still incomplete."""
        try:
            parsed = parse_reply(data, pos)
        except FramingLost:
            self.fail("framing_lost")
            return -1
        if parsed is None:
            return -1
        end, kind = parsed
        if op == GET and kind == "value":
            self.stats.error("wrong_value")
        elif kind in ("server_error", "client_error", "error"):
            self.stats.error(kind)
        else:
            self.stats.error(f"unexpected_{kind}_for_{OP_NAMES[op]}")
        return end

    def fill(self, now: float) -> None:
        """Closed loop: top the pipeline up with the next scheduled requests."""
        room = min(self.pipeline - len(self.in_flight), self.budget.remaining)
        if room > 0 and self.alive:
            self._send_next(room, now, 0.0)

    def fill_due(self, now: float) -> None:
        """Open loop: send the requests whose due time has passed, as far as the pipeline allows."""
        room = min(self.pipeline - len(self.in_flight), self.budget.remaining)
        if room <= 0 or self.next_due > now or not self.alive:
            return
        due = min(room, int((now - self.next_due) / self.interval) + 1)
        self._send_next(due, self.next_due, self.interval)
        self.next_due += due * self.interval

    def _send_next(self, count: int, first_start: float, interval: float) -> None:
        workload = self.workload
        schedule = self.schedule
        length = len(schedule)
        position = self.position
        in_flight = self.in_flight
        parts: list[bytes] = []
        started = first_start
        for _ in range(count):
            entry = schedule[position]
            position = position + 1 if position + 1 < length else 0
            key = entry >> 1
            if entry & 1 == SET:
                parts.append(workload.set_headers[key])
                parts.append(workload.value_line)
                in_flight.append((SET, key, started))
            else:
                parts.append(workload.get_requests[key])
                in_flight.append((GET, key, started))
            started += interval
        self.position = position
        self.budget.remaining -= count
        self.stats.sent += count
        self.send(b"".join(parts))

    def send(self, data: bytes) -> None:
        """Send now, or queue behind bytes the socket did not take yet."""
        if self.unsent:
            self.unsent += data
            return
        try:
            written = self.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError:
            self.fail("connection_error")
            return
        self.unsent = data[written:]

    def flush(self) -> None:
        """The socket is writable: send what is queued."""
        data, self.unsent = self.unsent, b""
        if data:
            self.send(data)


class Poller:
    """Readiness of the connections' sockets.

    epoll in closed loop. The open loop uses select(), whose timeout has microsecond
    resolution (epoll's is a millisecond), so requests are sent when they are due rather
    than up to a millisecond late; select() limits a worker to about 1000 connections.
    """

    def __init__(self, connections: Sequence[Connection], precise_timer: bool) -> None:
        self.precise_timer = precise_timer
        self.read_fds = [connection.fd for connection in connections]
        self.write_fds: set[int] = set()
        self.epoll = None if precise_timer else select.epoll()
        if self.epoll is not None:
            for fd in self.read_fds:
                self.epoll.register(fd, READABLE)

    def want_write(self, fd: int, wanted: bool) -> None:
        if wanted == (fd in self.write_fds):
            return
        if wanted:
            self.write_fds.add(fd)
        else:
            self.write_fds.discard(fd)
        if self.epoll is not None:
            self.epoll.modify(fd, READABLE | (WRITABLE if wanted else 0))

    def forget(self, fd: int) -> None:
        if fd in self.read_fds:
            self.read_fds.remove(fd)
            self.write_fds.discard(fd)
            if self.epoll is not None:
                self.epoll.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        """Ready (fd, event mask) pairs, waiting at most ``timeout`` seconds."""
        if self.epoll is not None:
            return self.epoll.poll(timeout)
        readable, writable, _ = select.select(self.read_fds, list(self.write_fds), [], timeout)
        return [(fd, select.EPOLLIN) for fd in readable] + [
            (fd, select.EPOLLOUT) for fd in writable
        ]

    def close(self) -> None:
        if self.epoll is not None:
            self.epoll.close()


def open_connections(
    config: LoadConfig, plan: WorkerPlan, workload: Workload
) -> tuple[list[Connection], Stats, Budget]:
    """Connect every socket of the plan (non-blocking, TCP_NODELAY)."""
    stats = Stats()
    budget = Budget(plan.max_ops if plan.max_ops is not None else sys.maxsize)
    connections = []
    for connection_id in plan.connection_ids:
        server = connection_id % len(config.servers)
        address = config.servers[server]
        try:
            sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
        except OSError as error:
            raise ConnectionError(f"cannot connect to {address[0]}:{address[1]}: {error}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        offset = connection_id * 7919 + plan.worker * 104729
        connection = Connection(sock, workload, server, offset, config.pipeline, stats, budget)
        connection.phase = connection_id / config.connections  # spread sends over an interval
        connections.append(connection)
    return connections, stats, budget


def run_worker(
    config: LoadConfig,
    connections: list[Connection],
    stats: Stats,
    budget: Budget,
    start_at: float,
) -> dict[str, Any]:
    """Drive the connections from ``start_at`` to the end of the measured window."""
    measure_start = start_at + config.warmup
    window = (measure_start, measure_start + config.duration)
    open_loop = config.rate is not None
    if open_loop and len(connections) > SELECT_FD_LIMIT:
        raise ValueError(f"open loop allows {SELECT_FD_LIMIT} connections per process")
    if config.rate is not None:
        interval = config.connections / config.rate
        for connection in connections:
            connection.interval = interval
            connection.next_due = start_at + interval * connection.phase
    poller = Poller(connections, precise_timer=open_loop)
    by_fd = {connection.fd: connection for connection in connections}
    cpu_start = time.process_time()
    now = time.monotonic()
    if now < start_at:
        time.sleep(start_at - now)
    now, end, live = _drive(connections, by_fd, poller, budget, window, open_loop)
    cpu_seconds = time.process_time() - cpu_start
    outstanding = sum(len(connection.in_flight) for connection in live)
    overdue = _overdue(live, now) if open_loop else 0
    _drain(poller, live, by_fd)
    poller.close()
    for connection in connections:
        connection.sock.close()
    return {
        "measured_seconds": max(0.0, end - measure_start),
        "cpu_seconds": cpu_seconds,
        "wall_seconds": now - start_at,
        "sent": stats.sent,
        "outstanding_at_end": outstanding,
        "overdue_at_end": overdue,
        "hits": stats.hits,
        "misses": stats.misses,
        "errors": stats.errors,
        "latencies": [latencies.tobytes() for latencies in stats.latencies],
    }


def _drive(
    connections: list[Connection],
    by_fd: dict[int, Connection],
    poller: Poller,
    budget: Budget,
    window: tuple[float, float],
    open_loop: bool,
) -> tuple[float, float, list[Connection]]:
    """The event loop: replies in, requests out, until the window closes or ``--max-ops`` is
    spent and answered. Returns the time, the end of measurement and the live connections."""
    measure_start, measure_end = window
    now = time.monotonic()
    if not open_loop:
        for connection in connections:
            connection.fill(now)
    last_completion = now
    live = list(connections)
    while now < measure_end and live:
        events = poller.poll(_poll_timeout(live, now, measure_end, open_loop))
        now = time.monotonic()
        touched = _dispatch(events, by_fd, now, record=measure_start <= now < measure_end)
        if events:
            last_completion = now
        if open_loop:
            for connection in live:
                connection.fill_due(now)
            touched = live
        else:
            sent_at = time.monotonic()
            for connection in touched:
                connection.fill(sent_at)
        if _update_interest(touched, poller):
            live = [connection for connection in live if connection.alive]
        if budget.remaining <= 0 and not any(connection.in_flight for connection in live):
            return now, min(now, last_completion), live  # every reply of --max-ops is in
    return now, min(now, measure_end), live


def _poll_timeout(live: list[Connection], now: float, measure_end: float, open_loop: bool) -> float:
    """How long the poller may sleep: to the end of the window, or the next due request."""
    timeout = min(0.1, measure_end - now)
    if open_loop:
        waiting = [c.next_due for c in live if len(c.in_flight) < c.pipeline]
        if waiting:
            timeout = min(max(min(waiting) - now, 0.0), timeout)
    return timeout


def _dispatch(
    events: list[tuple[int, int]], by_fd: dict[int, Connection], now: float, record: bool
) -> list[Connection]:
    """Hand each ready socket's events to its connection; the connections touched."""
    touched = []
    for fd, mask in events:
        connection = by_fd[fd]
        if mask & READABLE:
            connection.on_readable(now, record)
        if mask & WRITABLE:
            connection.flush()
        touched.append(connection)
    return touched


def _update_interest(touched: list[Connection], poller: Poller) -> bool:
    """Watch for writability where bytes wait unsent, forget dead connections; any dead?"""
    dead = False
    for connection in touched:
        if connection.alive:
            if connection.unsent or poller.write_fds:
                poller.want_write(connection.fd, bool(connection.unsent))
        else:
            poller.forget(connection.fd)
            dead = True
    return dead


def _overdue(live: list[Connection], now: float) -> int:
    """Open loop: requests that were due but never sent (the server was too slow)."""
    return sum(
        int((now - connection.next_due) / connection.interval) + 1
        for connection in live
        if connection.next_due <= now
    )


def _drain(poller: Poller, live: list[Connection], by_fd: dict[int, Connection]) -> None:
    """Read the replies still in flight (unmeasured) so servers see orderly closes."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    now = time.monotonic()
    while now < deadline and any(c.in_flight and c.alive for c in live):
        for fd, mask in poller.poll(deadline - now):
            if mask & READABLE:
                by_fd[fd].on_readable(now, record=False)
            if mask & WRITABLE:
                by_fd[fd].flush()
        now = time.monotonic()


def preload(config: LoadConfig, workload: Workload) -> None:
    """Set every key once, pipelining batches on one connection per server."""
    deadline = time.monotonic() + 120.0
    for server, address in enumerate(config.servers):
        keys = workload.keys_of(server)
        with socket.create_connection(address, timeout=10.0) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for first in range(0, len(keys), PRELOAD_BATCH):
                batch = keys[first : first + PRELOAD_BATCH]
                request = b"".join(workload.set_headers[key] + workload.value_line for key in batch)
                sock.sendall(request)
                expected = STORED * len(batch)
                reply = b""
                while len(reply) < len(expected):
                    if time.monotonic() > deadline:
                        raise TimeoutError("preload took longer than 120 s")
                    chunk = sock.recv(len(expected) - len(reply))
                    if not chunk:
                        raise ConnectionError(f"{address} closed the connection during preload")
                    reply += chunk
                if reply != expected:
                    raise RuntimeError(f"preload to {address} got {reply[:200]!r}")


def _worker_process(
    config: LoadConfig, plan: WorkerPlan, workload: Workload, pipe: Any, go: Any, start_at: Any
) -> None:
    """Entry point of a forked worker: connect, report ready, wait for the start, run."""
    try:
        connections, stats, budget = open_connections(config, plan, workload)
        pipe.send("ready")
        if not go.wait(timeout=60.0):
            pipe.send({"fatal": "no start signal within 60 s"})
            return
        pipe.send(run_worker(config, connections, stats, budget, start_at.value))
    except (OSError, ValueError, RuntimeError) as error:
        pipe.send({"fatal": f"worker {plan.worker}: {error!r}"})
    finally:
        pipe.close()


def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run the whole benchmark (preload, all workers) and return the merged result."""
    workload = Workload(config.workload_spec())
    if config.preload:
        preload(config, workload)
    plans = plan_workers(config)
    if config.processes == 1:
        connections, stats, budget = open_connections(config, plans[0], workload)
        start_at = time.monotonic() + 0.01
        worker_results = [run_worker(config, connections, stats, budget, start_at)]
    else:
        worker_results = _run_processes(config, plans, workload)
    return merge_results(config, worker_results)


def _run_processes(
    config: LoadConfig, plans: list[WorkerPlan], workload: Workload
) -> list[dict[str, Any]]:
    """Fork one worker per plan (they inherit ``workload``), start them together, collect."""
    context = multiprocessing.get_context("fork")
    go = context.Event()
    start_at = context.Value("d", 0.0)
    pipes = []
    processes = []
    for plan in plans:
        parent_end, child_end = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker_process,
            args=(config, plan, workload, child_end, go, start_at),
            daemon=True,
        )
        process.start()
        child_end.close()
        pipes.append(parent_end)
        processes.append(process)
    try:
        for pipe in pipes:
            if not pipe.poll(60.0):
                raise TimeoutError("a worker did not connect within 60 s")
            message = _receive(pipe)
            if message != "ready":
                raise RuntimeError(message["fatal"])
        start_at.value = time.monotonic() + 0.05
        go.set()
        results = []
        wait = config.warmup + config.duration + DRAIN_TIMEOUT + 30.0
        for pipe in pipes:
            if not pipe.poll(wait):
                raise TimeoutError("a worker did not report its result in time")
            result = _receive(pipe)
            if "fatal" in result:
                raise RuntimeError(result["fatal"])
            results.append(result)
        return results
    finally:
        go.set()
        for process in processes:
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)


def _receive(pipe: Any) -> Any:
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError("a worker process died; see its traceback above") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="memcached text-protocol load generator (loopback only).",
        epilog="example: python -m bench.loadgen --servers 127.0.0.1:11211 --connections 16 "
        "--preload --get-ratio 0.9 --duration 10 --json /tmp/result.json",
    )
    add = parser.add_argument
    add("--servers", required=True, help="host:port[,host:port...]; keys go to crc32(key) %% n")
    add("--connections", type=int, default=16, help="total concurrent connections (16)")
    add("--processes", type=int, default=1, help="worker processes (1)")
    add("--pipeline", type=int, default=1, help="requests in flight per connection (1)")
    add("--get-ratio", type=float, default=0.9, help="fraction of gets, 0..1 (0.9)")
    add("--keys", type=int, default=10_000, help="distinct keys (10000)")
    add("--key-size", type=int, default=32, help="key length in bytes (32)")
    add("--value-size", type=int, default=100, help="value length in bytes (100)")
    add("--distribution", choices=("uniform", "zipfian"), default="uniform")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds before measuring (1)")
    add("--duration", type=float, default=10.0, help="measured seconds (10)")
    add("--max-ops", type=int, default=None, help="hard cap on requests sent, warmup included")
    add("--rate", type=float, default=None, help="open loop: offered ops/s over all connections")
    add("--preload", action="store_true", help="set every key before the run")
    add("--seed", type=int, default=1, help="seed for keys, values and schedules (1)")
    add("--json", type=Path, default=None, help="write the result as JSON to this path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = LoadConfig(
            servers=parse_servers(args.servers),
            connections=args.connections,
            processes=args.processes,
            pipeline=args.pipeline,
            get_ratio=args.get_ratio,
            keys=args.keys,
            key_size=args.key_size,
            value_size=args.value_size,
            distribution=args.distribution,
            warmup=args.warmup,
            duration=args.duration,
            max_ops=args.max_ops,
            rate=args.rate,
            preload=args.preload,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        result = run_load(config)
    except (OSError, RuntimeError, TimeoutError, ValueError) as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["error_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
