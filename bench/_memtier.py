"""memtier_benchmark as an external cross-check of ``loadgen``'s figures.

memtier_benchmark (Redis Ltd.'s C load generator) is optional: a scenario runs it only when it
is on PATH or given with ``--memtier PATH``, and without it runs exactly as before. It talks to
one server per process, sends only ``get <key>`` and ``set <key> 0 0 <size>`` with keys
``memtier-<n>``, and stalls or restarts a connection on any reply other than VALUE, END or
STORED; so every run here has a deadline, after which the process is killed and the run is
reported as an error. Several runs (one per cluster node) start together and are awaited
together, and their figures are added up by :func:`combine`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

BINARY = "memtier_benchmark"
HOST = "127.0.0.1"
#: Seconds a run may take beyond its --test-time (connecting, reporting) before it is killed.
RUN_SLACK = 30.0
#: Longest prefill, seconds.
PREFILL_TIMEOUT = 120.0
#: Our percentile names and memtier's JSON keys for them (``--print-percentiles``).
PERCENTILES = {"p50": "p50.00", "p90": "p90.00", "p99": "p99.00", "p99.9": "p99.90"}
KEY_PREFIX = "memtier-"


@dataclass(frozen=True)
class MemtierRun:
    """One memtier_benchmark process against one server: the workload and its length."""

    port: int
    connections: int
    get_ratio: float
    value_size: int
    keys: int
    seconds: int

    def __post_init__(self) -> None:
        if self.connections < 1 or self.keys < 1 or self.value_size < 1:
            raise ValueError("memtier needs at least one connection, key and value byte")
        if not 0.0 <= self.get_ratio <= 1.0:
            raise ValueError("the get ratio must be between 0 and 1")
        if self.seconds < 1:
            raise ValueError("memtier runs for whole seconds, at least 1")


def set_get_ratio(get_ratio: float) -> str:
    """memtier's ``--ratio=SET:GET`` for a fraction of gets: 0.9 is ``1:9``, 0.8 is ``1:4``."""
    fraction = Fraction(get_ratio).limit_denominator(100)
    return f"{fraction.denominator - fraction.numerator}:{fraction.numerator}"


