"""Charts of the latest benchmark results in ``bench/results/``, as PNG files in ``bench/plots/``.

* ``single_node.png``: ops/s and p99 latency of memcached, the bare trio server and kai for
  each workload (loadgen's runs), from ``single_node.json`` if it measured several servers.
* ``cluster_scaling.png``: throughput and latency percentiles against the number of nodes,
  from ``cluster-scaling.json`` (``bench.cluster --scaling``).
* ``latency_<target>.png``: latency percentiles against the offered load of each open-loop
  step, one chart per target, from ``latency.json``.

matplotlib is an optional dependency (the ``bench`` extra); without it the script says so
and exits with status 2. A kind of result that is missing is skipped with a note.

Example::

    python -m bench.plot
    python -m bench.plot --latency bench/results/latency-repeated.json --plots-dir /tmp/plots
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PERCENTILES = ("p50", "p90", "p99", "p99.9", "max")
SERVER_LABELS = {
    "memcached": "memcached -t 1",
    "bare-trio": "bare trio dict server",
    "kai": "kai (1 node)",
}
DPI = 110


def measured_servers(document: dict[str, Any]) -> list[str]:
    """The servers of a single_node result with a successful read-heavy run."""
    return [
        server
        for server in SERVER_LABELS
        if "ops_per_sec" in document.get("results", {}).get(server, {}).get("read-heavy", {})
    ]


def is_scaling(document: dict[str, Any]) -> bool:
    runs = [run for run in document.get("runs", []) if "ops_per_sec" in run.get("load", {})]
    return len(runs) > 1


def plot_single_node(plt: Any, document: dict[str, Any], source: Path, output: Path) -> None:
    """Grouped bars: ops/s and p99 per workload, one bar per server."""
    servers = measured_servers(document)
    workloads = [
        workload
        for workload in ("read-heavy", "write-heavy")
        if any("ops_per_sec" in document["results"][s].get(workload, {}) for s in servers)
    ]
    figure, (ops_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 4.6))
    width = 0.8 / len(servers)
    for index, server in enumerate(servers):
        runs = [document["results"][server].get(workload, {}) for workload in workloads]
        positions = [w + (index - (len(servers) - 1) / 2) * width for w in range(len(workloads))]
        ops = [run.get("ops_per_sec", 0) for run in runs]
        p99 = [run.get("latency_ms", {}).get("p99", 0) for run in runs]
        bars = ops_axis.bar(positions, ops, width, label=SERVER_LABELS[server])
        ops_axis.bar_label(bars, labels=[f"{value / 1000:.1f}k" for value in ops], fontsize=8)
        bars = p99_axis.bar(positions, p99, width, label=SERVER_LABELS[server])
        p99_axis.bar_label(bars, labels=[f"{value:.2f}" for value in p99], fontsize=8)
    labels = [
        f"{workload}\n({document['results'][servers[0]][workload]['config']['get_ratio']:.0%} get)"
        for workload in workloads
    ]
    for axis, ylabel in ((ops_axis, "throughput (ops/s)"), (p99_axis, "p99 latency (ms)")):
        axis.set_xticks(range(len(workloads)), labels)
        axis.set_ylabel(ylabel)
        axis.grid(axis="y", alpha=0.3)
        axis.set_ylim(top=axis.get_ylim()[1] * 1.08)  # room for the bar labels
    handles, names = ops_axis.get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=len(servers), fontsize=9)
    ops_axis.set_title("Throughput (closed loop)")
    p99_axis.set_title("p99 latency (lower is better)")
    config = document["results"][servers[0]]["read-heavy"]["config"]
    figure.suptitle(
        f"One server: {config['connections']} connections, {config['value_size']}-byte values "
        f"({document['started']}, load avg {document.get('load_average_before', 0):.2f})",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # leave the bottom strip to the legend
    save(plt, figure, output, source)


def plot_scaling(plt: Any, document: dict[str, Any], source: Path, output: Path) -> None:
    """Throughput and latency percentiles against the number of nodes."""
    runs = [run for run in document["runs"] if "ops_per_sec" in run.get("load", {})]
    nodes = [run["nodes"] for run in runs]
    figure, (ops_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.6))
    ops = [run["load"]["ops_per_sec"] for run in runs]
    ops_axis.plot(nodes, ops, marker="o", label="kai cluster")
    for x, y in zip(nodes, ops, strict=True):
        ops_axis.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6))
    ops_axis.set_ylim(bottom=0, top=max(ops) * 1.2)
    ops_axis.set_title("Throughput (closed loop)")
    ops_axis.set_ylabel("throughput (ops/s)")
    for name in ("p50", "p99", "p99.9"):
        values = [run["load"]["latency_ms"][name] for run in runs]
        latency_axis.plot(nodes, values, marker="o", label=name)
    latency_axis.set_ylim(bottom=0)
    latency_axis.set_title("Latency")
    latency_axis.set_ylabel("latency (ms)")
    for axis in (ops_axis, latency_axis):
        axis.set_xlabel("nodes")
        axis.set_xticks(nodes)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    arguments = document["arguments"]
    figure.suptitle(
        f"Cluster scaling: quorum {arguments['quorum']} (capped at the node count), "
        f"{float(arguments['get_ratio']):.0%} get, {arguments['value_size']}-byte values, "
        f"{arguments['connections']} connections; all on one 2-CPU machine "
        f"({document['started']})",
        fontsize=10,
    )
    figure.tight_layout()
    save(plt, figure, output, source)


def plot_latency(plt: Any, record: dict[str, Any], document: dict[str, Any], output: Path) -> None:
    """Latency percentiles (log scale) against the offered rate of each open-loop step."""
    steps = record["steps"]
    saturation = record["saturation"]["achieved_ops_per_sec"]
    figure, axis = plt.subplots(figsize=(8.5, 5))
    offered = [step["offered_ops_per_sec"] for step in steps]
    for name in PERCENTILES:
        values = [step["latency_ms"][name] for step in steps]
        axis.plot(offered, values, marker="o", label=name)
    for step in steps:
        axis.annotate(
            f"{step['fraction']:.0%}",
            (step["offered_ops_per_sec"], step["latency_ms"]["p50"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=7,
            color="0.35",
        )
    axis.axvline(saturation, color="0.5", linestyle="--", label=f"closed loop: {saturation:,.0f}")
    axis.set_yscale("log")
    axis.set_xlim(left=0)
    axis.set_xlabel("offered load (ops/s, open loop); point labels: % of the closed-loop rate")
    axis.set_ylabel("latency from due time (ms, log scale)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, title="percentile", title_fontsize=8)
    load = record["machine"]["load_at_measurement"]
    axis.set_title(
        f"Open-loop latency: {record['description']}\n({document['started']}, load avg {load:.2f})",
        fontsize=10,
    )
    figure.tight_layout()
    save(plt, figure, output, None)


def save(plt: Any, figure: Any, output: Path, source: Path | None) -> None:
    """Write the (laid out) figure as a PNG and release it."""
    figure.savefig(output, dpi=DPI)
    plt.close(figure)
    print(f"wrote {output}" + (f" (from {source.name})" if source else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Plot the latest benchmark results as PNG files (needs matplotlib).",
        epilog="example: python -m bench.plot --plots-dir /tmp/plots",
    )
    add = parser.add_argument
    add("--results-dir", type=Path, default=BENCH_DIR / "results", help="where the JSON is")
    add("--plots-dir", type=Path, default=BENCH_DIR / "plots", help="where PNGs go")
    add("--single-node", type=Path, default=None, help="this single_node JSON instead")
    add("--scaling", type=Path, default=None, help="this cluster --scaling JSON instead")
    add("--latency", type=Path, default=None, help="this latency JSON instead")
    return parser


def choose(
    explicit: Path | None, results_dir: Path, name: str, accept: Callable[[dict[str, Any]], bool]
) -> tuple[Path, dict[str, Any]] | None:
    """The explicitly given result file, or ``<name>.json`` in ``results_dir``, if it exists
    and ``accept`` takes it (None, with a note, otherwise)."""
    path = explicit if explicit is not None else results_dir / f"{name}.json"
    if not path.exists():
        print(f"no {path}; skipped", file=sys.stderr)
        return None
    document: dict[str, Any] = json.loads(path.read_text())
    if not accept(document):
        print(f"{path} has nothing to draw this chart from; skipped", file=sys.stderr)
        return None
    return path, document


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench.plot needs matplotlib, an optional dependency: install the bench extra with\n"
            "    .venv/bin/pip install -e '.[bench]'    (or: .venv/bin/pip install matplotlib)",
            file=sys.stderr,
        )
        return 2
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        found = choose(
            args.single_node,
            args.results_dir,
            "single_node",
            lambda document: len(measured_servers(document)) > 1,
        )
        if found:
            plot_single_node(plt, found[1], found[0], args.plots_dir / "single_node.png")
            written += 1
        found = choose(args.scaling, args.results_dir, "cluster-scaling", is_scaling)
        if found:
            plot_scaling(plt, found[1], found[0], args.plots_dir / "cluster_scaling.png")
            written += 1
        found = choose(
            args.latency,
            args.results_dir,
            "latency",
            lambda document: any(record.get("steps") for record in document.get("targets", [])),
        )
        if found:
            source, document = found
            print(f"latency charts from {source.name}")
            for record in document["targets"]:
                if record.get("steps"):
                    name = record["target"]["name"]
                    plot_latency(plt, record, document, args.plots_dir / f"latency_{name}.png")
                    written += 1
    except (OSError, ValueError, KeyError) as error:
        print(f"bench.plot: cannot read a result file: {error!r}", file=sys.stderr)
        return 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
