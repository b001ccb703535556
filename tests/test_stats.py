"""Latency histograms report percentiles within their bucket resolution."""

from __future__ import annotations

import random

import pytest

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
