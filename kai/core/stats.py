"""Counters and latency histograms for memcached ``stats`` and ``kai-admin stats``.

Pure bookkeeping: no I/O. Recording must stay cheap because it happens on every request: a
counter is a plain attribute increment and a latency sample is one list-index increment.
"""

from __future__ import annotations

import math

import attrs

# Latency buckets: 16 per power of two from 1 microsecond to ~70 s, so a percentile is
# reported within about 4.5% of the true value.
_SUB_BUCKETS = 16
_MAX_EXPONENT = 26


def _bucket_of(microseconds: int) -> int:
    if microseconds < _SUB_BUCKETS:
        return max(microseconds, 0)
    exponent = microseconds.bit_length() - 5  # >= 0 once microseconds >= 16
    if exponent >= _MAX_EXPONENT:
        return (_MAX_EXPONENT + 1) * _SUB_BUCKETS - 1
    return (exponent + 1) * _SUB_BUCKETS + ((microseconds >> exponent) - _SUB_BUCKETS)


def _bucket_upper_bound(bucket: int) -> int:
    if bucket < _SUB_BUCKETS:
        return bucket
    exponent, offset = divmod(bucket, _SUB_BUCKETS)
    exponent -= 1
    return ((_SUB_BUCKETS + offset + 1) << exponent) - 1


@attrs.define(eq=False)
class LatencyHistogram:
    """A fixed-size log-linear histogram of latencies in microseconds."""

    counts: list[int] = attrs.field(factory=lambda: [0] * ((_MAX_EXPONENT + 1) * _SUB_BUCKETS))
    total: int = 0
    maximum: int = 0

    def record(self, seconds: float) -> None:
        """Add one sample, given in seconds."""
        microseconds = int(seconds * 1_000_000)
        self.counts[_bucket_of(microseconds)] += 1
        self.total += 1
        if microseconds > self.maximum:
            self.maximum = microseconds

    def percentile(self, fraction: float) -> float:
        """The latency (in milliseconds) below which ``fraction`` of the samples fall."""
        if self.total == 0:
            return 0.0
        rank = max(1, math.ceil(fraction * self.total))
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(_bucket_upper_bound(bucket), self.maximum) / 1000
        return self.maximum / 1000

    def reset(self) -> None:
        """Forget every sample."""
        self.counts = [0] * len(self.counts)
        self.total = 0
        self.maximum = 0


@attrs.define(eq=False)
class NodeStats:
    """Everything a node counts. Attribute names follow memcached's ``stats`` fields."""

    curr_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0
    cmd_get: int = 0
    cmd_set: int = 0
    cmd_flush: int = 0
    cmd_touch: int = 0
    get_hits: int = 0
    get_misses: int = 0
    get_expired: int = 0
    get_flushed: int = 0
    delete_hits: int = 0
    delete_misses: int = 0
    incr_hits: int = 0
    incr_misses: int = 0
    decr_hits: int = 0
    decr_misses: int = 0
    cas_hits: int = 0
    cas_misses: int = 0
    cas_badval: int = 0
    touch_hits: int = 0
    touch_misses: int = 0
    store_too_large: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    total_items: int = 0
    kai_unreconciled_get: int = 0
    kai_clock_prunes: int = 0
    kai_actor_epochs: int = 0
    kai_sibling_warnings: int = 0
    kai_sibling_rejections: int = 0
    kai_quorum_failures: int = 0
    #: Keys deleted for good after every version had been dead for ``tombstone_grace``.
    kai_tombstones_reaped: int = 0
    #: Incoming versions older than ``tombstone_grace`` that a merge refused (never seen here).
    kai_stale_refused: int = 0
    get_latency: LatencyHistogram = attrs.field(factory=LatencyHistogram)
    set_latency: LatencyHistogram = attrs.field(factory=LatencyHistogram)

    #: Counters that ``stats reset`` clears (connection gauges and items are not cleared).
    RESETTABLE = (
        "total_connections",
        "rejected_connections",
        "cmd_get",
        "cmd_set",
        "cmd_flush",
        "cmd_touch",
        "get_hits",
        "get_misses",
        "get_expired",
        "get_flushed",
        "delete_hits",
        "delete_misses",
        "incr_hits",
        "incr_misses",
        "decr_hits",
        "decr_misses",
        "cas_hits",
        "cas_misses",
        "cas_badval",
        "touch_hits",
        "touch_misses",
        "store_too_large",
        "bytes_read",
        "bytes_written",
        "total_items",
        "kai_unreconciled_get",
        "kai_clock_prunes",
        "kai_actor_epochs",
        "kai_sibling_warnings",
        "kai_sibling_rejections",
        "kai_quorum_failures",
        "kai_tombstones_reaped",
        "kai_stale_refused",
    )

    def reset(self) -> None:
        """memcached's ``stats reset``: clear counters and latency samples."""
        for name in self.RESETTABLE:
            setattr(self, name, 0)
        self.get_latency.reset()
        self.set_latency.reset()

    def counters(self) -> list[tuple[str, int]]:
        """The request counters in memcached's order."""
        return [(name, getattr(self, name)) for name in self.RESETTABLE]

    def latency_fields(self) -> list[tuple[str, str]]:
        """Get and set latency percentiles in milliseconds, as ``stats`` fields."""
        fields = []
        for label, histogram in (("get", self.get_latency), ("set", self.set_latency)):
            for name, fraction in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
                fields.append(
                    (f"kai_{label}_latency_{name}_ms", f"{histogram.percentile(fraction):.3f}")
                )
            fields.append((f"kai_{label}_latency_max_ms", f"{histogram.maximum / 1000:.3f}"))
        return fields
