"""Tests of the fault-injecting in-process network, and its equivalence to the real RPC."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from kai.core.errors import (
    RpcBadRequest,
    RpcConnectionError,
    RpcError,
    RpcMethodNotFound,
    RpcRemoteError,
)
from kai.core.pending import waits
from kai.core.ring import NodeId
from kai.rpc.client import RpcClient
from kai.rpc.server import Handler, serve_rpc
from kai.testing.network import Attempt, FakeNetwork, Faults

A = NodeId("10.0.0.1", 11011)
B = NodeId("10.0.0.2", 11011)
C = NodeId("10.0.0.3", 11011)
D = NodeId("10.0.0.4", 11011)
SECRET = b"x" * 32
#: Real-time guard for the TCP equivalence test only.
TCP_GUARD = 10


class Service:
    """Handlers that record what they were called with."""

    def __init__(self) -> None:
        self.received: list[tuple[object, ...]] = []
        self.finished = 0
        self.finish_times: list[float] = []
        self.release = trio.Event()

    def handlers(self) -> dict[str, Handler]:
        return {"echo": self.echo, "slow": self.slow, "wait": self.wait}

    @waits
    async def echo(self, *params: object) -> object:
        self.received.append(params)
        return list(params)

    @waits
    async def slow(self, seconds: float) -> str:
        self.received.append((seconds,))
        await trio.sleep(seconds)
        self.finished += 1
        self.finish_times.append(trio.current_time())
        return "done"

    @waits
    async def wait(self) -> str:
        self.received.append(())
        await self.release.wait()
        self.finished += 1
        return "released"


@asynccontextmanager
async def cluster(
    seed: int = 0, faults: Faults | None = None, nodes: tuple[NodeId, ...] = (A, B, C)
) -> AsyncIterator[tuple[FakeNetwork, dict[NodeId, Service]]]:
    async with FakeNetwork.running(random.Random(seed), faults) as network:
        services = {node: Service() for node in nodes}
        for node, service in services.items():
            network.register(node, service.handlers())
        yield network, services


async def outcome(network: FakeNetwork, caller: NodeId, target: NodeId, *call: Any) -> object:
    """The result, the error type, or "timeout" after 1 s."""
    with trio.move_on_after(1):
        try:
            return await network.transport_for(caller).call(target, *call)
        except RpcError as exc:
            return type(exc)
    return "timeout"


async def started_outcome(
    network: FakeNetwork, caller: NodeId, target: NodeId, method: str, *params: object
) -> object:
    """As :func:`outcome`, through ``start_call``: its callback, cancelled after 1 s."""
    outcomes: list[object] = []
    arrived = trio.Event()

    def on_done(result: object, error: RpcError | None) -> None:
        outcomes.append(result if error is None else type(error))
        arrived.set()

    try:
        cancel = network.transport_for(caller).start_call(target, method, params, on_done)
    except RpcError as exc:
        return type(exc)
    assert outcomes == [], "never called before start_call returns"
    with trio.move_on_after(1):
        await arrived.wait()
    cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert len(outcomes) <= 1, "called at most once"
    return outcomes[0] if outcomes else "timeout"


# Wire types and errors.


async def test_round_trip_types_match_msgpack() -> None:
    async with cluster() as (network, services):
        value = {"t": (1, (2, b"\x00")), "b": b"raw", "s": "text", 7: [None, True, 1.5]}
        result = await network.transport_for(A).call(B, "echo", value, (3, 4), bytearray(b"z"))
    expected_param = {"t": [1, [2, b"\x00"]], "b": b"raw", "s": "text", 7: [None, True, 1.5]}
    assert services[B].received == [(expected_param, [3, 4], b"z")]
    assert result == [expected_param, [3, 4], b"z"]
    assert repr(result) == repr([expected_param, [3, 4], b"z"])  # Exact types, not just ==.


async def test_unknown_method_raises_method_not_found() -> None:
    async with cluster() as (network, _):
        with pytest.raises(RpcMethodNotFound, match="no RPC method named 'nope'"):
            await network.transport_for(A).call(B, "nope")
        assert network.calls[(B, "nope")] == 1


async def test_handler_errors_are_mapped_like_the_server(caplog: pytest.LogCaptureFixture) -> None:
    @waits
    async def refuse() -> None:
        raise RpcBadRequest("bad key")

    @waits
    async def disconnect() -> None:
        raise RpcConnectionError("peer gone")

    @waits
    async def explode() -> None:
        raise KeyError("k")

    async with FakeNetwork.running(random.Random(0)) as network:
        network.register(B, {"refuse": refuse, "disconnect": disconnect, "explode": explode})
        transport = network.transport_for(A)
        with pytest.raises(RpcBadRequest, match=r"^bad key$"):
            await transport.call(B, "refuse")
        with pytest.raises(RpcConnectionError, match=r"^peer gone$"):
            await transport.call(B, "disconnect")
        with (
            caplog.at_level(logging.ERROR, logger="kai.testing.network"),
            pytest.raises(RpcRemoteError, match=r"^KeyError: 'k'$"),
        ):
            await transport.call(B, "explode")
    assert "RPC handler explode" in caplog.text


async def test_unencodable_params_fail_on_the_caller_and_send_nothing() -> None:
    async with cluster() as (network, services):
        with pytest.raises(RpcBadRequest, match="cannot encode"):
            await network.transport_for(A).call(B, "echo", object())
        with pytest.raises(RpcBadRequest, match="cannot encode"):
            await network.transport_for(A).call(B, "echo", 2**64)
        assert services[B].received == []
        assert network.statistics()["delivered"] == 0


async def test_unsendable_result_becomes_remote_error() -> None:
    @waits
    async def unsendable() -> object:
        return {1, 2}

    async with FakeNetwork.running(random.Random(0)) as network:
        network.register(B, {"unsendable": unsendable})
        with pytest.raises(RpcRemoteError, match="the result of unsendable cannot be sent"):
            await network.transport_for(A).call(B, "unsendable")


# Topology: partitions, crashes, pauses.


async def test_partition_hangs_both_directions_until_healed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster(nodes=(A, B, C, D)) as (network, services):
        network.partition([A, B], [C])
        assert await outcome(network, A, C, "echo", 1) == "timeout"
        assert trio.current_time() == 1
        assert await outcome(network, C, B, "echo", 2) == "timeout"
        assert trio.current_time() == 2
        # Same side, and a node in no group, are reachable from everyone.
        assert await outcome(network, A, B, "echo", 3) == [3]
        assert await outcome(network, C, D, "echo", 4) == [4]
        assert await outcome(network, D, A, "echo", 5) == [5]
        assert services[C].received == []
        assert network.statistics()["hung"] == 2
        network.heal()
        assert await outcome(network, A, C, "echo", 6) == [6]
        assert await outcome(network, C, B, "echo", 7) == [7]
        assert trio.current_time() == 2


async def test_partition_during_a_call_loses_the_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, network, A, B, "slow", 0.5)
            await trio.sleep(0.25)
            network.partition([A], [B])
        assert services[B].finished == 1
        assert trio.current_time() == 1.0  # The caller's timeout, not the handler, ended it.


async def test_partition_rejects_a_node_in_two_groups() -> None:
    network = FakeNetwork(random.Random(0))
    with pytest.raises(ValueError, match="more than one"):
        network.partition([A, B], [B])


async def test_unregistered_node_refuses_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, _):
        network.unregister(B)
        with pytest.raises(RpcConnectionError, match="refused"):
            await network.transport_for(A).call(B, "echo")
        assert trio.current_time() == 0
        assert network.statistics()["refused"] == 1
        restarted = Service()
        network.register(B, restarted.handlers())
        assert await network.transport_for(A).call(B, "echo", 1) == [1]
        assert restarted.received == [(1,)]


async def test_crash_fails_calls_in_flight_and_cancels_handlers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):

        async def crash_later() -> None:
            await trio.sleep(3)
            network.unregister(B)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_later)
            with pytest.raises(RpcConnectionError, match="lost"):
                await network.transport_for(A).call(B, "slow", 10)
        assert trio.current_time() == 3
        await trio.sleep(20)
        assert services[B].finished == 0
        assert network.statistics()["lost"] == 1


async def test_reregistering_replaces_a_node_and_fails_old_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, network, A, B, "wait")
            await trio.sleep(0.5)
            restarted = Service()
            network.register(B, restarted.handlers())
            assert await network.transport_for(A).call(B, "echo", 1) == [1]
        assert services[B].finished == 0
        assert restarted.received == [(1,)]
        assert network.statistics()["lost"] == 1


async def test_hung_node_queues_requests_until_unhang(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        network.hang(B)
        assert await outcome(network, A, B, "echo", 1) == "timeout"
        assert trio.current_time() == 1
        assert services[B].received == []
        assert await outcome(network, A, C, "echo", 2) == [2]
        network.unhang(B)
        await trio.testing.wait_all_tasks_blocked()
        # The request sent while B was paused runs late, as after SIGCONT.
        assert services[B].received == [(1,)]
        assert await outcome(network, A, B, "echo", 3) == [3]
        assert network.statistics()["hung"] == 1


async def test_a_call_waiting_on_a_hung_node_completes_after_unhang(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, _):
        network.hang(B)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_unhang_later, network, B, 7)
            assert await network.transport_for(A).call(B, "echo", 1) == [1]
        assert trio.current_time() == 7


async def _unhang_later(network: FakeNetwork, node: NodeId, seconds: float) -> None:
    await trio.sleep(seconds)
    network.unhang(node)


async def test_a_slow_node_gets_every_message_late_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        network.slow(B, 2.0)
        assert await network.transport_for(A).call(B, "echo", 1) == [1]
        assert trio.current_time() == 2.0  # the request to B; the response to A is on time
        assert await network.transport_for(B).call(C, "echo", 2) == [2]
        assert trio.current_time() == 4.0  # the response to B
        assert await network.transport_for(A).call(C, "echo", 3) == [3]
        assert await network.transport_for(B).call(B, "echo", 4) == [4]  # never to itself
        assert trio.current_time() == 4.0
        assert network.statistics()["delayed"] == 2
        network.slow(B, 0.5)  # replaces the earlier delay
        assert await network.transport_for(A).call(B, "echo", 5) == [5]
        assert trio.current_time() == 4.5
        network.unslow(B)
        network.unslow(D)  # not slow: ignored
        assert await network.transport_for(A).call(B, "echo", 6) == [6]
        network.slow(B, 1.0)
        network.slow(B, 0)  # as unslow
        assert await network.transport_for(A).call(B, "echo", 7) == [7]
        assert trio.current_time() == 4.5
    assert services[B].received == [(1,), (4,), (5,), (6,), (7,)]


async def test_slow_applies_to_calls_started_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, network, A, B, "slow", 1.0)
            await trio.sleep(0.5)
            network.slow(A, 10.0)  # the response is not delayed: its call started before
        assert trio.current_time() == 1.0
        assert services[B].finish_times == [1.0]
        assert await outcome(network, C, A, "echo") == "timeout"  # started after: 10 s late
        network.unslow(A)
        answered = trio.Event()
        network.transport_for(C).start_call(A, "echo", (), lambda _result, _error: answered.set())
        network.slow(A, 10.0)  # after the call started: it is not delayed
        await answered.wait()
        assert trio.current_time() == 2.0
        assert services[A].received == [()]
        await trio.sleep(9.0)
        await trio.testing.wait_all_tasks_blocked()
        assert services[A].received == [(), ()]  # the first request, 10 s after it was sent


async def test_slow_adds_to_the_seeded_delays_and_draws_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(99)
    drawn = [(rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5)) for _ in range(4)]
    async with cluster(seed=99, faults=Faults(delay=(0.1, 0.5))) as (network, _):
        network.slow(B, 3.0)
        for (request, response), (caller, target) in zip(
            drawn, [(A, B), (B, A), (A, C), (A, B)], strict=True
        ):
            start = trio.current_time()
            await network.transport_for(caller).call(target, "echo")
            extra = 3.0 if B in (caller, target) else 0.0
            assert trio.current_time() - start == pytest.approx(request + response + extra)


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan, True, "1"])
def test_slow_validates(seconds: Any) -> None:
    network = FakeNetwork(random.Random(0))
    with pytest.raises(ValueError, match="finite seconds"):
        network.slow(B, seconds)


async def test_the_log_has_every_call_started_whatever_became_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster(nodes=(A, B, C, D)) as (network, _):
        assert await outcome(network, A, B, "echo") == []
        assert await outcome(network, A, B, "nope") is RpcMethodNotFound
        assert await outcome(network, A, A, "echo") == []
        assert await outcome(network, A, B, "echo", object()) is RpcBadRequest  # never sent
        network.unregister(C)
        assert await outcome(network, B, C, "echo") is RpcConnectionError
        network.partition([A], [D])
        assert await outcome(network, D, A, "echo") == "timeout"
        network.heal()
        network.hang(B)
        assert await started_outcome(network, C, B, "echo") == "timeout"
        network.unhang(B)
        network.set_faults(Faults(drop=1.0))
        assert await outcome(network, D, B, "echo") == "timeout"
    assert network.log == [
        Attempt(A, B, "echo"),
        Attempt(A, B, "nope"),
        Attempt(A, A, "echo"),
        Attempt(B, C, "echo"),
        Attempt(D, A, "echo"),
        Attempt(C, B, "echo"),
        Attempt(D, B, "echo"),
    ]
    assert network.attempts("echo") == [(A, B), (A, A), (B, C), (D, A), (C, B), (D, B)]
    assert network.attempts("nope") == [(A, B)]
    # The counter has only the deliveries: the call that waited at the hung B ran late.
    assert network.calls == {(B, "echo"): 2, (B, "nope"): 1, (A, "echo"): 1}
    with pytest.raises(RpcConnectionError, match="not running"):
        await network.transport_for(A).call(B, "echo")
    assert len(network.log) == 7


# Random faults, in virtual time.


def replay_drops(seed: int, drop: float, calls: int) -> tuple[int, int]:
    """(answered calls, handler runs) that a drop-only network with ``seed`` must produce."""
    rng = random.Random(seed)
    answered = handled = 0
    for _ in range(calls):
        request_dropped = rng.random() < drop
        response_dropped = rng.random() < drop
        handled += not request_dropped
        answered += not request_dropped and not response_dropped
    return answered, handled


async def test_drop_rate_with_a_fixed_seed(autojump_clock: trio.testing.MockClock) -> None:
    calls, drop = 400, 0.2
    async with cluster(seed=1234, faults=Faults(drop=drop)) as (network, services):
        results = [await outcome(network, A, B, "echo", index) for index in range(calls)]
    answered, handled = replay_drops(1234, drop, calls)
    assert sum(result != "timeout" for result in results) == answered
    assert len(services[B].received) == handled == network.calls[(B, "echo")]
    statistics = network.statistics()
    assert statistics["delivered"] == handled
    assert statistics["dropped"] == calls - answered  # Lost requests plus lost responses.
    # Each call survives two independent 20 % drops: about 64 % are answered.
    assert abs(answered / calls - 0.64) < 0.06


async def test_duplicated_request_runs_the_handler_twice() -> None:
    async with cluster(faults=Faults(duplicate=1.0)) as (network, services):
        assert await network.transport_for(A).call(B, "echo", "x") == ["x"]
        await trio.testing.wait_all_tasks_blocked()
    assert services[B].received == [("x",), ("x",)]
    assert network.calls[(B, "echo")] == 2
    assert network.statistics()["duplicated"] == 2  # The request and the response.


async def test_dropped_response_still_ran_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The first seed whose first call keeps its request and loses its response.
    seed = next(
        seed
        for seed in range(100)
        if (rng := random.Random(seed)).random() >= 0.5 and rng.random() < 0.5
    )
    async with cluster(seed=seed, faults=Faults(drop=0.5)) as (network, services):
        assert await outcome(network, A, B, "echo", "write") == "timeout"
    assert services[B].received == [("write",)]
    assert network.statistics()["dropped"] == 1


async def test_fixed_delays_happen_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster(faults=Faults(delay=(2.0, 2.0))) as (network, _):
        assert await network.transport_for(A).call(B, "echo") == []
        assert trio.current_time() == 4.0  # Request and response each took 2 s.
        assert network.statistics()["delayed"] == 2


async def test_random_delays_follow_the_seed(autojump_clock: trio.testing.MockClock) -> None:
    rng = random.Random(99)
    expected = [rng.uniform(0.1, 0.5) + rng.uniform(0.1, 0.5) for _ in range(3)]
    async with cluster(seed=99, faults=Faults(delay=(0.1, 0.5))) as (network, _):
        for seconds in expected:
            start = trio.current_time()
            await network.transport_for(A).call(B, "echo")
            assert trio.current_time() - start == pytest.approx(seconds)


async def test_cancelled_caller_does_not_cancel_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        assert await outcome(network, A, B, "slow", 10) == "timeout"
        assert trio.current_time() == 1
        assert services[B].finished == 0
        await trio.sleep(20)
        assert services[B].finish_times == [10]


async def test_self_calls_are_never_faulty(autojump_clock: trio.testing.MockClock) -> None:
    faults = Faults(drop=1.0, duplicate=1.0, delay=(5.0, 5.0))
    async with cluster(faults=faults) as (network, services):
        network.partition([A], [B])
        assert await network.transport_for(A).call(A, "echo", 1) == [1]
        assert trio.current_time() == 0
        assert services[A].received == [(1,)]
        assert await outcome(network, A, B, "echo", 2) == "timeout"


async def test_set_faults_applies_to_later_calls(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster(faults=Faults(drop=1.0)) as (network, _):
        assert await outcome(network, A, B, "echo") == "timeout"
        network.set_faults(Faults())
        assert network.faults == Faults()
        assert await outcome(network, A, B, "echo") == []


async def run_scenario(
    seed: int, *, started: bool = False
) -> tuple[list[tuple[object, float]], dict[str, int]]:
    """Sixty calls between random pairs on a bad network: (result, elapsed time) per call.

    Made with ``call``, or with ``start_call`` if ``started``.
    """
    faults = Faults(drop=0.2, duplicate=0.2, delay=(0.0, 0.3))
    start = trio.current_time()
    results: list[tuple[object, float]] = []
    observe = started_outcome if started else outcome
    async with cluster(seed=seed, faults=faults) as (network, _):
        for index in range(60):
            caller, target = random.Random(index).sample([A, B, C], 2)
            result = await observe(network, caller, target, "echo", index)
            results.append((result, round(trio.current_time() - start, 9)))
    return results, network.statistics()


async def test_same_seed_same_outcomes(autojump_clock: trio.testing.MockClock) -> None:
    first, first_statistics = await run_scenario(5)
    second, second_statistics = await run_scenario(5)
    other, _ = await run_scenario(6)
    assert first == second
    assert first_statistics == second_statistics
    assert 0 < [result for result, _ in first].count("timeout") < 60
    assert first_statistics["duplicated"] > 0
    assert first_statistics["delayed"] > 0
    assert other != first


async def test_started_calls_meet_the_same_fates_as_awaited_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    awaited, awaited_statistics = await run_scenario(5)
    started, started_statistics = await run_scenario(5, started=True)
    # The same draws in the same order: the same results, at the same times.
    assert started == awaited
    assert started_statistics == awaited_statistics


async def test_a_started_call_reports_every_kind_of_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster(nodes=(A, B, C, D)) as (network, services):
        assert await started_outcome(network, A, B, "echo", 1) == [1]
        assert await started_outcome(network, A, B, "nope") is RpcMethodNotFound
        assert await started_outcome(network, A, B, "echo", object()) is RpcBadRequest
        network.unregister(C)
        assert await started_outcome(network, A, C, "echo") is RpcConnectionError
        network.partition([A], [D])
        assert await started_outcome(network, A, D, "echo") == "timeout"
        assert trio.current_time() == 1
        assert network.statistics()["refused"] == network.statistics()["hung"] == 1
    assert services[B].received == [(1,)]


async def test_a_cancelled_start_drops_the_late_outcome_but_the_handler_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        assert await started_outcome(network, A, B, "slow", 10) == "timeout"
        await trio.sleep(20)
        assert services[B].finish_times == [10]


async def test_a_crash_fails_a_started_call(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as (network, _):
        errors: list[RpcError | None] = []
        network.transport_for(A).start_call(
            B, "slow", (10,), lambda result, error: errors.append(error)
        )
        await trio.sleep(3)
        network.unregister(B)
        await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 1
        assert isinstance(errors[0], RpcConnectionError)
        assert "lost" in str(errors[0])
        assert network.statistics()["lost"] == 1


async def test_running_cancels_deliveries_and_then_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as (network, services):
        network.hang(C)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, network, A, B, "wait")
            nursery.start_soon(outcome, network, A, C, "echo")
        assert len(services[B].received) == 1
    assert services[B].finished == 0
    assert services[C].received == []
    with pytest.raises(RpcConnectionError, match="not running"):
        await network.transport_for(A).call(B, "echo")


@pytest.mark.parametrize(
    "faults",
    [
        {"drop": -0.1},
        {"drop": 1.5},
        {"duplicate": True},
        {"delay": (2.0, 1.0)},
        {"delay": (-1.0, 1.0)},
        {"delay": [0.0, 1.0]},
    ],
)
def test_faults_validate(faults: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Faults(**faults)


# Equivalence with the real RPC over TCP.


class Unsendable:
    """Not MessagePack-serialisable."""


@waits
async def _echo(*params: object) -> object:
    return list(params)


@waits
async def _param_types(*params: object) -> object:
    return [type(param).__name__ for param in params]


@waits
async def _raise_bad_request() -> None:
    raise RpcBadRequest("key too long")


@waits
async def _raise_connection_error() -> None:
    raise RpcConnectionError("downstream unreachable")


@waits
async def _raise_value_error() -> None:
    raise ValueError("boom")


@waits
async def _raise_key_error() -> None:
    raise KeyError("missing")


@waits
async def _return_unsendable() -> object:
    return Unsendable()


@waits
async def _return_tuple() -> object:
    return (1, (2, 3), {"k": (b"v",)})


EQUIVALENCE_HANDLERS: dict[str, Handler] = {
    "echo": _echo,
    "param_types": _param_types,
    "bad_request": _raise_bad_request,
    "connection_error": _raise_connection_error,
    "value_error": _raise_value_error,
    "key_error": _raise_key_error,
    "unsendable": _return_unsendable,
    "tuple": _return_tuple,
}

EQUIVALENCE_CASES: list[tuple[str, tuple[object, ...]]] = [
    ("echo", ()),
    ("echo", (None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "", "é", b"", b"\xff")),
    ("echo", ((1, (2, (3,))), [b"a", "a"])),
    ("echo", ({"a": {"b": [1, {"c": b"d"}]}, 1: "int key", b"k": "bytes key"},)),
    ("echo", (bytearray(b"ba"), memoryview(b"mv"))),
    ("param_types", ((1, 2), [1], {"a": 1}, b"x", "x", bytearray(b"y"))),
    ("echo", (object(),)),
    ("echo", ({1, 2},)),
    ("echo", (2**64,)),
    ("echo", (Unsendable(),)),
    ("missing_method", (1,)),
    ("bad_request", ()),
    ("connection_error", ()),
    ("value_error", ()),
    ("key_error", ()),
    ("unsendable", ()),
    ("tuple", ()),
]


async def _observe(
    call: Callable[..., Any], method: str, params: tuple[object, ...]
) -> tuple[object, ...]:
    """("result", repr of the result) or ("error", exception type, message)."""
    try:
        return ("result", repr(await call(method, *params)))
    except RpcError as exc:
        return ("error", type(exc), str(exc))


async def test_fake_network_is_equivalent_to_real_rpc() -> None:
    with trio.fail_after(TCP_GUARD):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_rpc, "127.0.0.1", 0, SECRET, EQUIVALENCE_HANDLERS)
            port = listeners[0].socket.getsockname()[1]
            async with RpcClient("127.0.0.1", port, SECRET) as client:
                real = [await _observe(client.call, *case) for case in EQUIVALENCE_CASES]
            nursery.cancel_scope.cancel()
        async with FakeNetwork.running(random.Random(0)) as network:
            network.register(B, EQUIVALENCE_HANDLERS)
            transport = network.transport_for(A)

            async def fake_call(method: str, *params: object) -> object:
                return await transport.call(B, method, *params)

            fake = [await _observe(fake_call, *case) for case in EQUIVALENCE_CASES]
    for case, real_outcome, fake_outcome in zip(EQUIVALENCE_CASES, real, fake, strict=True):
        assert fake_outcome == real_outcome, case
    # The table covers successes and every mapped error class.
    kinds = {observed[1] if observed[0] == "error" else "result" for observed in real}
    assert kinds == {
        "result",
        RpcBadRequest,
        RpcConnectionError,
        RpcMethodNotFound,
        RpcRemoteError,
    }
