"""Benchmark self-healing: what anti-entropy costs a loaded cluster, and how fast hints flow.

Two scenarios, each on fresh real nodes on loopback (N=3 R=2 W=2, 1 KB values, the setting
of ``bench.cluster``, whose functions it uses), nodes and directories always cleaned up:

``aae``
    ``bench.cluster``'s measured load on 3 nodes with ``anti_entropy = true`` and with
    ``false``, alternated ``--pairs`` times in one run; the ratio of the medians is the cost of
    anti-entropy at the default ``sync_interval``.
``handoff``
    3 nodes, preloaded; node 3 is killed (SIGKILL), ``bench.loadgen`` runs ``--outage``
    seconds against nodes 1 and 2 (the coordinators keep hints for node 3), node 3 is started
    again on its data directory, and the hints pending on nodes 1 and 2 are polled every 0.1 s
    until none is left: hints, seconds, records and MB per second delivered.

Example::

    python -m bench.healing                          # both scenarios
    python -m bench.healing --scenario handoff --outage 30
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cluster
from bench._common import format_count, markdown_table
from bench._results import add_output_options, publish
from bench._servers import memcache_stats
from kai.testing.process import KaiProcess

#: Seconds the hints may take to drain before the run gives up.
DRAIN_TIMEOUT = 300.0


def cluster_args(args: argparse.Namespace, *settings: str) -> argparse.Namespace:
    """``bench.cluster``'s options for one run: 3 nodes, this run's duration and settings."""
    options = ["--nodes", "3", "--duration", str(args.duration), "--keys", str(args.keys)]
    for setting in settings:
        options += ["--setting", setting]
    return cluster.build_parser().parse_args(options)


def measure_aae(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Throughput with anti-entropy on and off, alternated ``--pairs`` times."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for attempt in range(args.pairs):
        for state in ("on", "off"):
            base = scratch / f"aae-{state}-{attempt}"
            base.mkdir()
            setting = f"anti_entropy = {'true' if state == 'on' else 'false'}"
            run = cluster.measure_cluster(3, cluster_args(args, setting), base, None)
            if "error" in run or "ops_per_sec" not in run.get("load", {}):
                raise RuntimeError(f"anti-entropy {state}: {run.get('error', run.get('load'))}")
            rates[state].append(run["load"]["ops_per_sec"])
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"ops_per_sec_on": rates["on"], "ops_per_sec_off": rates["off"], "ratio": on / off}


def hints_pending(nodes: Sequence[KaiProcess]) -> int:
    return sum(int(memcache_stats(node.port).get("kai_hints_pending", 0)) for node in nodes)


def counter(nodes: Sequence[KaiProcess], name: str) -> int:
    return sum(int(memcache_stats(node.port).get(name, 0)) for node in nodes)


def measure_handoff(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Hints kept during an ``--outage`` under load, and the time they take to drain."""
    options = cluster_args(args)
    nodes: list[KaiProcess] = []
    result: dict[str, Any] = {}
    try:
        cluster.form_cluster(3, options, scratch, nodes, result)
        ports = [node.port for node in nodes]
        cluster.preload(ports, options, scratch, result)
        dead = nodes[2]
        dead.signal(signal.SIGKILL)
        dead.stop()
        options.duration = args.outage
        options.warmup = 0.0
        load = cluster.run_loadgen(ports[:2], options, scratch / "outage.json", preload=False)
        if "ops_per_sec" not in load:
            raise RuntimeError(f"load during the outage failed: {load}")
        result["outage_ops_per_sec"] = load["ops_per_sec"]
        result["hints"] = hints_pending(nodes[:2])
        revived = KaiProcess(
            dead.data_dir,
            port=dead.port,
            rpc_port=dead.rpc_port,
            config=(dead.data_dir.parent / f"{dead.data_dir.name}.toml").read_text(),
        )
        revived.start()
        nodes[2] = revived
        started = time.monotonic()
        while hints_pending(nodes[:2]):
            if time.monotonic() - started > DRAIN_TIMEOUT:
                raise TimeoutError(f"hints still pending after {DRAIN_TIMEOUT:g} s")
            time.sleep(0.1)  # the poll interval of a deadline-bounded wait
        seconds = time.monotonic() - started
        sent = counter(nodes[:2], "kai_transfer_keys_sent")
        sent_bytes = counter(nodes[:2], "kai_transfer_bytes_sent")
        result.update(
            drain_seconds=seconds,
            records_sent=sent,
            bytes_sent=sent_bytes,
            records_per_second=sent / seconds,
            mb_per_second=sent_bytes / seconds / 1e6,
        )
    finally:
        cluster.stop_nodes(nodes, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--scenario", choices=("aae", "handoff", "all"), default="all")
    add("--duration", type=float, default=10.0, help="measured seconds per aae run (10)")
    add("--pairs", type=int, default=2, help="on/off pairs of the aae scenario (2)")
    add("--outage", type=float, default=30.0, help="seconds node 3 is down under load (30)")
    add("--keys", type=int, default=10_000, help="distinct keys (10000)")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    document: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kai-bench-healing-") as scratch:
        if args.scenario in ("aae", "all"):
            base = Path(scratch) / "aae"
            base.mkdir()
            aae = document["aae"] = measure_aae(args, base)
            rows.append(
                [
                    "anti-entropy on / off, 3 nodes, ops/s",
                    " / ".join(
                        format_count(statistics.median(aae[f"ops_per_sec_{state}"]))
                        for state in ("on", "off")
                    ),
                    f"{aae['ratio']:.2f}x",
                ]
            )
        if args.scenario in ("handoff", "all"):
            base = Path(scratch) / "handoff"
            base.mkdir()
            handoff = document["handoff"] = measure_handoff(args, base)
            if "error" in handoff:
                print(f"handoff: {handoff['error']}", file=sys.stderr)
                return 1
            rows.append(
                [
                    f"hints after a {args.outage:g} s outage under load, drained in",
                    f"{handoff['hints']:,} in {handoff['drain_seconds']:.2f} s",
                    f"{format_count(handoff['records_per_second'])} records/s, "
                    f"{handoff['mb_per_second']:.1f} MB/s",
                ]
            )
    document["markdown"] = markdown_table(["measure", "figures", "rate or ratio"], rows)
    document["summary"] = f"bench.healing, {document['started']}"
    print(document["markdown"])
    publish(
        args.results_dir,
        "healing",
        document,
        readme_block="healing" if args.update_readme else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
