"""Log formatting and rate limiting: JSON lines, readable times, counted repeats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from kai.core.errors import QuorumTimeout, QuorumUnavailable
from kai.logs import (
    QUORUM_LOG_INTERVAL,
    JsonFormatter,
    RateLimitedLog,
    iso_time,
    iso_time_us,
    log_handler,
    log_quorum_failure,
    quorum_failures,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, list[logging.LogRecord]]]:
    """A logger of its own whose records are collected (no propagation to pytest's)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("kai.test_logs")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, records
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_iso_times_are_utc() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1_796_325_215.1239) == "2026-12-03T19:13:35.123Z"
    assert iso_time_us(1_796_325_215_123_456) == "2026-12-03T19:13:35.123456Z"


def test_json_lines_carry_time_level_logger_and_message() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("kai.test_logs.json")
    handler = log_handler("json", stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("peer %s is down\nsecond line", "127.0.0.1:11011")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("handler failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # newlines in messages and tracebacks stay inside the JSON strings
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "WARNING"
    assert first["logger"] == "kai.test_logs.json"
    assert first["message"] == "peer 127.0.0.1:11011 is down\nsecond line"
    assert first["time"].endswith("Z")
    assert first["time"][10] == "T"
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exception"]


def test_text_lines_are_the_classic_format() -> None:
    handler = log_handler("text", io.StringIO())
    assert not isinstance(handler.formatter, JsonFormatter)
    record = logging.LogRecord("kai.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    assert handler.format(record).endswith(" INFO kai.x: hello you")


def test_rate_limited_log_logs_once_per_interval_and_counts_the_rest(
    captured: tuple[logging.Logger, list[logging.LogRecord]],
) -> None:
    logger, records = captured
    clock = FakeClock()
    limited: RateLimitedLog[str] = RateLimitedLog(logger, logging.ERROR, 60.0, clock=clock)
    assert limited.log("a", "peer %s refused", "a")
    for _ in range(5):
        clock.now += 1
        assert not limited.log("a", "peer %s refused", "a")
    assert limited.held_back("a") == 5
    assert limited.log("b", "peer %s refused", "b")  # another key is not held back
    assert limited.due() == []
    clock.now += 55  # 60 s after the first message of "a"
    assert limited.due() == ["a"]
    assert limited.log("a", "peer %s refused", "a")
    assert limited.held_back("a") == 0
    assert [record.getMessage() for record in records] == [
        "peer a refused",
        "peer b refused",
        "peer a refused (5 more like this in the last 60 s were not logged)",
    ]
    assert {record.levelno for record in records} == {logging.ERROR}


def test_rate_limited_log_remembers_a_bounded_number_of_keys(
    captured: tuple[logging.Logger, list[logging.LogRecord]],
) -> None:
    logger, records = captured
    clock = FakeClock()
    limited: RateLimitedLog[int] = RateLimitedLog(
        logger, logging.INFO, 60.0, clock=clock, max_keys=2
    )
    assert limited.log(1, "one")
    assert limited.log(2, "two")
    assert limited.log(3, "three")  # forgets key 1, the one logged longest ago
    assert limited.log(1, "one again")
    assert not limited.log(3, "three again")
    assert len(records) == 4


def test_disabled_level_is_neither_logged_nor_counted(
    captured: tuple[logging.Logger, list[logging.LogRecord]],
) -> None:
    logger, records = captured
    logger.setLevel(logging.ERROR)
    limited: RateLimitedLog[str] = RateLimitedLog(logger, logging.WARNING, 1.0)
    assert not limited.log("a", "quiet")
    assert limited.held_back("a") == 0
    assert records == []


def test_rate_limited_log_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="interval"):
        RateLimitedLog(logging.getLogger("kai.x"), logging.INFO, 0)


def test_quorum_failures_warn_once_per_interval_per_kind(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(quorum_failures, "_clock", clock)
    monkeypatch.setattr(quorum_failures, "_keys", {})
    with caplog.at_level(logging.WARNING, logger="kai.quorum"):
        for _ in range(3):
            log_quorum_failure(QuorumTimeout("write of b'k': 1 of 2 acks"), "timeout")
        log_quorum_failure(QuorumUnavailable(), "not enough replicas")
        clock.now += QUORUM_LOG_INTERVAL
        log_quorum_failure(QuorumTimeout("read of b'k': 0 of 2 replies"), "timeout")
    assert [record.getMessage() for record in caplog.records] == [
        "quorum failure, client answered SERVER_ERROR timeout: write of b'k': 1 of 2 acks",
        "quorum failure, client answered SERVER_ERROR not enough replicas: QuorumUnavailable",
        "quorum failure, client answered SERVER_ERROR timeout: read of b'k': 0 of 2 replies"
        " (2 more like this in the last 10 s were not logged)",
    ]
    assert {record.levelname for record in caplog.records} == {"WARNING"}
