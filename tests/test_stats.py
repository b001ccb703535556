"""Latency histograms report percentiles within their bucket resolution; the stats report
carries node counts that a reader keeping only a value's first word can use."""

from __future__ import annotations

import random

import pytest

from kai.core.memcache.report import (
    NodeInfo,
    StatsReport,
    encode_cachedump_item,
    parse_cachedump,
)
from kai.core.stats import LatencyHistogram, NodeStats


def test_percentiles_are_close_to_exact_values() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(-7, 1.0) for _ in range(20_000)]  # around a millisecond
    histogram = LatencyHistogram()
    for sample in samples:
        histogram.record(sample)
    ordered = sorted(samples)
    for fraction in (0.5, 0.99, 0.999):
        exact_ms = ordered[int(fraction * len(ordered)) - 1] * 1000
        assert histogram.percentile(fraction) == pytest.approx(exact_ms, rel=0.07)
    assert histogram.percentile(1.0) == pytest.approx(max(samples) * 1000, abs=0.001)


def test_empty_histogram_and_reset() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(0.99) == 0.0
    histogram.record(0.002)
    assert histogram.percentile(0.5) > 0
    histogram.reset()
    assert histogram.total == 0
    assert histogram.percentile(0.5) == 0.0


def test_reset_clears_counters_but_not_gauges() -> None:
    stats = NodeStats()
    stats.curr_connections = 3
    stats.cmd_get = 10
    stats.get_latency.record(0.001)
    stats.reset()
    assert stats.cmd_get == 0
    assert stats.get_latency.total == 0
    assert stats.curr_connections == 3


def _report(members: list[str], down: str) -> StatsReport:
    info = NodeInfo(
        node="127.0.0.1:11011",
        quorum="3,2,2",
        buckets=1024,
        virtual_nodes=128,
        store="memory",
        max_connections=1024,
        max_item_size=1024,
        settings={},
        started_at=0.0,
    )
    return StatsReport(
        NodeStats(),
        info,
        members=lambda: members,
        extra_stats=lambda: [("kai_down_nodes", down), ("kai_cache_hits", 0)],
        wall_clock=lambda: 5.0,
    )


def _first_words(reply: bytes) -> dict[str, str]:
    """``stats`` as pymemcache's ``stats()`` and ``memcstat`` read it: a value's first word."""
    lines = reply.decode().split("\r\n")
    assert lines[-2:] == ["END", ""]
    return {line.split(" ")[1]: line.split(" ")[2] for line in lines[:-2]}


@pytest.mark.parametrize(
    ("members", "down", "curr_count", "down_count"),
    [
        (["127.0.0.1:11011"], "-", "1", "0"),
        (["127.0.0.1:11011", "127.0.0.1:11012", "127.0.0.1:11013"], "127.0.0.1:11013", "3", "1"),
        (
            ["127.0.0.1:11011", "127.0.0.1:11012", "127.0.0.1:11013"],
            "127.0.0.1:11012 127.0.0.1:11013",
            "3",
            "2",
        ),
    ],
)
def test_node_lists_come_with_counts_a_first_word_reader_can_use(
    members: list[str], down: str, curr_count: str, down_count: str
) -> None:
    report = _report(members, down)
    fields = dict(report.general())
    assert fields["kai_curr_nodes"] == " ".join(members)  # kept as Kai always had it
    assert fields["kai_down_nodes"] == down
    assert fields["kai_curr_nodes_count"] == int(curr_count)
    assert fields["kai_down_nodes_count"] == int(down_count)
    seen = _first_words(report.reply(()))
    assert seen["kai_curr_nodes_count"] == curr_count
    assert seen["kai_down_nodes_count"] == down_count
    names = [name for name, _ in report.general()]
    assert names.index("kai_down_nodes_count") == names.index("kai_down_nodes") + 1


def test_parse_cachedump_follows_memcached() -> None:
    assert parse_cachedump((b"cachedump", b"1", b"0")) == (1, 0)
    assert parse_cachedump((b"cachedump", b"63", b"5", b"ignored")) == (63, 5)
    assert parse_cachedump((b"cachedump", b"1")) == b"CLIENT_ERROR bad command line\r\n"
    for args in ((b"cachedump", b"-1", b"0"), (b"cachedump", b"1", b"x")):
        assert parse_cachedump(args) == b"CLIENT_ERROR bad command line format\r\n"
    assert parse_cachedump((b"cachedump", b"64", b"0")) == b"CLIENT_ERROR Illegal slab id\r\n"
    assert encode_cachedump_item(b"k", 3, 0) == b"ITEM k [3 b; 0 s]\r\n"
