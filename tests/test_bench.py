"""The benchmark tools in bench/: their pure helpers, and every scenario run end to end.

The smoke tests run each scenario as ``python -m bench.<scenario>`` against real processes (kai
nodes, memcached, the bare trio server) with tiny durations and few keys, write their results
to a temporary directory, and check that the figures are sane: operations were counted and no
reply was wrong. They never touch bench/README.md, bench/results/ or bench/plots/.

memcached is needed by the scenarios that compare with it (a missing memcached skips them,
or fails them under ``KAI_REQUIRE_TOOLS=1``). memtier_benchmark is optional: its tests run
when it is on PATH or named by ``KAI_MEMTIER``, and are skipped otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import _memtier, _results, cluster, instructions, plot, single_node, wakeup
from bench._common import (
    GET,
    SET,
    FramingLost,
    LoadConfig,
    Workload,
    WorkloadSpec,
    latency_summary,
    make_key,
    parse_reply,
    parse_server,
    percentile,
    plan_workers,
    server_of,
)
from bench._servers import memcache_stats
from kai.testing.process import KaiProcess
from tests.system.conftest import require_binaries

REPO_DIR = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_DIR / "bench"
#: Seconds one scenario run may take before the test fails.
RUN_TIMEOUT = 120.0
#: Options that make a load run tiny: no warmup, a third of a second, few keys.
TINY = ("--warmup=0", "--duration=0.3", "--keys=200")
#: Options of the scenarios that wait for a quiet machine: do not wait.
NO_WAIT = ("--max-load=1000", "--load-wait=0")


# --- pure helpers: workload, reply parser, percentiles --------------------------------------


def test_keys_have_the_requested_size_and_are_distinct() -> None:
    keys = [make_key(index, 32) for index in range(1000)]
    assert {len(key) for key in keys} == {32}
    assert len(set(keys)) == 1000
    assert make_key(7, 4) == b"k007"


def test_workload_spec_refuses_keys_too_short_for_the_key_count() -> None:
    with pytest.raises(ValueError, match="--key-size"):
        WorkloadSpec(
            servers=1,
            get_ratio=0.9,
            keys=1000,
            key_size=3,
            value_size=10,
            distribution="uniform",
            seed=1,
        )


@pytest.mark.parametrize("distribution", ["uniform", "zipfian"])
def test_schedules_keep_each_server_to_its_keys_and_the_get_ratio(distribution: str) -> None:
    spec = WorkloadSpec(
        servers=3,
        get_ratio=0.9,
        keys=500,
        key_size=16,
        value_size=20,
        distribution=distribution,
        seed=5,
    )
    workload = Workload(spec)
    for server, schedule in enumerate(workload.schedules):
        keys = {entry >> 1 for entry in schedule}
        assert all(server_of(workload.keys[key], 3) == server for key in keys)
        gets = sum(1 for entry in schedule if entry & 1 == GET)
        assert gets / len(schedule) == pytest.approx(0.9, abs=0.01)
        assert any(entry & 1 == SET for entry in schedule)
    assert Workload(spec).schedules == workload.schedules, "same seed, same schedules"
    assert len(workload.value) == 20
    assert workload.hit_tail == workload.value + b"\r\nEND\r\n"


def test_zipfian_schedule_favours_the_first_keys() -> None:
    spec = WorkloadSpec(
        servers=1,
        get_ratio=1.0,
        keys=1000,
        key_size=8,
        value_size=4,
        distribution="zipfian",
        seed=1,
    )
    schedule = Workload(spec).schedules[0]
    hot = sum(1 for entry in schedule if entry >> 1 < 10)
    assert hot / len(schedule) > 0.3  # the ten hottest keys of a thousand take a third


def test_plan_workers_splits_connections_and_budget_exactly() -> None:
    config = LoadConfig(
        servers=(("127.0.0.1", 1), ("127.0.0.1", 2)),
        connections=10,
        processes=3,
        pipeline=1,
        get_ratio=0.5,
        keys=100,
        key_size=8,
        value_size=10,
        distribution="uniform",
        warmup=0.0,
        duration=1.0,
        max_ops=101,
        rate=None,
        preload=False,
        seed=1,
    )
    plans = plan_workers(config)
    assert [c for plan in plans for c in plan.connection_ids] == list(range(10))
    assert sum(plan.max_ops or 0 for plan in plans) == 101


def test_only_loopback_servers_are_accepted() -> None:
    assert parse_server("localhost:11211") == ("127.0.0.1", 11211)
    assert parse_server("[::1]:5") == ("::1", 5)
    refused = {
        "10.0.0.1:11211": "not a loopback",
        "example.com:11211": "not an IP address",
        "127.0.0.1": "expected host:port",
        "127.0.0.1:0": "out of range",
    }
    for text, reason in refused.items():
        with pytest.raises(ValueError, match=reason):
            parse_server(text)


REPLIES = [
    (b"VALUE k 0 3\r\nabc\r\nEND\r\n", "value"),
    (b"VALUE k 0 4\r\na\r\nb\r\nVALUE j 5 1\r\nx\r\nEND\r\n", "value"),
    (b"END\r\n", "miss"),
    (b"STORED\r\n", "stored"),
    (b"SERVER_ERROR out of memory\r\n", "server_error"),
    (b"CLIENT_ERROR bad data chunk\r\n", "client_error"),
    (b"ERROR\r\n", "error"),
    (b"NOT_STORED\r\n", "unexpected"),
]


@pytest.mark.parametrize(("reply", "kind"), REPLIES)
def test_reply_parser_whole_byte_by_byte_and_pipelined(reply: bytes, kind: str) -> None:
    assert parse_reply(reply, 0) == (len(reply), kind)
    for cut in range(len(reply)):
        assert parse_reply(reply[:cut], 0) is None, f"incomplete at {cut} bytes"
    pipelined = b"STORED\r\n" + reply + b"END\r\n"
    assert parse_reply(pipelined, 8) == (8 + len(reply), kind)
    assert parse_reply(pipelined, 8 + len(reply)) == (len(pipelined), "miss")


@pytest.mark.parametrize(
    "reply",
    [
        b"VALUE k 0 x\r\nabc\r\nEND\r\n",
        b"VALUE k\r\nabc\r\nEND\r\n",
        b"VALUE k 0 1\r\na\r\n" * 65 + b"END\r\n",
    ],
)
def test_reply_parser_gives_up_on_broken_framing(reply: bytes) -> None:
    with pytest.raises(FramingLost):
        parse_reply(reply, 0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(value) for value in range(1, 11)]
    assert percentile(values, 0.5) == 5.0
    assert percentile(values, 0.9) == 9.0
    assert percentile(values, 0.91) == 10.0
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 10.0
    assert percentile([], 0.99) == 0.0


def test_latency_summary_is_in_milliseconds() -> None:
    latencies = [0.004, 0.001, 0.002, 0.003]
    summary = latency_summary(latencies)
    assert latencies == sorted(latencies), "sorted in place"
    assert summary["p50"] == pytest.approx(2.0)
    assert summary["max"] == pytest.approx(4.0)
    assert summary["mean"] == pytest.approx(2.5)
    assert latency_summary([]) == {
        "p50": 0.0,
        "p90": 0.0,
        "p99": 0.0,
        "p99.9": 0.0,
        "max": 0.0,
        "mean": 0.0,
    }


# --- memtier_benchmark's command line and results --------------------------------------------


@pytest.mark.parametrize(
    ("get_ratio", "ratio"), [(0.9, "1:9"), (0.1, "9:1"), (0.8, "1:4"), (1.0, "0:1"), (0.0, "1:0")]
)
def test_memtier_ratio_is_sets_to_gets(get_ratio: float, ratio: str) -> None:
    assert _memtier.set_get_ratio(get_ratio) == ratio


def test_memtier_runs_whole_seconds() -> None:
    assert [_memtier.whole_seconds(s) for s in (0.3, 1.0, 5.0, 5.2)] == [1, 1, 5, 6]


def test_memtier_command_lines() -> None:
    run = _memtier.MemtierRun(
        port=1234, connections=16, get_ratio=0.9, value_size=100, keys=50, seconds=5
    )
    measured = _memtier.command("memtier_benchmark", run, Path("/tmp/out.json"))
    assert "--ratio=1:9" in measured
    assert "--test-time=5" in measured
    assert "--distinct-client-seed" in measured
    assert "--protocol=memcache_text" in measured
    assert "--server=127.0.0.1" in measured
    prefill = _memtier.command("memtier_benchmark", run, Path("/tmp/out.json"), prefill=True)
    assert "--requests=allkeys" in prefill
    assert "--ratio=1:0" in prefill
    assert not any(arg.startswith("--test-time") for arg in prefill)


def memtier_document(count: int, p999: float, misses_per_sec: float = 0.0) -> dict[str, Any]:
    """The parts of memtier_benchmark 2.3.0's JSON output that are read."""
    percentiles = {"p50.00": 0.1, "p90.00": 0.2, "p99.00": 0.5, "p99.90": p999}
    op = {"Count": count // 2, "Ops/sec": count / 4, "Misses/sec": misses_per_sec}
    return {
        "ALL STATS": {
            "Runtime": {"Total duration": 2000, "Interrupted": "false"},
            "Gets": op,
            "Sets": op,
            "Totals": {
                "Count": count,
                "Ops/sec": count / 2,
                "Connection Errors": 0,
                "Accumulated Latency": count * 0.25,
                "Max Latency": 3.0,
                "Average Latency": 0.0,
                "Percentile Latencies": percentiles,
            },
        }
    }


def test_memtier_result_reads_like_loadgen() -> None:
    result = _memtier.parse_result(memtier_document(1000, 0.9, misses_per_sec=1.5))
    assert result["ops"] == 1000
    assert result["ops_per_sec"] == 500
    assert result["latency_ms"] == {
        "p50": 0.1,
        "p90": 0.2,
        "p99": 0.5,
        "p99.9": 0.9,
        "max": 3.0,
        "mean": 0.25,
    }
    assert result["get_misses"] == 3
    assert result["error_count"] == 0
    assert "error" not in result


def test_memtier_runs_together_add_up_with_the_worst_latency() -> None:
    first = {**_memtier.parse_result(memtier_document(1000, 0.9)), "port": 1}
    second = {**_memtier.parse_result(memtier_document(3000, 2.5)), "port": 2}
    combined = _memtier.combine([first, second])
    assert combined["ops"] == 4000
    assert combined["ops_per_sec"] == 2000
    assert combined["latency_ms"]["p99.9"] == 2.5
    assert combined["worst_node_port"] == 2
    assert combined["nodes"] == [first, second]
    failed = _memtier.combine([first, {"port": 2, "error": "exited with 1"}])
    assert failed["error"] == "port 2: exited with 1"


def loadgen_like(ops_per_sec: float, p50: float) -> dict[str, Any]:
    latency = {"p50": p50, "p90": p50, "p99": 2 * p50, "p99.9": 4 * p50}
    return {"ops_per_sec": ops_per_sec, "latency_ms": latency, "error_count": 0, "get_misses": 0}


def test_single_node_table_has_memtier_rows_and_ratio() -> None:
    results = {
        server: {
            "read-heavy": loadgen_like(rate, 0.2),
            "memtier read-heavy": loadgen_like(rate * 2, 0.1),
        }
        for server, rate in (("memcached", 40_000.0), ("kai", 10_000.0))
    }
    rows = single_node.table_rows(results)
    memtier_rows = [row for row in rows if row[1] == "memtier"]
    assert [row[2] for row in memtier_rows] == ["memcached -t 1", "kai (1 node)", "kai / memcached"]
    assert memtier_rows[-1][3] == "0.25x"
    assert memtier_rows[1][3] == "20,000"


def test_cluster_table_has_a_memtier_row() -> None:
    run = {
        "nodes": 3,
        "configured_quorum": "3,2,2",
        "load": {**loadgen_like(9000.0, 2.0), "errors": {}},
        "node_reports": [{"memory_kib": {"VmRSS": 40 * 1024}}] * 3,
        "preload_sets_per_sec": 1000.0,
        "load_average_before": 0.5,
        "cpu_cores": {"other": 0.01},
        "memtier": {**loadgen_like(7000.0, 3.0), "errors": {}},
    }
    rows = cluster.table_rows(run)
    assert [row[2] for row in rows] == ["loadgen", "memtier x3 (worst node's latency)"]
    assert rows[1][3] == "7,000"
    assert all(len(row) == len(cluster.HEADER) for row in rows)


# --- publishing results -----------------------------------------------------------------------


def test_publish_overwrites_the_previous_run_of_its_kind(tmp_path: Path) -> None:
    for run in (1, 2):
        document = {"summary": "s", "markdown": "| t |", "run": run}
        _results.publish(tmp_path, "single_node", document, readme_block=None)
    assert [path.name for path in tmp_path.iterdir()] == ["single_node.json"]
    assert json.loads((tmp_path / "single_node.json").read_text())["run"] == 2


def test_update_readme_replaces_only_its_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- x results start -->\nold\n<!-- x results end -->\nafter\n")
    assert _results.update_readme("x results", "summary", "| table |", readme)
    assert readme.read_text() == (
        "intro\n<!-- x results start -->\nsummary\n\n| table |\n<!-- x results end -->\nafter\n"
    )
    assert not _results.update_readme("y results", "summary", "table", readme)


def test_plot_reads_the_result_of_each_kind_by_name(tmp_path: Path) -> None:
    (tmp_path / "cluster-scaling.json").write_text('{"runs": []}')
    found = plot.choose(None, tmp_path, "cluster-scaling", lambda document: True)
    assert found == (tmp_path / "cluster-scaling.json", {"runs": []})
    assert plot.choose(None, tmp_path, "latency", lambda document: True) is None
    assert plot.choose(None, tmp_path, "cluster-scaling", plot.is_scaling) is None


@pytest.mark.parametrize(
    "module",
    ["loadgen", "single_node", "cluster", "latency", "memory", "wakeup", "plot", "routing"],
)
def test_every_scenario_has_help_with_an_example(module: str) -> None:
    parser = importlib.import_module(f"bench.{module}").build_parser()
    assert parser.description
    assert f"example: python -m bench.{module}" in parser.format_help()


# --- every scenario end to end ----------------------------------------------------------------


def bench_outputs() -> dict[str, Any]:
    """What the smoke tests must leave alone: the README's bytes, results and plots files."""
    return {
        "readme": (BENCH_DIR / "README.md").read_bytes(),
        **{
            folder: sorted(
                (path.name, path.stat().st_mtime_ns) for path in (BENCH_DIR / folder).iterdir()
            )
            for folder in ("results", "plots")
        },
    }


@pytest.fixture
def untouched_bench() -> Iterator[None]:
    """Fail a smoke test that rewrote bench/README.md, bench/results/ or bench/plots/."""
    before = bench_outputs()
    yield
    assert bench_outputs() == before, "a smoke run wrote into bench/"


def run_scenario(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.<module> args...`` from the repository root; fail on a non-zero exit."""
    completed = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, (
        f"bench.{module} exited with {completed.returncode}\n"
        f"--- stdout (end)\n{completed.stdout[-3000:]}\n--- stderr (end)\n{completed.stderr[-3000:]}"
    )
    return completed


def assert_clean(result: dict[str, Any], what: str) -> None:
    """A load run that counted operations, every get a hit, and no wrong reply."""
    assert "error" not in result, f"{what}: {result['error']}"
    assert result["ops"] > 0, f"{what}: no operations"
    assert result["ops_per_sec"] > 0, f"{what}: no throughput"
    assert result["error_count"] == 0, f"{what}: errors {result.get('errors')}"
    assert result["get_misses"] == 0, f"{what}: misses after a preload"
    assert result["latency_ms"]["p50"] > 0, f"{what}: no latency"


def memtier_binary() -> str:
    """memtier_benchmark from ``KAI_MEMTIER`` or PATH; skip the test when there is none."""
    path = os.environ.get("KAI_MEMTIER") or shutil.which(_memtier.BINARY)
    if not path:
        pytest.skip("memtier_benchmark (optional) is not on PATH and KAI_MEMTIER does not name it")
    return path


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_loadgen_against_kai(tmp_path: Path) -> None:
    output = tmp_path / "loadgen.json"
    with KaiProcess(tmp_path / "node") as node:
        completed = run_scenario(
            "loadgen",
            f"--servers=127.0.0.1:{node.port}",
            "--connections=4",
            "--preload",
            *TINY,
            f"--json={output}",
        )
    assert "throughput:" in completed.stdout
    result = json.loads(output.read_text())
    assert_clean(result, "loadgen")
    assert result["per_op"]["get"]["ops"] > 0
    assert result["per_op"]["set"]["ops"] > 0


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_single_node_scenario(tmp_path: Path) -> None:
    require_binaries("memcached")
    run_scenario(
        "single_node", *TINY, "--no-memcaslap", "--no-memtier", f"--results-dir={tmp_path}"
    )
    document = json.loads((tmp_path / "single_node.json").read_text())
    for server in single_node.SERVERS:
        for workload, _ in single_node.WORKLOADS:
            assert_clean(document["results"][server][workload], f"{server} {workload}")
        assert document["results"][server]["stop"]["exit_code"] in (0, -15)
    assert "kai / memcached" in document["markdown"]
    assert "memtier" not in document["markdown"]


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_single_node_scenario_with_memtier(tmp_path: Path) -> None:
    binary = memtier_binary()
    run_scenario(
        "single_node",
        *TINY,
        "--only=kai",
        "--no-memcaslap",
        f"--memtier={binary}",
        f"--results-dir={tmp_path}",
    )
    document = json.loads((tmp_path / "single_node.json").read_text())
    for workload, _ in single_node.WORKLOADS:
        assert_clean(document["results"]["kai"][f"memtier {workload}"], f"memtier {workload}")
    assert "| memtier | kai (1 node) |" in document["markdown"]


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
@pytest.mark.parametrize("with_memtier", [False, True], ids=["loadgen", "memtier"])
def test_cluster_scenario(tmp_path: Path, with_memtier: bool) -> None:
    memtier = [f"--memtier={memtier_binary()}"] if with_memtier else ["--no-memtier"]
    run_scenario("cluster", "--nodes=3", *TINY, *memtier, f"--results-dir={tmp_path}")
    document = json.loads((tmp_path / "cluster.json").read_text())
    (run,) = document["runs"]
    assert_clean(run["load"], "cluster loadgen")
    assert run["exit_codes"] == [0, 0, 0]
    assert [report["quorum"] for report in run["node_reports"]] == ["3,2,2"] * 3
    if with_memtier:
        assert_clean(run["memtier"], "cluster memtier")
        assert len(run["memtier"]["nodes"]) == 3
        assert "memtier x3" in document["markdown"]
    else:
        assert "memtier" not in run


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_elastic_scenario(tmp_path: Path) -> None:
    # Few, larger partitions: the growth settles in seconds (each partition is one copy).
    run_scenario(
        "elastic",
        "--keys=2000",
        "--duration=1",
        "--setting=buckets=64",
        f"--results-dir={tmp_path}",
    )
    document = json.loads((tmp_path / "elastic.json").read_text())
    for name in ("idle", "during", "after"):
        assert_clean(document[name]["load"], f"elastic {name}")
    transfer = document["transfer"]
    assert transfer["keys_sent"] >= 2000, "each new node holds 3/5 of the keys"
    assert transfer["bytes_sent"] > 2000 * 1024
    assert 0 <= transfer["transfer_began"] < transfer["settle_seconds"]
    assert transfer["keys_per_second"] > 0
    assert 0 <= transfer["overlap"] <= 1
    members = {stats["kai_curr_nodes"] for stats in document["node_stats"]}
    assert len(members) == 1
    assert len(members.pop().split()) == 5
    assert {stats["kai_ownership_phase"] for stats in document["node_stats"]} == {"0"}
    assert document["exit_codes"] == [0] * 5
    assert "during / idle" in document["markdown"]


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_latency_scenario(tmp_path: Path) -> None:
    require_binaries("memcached")
    run_scenario(
        "latency",
        "--only=node,bare-trio,memcached,cluster",
        "--cluster-nodes=2",
        "--fractions=0.5",
        "--step-duration=0.3",
        "--saturation-duration=0.3",
        "--warmup=0",
        "--keys=200",
        *NO_WAIT,
        f"--results-dir={tmp_path}",
    )
    document = json.loads((tmp_path / "latency.json").read_text())
    records = {record["target"]["name"]: record for record in document["targets"]}
    assert set(records) == {"node", "bare-trio", "memcached", "cluster"}
    for name, record in records.items():
        assert "error" not in record, f"{name}: {record['error']}"
        (step,) = record["steps"]
        for run in (record["saturation"], step):
            assert run["ops"] > 0, name
            assert run["error_count"] == 0, f"{name}: {run['errors']}"
            assert run["get_misses"] == 0, name
    assert records["memcached"]["rates_of"] == "node"
    node_rate = records["node"]["steps"][0]["offered_ops_per_sec"]
    assert records["memcached"]["steps"][0]["offered_ops_per_sec"] == node_rate


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_memory_scenario(tmp_path: Path) -> None:
    run_scenario(
        "memory", "--keys=500", "--settle=0", "--sample=50", *NO_WAIT, f"--results-dir={tmp_path}"
    )
    document = json.loads((tmp_path / "memory.json").read_text())
    assert [record["name"] for record in document["runs"]] == ["default", "no-cache"]
    for record in document["runs"]:
        assert "error" not in record, record["error"]
        assert record["stats"]["curr_items"] == 500
        assert record["sample_wrong"] == 0
        assert record["memory_kib"]["VmRSS"] > 0
    assert document["runs"][1]["stats"]["kai_cache_bytes"] == 0


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_wakeup_scenario(tmp_path: Path) -> None:
    require_binaries("memcached")
    run_scenario(
        "wakeup", "--requests=200", "--batches=1,4", "--timeout=30", f"--results-dir={tmp_path}"
    )
    document = json.loads((tmp_path / "wakeup.json").read_text())
    measured = {(result["server"], result["batch"]) for result in document["results"]}
    assert measured == {(server, batch) for server in wakeup.SERVERS for batch in (1, 4)}
    for result in document["results"]:
        assert result["requests"] >= 100, result
        assert result["round_trip_p50_us"] > 0, result


@pytest.mark.system
@pytest.mark.usefixtures("untouched_bench")
def test_routing_scenario(tmp_path: Path) -> None:
    # N=2 on 3 nodes: a random node is a non-primary of a third of the keys.
    run_scenario(
        "routing",
        "--quorum=2,1,1",
        "--duration=0.5",
        "--warmup=0",
        "--threads=2",
        "--keys=100",
        f"--results-dir={tmp_path}",
    )
    document = json.loads((tmp_path / "routing.json").read_text())
    (run,) = document["runs"]
    assert "error" not in run, run["error"]
    assert run["exit_codes"] == [0, 0, 0]
    sides = run["sides"]
    assert set(sides) == {"client", "routed", "random"}
    for name, side in sides.items():
        assert side["pairs"] > 0, name
        assert side["error_count"] == 0, f"{name}: {side['errors']} {side['first_errors']}"
        assert side["get_ms"]["p50"] > 0, name
        assert side["put_ms"]["p50"] > 0, name
    for name in ("client", "routed"):
        assert sides[name]["off_primary_share"] == 0, name
        assert sides[name]["forwarded_writes"] == 0, name
    assert sides["random"]["off_primary_requests"] > 0
    assert sides["random"]["forwarded_writes"] > 0
    assert "| 2,1,1 | random |" in document["markdown"]


@pytest.mark.system
def test_rpc_scenario() -> None:
    completed = run_scenario("rpc", "--duration=0.2", "--concurrency=2", "--size=100")
    rows = [
        line.split() for line in completed.stdout.splitlines() if line.startswith(("call", "fan"))
    ]
    assert len(rows) == 3, completed.stdout
    for row in rows:
        calls_per_sec = float(row[-3].replace(",", ""))
        assert calls_per_sec > 0, row


@pytest.mark.parametrize("module", ["hotpath", "quorum"])
def test_in_process_cost_scenarios(module: str) -> None:
    completed = run_scenario(module, "--ops=200")
    lines = [line for line in completed.stdout.splitlines() if line.startswith(("get:", "set:"))]
    assert len(lines) == 2, completed.stdout
    for line in lines:
        assert float(line.split()[1]) > 0, line


@pytest.mark.usefixtures("untouched_bench")
def test_plot_draws_the_committed_results(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        completed = subprocess.run(
            [sys.executable, "-m", "bench.plot", f"--plots-dir={tmp_path}"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert completed.returncode == 2, completed.stderr
        assert "pip install" in completed.stderr
        return
    completed = run_scenario("plot", f"--plots-dir={tmp_path}")
    drawn = sorted(path.name for path in tmp_path.iterdir())
    assert {"single_node.png", "cluster_scaling.png", "latency_node.png"} <= set(drawn), (
        completed.stdout + completed.stderr
    )


# --- bench.instructions: the driver and the count parser, without valgrind ------------------


def test_instructions_driver_preloads_and_sends_each_kind(tmp_path: Path) -> None:
    with KaiProcess(tmp_path / "node") as node:
        instructions.drive(node.port, 50, "set")
        instructions.drive(node.port, 50, "get")
        stats = memcache_stats(node.port)
    assert int(stats["cmd_set"]) == 2 * instructions.KEYS + 50
    assert int(stats["get_hits"]) == 50
    sample = b"==1== Events    : Ir\n==1== Collected : 1234567\n"
    found = instructions._COLLECTED.search(sample)
    assert found is not None
    assert found.group(1) == b"1234567"
