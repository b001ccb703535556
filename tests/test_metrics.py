"""The Prometheus exposition of a node's figures, read back with prometheus_client's parser.

The collector runs over the executor every node runs (a ring of one, no sockets), so the
figures are the ones ``stats`` reports; the HTTP side is fed requests whole, byte by byte
and oversized over an in-memory stream pair.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kai.core.stats import LatencyHistogram
from kai.metrics import (
    COUNTERS,
    LATENCY_BUCKETS,
    MAX_REQUEST_HEAD,
    StatsCollector,
    _serve_one,
    answer,
    end_of_head,
    latency_buckets,
    latency_sum,
    metric_name,
    metrics_registry,
)
from tests.test_commands import Harness, make_harness


def _collector(h: Harness, peers: dict[str, bool] | None = None) -> StatsCollector:
    return StatsCollector(
        h.executor.report.general,
        latencies=lambda: {"get": h.stats.get_latency, "set": h.stats.set_latency},
        peers=lambda: dict(peers or {}),
    )


def _scrape(collector: StatsCollector) -> dict[str, list[Sample]]:
    """Every sample of a scrape, by sample name, as a Prometheus server would read them."""
    text = generate_latest(metrics_registry(collector)).decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples: dict[str, list[Sample]], name: str) -> float:
    [sample] = samples[name]
    return sample.value


@pytest.fixture
def h(nursery: trio.Nursery) -> Harness:
    return make_harness(nursery)


async def test_every_numeric_stats_field_is_exported_under_its_kai_name(h: Harness) -> None:
    samples = _scrape(_collector(h))
    for field, value in h.executor.report.general():
        if field.endswith("_ms") or field in ("kai_curr_nodes", "version"):
            continue
        if isinstance(value, int):
            name = metric_name(field) + ("_total" if field in COUNTERS else "")
            assert name in samples, field
    assert _value(samples, "kai_curr_connections") == 0
    assert _value(samples, "kai_curr_nodes_count") == 1
    assert _value(samples, "kai_buckets") == 1024
    assert "process_cpu_seconds_total" in samples


async def test_the_figures_follow_the_commands(h: Harness) -> None:
    collector = _collector(h)
    before = _scrape(collector)
    assert _value(before, "kai_cmd_get_total") == 0
    await h.send(b"set k 0 0 1\r\nv\r\nget k\r\nget nope\r\n")
    after = _scrape(collector)
    assert _value(after, "kai_cmd_get_total") == 2
    assert _value(after, "kai_get_hits_total") == 1
    assert _value(after, "kai_get_misses_total") == 1
    assert _value(after, "kai_cmd_set_total") == 1
    assert _value(after, "kai_curr_items") == 1
    assert _value(after, "kai_get_latency_seconds_count") == 2
    assert _value(after, "kai_set_latency_seconds_count") == 1
    # `stats reset` clears the counters; Prometheus reads the drop as a counter reset.
    await h.send(b"stats reset\r\n")
    assert _value(_scrape(collector), "kai_cmd_get_total") == 0


async def test_text_fields_are_labels_of_kai_info(h: Harness) -> None:
    [info] = _scrape(_collector(h))["kai_info"]
    assert info.value == 1
    assert info.labels["node"] == "127.0.0.1:11011"
    assert info.labels["quorum"] == "1,1,1"
    assert info.labels["store"] == "memory"
    assert info.labels["version"].startswith("1.6.21-kai-")


async def test_peer_up_is_one_per_peer(h: Harness) -> None:
    samples = _scrape(_collector(h, {"10.0.0.2:11011": True, "10.0.0.3:11011": False}))
    states = {sample.labels["peer"]: sample.value for sample in samples["kai_peer_up"]}
    assert states == {"10.0.0.2:11011": 1, "10.0.0.3:11011": 0}


def test_every_metric_name_is_unique_and_valid() -> None:
    # A field exported twice (a clash of memcached's and Kai's names) would be two families.
    stats_fields = [("cmd_get", 1), ("curr_items", 2), ("kai_read_repairs", 3), ("bytes", 4)]
    text = generate_latest(metrics_registry(StatsCollector(lambda: stats_fields))).decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert {"kai_cmd_get", "kai_curr_items", "kai_read_repairs", "kai_bytes"} <= set(names)


def test_latency_buckets_never_overstate() -> None:
    histogram = LatencyHistogram()
    samples = [0.00001, 0.0000999, 0.0001, 0.0009, 0.001, 0.0011, 0.3, 20.0]
    for seconds in samples:
        histogram.record(seconds)
    buckets = latency_buckets(histogram)
    assert [le for le, _count in buckets] == [*map(str, LATENCY_BUCKETS), "+Inf"]
    counts = [count for _le, count in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == len(samples)
    for bound, count in zip(LATENCY_BUCKETS, counts, strict=False):
        truly_below = sum(1 for seconds in samples if seconds < bound)
        # Within one of the histogram's own buckets (1/16 of a power of two) of the bound.
        nearly_below = sum(1 for seconds in samples if seconds < bound * 15 / 16)
        assert nearly_below <= count <= truly_below, bound


def test_a_histogram_is_exported_with_its_buckets() -> None:
    histogram = LatencyHistogram()
    histogram.record(0.0003)
    histogram.record(0.002)
    collector = StatsCollector(list, latencies=lambda: {"get": histogram})
    samples = _scrape(collector)
    by_bound = {
        sample.labels["le"]: sample.value for sample in samples["kai_get_latency_seconds_bucket"]
    }
    assert by_bound["0.00025"] == 0
    assert by_bound["0.0005"] == 1
    assert by_bound["0.0025"] == 2
    assert by_bound["+Inf"] == 2
    assert _value(samples, "kai_get_latency_seconds_count") == 2
    assert _value(samples, "kai_get_latency_seconds_sum") == pytest.approx(0.0023, rel=1 / 32)


@pytest.mark.parametrize("seconds", [0.0, 0.000001, 0.000017, 0.0003, 0.0123, 1.5, 100.0, 5000.0])
def test_the_latency_sum_is_within_its_bucket(seconds: float) -> None:
    histogram = LatencyHistogram()
    for _ in range(3):
        histogram.record(seconds)
    # Whole microseconds are kept, so below 32 us the error is up to half a microsecond.
    assert latency_sum(histogram) == pytest.approx(3 * seconds, rel=1 / 32, abs=3 * 0.5e-6)


# --- HTTP ------------------------------------------------------------------------------------


def _render() -> bytes:
    return b"kai_up 1\n"


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /metrics?name=x HTTP/1.0\n\n", b"200"),
        (b"GET / HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /metrics\r\n\r\n", b"400"),
        (b"\r\n\r\n", b"400"),
    ],
)
def test_answers(request_head: bytes, status: bytes) -> None:
    end = end_of_head(request_head, 0)
    assert end == len(request_head)
    reply = answer(request_head[:end], _render)
    assert reply.split(b" ", 2)[1] == status
    assert b"\r\nConnection: close\r\n" in reply
    if status == b"200":
        assert f"Content-Type: {CONTENT_TYPE_LATEST}\r\n".encode() in reply
        assert reply.endswith(b"\r\n\r\nkai_up 1\n")


def test_head_gets_no_body() -> None:
    reply = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n", _render)
    assert reply.endswith(b"Content-Length: 9\r\nConnection: close\r\n\r\n")


def test_a_failing_figure_is_a_500_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bytes:
        raise ZeroDivisionError

    assert answer(b"GET /metrics HTTP/1.1\r\n\r\n", broken).startswith(b"HTTP/1.1 500 ")
    assert "cannot render the metrics" in caplog.text


def test_end_of_head_byte_by_byte() -> None:
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    buffer = b""
    searched = 0
    for index in range(len(head)):
        buffer += head[index : index + 1]
        found = end_of_head(buffer, searched)
        searched = len(buffer)
        assert found == (len(head) if index == len(head) - 1 else -1)
    # A pipelined second request is left alone: the head ends at its own blank line.
    assert end_of_head(head + b"GET / HTTP/1.1\r\n\r\n", 0) == len(head)


async def _exchange(chunks: list[bytes]) -> bytes:
    """What the server sends back to a client that sends ``chunks`` and then waits."""
    client, server = trio.testing.memory_stream_pair()

    async def serve() -> None:
        async with server:
            await _serve_one(server, _render)

    reply = b""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for chunk in chunks:
                await client.send_all(chunk)
            while data := await client.receive_some():
                reply += data
    return reply


async def test_a_request_arriving_byte_by_byte_is_answered() -> None:
    head = b"GET /metrics HTTP/1.1\r\n\r\n"
    reply = await _exchange([head[index : index + 1] for index in range(len(head))])
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"kai_up 1\n")


async def test_an_oversized_head_is_refused() -> None:
    reply = await _exchange([b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * MAX_REQUEST_HEAD])
    assert reply.startswith(b"HTTP/1.1 431 ")
