"""Benchmark elastic membership: how fast a 3-node cluster hands data to 2 new nodes, and
what the clients see meanwhile.

On fresh real nodes on loopback (N=3 R=2 W=2, ``bench.cluster``'s setting and functions): 3
nodes are formed and preloaded with ``--keys`` keys of ``--value-size`` bytes; ``bench.loadgen``
(``bench.cluster``'s mix: 80% get, 30 connections over the 3 nodes' memcached ports) runs
``--duration`` seconds on the idle cluster; then nodes 4 and 5 are started at once with node 1
as their seed (same secret, same settings), the same load is started as soon as a node
reports phase 1 (copying), and every node's ``stats`` are polled every 0.1 s until each one
is in phase 0 (settled) with 5 members in ``kai_curr_nodes``. Once the old owners have
deleted what they gave away, the same load runs once more on the settled 5-node cluster
(still through the first 3 nodes' ports, so the three runs differ only in what the cluster
is doing). The figures: keys and bytes the transfers sent (``kai_transfer_keys_sent`` and
``kai_transfer_bytes_sent`` summed over the nodes), their rate from starting the new nodes
to settled and over the phases 1-2 alone, and each load's throughput, latency and CPU split.

The load during the growth is one run of ``--duration`` seconds: it measures the transfer
only for the part of the run the transfer lasted. That overlap is reported; when the
cluster settles before the load ends, the output says so (a shorter ``--duration`` or a
lower ``transfer_rate`` measures the transfer alone). The polls time each node's ``stats``
reply too: a node whose event loop is blocked answers late. Nodes and directories are
always cleaned up, and every wait has a deadline.

Example::

    python -m bench.elastic                                  # 100,000 keys of 1 KB, 10 s
    python -m bench.elastic --setting transfer_rate=4194304 --duration 5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import cluster
from bench._common import format_count, format_ms, markdown_table, percentile
from bench._machine import CpuMeter, process_cpu_seconds
from bench._results import add_output_options, publish
from bench._servers import HOST, memcache_stats, seeded_node
from kai.testing.process import KaiProcess

#: Seconds between two rounds of ``stats`` while a load runs or the cluster settles.
POLL_INTERVAL = 0.1
#: Seconds the old owners may take to delete what they gave away, after settling.
CLEANUP_TIMEOUT = 120.0
#: The bench/README.md block ``--update-readme`` replaces.
README_BLOCK = "elastic results"
#: The nodes the cluster grows by.
NEW_NODES = 2
#: The loads measured, in order: (name, what the cluster is doing meanwhile).
LOADS = (
    ("idle", "idle, 3 nodes"),
    ("during", "during the transfer (3 -> 5)"),
    ("after", "settled, 5 nodes"),
)

TRANSFER_HEADER = (
    "keys sent",
    "MB sent",
    "s from start to settled",
    "keys/s / MB/s",
    "s moving (phase 1-2)",
    "keys/s / MB/s moving",
    "load overlapping the transfer",
)
LOAD_HEADER = (
    "client load (30 conns on nodes 1-3)",
    "ops/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "misses+errors",
    "slowest stats reply ms",
    "CPU cores: nodes (each) / bench / other",
)


@dataclass(frozen=True)
class Poll:
    """One round of ``stats`` over the nodes, ``at`` seconds after the watch began."""

    at: float
    #: Whether some node is copying or switched (``kai_ownership_phase`` 1 or 2).
    moving: bool
    #: Whether every node is in phase 0 with every one of the nodes in ``kai_curr_nodes``.
    settled: bool
    keys_sent: int
    bytes_sent: int
    #: The slowest node's ``stats`` round trip, in milliseconds, and that node (1-based).
    slowest_ms: float
    slowest_node: int
    #: Nodes that did not answer ``stats`` (not started yet, or not in time).
    unanswered: int


def poll_nodes(nodes: Sequence[KaiProcess], began: float) -> Poll:
    """``stats`` of every node: their phases and the sums of the transfer counters."""
    everyone = " ".join(sorted(f"{HOST}:{node.rpc_port}" for node in nodes))
    moving, settled, keys, size, unanswered = False, True, 0, 0, 0
    slowest, slowest_node = 0.0, 0
    for number, node in enumerate(nodes, start=1):
        asked = time.monotonic()
        try:
            fields = memcache_stats(node.port)
        except OSError:
            settled, unanswered = False, unanswered + 1
            continue
        finally:
            if (took := (time.monotonic() - asked) * 1000) > slowest:
                slowest, slowest_node = took, number
        phase = fields.get("kai_ownership_phase")
        members = " ".join(sorted(fields.get("kai_curr_nodes", "").split()))
        moving = moving or phase in ("1", "2")
        settled = settled and members == everyone and phase == "0"
        keys += int(fields.get("kai_transfer_keys_sent", 0))
        size += int(fields.get("kai_transfer_bytes_sent", 0))
    return Poll(
        time.monotonic() - began, moving, settled, keys, size, slowest, slowest_node, unanswered
    )


def watch(
    nodes: Sequence[KaiProcess],
    polls: list[Poll],
    began: float,
    done: Callable[[Poll], bool],
    timeout: float,
) -> None:
    """Poll ``nodes`` every 0.1 s, appending to ``polls``, until ``done`` says so (raise
    TimeoutError after ``timeout`` s, RuntimeError if a node exits)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        for number, node in enumerate(nodes, start=1):
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"node {number} exited with {node.process.returncode}")
        polls.append(poll_nodes(nodes, began))
        if done(polls[-1]):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL)  # the poll interval of a deadline-bounded wait
    raise TimeoutError(f"gave up after {timeout:g} s of polls; the last: {polls[-1]}")


