"""Benchmark a local kai cluster in the original Kai's published setting, in one command.

The setting: N=3 R=2 W=2, 80% get / 20% set, 1 KB values (the original Kai reported
14,212 ops/s on five 4-core servers). For each cluster size it starts fresh kai nodes on free
loopback ports (one temporary data directory each; the first node's cluster secret is copied
to the others, which join through it as their seed), waits until every node lists every
member in ``stats``, sets every key with ``bench.loadgen --preload``, then runs
``bench.loadgen`` with its connections spread over all the nodes' memcached ports while it
accounts the CPU used by the nodes, the generator and everything else on the machine. When
``memtier_benchmark`` is on PATH or given with ``--memtier``, it then cross-checks with one
memtier per node, all at once, and adds their figures up. It records each node's resident
memory and counters, stops the nodes, prints a markdown table and writes JSON to
``bench/results/cluster.json`` (``cluster-scaling.json`` with ``--scaling``). Nodes and
temporary directories are always cleaned up, and every wait has a deadline.

Example::

    python -m bench.cluster                           # 3 nodes, 1 + 10 s of load
    python -m bench.cluster --scaling --duration 5    # 1, 3, then 5 nodes
    python -m bench.cluster --nodes 5 --connections 60 --update-readme
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import _memtier
from bench._common import format_count, format_ms, markdown_table
from bench._machine import CpuMeter, memory_kib
from bench._results import add_output_options, publish
from bench._servers import (
    HOST,
    effective_quorum,
    memcache_stats,
    module_command,
    module_env,
    node_config,
    parse_quorum,
    start_cluster,
    wait_until_formed,
)
from kai.testing.process import KaiProcess

SCALING_SIZES = (1, 3, 5)
#: Seconds to wait for the cluster to form.
FORM_TIMEOUT = 60.0
#: Seconds loadgen may need beyond warmup + duration (connecting, preloading, reporting).
LOADGEN_SLACK = 120.0
#: The per-node counters kept in the JSON (and checked for trouble) after each run.
NODE_COUNTERS = (
    "cmd_get",
    "cmd_set",
    "get_hits",
    "get_misses",
    "curr_connections",
    "curr_items",
    "kai_quorum_failures",
    "kai_unreconciled_get",
    "kai_sibling_warnings",
    "kai_sibling_rejections",
    "rusage_user",
    "rusage_system",
)
TARGET_OPS = 10_000
TARGET_P999_MS = 20.0
#: README blocks replaced by ``--update-readme``: one for a single size, one for ``--scaling``.
README_BLOCKS = {False: "cluster results", True: "cluster scaling results"}
#: The file each kind of run writes under bench/results/.
RESULT_NAMES = {False: "cluster", True: "cluster-scaling"}
HEADER = (
    "nodes",
    "N,R,W used",
    "tool",
    "ops/s",
    "runs: ops/s range",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "misses+errors",
    "RSS per node (MiB)",
    "preload sets/s (1 conn, pipelined)",
    "load avg before",
    "other CPU (cores)",
)


def run_loadgen(
    ports: Sequence[int], args: argparse.Namespace, output: Path, *, preload: bool
) -> dict[str, Any]:
    """One loadgen run over all ``ports``; its JSON result or an ``error`` entry.

    With ``preload`` it only sets every key (and sends one request), so that the measured run
    that follows, and the CPU accounting around it, contains nothing but the workload.
    """
    command = module_command(
        "bench.loadgen",
        "--servers=" + ",".join(f"{HOST}:{port}" for port in ports),
        f"--connections={args.connections}",
        f"--processes={args.processes}",
        f"--pipeline={args.pipeline}",
        f"--get-ratio={args.get_ratio}",
        f"--keys={args.keys}",
        f"--value-size={args.value_size}",
        f"--json={output}",
    )
    if preload:
        command += ["--preload", "--max-ops=1", "--warmup=0", "--duration=0.1"]
        timeout = LOADGEN_SLACK
    else:
        command += [f"--warmup={args.warmup}", f"--duration={args.duration}"]
        timeout = args.warmup + args.duration + LOADGEN_SLACK
    print("$", " ".join(command[1:]), flush=True)
    try:
        completed = subprocess.run(
            command,
            timeout=timeout,
            check=False,
            stdout=subprocess.DEVNULL if preload else None,
            env=module_env(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"loadgen did not finish in {timeout:g} s"}
    if not output.exists():
        return {"error": f"loadgen exited with {completed.returncode} and wrote no result"}
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def node_report(node: KaiProcess) -> dict[str, Any]:
    """A node's memory, counters and logged warnings, taken while it still runs."""
    report: dict[str, Any] = {
        "memcached_port": node.port,
        "rpc": f"{HOST}:{node.rpc_port}",
        "pid": node.pid,
        "memory_kib": memory_kib(node.pid),
    }
    try:
        fields = memcache_stats(node.port)
    except OSError as error:
        report["stats_error"] = str(error)
    else:
        report["quorum"] = fields.get("kai_quorum")
        report["stats"] = {name: fields[name] for name in NODE_COUNTERS if name in fields}
    problems = [
        line for line in node.log_text().splitlines() if " WARNING " in line or " ERROR " in line
    ]
    report["log_warnings"] = len(problems)
    report["log_warning_sample"] = problems if len(problems) <= 10 else problems[:5] + problems[-5:]
    return report


