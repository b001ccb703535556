"""Resident memory and disk use of one kai node holding 1,000,000 keys of 100 bytes.

For each configuration (by default kai's defaults, then ``cache_size = 0`` to show the
share of the decoded-value cache) it starts a fresh kai node on free loopback ports with its
own temporary data directory, notes its memory while empty, and sets every key with
pipelined ``set`` batches over a few connections (every reply is checked; the load rate is
reported). It then reads back a sample of the keys, and reports the node's ``VmRSS`` and
``VmHWM`` (peak) from ``/proc``, the data directory's size on disk and the node's ``stats``
(``curr_items``, ``bytes``, ``kai_cache_bytes``), and stops the node.

Every key gets its own value (hex digits derived from the key), so LevelDB's block
compression cannot shrink identical values and the disk figure is realistic.

It prints a markdown table, writes JSON to ``bench/results/memory.json`` and, with
``--update-readme``, fills the ``memory results`` block of ``bench/README.md``. Nodes and
temporary directories are always cleaned up, and the load has a deadline.

Example::

    python -m bench.memory                          # 1M keys, default config then no cache
    python -m bench.memory --keys 200000 --runs default
    python -m bench.memory --runs default --kai-arg=--store=memory
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    STORED,
    format_count,
    make_key,
    markdown_table,
    wait_for_quiet_machine,
)
from bench._machine import CpuMeter, memory_kib
from bench._results import add_output_options, publish
from bench._servers import HOST, memcache_stats, start_server
from kai.testing.process import KaiProcess

#: Configurations measured: name -> TOML given to the node with ``--config`` (None: defaults).
RUNS = {"default": None, "no-cache": "cache_size = 0\n"}
README_BLOCK = "memory results"
#: Seconds one socket operation may block (connect, send, a sample read).
SOCKET_TIMEOUT = 10.0
PROGRESS_INTERVAL = 10.0
STATS_FIELDS = ("curr_items", "bytes", "kai_cache_bytes", "kai_cache_entries")
HEADER = (
    "config",
    "keys",
    "load sets/s",
    "RSS empty MiB",
    "RSS loaded MiB",
    "peak RSS MiB",
    "RSS per key (bytes)",
    "data dir MiB",
    "curr_items",
    "bytes (MiB)",
    "kai_cache_bytes (MiB)",
    "load avg at start",
    "CPU cores while loading: kai / loader / other",
)


def value_of(key: bytes, size: int) -> bytes:
    """The value stored under ``key``: ``size`` hex digits derived from the key."""
    return hashlib.shake_128(key).hexdigest((size + 1) // 2)[:size].encode()


class PipelinedLoader:
    """Sets keys ``0..keys-1`` through ``connections`` sockets, ``batch`` sets in flight on each.

    Connection ``c`` sets the keys ``c, c + connections, ...`` in batches; it sends the next
    batch when every reply of the previous one is in and equal to ``STORED``.
    """

    def __init__(self, port: int, keys: int, key_size: int, value_size: int, batch: int) -> None:
        self.port = port
        self.keys = keys
        self.key_size = key_size
        self.value_size = value_size
        self.batch = batch
        self.stored = 0

    def request(self, indexes: range) -> bytes:
        """One pipelined batch of ``set`` requests."""
        parts = []
        for index in indexes:
            key = make_key(index, self.key_size)
            parts.append(
                b"set %s 0 0 %d\r\n%s\r\n" % (key, self.value_size, value_of(key, self.value_size))
            )
        return b"".join(parts)

    def run(self, connections: int, timeout: float) -> float:
        """Set every key; the seconds it took. Raises on a wrong reply or after ``timeout``."""
        started = time.monotonic()
        deadline = started + timeout
        next_progress = started + PROGRESS_INTERVAL
        selector = selectors.DefaultSelector()
        socks = []
        try:
            for first in range(min(connections, self.keys)):
                sock = socket.create_connection((HOST, self.port), timeout=SOCKET_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks.append(sock)
                # state: [next key index, replies expected for the batch in flight, bytes read]
                state = [first, 0, bytearray()]
                selector.register(sock, selectors.EVENT_READ, state)
                self._send_batch(sock, state, connections)
            while selector.get_map():
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(
                        f"loading took longer than {timeout:g} s ({self.stored:,} keys set)"
                    )
                if now > next_progress:
                    rate = self.stored / (now - started)
                    print(f"  {self.stored:,} keys set ({format_count(rate)}/s)", flush=True)
                    next_progress += PROGRESS_INTERVAL
                for selected, _ in selector.select(timeout=min(1.0, deadline - now)):
                    self._on_readable(selected.fileobj, selected.data, selector, connections)
        finally:
            selector.close()
            for sock in socks:
                sock.close()
        return time.monotonic() - started

    def _send_batch(self, sock: socket.socket, state: list[Any], stride: int) -> bool:
        """Send the connection's next batch; False when it has no keys left."""
        indexes = range(state[0], min(state[0] + self.batch * stride, self.keys), stride)
        if not indexes:
            return False
        sock.sendall(self.request(indexes))
        state[0] = indexes[-1] + stride
        state[1] = len(indexes)
        state[2] = bytearray()
        return True

    def _on_readable(
        self, sock: Any, state: list[Any], selector: selectors.BaseSelector, stride: int
    ) -> None:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("kai closed a loading connection")
        reply = state[2]
        reply += chunk
        expected = STORED * state[1]
        if len(reply) < len(expected):
            return
        if reply != expected:
            raise RuntimeError(f"unexpected reply while loading: {bytes(reply[:200])!r}")
        self.stored += state[1]
        if not self._send_batch(sock, state, stride):
            selector.unregister(sock)