def load_and_watch(
    nodes: Sequence[KaiProcess],
    ports: Sequence[int],
    options: argparse.Namespace,
    output: Path,
    polls: list[Poll],
    *,
    began: float,
    until_settled: bool,
    timeout: float,
) -> tuple[dict[str, Any], float]:
    """One loadgen run on ``ports`` while ``nodes`` are polled (into ``polls``) until the
    load is over and, with ``until_settled``, the nodes are settled: the load's result (with
    the cores the nodes, each node, the generator and the rest of the machine used while
    the load's process ran) and when it ended (seconds after ``began``)."""
    running = [node for node in nodes if node.process is not None]
    meter = CpuMeter([node.pid for node in running])
    before = [process_cpu_seconds(node.pid) for node in running]
    ended: list[float] = []
    cpu: dict[str, Any] = {}

    def finished(_: object) -> None:
        ended.append(time.monotonic() - began)
        cpu.update(meter.read())
        after = [process_cpu_seconds(node.pid) for node in running]
        cpu["by_node"] = [
            (end - start) / cpu["seconds"] for start, end in zip(before, after, strict=True)
        ]

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        load = pool.submit(cluster.run_loadgen, ports, options, output, preload=False)
        load.add_done_callback(finished)
        watch(
            nodes,
            polls,
            began,
            lambda poll: load.done() and (poll.settled or not until_settled),
            timeout,
        )
        result = load.result()
    if "ops_per_sec" not in result:
        raise RuntimeError(f"loadgen failed: {result.get('error', result)}")
    result["cpu_cores"] = cpu
    return result, ended[0]


def new_nodes(nodes: list[KaiProcess], base: Path) -> list[KaiProcess]:
    """``NEW_NODES`` fresh nodes, not started, with node 1 as their seed and node 1's
    secret and settings (appended to ``nodes`` too, so they are always stopped)."""
    first = nodes[0]
    secret = (first.data_dir / "cluster.secret").read_bytes()
    config = (first.data_dir.parent / f"{first.data_dir.name}.toml").read_text()
    fresh = []
    for index in range(len(nodes) + 1, len(nodes) + NEW_NODES + 1):
        node = seeded_node(base / f"n{index}", secret, config, first.rpc_port)
        nodes.append(node)
        fresh.append(node)
    return fresh