def print_node_reports(reports: Sequence[dict[str, Any]]) -> None:
    """One line per node: memory after the run, requests it coordinated, trouble it logged."""
    for report in reports:
        memory = report["memory_kib"]
        stats = report.get("stats", {})
        counters = ", ".join(
            f"{name} {stats[name]}"
            for name in ("cmd_get", "cmd_set", "get_misses", "kai_quorum_failures")
            if name in stats
        )
        print(
            f"node {report['rpc']} (pid {report['pid']}): "
            f"RSS {memory.get('VmRSS', 0) / 1024:.1f} MiB (peak {memory.get('VmHWM', 0) / 1024:.1f}"
            f" MiB); {counters or report.get('stats_error', 'no stats')}; "
            f"{report['log_warnings']} warning/error log lines",
            flush=True,
        )
        for line in report["log_warning_sample"]:
            print(f"    {line}", flush=True)


def measure_cluster(
    size: int, args: argparse.Namespace, scratch: Path, memtier: str | None
) -> dict[str, Any]:
    """Start a fresh cluster of ``size`` nodes, load it, report on it, and always stop it."""
    print(f"\n== {size} node(s), quorum {args.quorum} ==", flush=True)
    base = scratch / f"cluster-{size}"
    base.mkdir()
    run: dict[str, Any] = {"nodes": size, "configured_quorum": args.quorum}
    nodes: list[KaiProcess] = []
    try:
        form_cluster(size, args, base, nodes, run)
        ports = [node.port for node in nodes]
        preload(ports, args, base, run)
        measure_load(nodes, args, base, run)
        if memtier is not None:
            run["memtier"] = measure_memtier(memtier, ports, args, base)
        run["node_reports"] = [node_report(node) for node in nodes]
        print_node_reports(run["node_reports"])
    except (OSError, RuntimeError, TimeoutError) as error:
        run["error"] = str(error)
        print(f"cluster of {size}: {error}", file=sys.stderr)
    finally:
        stop_nodes(nodes, run)
    return run


def form_cluster(
    size: int, args: argparse.Namespace, base: Path, nodes: list[KaiProcess], run: dict[str, Any]
) -> None:
    """Start the nodes (appending them to ``nodes``) and wait until every one sees all."""
    start = time.monotonic()
    config = node_config(args.quorum, args.membership_interval)
    config += "".join(f"{setting}\n" for setting in args.setting)
    start_cluster(size, base, config, nodes)
    run["start_seconds"] = time.monotonic() - start
    run["form_seconds"] = wait_until_formed(nodes, args.form_timeout)
    print(
        f"cluster formed: {size} node(s) started in {run['start_seconds']:.1f} s, "
        f"all members seen after {run['form_seconds']:.1f} s more",
        flush=True,
    )


