"""Compare one kai node with a real ``memcached -t 1`` under the same load, in one command.

For each server in turn it starts the server on free loopback ports (kai gets a fresh temporary
data directory), runs ``bench.loadgen`` with the same configuration for each workload
(read-heavy: 90% get; write-heavy: 10% get), cross-checks kai and memcached with
``memtier_benchmark`` (when it is on PATH or given with ``--memtier``) and ``memcaslap`` (when
installed), and stops the server. It prints a markdown table with kai/memcached ratios and
writes JSON to ``bench/results/single_node.json``. Servers and temporary directories are
always cleaned up, and every child process has a deadline.

Example::

    python -m bench.single_node                  # every server, ~75 s (+40 s with memtier)
    python -m bench.single_node --only kai --duration 5 --connections 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import _memtier
from bench._common import format_count, format_ms, markdown_table
from bench._results import add_output_options, publish
from bench._servers import HOST, module_command, module_env, start_server
from kai.testing.process import KaiProcess, memcache_version

WORKLOADS = (("read-heavy", 0.9), ("write-heavy", 0.1))
SERVERS = ("memcached", "bare-trio", "kai")
#: The servers memtier_benchmark measures (the reference pair of the comparison).
MEMTIER_SERVERS = ("memcached", "kai")
LABELS = {
    "memcached": "memcached -t 1",
    "bare-trio": "bare trio dict server",
    "kai": "kai (1 node)",
}
#: The servers kai's figures are divided by, per tool.
BASELINES = {"loadgen": ("memcached", "bare-trio"), "memtier": ("memcached",)}
LATENCY_COLUMNS = ("p50", "p99", "p99.9")
MEMCASLAP_CONFIG = "key\n32 32 1\nvalue\n100 100 1\ncmd\n0 0.1\n1 0.9\n"
MEMCASLAP_TPS = re.compile(rb"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)")
#: Seconds a loadgen or memcaslap run may need beyond its duration.
RUN_SLACK = 120.0
HEADER = ("workload", "tool", "server", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "misses+errors")


def run_loadgen(
    port: int, get_ratio: float, args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """One loadgen run (with preload); its JSON result, or an ``error`` entry."""
    output = scratch / f"loadgen-{port}-{get_ratio}.json"
    command = module_command(
        "bench.loadgen",
        f"--servers={HOST}:{port}",
        f"--connections={args.connections}",
        f"--processes={args.processes}",
        f"--pipeline={args.pipeline}",
        f"--get-ratio={get_ratio}",
        f"--keys={args.keys}",
        "--key-size=32",
        f"--value-size={args.value_size}",
        f"--warmup={args.warmup}",
        f"--duration={args.duration}",
        "--preload",
        f"--json={output}",
    )
    print("$", " ".join(command[1:]), flush=True)
    timeout = args.warmup + args.duration + RUN_SLACK
    try:
        completed = subprocess.run(command, timeout=timeout, check=False, env=module_env())
    except subprocess.TimeoutExpired:
        return {"error": f"loadgen did not finish in {timeout:g} s"}
    if not output.exists():
        return {"error": f"loadgen exited with {completed.returncode} and wrote no result"}
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def run_memtier(
    binary: str, port: int, args: argparse.Namespace, scratch: Path
) -> dict[str, dict[str, Any]]:
    """memtier_benchmark sets every key, then runs each workload; ``memtier <workload>``
    entries (each the run's result or an ``error``)."""

    def run(get_ratio: float) -> _memtier.MemtierRun:
        seconds = _memtier.whole_seconds(args.duration)
        return _memtier.MemtierRun(
            port, args.connections, get_ratio, args.value_size, args.keys, seconds
        )

    prefill = _memtier.run_together(binary, [run(0.0)], scratch, prefill=True)[0]
    if "error" in prefill:
        print(f"memtier prefill: {prefill['error']}", file=sys.stderr)
        return {
            f"memtier {name}": {"error": f"prefill {prefill['error']}"} for name, _ in WORKLOADS
        }
    results = {}
    for workload, get_ratio in WORKLOADS:
        result = _memtier.run_together(binary, [run(get_ratio)], scratch)[0]
        results[f"memtier {workload}"] = result
        print(f"memtier {workload}: {describe(result)}", flush=True)
    return results


def describe(result: dict[str, Any]) -> str:
    """A run's ops/s, tail latency and problems in one line (or its error)."""
    if "error" in result:
        return f"error: {result['error']}"
    latency = result["latency_ms"]
    return (
        f"{format_count(result['ops_per_sec'])} ops/s, "
        + ", ".join(f"{name} {format_ms(latency[name])}" for name in LATENCY_COLUMNS)
        + f" ms; {result['get_misses']:,} misses, {result['error_count']:,} errors"
    )


def executed_commands(port: int) -> int | None:
    """cmd_get + cmd_set from the server's ``stats``, or None if it has no such stats."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"stats\r\n")
            reply = b""
            while not reply.endswith((b"END\r\n", b"ERROR\r\n")):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    fields = dict(
        line.split(b" ")[1:3] for line in reply.split(b"\r\n") if line.startswith(b"STAT ")
    )
    if b"cmd_get" not in fields or b"cmd_set" not in fields:
        return None
    return int(fields[b"cmd_get"]) + int(fields[b"cmd_set"])


def run_memcaslap(port: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """memcaslap with 32-byte keys, 100-byte values, get:set 9:1; its TPS line.

    memcaslap counts every reply as an operation, errors included, and its keys begin with
    control bytes (0x10), which kai refuses (keys may not hold control bytes). So the
    server's own cmd_get + cmd_set are compared with memcaslap's count, and a run in which
    the server did not execute the requests is reported as an error, not as throughput.
    """
    config = scratch / "memcaslap.cnf"
    config.write_text(MEMCASLAP_CONFIG)
    duration = max(1, round(args.duration))
    command = [
        "memcaslap",
        f"--servers={HOST}:{port}",
        "--threads=1",
        f"--concurrency={args.connections}",
        f"--time={duration}s",
        f"--cfg_cmd={config}",
    ]
    print("$", " ".join(command), flush=True)
    before = executed_commands(port)
    try:
        completed = subprocess.run(
            command, capture_output=True, timeout=duration + 60, check=False, cwd=scratch
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memcaslap did not finish in {duration + 60} s"}
    matches = MEMCASLAP_TPS.findall(completed.stdout)
    if not matches:
        tail = completed.stdout[-300:] + completed.stderr[-300:]
        return {"error": f"no TPS line from memcaslap: {tail!r}"}
    seconds, ops, tps = matches[-1]
    after = executed_commands(port)
    result: dict[str, Any] = {"seconds": float(seconds), "ops": int(ops), "ops_per_sec": int(tps)}
    if before is not None and after is not None:
        executed = after - before
        result["server_executed"] = executed
        if executed < 0.9 * int(ops):
            error = (
                f"not comparable: memcaslap counted {int(ops):,} ops but the server executed "
                f"{executed:,} gets and sets (it refused memcaslap's control-byte keys)"
            )
            print(f"memcaslap: {error}", flush=True)
            return {"error": error, "claimed_ops": int(ops), "server_executed": executed}
    print(f"memcaslap: {int(tps):,} ops/s", flush=True)
    return result


def measure_server(
    name: str, args: argparse.Namespace, scratch: Path, memtier: str | None
) -> dict[str, dict[str, Any]]:
    """All runs against one server, started fresh and always stopped."""
    print(f"\n== {name} ==", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        server = start_server(name, scratch, args.kai_arg)
    except (OSError, RuntimeError, TimeoutError) as error:
        print(f"{name} did not start: {error}", file=sys.stderr)
        return {"start": {"error": str(error)}}
    try:
        results["version"] = {"version": memcache_version(server.host, server.port)}
        for workload, get_ratio in WORKLOADS:
            results[workload] = run_loadgen(server.port, get_ratio, args, scratch)
        if memtier is not None and name in MEMTIER_SERVERS:
            results.update(run_memtier(memtier, server.port, args, scratch))
        if args.memcaslap and shutil.which("memcaslap"):
            results["memcaslap"] = run_memcaslap(server.port, args, scratch)
    finally:
        exit_code = server.stop()
        results["stop"] = {"exit_code": exit_code}
        if isinstance(server, KaiProcess) and exit_code not in (0, None):
            log_tail = server.log_text().splitlines()[-12:]
            results["stop"]["log_tail"] = log_tail
            print(f"kai exited with {exit_code}; end of its log:", file=sys.stderr)
            print("\n".join(log_tail), file=sys.stderr)
    return results


def table_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    """Markdown rows: per workload and tool one per server, then kai's ratios; memcaslap last."""
    rows: list[list[str]] = []
    for workload, get_ratio in WORKLOADS:
        title = f"{workload} ({get_ratio:.0%} get)"
        for tool, key in (("loadgen", workload), ("memtier", f"memtier {workload}")):
            runs = {
                server: results[server][key] for server in SERVERS if key in results.get(server, {})
            }
            rows += tool_rows(title, tool, runs)
    return rows + memcaslap_rows(results)


def tool_rows(title: str, tool: str, runs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One tool's rows for one workload: each server's figures, then kai / each baseline."""
    rows = []
    for server, result in runs.items():
        if "error" in result:
            rows.append([title, tool, LABELS[server], result["error"], "", "", "", ""])
            continue
        latency = result["latency_ms"]
        rows.append(
            [title, tool, LABELS[server], format_count(result["ops_per_sec"])]
            + [format_ms(latency[key]) for key in LATENCY_COLUMNS]
            + [format_count(result["error_count"] + result["get_misses"])]
        )
    kai = runs.get("kai", {})
    for baseline in BASELINES[tool]:
        base = runs.get(baseline, {})
        if "ops_per_sec" not in kai or "ops_per_sec" not in base:
            continue
        ratio = [f"{kai['ops_per_sec'] / max(base['ops_per_sec'], 1e-9):.2f}x"]
        ratio += [
            f"{kai['latency_ms'][key] / max(base['latency_ms'][key], 1e-9):.1f}x"
            for key in LATENCY_COLUMNS
        ]
        rows.append([title, tool, f"kai / {baseline}", *ratio, ""])
    return rows


def memcaslap_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    """memcaslap's TPS per server, and kai/memcached when both are comparable."""
    rows = []
    caslap = {
        server: results[server]["memcaslap"]
        for server in SERVERS
        if "memcaslap" in results.get(server, {})
    }
    for server, result in caslap.items():
        value = result.get("error") or format_count(result["ops_per_sec"])
        rows.append(["get:set 9:1", "memcaslap", LABELS[server], value, "", "", "", ""])
    if all("ops_per_sec" in caslap.get(server, {}) for server in ("kai", "memcached")):
        ratio = caslap["kai"]["ops_per_sec"] / max(caslap["memcached"]["ops_per_sec"], 1)
        rows.append(["get:set 9:1", "memcaslap", "kai / memcached", f"{ratio:.2f}x"] + [""] * 4)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark one kai node against memcached -t 1 with the same load.",
        epilog="example: python -m bench.single_node --duration 5 --only kai",
    )
    add = parser.add_argument
    add("--duration", type=float, default=10.0, help="measured seconds per run (10)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds per loadgen run (1)")
    add("--connections", type=int, default=16, help="client connections (16)")
    add("--processes", type=int, default=1, help="loadgen worker processes (1)")
    add("--pipeline", type=int, default=1, help="requests in flight per connection (1)")
    add("--keys", type=int, default=10_000, help="distinct keys (10000)")
    add("--value-size", type=int, default=100, help="value bytes (100)")
    add("--only", choices=SERVERS, default=None, help="measure just one server")
    add("--kai-arg", action="append", default=[], help="extra kai flag (repeatable)")
    add("--no-memcaslap", dest="memcaslap", action="store_false", help="skip memcaslap")
    _memtier.add_options(parser)
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    memtier = _memtier.find_binary(args, parser)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    servers = (args.only,) if args.only else SERVERS
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    scratch = Path(tempfile.mkdtemp(prefix="kai-bench-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for name in servers:
            results[name] = measure_server(name, args, scratch, memtier)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = markdown_table(HEADER, table_rows(results))
    summary = (
        f"{started}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.connections} connections, pipeline {args.pipeline}, "
        f"{args.processes} loadgen process(es), {args.keys:,} keys, "
        f"{args.value_size}-byte values, {args.duration:g} s per run; "
        + (
            f"memtier_benchmark: same connections, keys and values, "
            f"{_memtier.whole_seconds(args.duration)} s per run; "
            if memtier
            else "memtier_benchmark not run; "
        )
        + f"load average before: {load_before:.2f}"
    )
    print(f"\n{summary}\n\n{table}")
    if load_before > 0.5:
        print("note: the machine was busy before the run; expect noisy numbers")
    document = {
        "started": started,
        "summary": summary,
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "memtier": memtier,
        "load_average_before": load_before,
        "results": results,
        "markdown": table,
    }
    publish(
        args.results_dir,
        "single_node",
        document,
        readme_block="single_node results" if args.update_readme else None,
    )
    failed = any(
        "error" in run or run.get("error_count")
        for server in results.values()
        for run in server.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
