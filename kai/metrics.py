"""Prometheus metrics: the node's ``stats`` figures in the text exposition, over HTTP.

:class:`StatsCollector` builds the metric families afresh from the node's live figures on
every scrape (the ``stats`` fields, the latency histograms, the peers' states), so there is
no second set of counters to keep in step with ``stats``. :func:`serve_metrics` answers
``GET /metrics`` with :func:`prometheus_client.generate_latest` on a small trio listener in
the node's own event loop: no thread reads the counters while requests change them.

Names: every ``stats`` field ``F`` is exported as ``kai_F`` (Kai's own ``kai_*`` fields keep
their name), so memcached's ``bytes``, ``time`` or ``threads`` cannot be confused with
another job's metrics; counters get prometheus_client's ``_total`` suffix. Fields that are
not numbers are labels of the one ``kai_info`` metric. The latency percentile fields are
replaced by the histograms they are computed from (``histogram_quantile`` gives them over
any window). Never changes a figure: a scrape only reads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

import trio
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from kai.core.memcache.report import COUNTED_NODE_LISTS
from kai.core.stats import LatencyHistogram, NodeStats, _bucket_upper_bound

logger = logging.getLogger(__name__)

#: ``stats`` fields that only ever grow (until ``stats reset``, which Prometheus sees as a
#: counter reset). Every other numeric field is a gauge; a new counter belongs here.
COUNTERS: Final = frozenset(NodeStats.RESETTABLE) | {
    "evictions",
    "rusage_user",
    "rusage_system",
    "kai_cache_hits",
    "kai_cache_misses",
    "kai_read_repairs",
    "kai_forwarded_writes",
    "kai_stand_in_writes",
    "kai_replica_timeouts",
    "kai_replica_errors",
    "kai_peer_transitions",
    "kai_hints_stored",
    "kai_hints_delivered",
    "kai_transfers_completed",
    "kai_transfer_batches_sent",
    "kai_transfer_batches_acked",
    "kai_transfer_keys_sent",
    "kai_transfer_bytes_sent",
    "kai_transfer_batches_received",
    "kai_transfer_keys_received",
    "kai_aae_exchanges",
    "kai_aae_exchanges_failed",
    "kai_aae_keys_repaired",
    "kai_aae_bytes",
    "kai_reap_rounds",
    "kai_reap_deferred",
}

#: Fields not exported as they are: the latency percentiles (the histograms replace them)
#: and the node lists (``kai_peer_up`` and the ``*_count`` fields carry them).
NOT_EXPORTED: Final = frozenset(
    {name for name, _value in NodeStats().latency_fields()}
    | {"kai_curr_nodes"}
    | COUNTED_NODE_LISTS
)

#: Upper bounds, in seconds, of the exported latency buckets.
LATENCY_BUCKETS: Final = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Fields that are labels of ``kai_info`` even when they look like numbers (a version
#: "1.6" is not a measurement).
INFO_FIELDS: Final = frozenset({"version", "kai_node", "kai_quorum", "kai_store"})

_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _fine_buckets_below(bound: float) -> int:
    """How many of LatencyHistogram's buckets hold only samples below ``bound`` seconds.

    A sample is kept in whole microseconds, rounded down, so a bucket whose largest value is
    ``u`` microseconds holds samples below ``(u + 1) / 1e6`` seconds. A bucket that straddles
    ``bound`` counts in the next exported bucket: a bucket's figure never overstates.
    """
    microseconds = round(bound * 1_000_000)
    buckets = len(LatencyHistogram().counts)
    return sum(1 for bucket in range(buckets) if _bucket_upper_bound(bucket) < microseconds)


_CUTS: Final = tuple(_fine_buckets_below(bound) for bound in LATENCY_BUCKETS)


def _midpoints() -> tuple[float, ...]:
    """Per LatencyHistogram bucket, the middle of the latencies it holds, in seconds."""
    middles = []
    lowest = 0
    for bucket in range(len(LatencyHistogram().counts)):
        highest = _bucket_upper_bound(bucket)
        middles.append((lowest + highest + 1) / 2 / 1_000_000)
        lowest = highest + 1
    return tuple(middles)


_MIDPOINTS: Final = _midpoints()


def latency_sum(histogram: LatencyHistogram) -> float:
    """The sum of the samples in seconds, estimated from their buckets.

    LatencyHistogram keeps counts, not a sum; each sample is taken as the middle of its
    bucket, within 1/32 of its value (those in the last bucket, which holds everything from
    about 17 minutes on, as the maximum).
    Prometheus needs the sum for the ``_count`` and ``_sum`` series (averages, rates).
    """
    *counts, beyond = histogram.counts
    estimate = sum(count * middle for count, middle in zip(counts, _MIDPOINTS, strict=False))
    return estimate + beyond * histogram.maximum / 1_000_000


def latency_buckets(histogram: LatencyHistogram) -> list[tuple[str, float]]:
    """The cumulative ``(le, count)`` pairs of ``histogram``, ``+Inf`` last."""
    pairs: list[tuple[str, float]] = []
    seen = 0
    start = 0
    for bound, cut in zip(LATENCY_BUCKETS, _CUTS, strict=True):
        seen += sum(histogram.counts[start:cut])
        start = cut
        pairs.append((str(bound), float(seen)))
    pairs.append(("+Inf", float(histogram.total)))
    return pairs


def metric_name(field: str) -> str:
    """The Prometheus name of the ``stats`` field ``field`` (without a counter's ``_total``)."""
    return field if field.startswith("kai_") else f"kai_{field}"


def _number(value: object) -> float | None:
    """``value`` as a number if it is one (``stats`` writes some as decimal strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    return None


class StatsCollector:
    """A :class:`prometheus_client.registry.Collector` over a node's live figures.

    Args:
        fields: the general ``stats`` fields, read on each scrape.
        latencies: histograms by operation (``get``, ``set``): ``kai_<op>_latency_seconds``.
        peers: every other node this one knows, ``host:port`` mapped to whether it is up.
    """

    def __init__(
        self,
        fields: Callable[[], Iterable[tuple[str, object]]],
        *,
        latencies: Callable[[], Mapping[str, LatencyHistogram]] = dict,
        peers: Callable[[], Mapping[str, bool]] = dict,
    ) -> None:
        self.fields = fields
        self.latencies = latencies
        self.peers = peers

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the figures as they are now."""
        info: dict[str, str] = {}
        for field, value in self.fields():
            if field in NOT_EXPORTED:
                continue
            number = None if field in INFO_FIELDS else _number(value)
            if number is None:
                info[field.removeprefix("kai_")] = str(value)
                continue
            help_text = f"stats field {field}"
            if field in COUNTERS:
                yield CounterMetricFamily(metric_name(field), help_text, value=number)
            else:
                yield GaugeMetricFamily(metric_name(field), help_text, value=number)
        yield InfoMetricFamily("kai", "the node's stats fields that are not numbers", value=info)
        for operation, histogram in self.latencies().items():
            yield HistogramMetricFamily(
                f"kai_{operation}_latency_seconds",
                f"{operation} latency as the client sees it, in seconds (sum estimated)",
                buckets=latency_buckets(histogram),
                sum_value=latency_sum(histogram),
            )
        peer_up = GaugeMetricFamily(
            "kai_peer_up",
            "1 if this node's last call to the peer reached it, else 0",
            labels=["peer"],
        )
        for peer, up in sorted(self.peers().items()):
            peer_up.add_metric([peer], 1.0 if up else 0.0)
        yield peer_up


def metrics_registry(collector: StatsCollector) -> CollectorRegistry:
    """A registry of ``collector`` and the process's own figures (CPU, memory, files)."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


# --- the HTTP listener ----------------------------------------------------------------------

#: Largest request head read; a longer one is answered 431 and the connection closed.
MAX_REQUEST_HEAD: Final = 8192
#: Seconds a client has to send its request and read the answer.
REQUEST_TIMEOUT: Final = 10.0
#: Connections served at once; more are closed at once (a scraper needs one).
MAX_CONNECTIONS: Final = 32

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def response(
    status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8", head: bool
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (no body for ``HEAD``)."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return "\r\n".join(lines).encode("ascii") + b"\r\n\r\n" + (b"" if head else body)


def end_of_head(buffer: bytes | bytearray, searched: int) -> int:
    """Where the request head in ``buffer`` ends (after its blank line), or -1.

    ``searched`` is how much of the buffer an earlier call already looked at, so a head
    arriving byte by byte is scanned once. A bare LF ends lines too, as HTTP allows.
    """
    start = max(searched - 3, 0)
    ends = [
        found + len(blank)
        for blank in (b"\r\n\r\n", b"\n\n")
        if (found := buffer.find(blank, start)) >= 0
    ]
    return min(ends, default=-1)


def answer(head: bytes, render: Callable[[], bytes]) -> bytes:
    """The response to the request whose head is ``head``; ``render`` makes the metrics."""
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return response(400, b"bad request line\n", head=False)
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return response(405, b"only GET and HEAD\n", head=False)
    is_head = method == b"HEAD"
    if target.split(b"?", 1)[0] != b"/metrics":
        return response(404, b"metrics are at /metrics\n", head=is_head)
    try:
        body = render()
    # A fault in a figure must not take the memcached node down with the scrape.
    except Exception:
        logger.exception("cannot render the metrics")
        return response(500, b"cannot render the metrics; see the node's log\n", head=is_head)
    return response(200, body, content_type=CONTENT_TYPE_LATEST, head=is_head)


async def serve_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``http://host:port/metrics`` until cancelled.

    Reports its listeners once bound (port 0 picks one). One request per connection.

    Raises:
        OSError: the address cannot be bound (before ``task_status.started``).
    """
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= MAX_CONNECTIONS:
            await stream.aclose()
            return
        active += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _serve_one(stream, lambda: generate_latest(registry))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("metrics client went away: %s", exc)
        finally:
            active -= 1
            await trio.aclose_forcefully(stream)

    await trio.serve_tcp(handle, port, host=host, task_status=task_status)


async def _serve_one(stream: trio.abc.Stream, render: Callable[[], bytes]) -> None:
    buffer = bytearray()
    searched = 0
    while (end := end_of_head(buffer, searched)) < 0:
        if len(buffer) >= MAX_REQUEST_HEAD:
            await stream.send_all(response(431, b"request head too large\n", head=False))
            return
        searched = len(buffer)
        chunk = await stream.receive_some(MAX_REQUEST_HEAD - len(buffer))
        if not chunk:
            return
        buffer += chunk
    await stream.send_all(answer(bytes(buffer[:end]), render))