def preload(
    ports: Sequence[int], args: argparse.Namespace, base: Path, run: dict[str, Any]
) -> None:
    """Set every key of loadgen's workload once (raise if any reply was wrong)."""
    run["load_average_before"] = os.getloadavg()[0]
    start = time.monotonic()
    preloaded = run_loadgen(ports, args, base / "preload.json", preload=True)
    run["preload_seconds"] = time.monotonic() - start
    if "error" in preloaded:
        raise RuntimeError(f"preload failed: {preloaded['error']}")
    if preloaded["error_count"] or preloaded["get_misses"]:
        raise RuntimeError(
            f"preload failed: errors {preloaded['errors']}, {preloaded['get_misses']} misses"
        )
    run["preload_sets_per_sec"] = args.keys / run["preload_seconds"]
    print(
        f"preloaded {args.keys:,} keys in {run['preload_seconds']:.1f} s "
        f"({format_count(run['preload_sets_per_sec'])} pipelined sets/s)",
        flush=True,
    )


def measure_load(
    nodes: Sequence[KaiProcess], args: argparse.Namespace, base: Path, run: dict[str, Any]
) -> None:
    """The measured loadgen runs (``--repeat``), with the machine's CPU split around them."""
    ports = [node.port for node in nodes]
    meter = CpuMeter([node.pid for node in nodes])
    loads = [
        run_loadgen(ports, args, base / f"loadgen-{attempt}.json", preload=False)
        for attempt in range(args.repeat)
    ]
    run["cpu_cores"] = meter.read()
    run["load"], run["repeats"] = median_run(loads)
    run["load_average_after"] = os.getloadavg()[0]
    cores = run["cpu_cores"]
    print(
        f"CPU during the run (cores): kai nodes {cores['nodes']:.2f}, load generator "
        f"{cores['generator']:.2f}, other processes {cores['other']:.2f}",
        flush=True,
    )


def measure_memtier(
    binary: str, ports: Sequence[int], args: argparse.Namespace, base: Path
) -> dict[str, Any]:
    """memtier sets every key through the first node, then one memtier per node runs at once
    (``--memtier-connections`` each); their figures added up (see ``_memtier.combine``)."""

    def run(port: int, get_ratio: float) -> _memtier.MemtierRun:
        seconds = _memtier.whole_seconds(args.duration)
        connections = args.memtier_connections
        return _memtier.MemtierRun(
            port, connections, get_ratio, args.value_size, args.keys, seconds
        )

    start = time.monotonic()
    prefill = _memtier.run_together(binary, [run(ports[0], 0.0)], base, prefill=True)[0]
    if "error" in prefill:
        print(f"memtier prefill: {prefill['error']}", file=sys.stderr)
        return {"error": f"prefill {prefill['error']}"}
    prefill_seconds = time.monotonic() - start
    runs = [run(port, args.get_ratio) for port in ports]
    result = _memtier.combine(_memtier.run_together(binary, runs, base))
    result["prefill_seconds"] = prefill_seconds
    if "error" in result:
        print(f"memtier: {result['error']}", file=sys.stderr)
        return result
    for node in result["nodes"]:
        latency = node["latency_ms"]
        print(
            f"memtier on port {node['port']}: {format_count(node['ops_per_sec'])} ops/s, "
            + ", ".join(f"{name} {format_ms(latency[name])}" for name in ("p50", "p99", "p99.9"))
            + " ms",
            flush=True,
        )
    print(
        f"memtier, {len(ports)} at once: {format_count(result['ops_per_sec'])} ops/s in all; "
        f"worst node's p99.9 {format_ms(result['latency_ms']['p99.9'])} ms; "
        f"{result['get_misses']:,} misses, {result['error_count']:,} errors",
        flush=True,
    )
    return result


def stop_nodes(nodes: Sequence[KaiProcess], run: dict[str, Any]) -> None:
    """Stop every node; record exit codes, and the end of the log of any that failed."""
    run["exit_codes"] = [node.stop() for node in nodes]
    for node, code in zip(nodes, run["exit_codes"], strict=True):
        if code not in (0, None):
            tail = node.log_text().splitlines()[-12:]
            run.setdefault("log_tails", {})[str(node.rpc_port)] = tail
            print(f"node {node.rpc_port} exited with {code}; end of its log:", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)