def check_sample(port: int, keys: int, key_size: int, value_size: int, count: int) -> int:
    """Read ``count`` random keys back (pipelined gets); how many had the wrong reply."""
    indexes = random.Random(1).sample(range(keys), min(count, keys))
    wrong = 0
    with socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT) as sock:
        for first in range(0, len(indexes), 100):
            batch = [make_key(index, key_size) for index in indexes[first : first + 100]]
            sock.sendall(b"".join(b"get %s\r\n" % key for key in batch))
            expected = [
                b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, value_size, value_of(key, value_size))
                for key in batch
            ]
            total = sum(len(reply) for reply in expected)
            received = b""
            while len(received) < total and not received.endswith(b"ERROR\r\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("kai closed the sample connection")
                received += chunk
            if received != b"".join(expected):
                wrong += sum(1 for reply in expected if reply not in received)
                if received.endswith(b"ERROR\r\n") or len(received) != total:
                    break  # the stream is out of step; what follows cannot be compared
    return wrong


def directory_size(path: Path) -> dict[str, int]:
    """Apparent bytes and allocated bytes of every file under ``path``."""
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue  # LevelDB may delete a file during compaction
            apparent += info.st_size
            allocated += info.st_blocks * 512
    return {"apparent": apparent, "allocated": allocated}


def measure(
    name: str, config: str | None, args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """One fresh node: memory empty, load, check, memory loaded; the node is always stopped."""
    print(f"\n== {name} ({config.strip() if config else 'default configuration'}) ==", flush=True)
    base = scratch / name
    base.mkdir()
    kai_args = list(args.kai_arg)
    if config is not None:
        path = base / "kai.toml"
        path.write_text(config)
        kai_args.append(f"--config={path}")
    record: dict[str, Any] = {"name": name, "config": config, "kai_args": kai_args}
    record["machine"] = wait_for_quiet_machine(args.max_load, args.load_wait)
    node: KaiProcess | None = None
    try:
        server = start_server("kai", base, kai_args)
        assert isinstance(server, KaiProcess)
        node = server
        record["memory_empty_kib"] = memory_kib(node.pid)
        loader = PipelinedLoader(node.port, args.keys, args.key_size, args.value_size, args.batch)
        meter = CpuMeter([node.pid])
        seconds = loader.run(args.connections, args.load_timeout)
        record["load_cpu_cores"] = meter.read()
        record["load_seconds"] = seconds
        record["load_sets_per_sec"] = args.keys / seconds
        print(
            f"set {args.keys:,} keys in {seconds:.1f} s ({format_count(args.keys / seconds)}/s)",
            flush=True,
        )
        record["load_average_after_load"] = os.getloadavg()[0]
        if args.settle:
            time.sleep(args.settle)  # let LevelDB finish flushing before the sizes are read
        record["sample_checked"] = min(args.sample, args.keys)
        record["sample_wrong"] = check_sample(
            node.port, args.keys, args.key_size, args.value_size, args.sample
        )
        record["memory_kib"] = memory_kib(node.pid)
        fields = memcache_stats(node.port)
        record["stats"] = {field: int(fields[field]) for field in STATS_FIELDS if field in fields}
        record["data_dir_bytes"] = directory_size(node.data_dir)
        print_record(record)
        if record["sample_wrong"]:
            raise RuntimeError(f"{record['sample_wrong']} sampled keys read back wrong")
    except (OSError, RuntimeError, TimeoutError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
        print(f"{name}: {record['error']}", file=sys.stderr)
    finally:
        if node is not None:
            record["exit_code"] = node.stop()
            if record["exit_code"] not in (0, None):
                record["log_tail"] = node.log_text().splitlines()[-12:]
    return record


def mib(value: float) -> str:
    return f"{value / (1 << 20):,.1f}"


def print_record(record: dict[str, Any]) -> None:
    memory, stats = record["memory_kib"], record["stats"]
    print(
        f"RSS {mib(memory.get('VmRSS', 0) * 1024)} MiB (peak {mib(memory.get('VmHWM', 0) * 1024)}"
        f" MiB, empty {mib(record['memory_empty_kib'].get('VmRSS', 0) * 1024)} MiB); "
        f"data dir {mib(record['data_dir_bytes']['apparent'])} MiB; "
        + ", ".join(f"{name} {value:,}" for name, value in stats.items())
        + f"; {record['sample_checked']:,} sampled keys read back, {record['sample_wrong']} wrong",
        flush=True,
    )


def table_row(record: dict[str, Any], keys: int) -> list[str]:
    """One markdown row for a configuration."""
    name = record["name"]
    if "memory_kib" not in record:
        return [name, format_count(keys), f"failed: {record.get('error', '?')}"] + [""] * (
            len(HEADER) - 3
        )
    empty = record["memory_empty_kib"].get("VmRSS", 0) * 1024
    loaded = record["memory_kib"].get("VmRSS", 0) * 1024
    stats = record["stats"]
    return [
        name,
        format_count(keys),
        format_count(record["load_sets_per_sec"]),
        mib(empty),
        mib(loaded),
        mib(record["memory_kib"].get("VmHWM", 0) * 1024),
        format_count((loaded - empty) / keys),
        mib(record["data_dir_bytes"]["apparent"]),
        format_count(stats.get("curr_items", 0)),
        mib(stats.get("bytes", 0)),
        mib(stats.get("kai_cache_bytes", 0)),
        f"{record['machine']['load_at_measurement']:.2f}",
        "{nodes:.2f} / {generator:.2f} / {other:.2f}".format(**record["load_cpu_cores"]),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Resident memory and disk use of one kai node holding many keys.",
        epilog="example: python -m bench.memory --keys 200000 --runs default",
    )
    add = parser.add_argument
    add("--keys", type=int, default=1_000_000, help="keys to set (1000000)")
    add("--key-size", type=int, default=32, help="key bytes (32)")
    add("--value-size", type=int, default=100, help="value bytes (100)")
    add("--connections", type=int, default=4, help="loading connections (4)")
    add("--batch", type=int, default=100, help="pipelined sets per batch and connection (100)")
    add("--load-timeout", type=float, default=300.0, help="deadline of each load, seconds (300)")
    add("--settle", type=float, default=2.0, help="seconds between load and readings (2)")
    add("--sample", type=int, default=1000, help="keys read back to check the load (1000)")
    add(
        "--runs",
        default=",".join(RUNS),
        help=f"configurations, comma-separated, from {', '.join(RUNS)} (all)",
    )
    add("--kai-arg", action="append", default=[], help="extra kai flag for every run")
    add_output_options(parser, quiet_machine=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in runs if name not in RUNS]
    if unknown or not runs:
        parser.error(f"--runs: choose from {', '.join(RUNS)}")
    if args.keys < 1 or args.connections < 1 or args.batch < 1:
        parser.error("--keys, --connections and --batch must be at least 1")
    if not len(str(args.keys - 1)) + 1 <= args.key_size <= 250:
        parser.error(f"--key-size must be {len(str(args.keys - 1)) + 1}..250 for this --keys")
    if not 1 <= args.value_size <= 1 << 20:
        parser.error("--value-size must be 1..1048576")
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the node is still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    scratch = Path(tempfile.mkdtemp(prefix="kai-memory-bench-"))
    records = []
    try:
        for name in runs:
            records.append(measure(name, RUNS[name], args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = markdown_table(HEADER, [table_row(record, args.keys) for record in records])
    loads = ", ".join(
        f"{record['name']} {record['machine']['load_at_measurement']:.2f}" for record in records
    )
    summary = (
        f"{started}, {os.cpu_count()} CPUs, Python {platform.python_version()}; one kai node, "
        f"{args.keys:,} keys of {args.key_size} bytes with distinct "
        f"{args.value_size}-byte values, set over {args.connections} connections in pipelined "
        f"batches of {args.batch}; extra kai flags: {' '.join(args.kai_arg) or 'none'}; "
        f"load average when each run started: {loads}"
    )
    print(f"\n{summary}\n\n{table}")
    document = {
        "started": started,
        "summary": summary,
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "runs": records,
        "markdown": table,
    }
    publish(
        args.results_dir,
        "memory",
        document,
        readme_block=README_BLOCK if args.update_readme else None,
    )
    return 1 if any("error" in record for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
