"""The failure detector: one failure marks down, one success marks up, probes find returns."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from kai.core.errors import RpcConnectionError
from kai.core.ring import NodeId
from kai.membership.detector import FailureDetector

A = NodeId("127.0.0.1", 11011)
B = NodeId("127.0.0.1", 11012)
C = NodeId("127.0.0.1", 11013)


class PingTransport:
    """Answers ``ping`` after ``latency`` seconds, except from unreachable or hung nodes."""

    def __init__(self, latency: float = 0.25) -> None:
        self.latency = latency
        self.unreachable: set[NodeId] = set()
        self.hung: set[NodeId] = set()
        self.pings: list[tuple[float, NodeId]] = []

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        assert (method, params) == ("ping", ())
        self.pings.append((trio.current_time(), peer))
        if peer in self.hung:
            await trio.sleep_forever()
        await trio.sleep(self.latency)
        if peer in self.unreachable:
            raise RpcConnectionError(f"{peer} is unreachable")
        return "pong"


def fixed_clock() -> float:
    return 0.0


def test_unknown_nodes_are_up() -> None:
    detector = FailureDetector(clock=fixed_clock)
    assert detector.is_up(A)
    assert detector.down_nodes() == []
    assert detector.statuses() == {}
    assert detector.transitions() == 0


def test_one_failure_marks_down_and_one_success_marks_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    detector = FailureDetector(clock=fixed_clock)
    with caplog.at_level(logging.INFO, logger="kai.membership.detector"):
        detector.record_failure(A)
    assert not detector.is_up(A)
    assert detector.down_nodes() == [A]
    assert [record.getMessage() for record in caplog.records] == [f"{A} is down"]
    detector.record_success(A)
    assert detector.is_up(A)
    assert detector.down_nodes() == []
    assert detector.statuses() == {A: True}


def test_transitions_count_only_changes() -> None:
    detector = FailureDetector(clock=fixed_clock)
    detector.record_success(A)  # first sight, up: no change
    detector.record_success(A)
    assert detector.transitions() == 0
    detector.record_failure(A)
    detector.record_failure(A)
    assert detector.transitions() == 1
    detector.record_success(A)
    detector.record_failure(B)  # first sight, down: a change from the assumed "up"
    assert detector.transitions() == 3
    assert detector.statuses() == {A: True, B: False}
    assert detector.down_nodes() == [B]


async def test_probe_marks_answering_nodes_up(autojump_clock: trio.testing.MockClock) -> None:
    detector = FailureDetector()
    transport = PingTransport(latency=0.25)
    for node in (A, B, C):
        detector.record_failure(node)
    transport.unreachable.add(B)
    start = trio.current_time()
    await detector.probe_down_nodes(transport, timeout=1.0)
    # The pings run concurrently: the whole probe takes one latency, not three.
    assert trio.current_time() - start == 0.25
    assert sorted(node for _, node in transport.pings) == [A, B, C]
    assert detector.down_nodes() == [B]
    assert detector.transitions() == 5


async def test_probe_gives_up_on_hung_nodes_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detector = FailureDetector()
    transport = PingTransport(latency=0.25)
    detector.record_failure(A)
    detector.record_failure(B)
    transport.hung.add(B)
    start = trio.current_time()
    await detector.probe_down_nodes(transport, timeout=1.5)
    assert trio.current_time() - start == 1.5
    assert detector.statuses() == {A: True, B: False}


async def test_probe_without_down_nodes_calls_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detector = FailureDetector()
    detector.record_success(A)
    transport = PingTransport()
    await detector.probe_down_nodes(transport, timeout=1.0)
    assert transport.pings == []
    assert trio.current_time() == 0


async def test_up_again_is_logged_with_the_time_down(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    detector = FailureDetector()
    with caplog.at_level(logging.INFO, logger="kai.membership.detector"):
        detector.record_failure(A)
        await trio.sleep(2.5)
        detector.record_success(A)
    assert [record.getMessage() for record in caplog.records] == [
        f"{A} is down",
        f"{A} is up again after 2.5 s down",
    ]
