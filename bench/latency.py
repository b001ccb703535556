"""Latency under fixed offered loads, from light load up to saturation, in one command.

Targets, each on freshly started servers on free loopback ports:

- ``node``: one kai node;
- ``bare-trio``: the bare trio dict server (``bare_trio.py``, the ceiling of the approach)
  under the same workload;
- ``memcached``: ``memcached -t 1`` under the same workload, offered the *same rates as the
  node's steps* (when the node is measured in the same run), so the floor that the machine
  and the generator put under any server shows next to kai's figures at equal load;
- ``cluster``: a 3-node kai cluster with N=3 R=2 W=2.

For each it sets every key and measures the saturation throughput with a short closed-loop
run (each connection sends its next request as soon as the reply arrives). Then it offers
fixed rates in open loop -- by default 10%, 25%, 50%, 70%, 80%, 90%, 100% and 110% of that
saturation figure -- and records, for each step, the latency percentiles measured from each
request's *due* time (so queueing behind a slow reply is not hidden), the rate actually
achieved, and how many requests were due but never sent. Around every step it splits the
machine's CPU use into the server processes, load generator and other processes.
``--rates`` offers fixed rates (ops/s) instead of fractions. ``--repeat n`` runs every
open-loop step n times back to back and reports the run with the median p99.9, with the
range over the runs: one step of a few seconds can be decided by a single stall of the
machine, which memcached shows as well.

Default workloads: one process 90% get / 100-byte values over 16 connections (as
``single_node.py``); the cluster 80% get / 1 KB values over 30 connections spread across the
nodes (as ``cluster.py``). The load generator is ``bench.loadgen``, run in this process.

It prints a markdown table, writes JSON to ``bench/results/latency.json`` (with ``--repeat``:
``latency-repeated.json``) and, with
``--update-readme``, fills the ``latency results`` block of ``bench/README.md``. Servers and
temporary directories are always cleaned up, and every step is bounded in time (about four
minutes in all with the defaults, plus any wait for a quiet machine).

Example::

    python -m bench.latency                          # every target, 4 s per step
    python -m bench.latency --only node,memcached --fractions 0.5,0.8 --step-duration 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench._common import (
    LoadConfig,
    format_count,
    format_ms,
    markdown_table,
    wait_for_quiet_machine,
)
from bench._machine import CpuMeter
from bench._results import add_output_options, publish
from bench._servers import (
    HOST,
    effective_quorum,
    node_config,
    parse_quorum,
    start_cluster,
    start_server,
    wait_until_formed,
)
from bench.loadgen import run_load
from kai.testing.process import KaiProcess, MemcachedProcess, ServerProcess

FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1)
TARGETS = ("node", "bare-trio", "memcached", "cluster")
#: A step "kept up" when it achieved at least this share of the offered rate and ended with
#: fewer requests due but unsent than this share of the requests offered while measuring.
KEPT_UP = 0.97
MAX_UNSENT = 0.01
README_BLOCK = "latency results"
#: Runs with ``--repeat`` fill their own block, so the single-run table of every target stays.
REPEATED_README_BLOCK = "latency repeated results"
#: The result file of each kind of run under bench/results/: single runs, ``--repeat`` runs.
RESULT_NAMES = {False: "latency", True: "latency-repeated"}
PERCENTILES = ("p50", "p90", "p99", "p99.9", "max")
HEADER = (
    "target",
    "step",
    "offered ops/s",
    "achieved ops/s",
    "kept up",
    *(f"{name} ms" for name in PERCENTILES),
    "runs: p99.9 range ms",
    "due but unsent",
    "misses+errors",
    "load avg",
    "CPU cores: server / generator / other",
)


#: What each one-process target runs (``bench._servers.start_server``).
SERVER_OF = {"node": "kai", "bare-trio": "bare-trio", "memcached": "memcached"}
KIND_OF = {"kai": "1 kai node", "bare-trio": "bare trio dict server", "memcached": "memcached -t 1"}


@dataclass(frozen=True)
class Target:
    """What is measured: which server, how many nodes, and the workload offered to them."""

    name: str
    nodes: int
    connections: int
    get_ratio: float
    value_size: int
    server: str = "kai"

    def describe(self, quorum: str) -> str:
        kind = KIND_OF[self.server] if self.nodes == 1 else f"{self.nodes}-node cluster"
        used = effective_quorum(quorum, self.nodes) if self.nodes > 1 else None
        return (
            f"{kind}{f' (N,R,W {used})' if used else ''}: {self.get_ratio:.0%} get, "
            f"{self.value_size}-byte values, {self.connections} connections"
        )


def parse_targets(text: str) -> tuple[str, ...]:
    """Comma-separated target names, e.g. ``node,memcached``."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in TARGETS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"targets are {', '.join(TARGETS)}, not {text!r}")
    return names


