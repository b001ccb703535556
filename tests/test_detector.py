"""The failure detector: one failure marks down, one answer marks up, probes find returns.

Probes run over the in-process :class:`~kai.testing.network.FakeNetwork`, from node SELF.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from kai.core.errors import (
    RpcAuthenticationError,
    RpcBadRequest,
    RpcConnectionError,
    RpcProtocolError,
)
from kai.core.ring import NodeId
from kai.membership.detector import FailureDetector
from kai.testing.network import FakeNetwork, Faults

SELF = NodeId("127.0.0.1", 11010)
A = NodeId("127.0.0.1", 11011)
B = NodeId("127.0.0.1", 11012)
C = NodeId("127.0.0.1", 11013)


#: Each way; a ping's round trip takes twice this.
ONE_WAY = 0.125
ROUND_TRIP = 2 * ONE_WAY


def pong() -> str:
    return "pong"


@asynccontextmanager
async def pinged(*nodes: NodeId) -> AsyncIterator[FakeNetwork]:
    """A network on which ``nodes`` answer ``ping`` (the detector's own node is SELF)."""
    async with FakeNetwork.running(random.Random(0), Faults(delay=(ONE_WAY, ONE_WAY))) as network:
        for node in nodes:
            network.register(node, {"ping": pong})
        yield network


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


def test_an_error_the_peer_answered_with_means_it_is_up() -> None:
    detector = FailureDetector(clock=fixed_clock)
    detector.record_error(A, RpcConnectionError("refused"))
    detector.record_error(B, RpcProtocolError("not Kai RPC"))
    detector.record_error(C, RpcBadRequest("no"))
    assert detector.statuses() == {A: False, B: False, C: True}


async def test_probe_marks_answering_nodes_up(autojump_clock: trio.testing.MockClock) -> None:
    detector = FailureDetector()
    async with pinged(A, B, C) as network:
        for node in (A, B, C):
            detector.record_failure(node)
        network.unregister(B)
        start = trio.current_time()
        await detector.probe_down_nodes(network.transport_for(SELF), timeout=1.0)
        # The pings run concurrently: the whole probe takes one round trip, not three.
        assert trio.current_time() - start == ROUND_TRIP
    assert (network.calls[(A, "ping")], network.calls[(C, "ping")]) == (1, 1)
    assert network.statistics()["refused"] == 1
    assert detector.down_nodes() == [B]
    assert detector.transitions() == 5


async def test_a_node_that_answers_with_an_error_is_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detector = FailureDetector()
    async with pinged(C) as network:
        network.register(B, {})  # answers every call, with "no such method"
        detector.record_failure(B)
        detector.record_failure(C)
        await detector.probe_down_nodes(network.transport_for(SELF), timeout=1.0)
    assert detector.statuses() == {B: True, C: True}


async def test_probe_gives_up_on_hung_nodes_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detector = FailureDetector()
    async with pinged(A, B) as network:
        detector.record_failure(A)
        detector.record_failure(B)
        network.hang(B)
        start = trio.current_time()
        await detector.probe_down_nodes(network.transport_for(SELF), timeout=1.5)
        assert trio.current_time() - start == 1.5
    assert detector.statuses() == {A: True, B: False}


async def test_probe_without_down_nodes_calls_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detector = FailureDetector()
    detector.record_success(A)
    async with pinged(A, B) as network:
        await detector.probe_down_nodes(network.transport_for(SELF), timeout=1.0)
    assert network.statistics()["delivered"] == 0
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


class SteppedClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_with_another_secret_is_an_error_naming_it_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SteppedClock()
    detector = FailureDetector(clock=clock)
    refused = RpcAuthenticationError(
        "server rejected this node: authentication failed: the cluster secrets differ"
    )
    with caplog.at_level(logging.INFO, logger="kai.membership.detector"):
        for _ in range(120):  # gossip and probes, twice a second for a minute
            detector.record_error(A, refused)
            clock.now += 0.5
        detector.record_error(A, refused)
    assert not detector.is_up(A)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.getMessage() for record in errors] == [
        f"cannot authenticate to {A}: {refused}; this node does not hold that cluster's"
        " secret: copy the cluster's secret file to this node and restart it",
        f"cannot authenticate to {A}: {refused}; this node does not hold that cluster's"
        " secret: copy the cluster's secret file to this node and restart it"
        " (119 more like this in the last 60 s were not logged)",
    ]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [record.getMessage() for record in warnings] == [f"{A} is down: {refused}"]


def test_a_flapping_peer_is_rate_limited_and_its_last_state_logged_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SteppedClock()
    detector = FailureDetector(clock=clock)
    with caplog.at_level(logging.WARNING, logger="kai.membership.detector"):
        for _ in range(5):  # down and up every half second
            detector.record_failure(A)
            clock.now += 0.5
            detector.record_success(A)
            clock.now += 0.5
        detector.record_failure(A)
        detector.log_held_back_changes()  # too early: nothing new
        assert [record.getMessage() for record in caplog.records] == [
            f"{A} is down",
            f"{A} is up again after 0.5 s down",
        ]
        clock.now = 10.0
        detector.log_held_back_changes()
        detector.log_held_back_changes()  # once only
    assert [record.getMessage() for record in caplog.records][2:] == [
        f"{A} is down (5 more like this in the last 10 s were not logged)"
    ]
    assert {record.levelname for record in caplog.records} == {"WARNING"}