def median_run(loads: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The run with the median throughput (a failed run counts as the slowest), and every
    run's ops/s and p99.9 in the order they ran."""
    ranked = sorted(loads, key=lambda load: load.get("ops_per_sec", -1.0))
    summary = [
        {"ops_per_sec": load["ops_per_sec"], "p99.9_ms": load["latency_ms"]["p99.9"]}
        for load in loads
        if "ops_per_sec" in load
    ]
    return ranked[(len(ranked) - 1) // 2], summary


def describe_repeats(run: dict[str, Any]) -> str:
    """``n: low-high`` ops/s over the repeated measurements, or just the count."""
    repeats = run.get("repeats", [])
    if len(repeats) < 2:
        return str(len(repeats) or 1)
    rates = [repeat["ops_per_sec"] for repeat in repeats]
    return f"{len(rates)}: {format_count(min(rates))}-{format_count(max(rates))}"


def describe_problems(load: dict[str, Any]) -> str:
    """Misses plus errors as a count, with the kinds when there are any."""
    kinds = dict(load["errors"])
    if load["get_misses"]:
        kinds["miss"] = load["get_misses"]
    total = sum(kinds.values())
    if not total:
        return "0"
    detail = ", ".join(f"{kind} {format_count(count)}" for kind, count in sorted(kinds.items()))
    return f"{format_count(total)} ({detail})"


def table_rows(run: dict[str, Any]) -> list[list[str]]:
    """The markdown rows of a cluster run: loadgen's, then memtier's if it ran."""
    nodes, quorum = str(run["nodes"]), effective_quorum(run["configured_quorum"], run["nodes"])
    load = run.get("load", {})
    error = run.get("error") or load.get("error")
    if error:
        return [[nodes, quorum, "loadgen", f"failed: {error}"] + [""] * (len(HEADER) - 4)]
    latency = load["latency_ms"]
    rss = " / ".join(
        f"{report['memory_kib']['VmRSS'] / 1024:.0f}"
        for report in run.get("node_reports", [])
        if "VmRSS" in report["memory_kib"]
    )
    rows = [
        [
            nodes,
            quorum,
            "loadgen",
            format_count(load["ops_per_sec"]),
            describe_repeats(run),
            *(format_ms(latency[key]) for key in ("p50", "p99", "p99.9")),
            describe_problems(load),
            rss or "?",
            format_count(run["preload_sets_per_sec"]),
            f"{run['load_average_before']:.2f}",
            f"{run['cpu_cores']['other']:.2f}",
        ]
    ]
    memtier = run.get("memtier")
    if memtier is not None:
        tool = f"memtier x{run['nodes']} (worst node's latency)"
        if "error" in memtier:
            rows.append([nodes, quorum, tool, f"failed: {memtier['error']}"])
        else:
            rows.append(
                [nodes, quorum, tool, format_count(memtier["ops_per_sec"]), "1"]
                + [format_ms(memtier["latency_ms"][key]) for key in ("p50", "p99", "p99.9")]
                + [describe_problems(memtier)]
            )
        rows[-1] += [""] * (len(HEADER) - len(rows[-1]))
    return rows


def target_verdict(runs: Sequence[dict[str, Any]]) -> str | None:
    """Whether the 3-node run met the target throughput and tail latency, as one line."""
    for run in runs:
        load = run.get("load", {})
        if run["nodes"] != 3 or "ops_per_sec" not in load:
            continue
        ops, p999 = load["ops_per_sec"], load["latency_ms"]["p99.9"]
        met = ops >= TARGET_OPS and p999 <= TARGET_P999_MS and not load["error_count"]
        return (
            f"3-node target (>= {format_count(TARGET_OPS)} ops/s, p99.9 <= "
            f"{TARGET_P999_MS:g} ms, no errors): {'met' if met else 'NOT met'} "
            f"({format_count(ops)} ops/s, p99.9 {format_ms(p999)} ms)"
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark a local kai cluster (N=3 R=2 W=2, 80%% get, 1 KB values).",
        epilog="example: python -m bench.cluster --scaling --duration 5",
    )
    add = parser.add_argument
    add("--nodes", type=int, default=3, help="cluster size (3)")
    add("--scaling", action="store_true", help="run 1, 3 and 5 nodes in turn (ignores --nodes)")
    add("--quorum", default="3,2,2", help="N,R,W; capped at the member count by kai (3,2,2)")
    add("--duration", type=float, default=10.0, help="measured seconds per run (10)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds per loadgen run (1)")
    add(
        "--repeat",
        type=int,
        default=1,
        help="loadgen measurements per cluster; the table shows the median run and the range (1)",
    )
    add("--connections", type=int, default=30, help="client connections, spread over nodes (30)")
    add("--processes", type=int, default=1, help="loadgen worker processes (1)")
    add("--pipeline", type=int, default=1, help="requests in flight per connection (1)")
    add("--get-ratio", type=float, default=0.8, help="fraction of gets (0.8)")
    add("--keys", type=int, default=10_000, help="distinct keys (10000)")
    add("--value-size", type=int, default=1024, help="value bytes (1024)")
    add("--membership-interval", type=int, default=200, help="membership round, ms (200)")
    add("--form-timeout", type=float, default=FORM_TIMEOUT, help="seconds to wait for the ring")
    add(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more node setting as a TOML line, e.g. anti_entropy=false (repeatable)",
    )
    _memtier.add_options(parser)
    add("--memtier-connections", type=int, default=8, help="memtier connections per node (8)")
    add_output_options(parser)
    return parser


def describe_setting(args: argparse.Namespace, started: str, memtier: str | None) -> str:
    """The summary line of a run, without the load averages."""
    return (
        f"{started}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"cluster and load generator on one machine over loopback; "
        f"{args.connections} connections spread over the nodes, pipeline {args.pipeline}, "
        f"{args.processes} loadgen process(es); {args.get_ratio:.0%} get, "
        f"{args.keys:,} keys, {args.value_size}-byte values, "
        f"{args.warmup:g} + {args.duration:g} s per run; "
        + (
            f"memtier_benchmark: one per node at once, {args.memtier_connections} connections "
            f"each, {_memtier.whole_seconds(args.duration)} s; "
            if memtier
            else "memtier_benchmark not run; "
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.repeat < 1 or args.memtier_connections < 1:
        parser.error("--nodes, --repeat and --memtier-connections must be at least 1")
    try:
        parse_quorum(args.quorum)
    except ValueError as error:
        parser.error(f"--quorum: {error}")
    memtier = _memtier.find_binary(args, parser)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the nodes are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = SCALING_SIZES if args.scaling else (args.nodes,)
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    scratch = Path(tempfile.mkdtemp(prefix="kai-cluster-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        for size in sizes:
            runs.append(measure_cluster(size, args, scratch, memtier))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()[0]
    table = markdown_table(HEADER, [row for run in runs for row in table_rows(run)])
    summary = describe_setting(args, started, memtier) + (
        f"load average {load_before:.2f} before, {load_after:.2f} after"
    )
    verdict = target_verdict(runs)
    if verdict:
        summary += f"\n\n{verdict}"
    print(f"\n{summary}\n\n{table}")
    document = {
        "started": started,
        "summary": summary,
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "memtier": memtier,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "runs": runs,
        "markdown": table,
    }
    publish(
        args.results_dir,
        RESULT_NAMES[args.scaling],
        document,
        readme_block=README_BLOCKS[args.scaling] if args.update_readme else None,
    )
    return 1 if any(failures(run) for run in runs) else 0


def failures(run: dict[str, Any]) -> bool:
    """Whether a cluster run failed or any of its replies was wrong (loadgen or memtier)."""
    parts = (run, run.get("load", {}), run.get("memtier", {}))
    return any("error" in part or part.get("error_count") for part in parts)


if __name__ == "__main__":
    sys.exit(main())