def positive_numbers(text: str, *, what: str, example: str, maximum: float) -> tuple[float, ...]:
    """Comma-separated numbers in (0, ``maximum``], e.g. ``example``."""
    try:
        numbers = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} like {example}, got {text!r}") from None
    if not numbers or any(not 0 < number <= maximum for number in numbers):
        raise argparse.ArgumentTypeError(f"{what} must be in (0, {maximum:,}]")
    return numbers


def parse_fractions(text: str) -> tuple[float, ...]:
    """Comma-separated positive fractions of the saturation throughput, e.g. ``0.5,0.9,1``."""
    return positive_numbers(text, what="fractions", example="0.5,0.9,1", maximum=5)


def parse_rates(text: str) -> tuple[float, ...]:
    """Comma-separated positive offered rates in ops/s, e.g. ``5000,10000``."""
    return positive_numbers(text, what="rates", example="5000,10000", maximum=10_000_000)


def load_config(
    target: Target,
    ports: Sequence[int],
    args: argparse.Namespace,
    *,
    rate: float | None,
    duration: float,
    preload: bool = False,
    max_ops: int | None = None,
) -> LoadConfig:
    """The loadgen configuration of one run against ``ports`` (closed loop if no rate)."""
    return LoadConfig(
        servers=tuple((HOST, port) for port in ports),
        connections=target.connections,
        processes=args.processes,
        pipeline=args.pipeline,
        get_ratio=target.get_ratio,
        keys=args.keys,
        key_size=32,
        value_size=target.value_size,
        distribution="uniform",
        warmup=args.warmup,
        duration=duration,
        max_ops=max_ops,
        rate=rate,
        preload=preload,
        seed=1,
    )


def measure_run(config: LoadConfig, pids: Sequence[int]) -> dict[str, Any]:
    """One loadgen run with the machine's CPU split around it; the step's record."""
    load_average = os.getloadavg()[0]
    meter = CpuMeter(pids)
    result = run_load(config)
    return {
        "offered_ops_per_sec": config.rate,
        "achieved_ops_per_sec": result["ops_per_sec"],
        "latency_ms": result["latency_ms"],
        "per_op_latency_ms": {op: data["latency_ms"] for op, data in result["per_op"].items()},
        "ops": result["ops"],
        "sent": result["sent"],
        "due_but_unsent": result["overdue_at_end"],
        "outstanding_at_end": result["outstanding_at_end"],
        "get_misses": result["get_misses"],
        "errors": result["errors"],
        "error_count": result["error_count"],
        "generator_cpu_per_process": result["generator_cpu_per_process"],
        "load_average_before": load_average,
        "cpu_cores": meter.read(),
    }


def print_step(label: str, step: dict[str, Any]) -> None:
    latency = step["latency_ms"]
    offered = step["offered_ops_per_sec"]
    print(
        f"{label:>12}: offered {format_count(offered) if offered else 'closed loop':>11}, "
        f"achieved {format_count(step['achieved_ops_per_sec']):>7} ops/s; "
        + ", ".join(f"{name} {format_ms(latency[name])}" for name in PERCENTILES)
        + f" ms; due but unsent {step['due_but_unsent']:,}; "
        f"errors {step['error_count']:,}, misses {step['get_misses']:,}; "
        f"other CPU {step['cpu_cores']['other']:.2f} cores",
        flush=True,
    )


def start_target(target: Target, args: argparse.Namespace, scratch: Path) -> list[ServerProcess]:
    """Start the target's servers (the caller stops them, also when this raises)."""
    base = scratch / target.name
    base.mkdir()
    if target.nodes == 1:
        return [start_server(target.server, base, args.kai_arg)]
    nodes: list[KaiProcess] = []
    config = node_config(args.quorum, args.membership_interval)
    try:
        start_cluster(target.nodes, base, config, nodes)
        seconds = wait_until_formed(nodes, args.form_timeout)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    print(f"cluster of {target.nodes} formed after {seconds:.1f} s", flush=True)
    return list(nodes)