def whole_seconds(duration: float) -> int:
    """memtier's ``--test-time`` for a duration: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(duration))


def command(binary: str, run: MemtierRun, json_out: Path, *, prefill: bool = False) -> list[str]:
    """The argv of a measured run, or with ``prefill`` of setting every key once.

    A prefill walks the key range in parallel (``P:P``: the connections split it) until every
    key is set; a measured run draws keys uniformly, each connection with its own seed.
    """
    argv = [
        binary,
        f"--server={HOST}",
        f"--port={run.port}",
        "--protocol=memcache_text",
        "--threads=1",
        f"--clients={run.connections}",
        f"--data-size={run.value_size}",
        f"--key-prefix={KEY_PREFIX}",
        "--key-minimum=1",
        f"--key-maximum={run.keys}",
        "--hide-histogram",
        "--print-percentiles=" + ",".join(key.removeprefix("p") for key in PERCENTILES),
        f"--json-out-file={json_out}",
    ]
    if prefill:
        return [*argv, "--ratio=1:0", "--key-pattern=P:P", "--requests=allkeys"]
    return [
        *argv,
        f"--ratio={set_get_ratio(run.get_ratio)}",
        "--key-pattern=R:R",
        "--distinct-client-seed",
        f"--test-time={run.seconds}",
    ]


def parse_result(document: dict[str, Any]) -> dict[str, Any]:
    """memtier's JSON output as a result shaped like loadgen's (ops, ops/s, latency in ms).

    Totals' "Average Latency" is always 0 in memtier 2.3.0, so the mean is the accumulated
    latency over the count. Misses come as a rate, so their count is rounded.
    """
    stats = document["ALL STATS"]
    totals, gets, sets = stats["Totals"], stats["Gets"], stats["Sets"]
    runtime = stats["Runtime"]
    seconds = runtime["Total duration"] / 1000.0
    percentiles = totals["Percentile Latencies"]
    latency = {name: float(percentiles[key]) for name, key in PERCENTILES.items()}
    latency["max"] = float(totals["Max Latency"])
    latency["mean"] = totals["Accumulated Latency"] / totals["Count"] if totals["Count"] else 0.0
    connection_errors = int(totals.get("Connection Errors", 0))
    result: dict[str, Any] = {
        "seconds": seconds,
        "ops": int(totals["Count"]),
        "ops_per_sec": float(totals["Ops/sec"]),
        "latency_ms": latency,
        "per_op": {
            name: {"ops": int(op["Count"]), "ops_per_sec": float(op["Ops/sec"])}
            for name, op in (("get", gets), ("set", sets))
        },
        "get_misses": round(float(gets["Misses/sec"]) * seconds),
        "errors": {"connection_errors": connection_errors} if connection_errors else {},
        "error_count": connection_errors,
    }
    if runtime.get("Interrupted") == "true":
        result["error"] = "memtier reports the run as interrupted"
    return result


def combine(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Runs that went on at the same time against different nodes, as one figure.

    Operations and rates add up; each latency percentile is the worst node's, and every
    node's own result stays under ``nodes``. Any node's error is the whole run's error.
    """
    combined: dict[str, Any] = {"nodes": list(results)}
    failed = [result for result in results if "error" in result]
    if failed:
        combined["error"] = "; ".join(f"port {r['port']}: {r['error']}" for r in failed)
        return combined
    errors: dict[str, int] = {}
    for result in results:
        for kind, count in result["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    names = results[0]["latency_ms"].keys()
    combined.update(
        ops=sum(result["ops"] for result in results),
        ops_per_sec=sum(result["ops_per_sec"] for result in results),
        latency_ms={name: max(r["latency_ms"][name] for r in results) for name in names},
        worst_node_port=max(results, key=lambda r: r["latency_ms"]["p99.9"])["port"],
        get_misses=sum(result["get_misses"] for result in results),
        errors=errors,
        error_count=sum(errors.values()),
    )
    return combined


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--memtier PATH`` and ``--no-memtier``."""
    add = parser.add_argument
    add(
        "--memtier",
        metavar="PATH",
        default=None,
        help=f"cross-check with this memtier_benchmark (default: {BINARY} on PATH, if any)",
    )
    add("--no-memtier", action="store_true", help="do not run memtier_benchmark even if found")


def find_binary(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """The memtier_benchmark to run, or None (not wanted or not installed)."""
    if args.no_memtier:
        return None
    if args.memtier is None:
        return shutil.which(BINARY)
    if not os.access(args.memtier, os.X_OK):
        parser.error(f"--memtier: {args.memtier} is not an executable file")
    return str(args.memtier)


def run_together(
    binary: str, runs: Sequence[MemtierRun], scratch: Path, *, prefill: bool = False
) -> list[dict[str, Any]]:
    """Start one memtier per run at once, wait for all of them, and parse their results.

    Each run is killed when its deadline passes (``RUN_SLACK`` beyond its test time, or
    ``PREFILL_TIMEOUT``) and then reported as an error, as is any run that failed.
    """
    started = time.monotonic()
    processes = []
    try:
        for index, run in enumerate(runs):
            kind = "prefill" if prefill else str(index)
            stem = scratch / f"memtier-{run.port}-{kind}-{time.time_ns()}"
            argv = command(binary, run, stem.with_suffix(".json"), prefill=prefill)
            print("$", " ".join(argv), flush=True)
            with stem.with_suffix(".log").open("wb") as log:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            processes.append((run, argv, stem, process))
        results = []
        for run, argv, stem, process in processes:
            limit = PREFILL_TIMEOUT if prefill else run.seconds + RUN_SLACK
            result = _finish(process, stem, started + limit)
            result.update(port=run.port, connections=run.connections, command=" ".join(argv))
            results.append(result)
        return results
    finally:  # also when interrupted: no memtier outlives the run
        for *_, process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _finish(process: subprocess.Popen[bytes], stem: Path, deadline: float) -> dict[str, Any]:
    """Wait for one memtier until ``deadline`` (then kill it); its parsed result or error."""
    try:
        code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"error": f"killed at its deadline (a stalled connection?): {_tail(stem)}"}
    if code != 0:
        return {"error": f"exited with {code}: {_tail(stem)}"}
    try:
        document = json.loads(stem.with_suffix(".json").read_text())
        return parse_result(document)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {"error": f"unreadable JSON output ({error!r}): {_tail(stem)}"}


def _tail(stem: Path) -> str:
    """The end of a run's output, for an error message."""
    try:
        text = stem.with_suffix(".log").read_text(errors="replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "no output"