def start_timed(node: KaiProcess) -> float:
    """Start ``node``; the moment it answered (``time.monotonic()``)."""
    node.start()
    return time.monotonic()


def grow_under_load(
    nodes: list[KaiProcess],
    options: argparse.Namespace,
    base: Path,
    polls: list[Poll],
    timeout: float,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Start the new nodes at once; when the first node reports copying, start the load on
    the old nodes; poll until it is over and the cluster settled. The load's result, and
    the moments (seconds after the start) that frame the measurement."""
    ports = [node.port for node in nodes]
    fresh = new_nodes(nodes, base)
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(fresh)) as pool:
        starting = [pool.submit(start_timed, node) for node in fresh]

        def failed() -> bool:
            return any(started.done() and started.exception() for started in starting)

        watch(nodes, polls, began, lambda poll: poll.moving or poll.settled or failed(), timeout)
        errors = [started.exception() for started in starting if started.done()]
        if any(errors):
            raise next(error for error in errors if error is not None)
        load_started = time.monotonic() - began
        load, load_ended = load_and_watch(
            nodes,
            ports,
            options,
            base / "during.json",
            polls,
            began=began,
            until_settled=True,
            timeout=timeout,
        )
        answered = max(started.result() for started in starting)
    moments = {
        "nodes_answered": answered - began,
        "load_started": load_started,
        "load_ended": load_ended,
    }
    return load, moments


def wait_for_cleanup(old: Sequence[KaiProcess], timeout: float) -> float | None:
    """Seconds until every old owner reports records deleted (None if not in ``timeout``)."""
    began = time.monotonic()
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        dropped = [int(memcache_stats(n.port)["kai_ownership_records_dropped"]) for n in old]
        if all(dropped):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            break
        time.sleep(POLL_INTERVAL)  # the poll interval of a deadline-bounded wait
    return None


def stats_reply_ms(polls: Sequence[Poll]) -> dict[str, float]:
    """The slowest node's ``stats`` reply over the polls: median, p99 and worst."""
    slowest = sorted(poll.slowest_ms for poll in polls)
    return {
        "p50": percentile(slowest, 0.5),
        "p99": percentile(slowest, 0.99),
        "max": slowest[-1] if slowest else 0.0,
    }


def transfer_figures(
    polls: Sequence[Poll], baseline: Poll, moments: dict[str, float], duration: float
) -> dict[str, Any]:
    """What the polls of the growth show: keys and bytes sent, when the copying began and
    the cluster settled, and how much of the measured load overlapped the transfer.

    The transfer runs from the last poll before some node reported phase 1 or 2 to the
    first poll that saw all settled, so it is known to within a poll interval at each end.
    The load's measured window ends when its process does (a little after its last
    request), and starts ``duration`` before that, or when it was started if later.
    """
    keys = polls[-1].keys_sent - baseline.keys_sent
    size = polls[-1].bytes_sent - baseline.bytes_sent
    first_moving = next(index for index, poll in enumerate(polls) if poll.moving or poll.settled)
    began = polls[first_moving - 1].at if first_moving else 0.0
    settled = next(poll.at for poll in polls if poll.settled)
    seconds = max(settled - began, 1e-9)
    window_start = max(moments["load_started"], moments["load_ended"] - duration)
    window_end = moments["load_ended"]
    transferring = max(0.0, min(settled, window_end) - max(began, window_start))
    return {
        "keys_sent": keys,
        "bytes_sent": size,
        "settle_seconds": settled,
        "keys_per_second": keys / settled,
        "mb_per_second": size / settled / 1e6,
        "transfer_began": began,
        "moving_seen": polls[first_moving].at,
        "transfer_seconds": seconds,
        "transfer_keys_per_second": keys / seconds,
        "transfer_mb_per_second": size / seconds / 1e6,
        **moments,
        "load_window": [window_start, window_end],
        "overlap": min(1.0, transferring / max(window_end - window_start, 1e-9)),
        "settled_before_load_ended": settled < window_end,
        "polls": len(polls),
    }


def measure_growth(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Form 3 nodes, preload, load them idle, grow to 5 under load, load the 5."""
    options = cluster.build_parser().parse_args(
        ["--nodes", "3", "--duration", str(args.duration), "--warmup", "0"]
        + ["--keys", str(args.keys), "--value-size", str(args.value_size)]
        + [option for setting in args.setting for option in ("--setting", setting)]
    )
    load_timeout = args.duration + cluster.LOADGEN_SLACK
    nodes: list[KaiProcess] = []
    result: dict[str, Any] = {}
    try:
        cluster.form_cluster(3, options, scratch, nodes, result)
        ports = [node.port for node in nodes]
        cluster.preload(ports, options, scratch, result)
        polls: list[Poll] = []
        load, _ = load_and_watch(
            nodes,
            ports,
            options,
            scratch / "idle.json",
            polls,
            began=time.monotonic(),
            until_settled=False,
            timeout=load_timeout,
        )
        result["idle"] = {"load": load, "stats_reply_ms": stats_reply_ms(polls)}
        baseline = poll_nodes(nodes, time.monotonic())
        print(f"\n== starting {NEW_NODES} nodes with node 1 as their seed ==", flush=True)
        polls = []
        load, moments = grow_under_load(nodes, options, scratch, polls, args.settle_timeout)
        transfer = transfer_figures(polls, baseline, moments, args.duration)
        moving = [poll for poll in polls if transfer["transfer_began"] < poll.at]
        result["transfer"] = transfer
        result["during"] = {
            "load": load,
            "stats_reply_ms": stats_reply_ms(
                [poll for poll in moving if poll.at <= transfer["settle_seconds"]]
            ),
        }
        result["timeline"] = [asdict(poll) for poll in polls]
        result["cleanup_seconds"] = wait_for_cleanup(nodes[:3], CLEANUP_TIMEOUT)
        polls = []
        load, _ = load_and_watch(
            nodes,
            ports,
            options,
            scratch / "after.json",
            polls,
            began=time.monotonic(),
            until_settled=False,
            timeout=load_timeout,
        )
        result["after"] = {"load": load, "stats_reply_ms": stats_reply_ms(polls)}
        result["node_stats"] = [memcache_stats(node.port) for node in nodes]
    except (OSError, RuntimeError, TimeoutError) as error:
        result["error"] = str(error)
        print(f"elastic: {error}", file=sys.stderr)
    finally:
        cluster.stop_nodes(nodes, result)
    return result


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "?"


def describe_cpu(load: dict[str, Any]) -> str:
    """The cores used while the load ran: by the nodes (and each node), by this process with
    loadgen (the generator and the polls), and by the rest of the machine."""
    cpu = load["cpu_cores"]
    each = "+".join(f"{cores:.2f}" for cores in cpu["by_node"])
    return f"{cpu['nodes']:.2f} ({each}) / {cpu['generator']:.2f} / {cpu['other']:.2f}"


def load_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per measured load, then the ratios of the growth's to the idle one's."""
    rows = []
    for name, label in LOADS:
        load, replies = result[name]["load"], result[name]["stats_reply_ms"]
        latency = load["latency_ms"]
        rows.append(
            [label, format_count(load["ops_per_sec"])]
            + [format_ms(latency[key]) for key in ("p50", "p99", "p99.9")]
            + [cluster.describe_problems(load), format_ms(replies["max"]), describe_cpu(load)]
        )
    idle = result["idle"]
    for name in ("during", "after"):
        other = result[name]
        rows.append(
            [f"{name} / idle", ratio(other["load"]["ops_per_sec"], idle["load"]["ops_per_sec"])]
            + [
                ratio(other["load"]["latency_ms"][key], idle["load"]["latency_ms"][key])
                for key in ("p50", "p99", "p99.9")
            ]
            + ["", ratio(other["stats_reply_ms"]["max"], idle["stats_reply_ms"]["max"]), ""]
        )
    return rows


def transfer_row(transfer: dict[str, Any]) -> list[str]:
    return [
        format_count(transfer["keys_sent"]),
        f"{transfer['bytes_sent'] / 1e6:.1f}",
        f"{transfer['settle_seconds']:.1f}",
        f"{format_count(transfer['keys_per_second'])} / {transfer['mb_per_second']:.1f}",
        f"{transfer['transfer_seconds']:.1f}",
        f"{format_count(transfer['transfer_keys_per_second'])} / "
        f"{transfer['transfer_mb_per_second']:.1f}",
        f"{transfer['overlap']:.0%}",
    ]


def describe_moments(transfer: dict[str, Any]) -> str:
    """When things happened, in seconds after the new nodes were started, and whether the
    load measured the transfer for all of its window."""
    start, end = transfer["load_window"]
    text = (
        f"Seconds after starting the new nodes: both answered at {transfer['nodes_answered']:.1f},"
        f" the first node left phase 0 between {transfer['transfer_began']:.1f}"
        f" and {transfer['moving_seen']:.1f},"
        f" the load measured about {start:.1f}-{end:.1f},"
        f" all settled at {transfer['settle_seconds']:.1f}."
    )
    if transfer["settled_before_load_ended"]:
        text += (
            f" The cluster settled before the load ended: only {transfer['overlap']:.0%} of"
            " the measured load overlapped the transfer (use a shorter --duration)."
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark growing a loaded 3-node kai cluster to 5: transfer rate and "
        "the clients' latency during the transfer against idle.",
        epilog="example: python -m bench.elastic --keys 100000 --duration 10 "
        "--setting transfer_rate=4194304",
    )
    add = parser.add_argument
    add("--keys", type=int, default=100_000, help="distinct keys, all preloaded (100000)")
    add("--value-size", type=int, default=1024, help="value bytes (1024)")
    add("--duration", type=float, default=10.0, help="measured seconds per load run (10)")
    add(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more node setting as a TOML line, e.g. transfer_rate=4194304 (repeatable)",
    )
    add(
        "--settle-timeout",
        type=float,
        default=600.0,
        help="seconds the growth may take to settle (600)",
    )
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the nodes are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="kai-bench-elastic-") as scratch:
        result = measure_growth(args, Path(scratch))
    document: dict[str, Any] = {
        "started": started,
        "arguments": {key: str(value) for key, value in vars(args).items()},
        **result,
    }
    if "error" in result:
        publish(args.results_dir, "elastic", document, readme_block=None)
        return 1
    transfer = result["transfer"]
    loads = markdown_table(LOAD_HEADER, load_rows(result))
    moved = markdown_table(TRANSFER_HEADER, [transfer_row(transfer)])
    document["markdown"] = f"{moved}\n\n{loads}"
    document["summary"] = (
        f"bench.elastic, {started}: 3 -> 5 nodes, {args.keys:,} keys of {args.value_size} "
        f"bytes, {args.duration:g} s per load"
        + "".join(f", {s}" for s in args.setting)
        + ". "
        + describe_moments(transfer)
    )
    print(f"\n{document['summary']}\n\n{document['markdown']}")
    publish(
        args.results_dir,
        "elastic",
        document,
        readme_block=README_BLOCK if args.update_readme else None,
    )
    loads_failed = any(
        result[name]["load"]["error_count"] or result[name]["load"]["get_misses"]
        for name, _ in LOADS
    )
    stopped_badly = any(code not in (0, None) for code in result["exit_codes"])
    return 1 if loads_failed or stopped_badly else 0


if __name__ == "__main__":
    sys.exit(main())