def measure_target(
    target: Target,
    args: argparse.Namespace,
    scratch: Path,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Saturation, then the open-loop steps, against freshly started servers.

    The steps offer ``fraction`` times the closed-loop throughput, or the fixed ``--rates``,
    or, given the record of a ``reference`` target measured before, the rates of its steps (to
    compare at equal load). Each step runs ``--repeat`` times; its record is the run with the
    median p99.9, plus every run's summary under ``repeats``.
    """
    print(f"\n== {target.describe(args.quorum)} ==", flush=True)
    record: dict[str, Any] = {"target": asdict(target), "description": target.describe(args.quorum)}
    record["machine"] = wait_for_quiet_machine(args.max_load, args.load_wait)
    nodes: list[ServerProcess] = []
    try:
        nodes = start_target(target, args, scratch)
        ports = [node.port for node in nodes]
        pids = [node.pid for node in nodes]
        started = time.monotonic()
        # Set every key (the one request after it is not measured).
        run_load(load_config(target, ports, args, rate=None, duration=0.1, preload=True, max_ops=1))
        record["preload_seconds"] = time.monotonic() - started
        closed = load_config(target, ports, args, rate=None, duration=args.saturation_duration)
        record["saturation"] = measure_run(closed, pids)
        print_step("closed loop", record["saturation"])
        saturation = record["saturation"]["achieved_ops_per_sec"]
        if not saturation:
            raise RuntimeError("the closed-loop run completed no requests")
        record["steps"] = []
        record["rates_of"] = reference["target"]["name"] if reference is not None else None
        for fraction, rate in step_rates(saturation, args, reference):
            config = load_config(target, ports, args, rate=rate, duration=args.step_duration)
            runs = []
            for _ in range(args.repeat):
                runs.append(measure_run(config, pids))
                if args.repeat > 1:
                    print_step(f"{step_label(record, {'fraction': fraction})} run", runs[-1])
            step = {"fraction": fraction, **median_run(runs, args.step_duration)}
            record["steps"].append(step)
            print_step(step_label(record, step), step)
    except (OSError, RuntimeError, TimeoutError, ValueError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
        print(f"{target.name}: {record['error']}", file=sys.stderr)
    finally:
        record["exit_codes"] = [node.stop() for node in nodes]
        for node, code in zip(nodes, record["exit_codes"], strict=True):
            if code not in (0, None) and isinstance(node, KaiProcess):
                tail = node.log_text().splitlines()[-12:]
                record.setdefault("log_tails", {})[str(node.port)] = tail
    return record


def step_rates(
    saturation: float, args: argparse.Namespace, reference: dict[str, Any] | None
) -> list[tuple[float, float]]:
    """(fraction of saturation, offered ops/s) of each open-loop step: the ``reference``
    target's rates if given, else ``--rates``, else ``--fractions`` of ``saturation``."""
    if reference is not None:
        return [(step["fraction"], step["offered_ops_per_sec"]) for step in reference["steps"]]
    if args.rates:
        return [(rate / saturation, rate) for rate in args.rates]
    return [(fraction, fraction * saturation) for fraction in args.fractions]


def median_run(runs: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """The run with the median p99.9 of a repeated step, with every run's summary (in the
    order they ran) under ``repeats``."""
    ranked = sorted(runs, key=lambda run: run["latency_ms"]["p99.9"])
    repeats = [
        {
            "achieved_ops_per_sec": run["achieved_ops_per_sec"],
            "p99.9_ms": run["latency_ms"]["p99.9"],
            "kept_up": kept_up(run, duration),
        }
        for run in runs
    ]
    return {**ranked[(len(ranked) - 1) // 2], "repeats": repeats}


def describe_repeats(run: dict[str, Any]) -> str:
    """``n: low-high`` p99.9 ms over a repeated step and how many runs kept up, or ``1``."""
    repeats = run.get("repeats", [])
    if len(repeats) < 2:
        return "1"
    tails = [repeat["p99.9_ms"] for repeat in repeats]
    kept = sum(repeat["kept_up"] for repeat in repeats)
    return (
        f"{len(tails)}: {format_ms(min(tails))}-{format_ms(max(tails))}, "
        f"{kept}/{len(tails)} kept up"
    )


def step_label(record: dict[str, Any], step: dict[str, Any]) -> str:
    """``80%`` of the target's own closed-loop throughput, or ``80% of node``."""
    rates_of = record.get("rates_of")
    return f"{step['fraction']:.0%}" + (f" of {rates_of}" if rates_of else "")


def kept_up(run: dict[str, Any], duration: float) -> bool:
    """Whether an open-loop run delivered the offered rate (no growing backlog at the end)."""
    offered: float = run["offered_ops_per_sec"]
    achieved: float = run["achieved_ops_per_sec"]
    unsent: int = run["due_but_unsent"]
    return achieved >= KEPT_UP * offered and unsent <= MAX_UNSENT * offered * duration


def table_rows(record: dict[str, Any], duration: float) -> list[list[str]]:
    """Markdown rows of one target: the closed-loop run, then one per offered load."""
    name = record["target"]["name"]
    if "saturation" not in record:
        return [[name, "failed", record.get("error", "?")] + [""] * (len(HEADER) - 3)]
    rows = []
    runs = [("closed loop", record["saturation"])]
    runs += [(step_label(record, step), step) for step in record.get("steps", [])]
    for label, run in runs:
        offered = run["offered_ops_per_sec"]
        achieved = run["achieved_ops_per_sec"]
        cores = run["cpu_cores"]
        rows.append(
            [
                name,
                label,
                format_count(offered) if offered else "",
                format_count(achieved),
                "" if offered is None else ("yes" if kept_up(run, duration) else "no"),
                *(format_ms(run["latency_ms"][key]) for key in PERCENTILES),
                describe_repeats(run) if offered else "",
                format_count(run["due_but_unsent"]) if offered else "",
                format_count(run["get_misses"] + run["error_count"]),
                f"{run['load_average_before']:.2f}",
                f"{cores['nodes']:.2f} / {cores['generator']:.2f} / {cores['other']:.2f}",
            ]
        )
    if "error" in record:
        rows.append([name, "failed", record["error"]] + [""] * (len(HEADER) - 3))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Latency percentiles under fixed offered loads (open loop): one kai "
        "node, the bare trio dict server, memcached -t 1 and a 3-node kai cluster.",
        epilog="example: python -m bench.latency --only node --step-duration 3",
    )
    add = parser.add_argument
    add(
        "--only",
        type=parse_targets,
        default=TARGETS,
        help=f"targets to measure, comma-separated ({','.join(TARGETS)})",
    )
    add(
        "--fractions",
        type=parse_fractions,
        default=None,
        help="offered loads as fractions of the closed-loop throughput "
        "(0.1,0.25,0.5,0.7,0.8,0.9,1.0,1.1)",
    )
    add(
        "--rates",
        type=parse_rates,
        default=None,
        help="offered loads in ops/s instead of fractions, e.g. 5000,10000 (memcached still "
        "gets the node's rates)",
    )
    add("--repeat", type=int, default=1, help="runs of each open-loop step; median p99.9 (1)")
    add("--step-duration", type=float, default=4.0, help="measured seconds per step (4)")
    add("--saturation-duration", type=float, default=4.0, help="closed-loop seconds (4)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (1)")
    add("--keys", type=int, default=10_000, help="distinct keys, all set first (10000)")
    add("--processes", type=int, default=1, help="loadgen worker processes (1)")
    add("--pipeline", type=int, default=1, help="requests in flight per connection (1)")
    add("--node-connections", type=int, default=16, help="connections to one node (16)")
    add("--node-get-ratio", type=float, default=0.9, help="one node: fraction of gets (0.9)")
    add("--node-value-size", type=int, default=100, help="one node: value bytes (100)")
    add("--kai-arg", action="append", default=[], help="extra flag for the single node")
    add("--cluster-nodes", type=int, default=3, help="cluster size (3)")
    add("--cluster-connections", type=int, default=30, help="connections over the nodes (30)")
    add("--cluster-get-ratio", type=float, default=0.8, help="cluster: fraction of gets (0.8)")
    add("--cluster-value-size", type=int, default=1024, help="cluster: value bytes (1024)")
    add("--quorum", default="3,2,2", help="cluster N,R,W (3,2,2)")
    add("--membership-interval", type=int, default=200, help="membership round, ms (200)")
    add("--form-timeout", type=float, default=60.0, help="seconds to wait for the ring (60)")
    add_output_options(parser, quiet_machine=True)
    return parser


def choose_targets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Target]:
    """Check the options and return the targets to measure, in order (exit on a bad option)."""
    try:
        parse_quorum(args.quorum)
    except ValueError as error:
        parser.error(f"--quorum: {error}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.rates and args.fractions:
        parser.error("give --rates or --fractions, not both")
    args.fractions = args.fractions or FRACTIONS
    if args.cluster_nodes < 2:
        parser.error("--cluster-nodes must be at least 2 (use --only node for one node)")
    one_node = (args.node_connections, args.node_get_ratio, args.node_value_size)
    targets = [
        *(Target(name, 1, *one_node, server=server) for name, server in SERVER_OF.items()),
        Target(
            "cluster",
            args.cluster_nodes,
            args.cluster_connections,
            args.cluster_get_ratio,
            args.cluster_value_size,
        ),
    ]
    targets = [target for target in targets if target.name in args.only]
    if "memcached" in args.only and not MemcachedProcess.available():
        print("memcached is not installed: skipping that target", file=sys.stderr)
        targets = [target for target in targets if target.name != "memcached"]
    try:  # validate the workload options before starting anything
        for target in targets:
            load_config(target, [1] * target.nodes, args, rate=None, duration=1.0)
    except ValueError as error:
        parser.error(str(error))
    return targets


def measure_all(targets: Sequence[Target], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every target in turn, in a scratch directory that is always removed."""
    scratch = Path(tempfile.mkdtemp(prefix="kai-latency-bench-"))
    records: list[dict[str, Any]] = []
    try:
        for target in targets:
            # memcached is offered the node's rates when the node was measured in this run.
            node = next((r for r in records if r["target"]["name"] == "node"), None)
            reference = (
                node if target.server == "memcached" and node and node.get("steps") else None
            )
            records.append(measure_target(target, args, scratch, reference))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return records


def describe_run(args: argparse.Namespace, records: Sequence[dict[str, Any]], started: str) -> str:
    """The summary above the table: the setting, then one line per target."""
    repeated = (
        f", each step run {args.repeat} times (the row is the run with the median p99.9)"
        if args.repeat > 1
        else ""
    )
    lines = [
        f"{started}, {os.cpu_count()} CPUs, Python {platform.python_version()}; servers and "
        f"load generator on one machine over loopback; pipeline {args.pipeline}, "
        f"{args.processes} loadgen process(es), {args.keys:,} keys; {args.warmup:g} s warmup, "
        f"then {args.saturation_duration:g} s closed loop and {args.step_duration:g} s per "
        f"open-loop step{repeated}; latency is measured from each request's due time",
        "",
    ]
    for record in records:
        machine = record["machine"]
        waited = machine["waited_seconds"]
        lines.append(
            f"- {record['target']['name']}: {record['description']}; load average "
            f"{machine['load_at_measurement']:.2f} when it started"
            + (f" (waited {waited:.0f} s)" if waited > 1 else "")
        )
    return "\n".join(lines)


def failed(records: Sequence[dict[str, Any]]) -> bool:
    """Whether a target failed or any reply of any run was wrong."""
    return any("error" in record for record in records) or any(
        run["error_count"]
        for record in records
        for run in [record.get("saturation", {"error_count": 0}), *record.get("steps", [])]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    targets = choose_targets(args, parser)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the nodes are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    records = measure_all(targets, args)
    table = markdown_table(
        HEADER, [row for record in records for row in table_rows(record, args.step_duration)]
    )
    summary = describe_run(args, records, started)
    print(f"\n{summary}\n\n{table}")
    document = {
        "started": started,
        "summary": summary,
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "targets": records,
        "markdown": table,
    }
    repeated = args.repeat > 1
    publish(
        args.results_dir,
        RESULT_NAMES[repeated],
        document,
        readme_block=(REPEATED_README_BLOCK if repeated else README_BLOCK)
        if args.update_readme
        else None,
    )
    return 1 if failed(records) else 0


if __name__ == "__main__":
    sys.exit(main())
