"""Pure parts of the benchmark tools: run configuration, workload, reply parsing, results.

Nothing here opens a socket or starts a process; ``loadgen.py`` is the I/O shell around it.
(:func:`wait_for_quiet_machine` only reads the load average and sleeps.)
The workload is fully determined by its parameters and seed, so every worker process can
rebuild the same keys, values and request bytes without shipping them between processes.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

GET = 0
SET = 1
OP_NAMES = ("get", "set")

ZIPF_EXPONENT = 0.99
MIN_SCHEDULE = 1 << 16
MAX_SCHEDULE = 1 << 20
MAX_VALUES_PER_REPLY = 64
MAX_UNPARSED_BYTES = 1 << 20

STORED = b"STORED\r\n"
END = b"END\r\n"


class FramingLost(Exception):
    """The reply stream cannot be parsed any further; the caller must close the connection."""


def parse_server(text: str) -> tuple[str, int]:
    """``host:port`` on a loopback address, as (host, port). Raises ValueError otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address; use a loopback address") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address; benchmarks only run locally")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def parse_servers(text: str) -> tuple[tuple[str, int], ...]:
    """A comma-separated ``host:port`` list (see :func:`parse_server`)."""
    servers = tuple(parse_server(part) for part in text.split(",") if part.strip())
    if not servers:
        raise ValueError("no servers given")
    return servers


def make_key(index: int, key_size: int) -> bytes:
    """Key number ``index``, zero-padded to exactly ``key_size`` bytes."""
    return b"k" + str(index).encode().rjust(key_size - 1, b"0")


def server_of(key: bytes, server_count: int) -> int:
    """Which server a key goes to: CRC-32 of the key modulo the server count."""
    return zlib.crc32(key) % server_count


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines the requests a load generator sends."""

    servers: int
    get_ratio: float
    keys: int
    key_size: int
    value_size: int
    distribution: str
    seed: int

    def __post_init__(self) -> None:
        if self.servers < 1:
            raise ValueError("need at least one server")
        if not 0.0 <= self.get_ratio <= 1.0:
            raise ValueError("--get-ratio must be between 0 and 1")
        if self.keys < 1:
            raise ValueError("--keys must be at least 1")
        if not len(str(self.keys - 1)) + 1 <= self.key_size <= 250:
            raise ValueError(
                f"--key-size must be {len(str(self.keys - 1)) + 1}..250 for this --keys"
            )
        if not 1 <= self.value_size <= 1 << 20:
            raise ValueError("--value-size must be 1..1048576")
        if self.distribution not in ("uniform", "zipfian"):
            raise ValueError("--distribution must be uniform or zipfian")


class Workload:
    """Precomputed request and expected-reply bytes for every key, and per-server schedules.

    A schedule is a list of ``key * 2 + op`` entries drawn with the key distribution and get
    ratio, restricted to the keys that hash to one server (each key keeps its global weight).
    Connections cycle through their server's schedule from different offsets, so choosing the
    next request costs a list index instead of a random draw.
    """

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        size = spec.value_size
        self.keys = [make_key(index, spec.key_size) for index in range(spec.keys)]
        self.value = random.Random(spec.seed).randbytes(size).hex()[:size].encode()
        self.get_requests = [b"get " + key + b"\r\n" for key in self.keys]
        self.set_headers = [b"set %s 0 0 %d\r\n" % (key, size) for key in self.keys]
        self.value_line = self.value + b"\r\n"
        self.hit_headers = [b"VALUE %s 0 %d\r\n" % (key, size) for key in self.keys]
        self.hit_tail = self.value + b"\r\n" + END
        self.key_server = [server_of(key, spec.servers) for key in self.keys]
        self.schedules = [self._schedule(server) for server in range(spec.servers)]
        if not all(self.schedules):
            raise ValueError("some server gets none of the keys; use more --keys")

    def keys_of(self, server: int) -> list[int]:
        """Indexes of the keys that hash to ``server``."""
        return [index for index, owner in enumerate(self.key_server) if owner == server]

    def _schedule(self, server: int) -> list[int]:
        spec = self.spec
        population = self.keys_of(server)
        length = min(max(2 * spec.keys, MIN_SCHEDULE), MAX_SCHEDULE)
        if not population:
            return []  # rejected by the constructor
        rng = random.Random(spec.seed * 1_000_003 + server)
        if spec.distribution == "zipfian":
            cumulative: list[float] = []
            total = 0.0
            for index in population:  # rank = key index, so key 0 is the hottest
                total += 1.0 / (index + 1) ** ZIPF_EXPONENT
                cumulative.append(total)
            chosen = rng.choices(population, cum_weights=cumulative, k=length)
        else:
            chosen = [population[rng.randrange(len(population))] for _ in range(length)]
        ratio = spec.get_ratio
        return [key * 2 + (GET if rng.random() < ratio else SET) for key in chosen]


def parse_reply(data: bytes, pos: int) -> tuple[int, str] | None:
    """Parse one whole reply at ``data[pos:]``: (end position, kind), or None if incomplete.

    Kinds: ``value`` (one or more VALUE blocks then END), ``miss`` (END), ``stored``,
    ``server_error``, ``client_error``, ``error`` and ``unexpected`` (any other line). Raises
    :class:`FramingLost` when the bytes cannot be a reply at all.
    """
    line_end = data.find(b"\r\n", pos)
    if line_end < 0:
        if len(data) - pos > MAX_UNPARSED_BYTES:
            raise FramingLost("no line end in 1 MiB of reply")
        return None
    line = data[pos:line_end]
    if line.startswith(b"VALUE "):
        cursor = pos
        for _ in range(MAX_VALUES_PER_REPLY):
            line_end = data.find(b"\r\n", cursor)
            if line_end < 0:
                return None
            line = data[cursor:line_end]
            if line == b"END":
                return line_end + 2, "value"
            fields = line.split()
            if len(fields) < 4 or fields[0] != b"VALUE" or not fields[3].isdigit():
                raise FramingLost(f"bad value line {line[:80]!r}")
            cursor = line_end + 2 + int(fields[3]) + 2
            if cursor > len(data):
                return None
        raise FramingLost(f"more than {MAX_VALUES_PER_REPLY} values in one reply")
    end = line_end + 2
    if line == b"END":
        return end, "miss"
    if line == b"STORED":
        return end, "stored"
    if line.startswith(b"SERVER_ERROR"):
        return end, "server_error"
    if line.startswith(b"CLIENT_ERROR"):
        return end, "client_error"
    if line == b"ERROR":
        return end, "error"
    return end, "unexpected"


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds. Sorts ``latencies_s`` in place."""
    latencies_s.sort()
    summary = {
        name: percentile(latencies_s, fraction) * 1e3
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
    }
    summary["max"] = latencies_s[-1] * 1e3 if latencies_s else 0.0
    summary["mean"] = sum(latencies_s) / len(latencies_s) * 1e3 if latencies_s else 0.0
    return summary


def wait_for_quiet_machine(max_load: float, timeout: float, poll: float = 5.0) -> dict[str, float]:
    """Wait until the 1-minute load average is at most ``max_load``, for up to ``timeout`` s.

    Other work on the machine makes every measurement noisy, so a benchmark waits for a quiet
    moment before measuring, but never for ever: after ``timeout`` it goes ahead anyway.
    Returns the load average at the start and at the end, and the seconds waited.
    """
    started = time.monotonic()
    first = load = os.getloadavg()[0]
    if load > max_load:
        print(f"load average {load:.2f} > {max_load:g}: waiting up to {timeout:g} s", flush=True)
    while load > max_load and time.monotonic() - started < timeout:
        time.sleep(min(poll, max(0.0, timeout - (time.monotonic() - started))))
        load = os.getloadavg()[0]
    waited = time.monotonic() - started
    if load > max_load:
        print(f"load average still {load:.2f} after {waited:.0f} s; measuring anyway", flush=True)
    return {"load_at_start": first, "load_at_measurement": load, "waited_seconds": waited}


def format_count(value: float) -> str:
    """An integer count with thousands separators."""
    return f"{round(value):,}"


def format_ms(value: float) -> str:
    """A latency in milliseconds with three significant decimals for small values."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class LoadConfig:
    """One load-generator run."""

    servers: tuple[tuple[str, int], ...]
    connections: int
    processes: int
    pipeline: int
    get_ratio: float
    keys: int
    key_size: int
    value_size: int
    distribution: str
    warmup: float
    duration: float
    max_ops: int | None
    rate: float | None
    preload: bool
    seed: int

    def __post_init__(self) -> None:
        if self.connections < 1 or self.processes < 1 or self.pipeline < 1:
            raise ValueError("--connections, --processes and --pipeline must be at least 1")
        if self.processes > self.connections:
            raise ValueError("--processes cannot exceed --connections")
        if self.warmup < 0 or self.duration <= 0:
            raise ValueError("--warmup must be >= 0 and --duration > 0")
        if self.max_ops is not None and self.max_ops < 1:
            raise ValueError("--max-ops must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")
        self.workload_spec()  # validates the workload parameters

    def workload_spec(self) -> WorkloadSpec:
        """The workload part of the configuration."""
        return WorkloadSpec(
            servers=len(self.servers),
            get_ratio=self.get_ratio,
            keys=self.keys,
            key_size=self.key_size,
            value_size=self.value_size,
            distribution=self.distribution,
            seed=self.seed,
        )


@dataclass(frozen=True)
class WorkerPlan:
    """The connections one worker drives, by global connection number."""

    worker: int
    connection_ids: tuple[int, ...]
    max_ops: int | None


def plan_workers(config: LoadConfig) -> list[WorkerPlan]:
    """Split connections (and the op budget) into contiguous blocks, one per worker.

    Connection ``c`` talks to server ``c % len(servers)``, so each worker spreads its
    connections across the servers.
    """
    plans = []
    for worker in range(config.processes):
        first = worker * config.connections // config.processes
        last = (worker + 1) * config.connections // config.processes
        budget = None
        if config.max_ops is not None:
            budget = (config.max_ops * last // config.connections) - (
                config.max_ops * first // config.connections
            )
        plans.append(WorkerPlan(worker, tuple(range(first, last)), budget))
    return plans


def merge_results(config: LoadConfig, worker_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-worker counts and latencies into one report."""
    measured = max(result["measured_seconds"] for result in worker_results) or 1e-9
    per_op: dict[str, Any] = {}
    everything: list[float] = []
    for op, name in enumerate(OP_NAMES):
        latencies: list[float] = []
        for result in worker_results:
            samples = array("d")
            samples.frombytes(result["latencies"][op])
            latencies.extend(samples)
        everything.extend(latencies)
        per_op[name] = {
            "ops": len(latencies),
            "ops_per_sec": len(latencies) / measured,
            "latency_ms": latency_summary(latencies),
        }
    errors: dict[str, int] = {}
    for result in worker_results:
        for kind, count in result["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    cpu = sum(result["cpu_seconds"] for result in worker_results)
    wall = max(result["wall_seconds"] for result in worker_results) or 1e-9
    config_dict = asdict(config)
    config_dict["servers"] = [f"{host}:{port}" for host, port in config.servers]
    return {
        "config": config_dict,
        "measured_seconds": measured,
        "ops": len(everything),
        "ops_per_sec": len(everything) / measured,
        "latency_ms": latency_summary(everything),
        "per_op": per_op,
        "get_hits": sum(result["hits"] for result in worker_results),
        "get_misses": sum(result["misses"] for result in worker_results),
        "errors": errors,
        "error_count": sum(errors.values()),
        "sent": sum(result["sent"] for result in worker_results),
        "outstanding_at_end": sum(result["outstanding_at_end"] for result in worker_results),
        "overdue_at_end": sum(result["overdue_at_end"] for result in worker_results),
        "generator_cpu_per_process": cpu / wall / config.processes,
    }


def format_report(result: dict[str, Any]) -> str:
    """The human-readable summary printed after a run."""
    config = result["config"]
    mode = f"open loop at {config['rate']:,.0f} ops/s" if config["rate"] else "closed loop"
    lines = [
        f"servers {', '.join(config['servers'])}; {config['connections']} connections, "
        f"{config['processes']} process(es), pipeline {config['pipeline']}, {mode}",
        f"workload: {config['get_ratio']:.0%} get, {config['keys']:,} keys "
        f"({config['distribution']}), key {config['key_size']} B, value {config['value_size']} B;"
        f" warmup {config['warmup']} s, measured {result['measured_seconds']:.2f} s",
        f"throughput: {format_count(result['ops_per_sec'])} ops/s ({format_count(result['ops'])} ops)",
        f"{'op':<4} {'ops':>10} {'ops/s':>10} "
        + " ".join(f"{name:>8}" for name in ("p50", "p90", "p99", "p99.9", "max"))
        + "  (ms)",
    ]
    rows = [("all", result["ops"], result["ops_per_sec"], result["latency_ms"])]
    rows += [
        (name, op["ops"], op["ops_per_sec"], op["latency_ms"])
        for name, op in result["per_op"].items()
    ]
    for name, ops, rate, latency in rows:
        lines.append(
            f"{name:<4} {ops:>10,} {rate:>10,.0f} "
            + " ".join(
                f"{format_ms(latency[key]):>8}" for key in ("p50", "p90", "p99", "p99.9", "max")
            )
        )
    errors = ", ".join(f"{kind} {count:,}" for kind, count in sorted(result["errors"].items()))
    lines.append(
        f"gets: {result['get_hits']:,} hits, {result['get_misses']:,} misses; "
        f"errors: {errors or 'none'}"
    )
    if config["rate"] and result["overdue_at_end"]:
        lines.append(
            f"open loop fell behind: {result['overdue_at_end']:,} requests were due but unsent "
            "at the end (the server cannot sustain the offered rate)"
        )
    cpu = result["generator_cpu_per_process"]
    note = " (near 100%: the generator may be the limit)" if cpu > 0.9 else ""
    lines.append(f"generator CPU: {cpu:.0%} of a core per process{note}")
    return "\n".join(lines)
