"""The coordinator's fan-out: every call answered exactly once, by its deadline.

Every test runs twice, through both transports a node can have: the in-process
:class:`~kai.testing.network.FakeNetwork`, and the real RPC client and server
(:class:`~kai.rpc.transport.RpcTransport`) over socket pairs. Both run in virtual time.
"""

from __future__ import annotations

import random
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Protocol

import pytest
import trio
import trio.testing

from kai.cluster.fanout import Answer, FanOut, PeerCaller
from kai.core.errors import RpcBadRequest, RpcConnectionError, RpcError
from kai.core.pending import Pending, waits
from kai.core.ring import NodeId
from kai.rpc.server import Handler, handle_rpc_connection
from kai.rpc.transport import FanOutTransport, RpcTransport
from kai.testing.network import FakeNetwork

SECRET = b"cluster-secret-0123456789abcdef!"
#: The node whose coordinator makes the calls.
SELF = NodeId("127.0.0.1", 11010)
A = NodeId("127.0.0.1", 11011)
B = NodeId("127.0.0.1", 11012)
TIMEOUT = 5.0


class Network(Protocol):
    """What the tests need of a network: both transports' test networks have it."""

    def register(self, node: NodeId, handlers: Mapping[str, Handler]) -> None: ...

    def unregister(self, node: NodeId) -> None: ...

    def transport_for(self, node: NodeId) -> FanOutTransport: ...


class SocketPairNetwork:
    """Nodes served by the real RPC server over socket pairs, called by the real transport.

    Not a fake: it only stands in for TCP connect, with :class:`FakeNetwork`'s
    ``register`` / ``unregister`` / ``transport_for``, so one test covers both networks.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._handlers: dict[NodeId, Mapping[str, Handler]] = {}
        self._connections: defaultdict[NodeId, list[trio.CancelScope]] = defaultdict(list)

    def register(self, node: NodeId, handlers: Mapping[str, Handler]) -> None:
        self.unregister(node)
        self._handlers[node] = handlers

    def unregister(self, node: NodeId) -> None:
        """Crash ``node``: its connections drop, and new ones are refused."""
        self._handlers.pop(node, None)
        for scope in self._connections.pop(node, []):
            scope.cancel()

    def transport_for(self, node: NodeId) -> FanOutTransport:
        return RpcTransport(SECRET, self._nursery, open_socket=self._open_socket)

    async def _open_socket(self, host: str, port: int) -> socket.socket:
        node = NodeId(host, port)
        handlers = self._handlers.get(node)
        if handlers is None:
            raise ConnectionRefusedError(f"nothing listens at {node}")
        client_side, server_side = socket.socketpair()
        scope = trio.CancelScope()
        self._connections[node].append(scope)
        self._nursery.start_soon(self._serve, server_side, handlers, scope)
        return client_side

    async def _serve(
        self, sock: socket.socket, handlers: Mapping[str, Handler], scope: trio.CancelScope
    ) -> None:
        with scope:
            await handle_rpc_connection(sock, secret=SECRET, handlers=handlers)


@pytest.fixture(params=["fake-network", "rpc-over-socketpairs"])
async def network(request: pytest.FixtureRequest) -> AsyncIterator[Network]:
    if request.param == "fake-network":
        async with FakeNetwork.running(random.Random(0)) as fake:
            yield fake
    else:
        async with trio.open_nursery() as nursery:
            yield SocketPairNetwork(nursery)
            nursery.cancel_scope.cancel()


class Peers:
    """Handlers for A and B that the tests control, and what the failure detector heard."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.release = trio.Event()
        self.detector: list[tuple[str, NodeId]] = []
        for node in (A, B):
            network.register(node, self.handlers(node))

    def handlers(self, node: NodeId) -> dict[str, Handler]:
        @waits
        async def hang(tag: str) -> str:
            await self.release.wait()
            return tag

        def refuse() -> None:
            raise RpcBadRequest("no")

        return {"whoami": lambda: node.port, "hang": hang, "refuse": refuse}

    def caller(self, background: trio.Nursery) -> PeerCaller:
        return PeerCaller(
            self.network.transport_for(SELF),
            background,
            on_success=lambda node: self.detector.append(("up", node)),
            on_failure=lambda node: self.detector.append(("down", node)),
        )


@asynccontextmanager
async def calling(network: Network) -> AsyncIterator[tuple[Peers, PeerCaller]]:
    """Peers A and B on ``network``, and SELF's caller (nothing connected yet)."""
    peers = Peers(network)
    async with trio.open_nursery() as background:
        yield peers, peers.caller(background)
        background.cancel_scope.cancel()


async def drain(fan: FanOut) -> list[Answer]:
    answers = []
    while (answer := await fan.receive()) is not None:
        answers.append(answer)
    return answers


async def test_every_call_is_answered_with_its_result(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        fan = caller.fan_out([(A, "whoami", ()), (B, "whoami", ())], TIMEOUT)
        answers = await drain(fan)
        assert sorted((answer.peer, answer.result) for answer in answers) == [
            (A, A.port),
            (B, B.port),
        ]
        assert all(answer.ok for answer in answers)
        assert await fan.receive() is None
        assert sorted(peers.detector) == [("up", A), ("up", B)]
        assert caller.timeouts == caller.errors == 0
        assert trio.current_time() == 0  # nothing waited for a timer


async def test_call_is_a_fan_out_of_one(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        assert await caller.call(A, "whoami", (), TIMEOUT) == Answer(A, result=A.port)
        answer = await caller.call(B, "hang", ("b",), TIMEOUT)
        assert answer == Answer(B, timed_out=True)
        assert trio.current_time() == TIMEOUT
        assert peers.detector == [("up", A), ("down", B)]
        assert caller.timeouts == 1


async def test_a_cancelled_call_still_tells_the_detector_by_its_deadline(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        with trio.move_on_after(1):
            await caller.call(B, "hang", ("b",), TIMEOUT)
        assert peers.detector == []
        await trio.sleep_until(TIMEOUT)
        await trio.testing.wait_all_tasks_blocked()
        assert peers.detector == [("down", B)]


async def test_nothing_runs_in_the_background_after_the_last_deadline(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    peers = Peers(network)
    async with trio.open_nursery() as background:
        caller = peers.caller(background)
        assert len(await drain(caller.fan_out([(A, "whoami", ()), (B, "hang", ("b",))], 3))) == 2
        assert await drain(caller.fan_out([(A, "whoami", ())], 4)) != []
    # The background nursery closed by itself, by the last call's deadline at the latest
    # (sooner if the deadline sweeper finds the last call answered already).
    assert 3 <= trio.current_time() <= 4


async def test_a_silent_peer_times_out_exactly_at_the_deadline(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        fan = caller.fan_out([(A, "whoami", ()), (B, "hang", ("late",))], TIMEOUT)
        first, second = await drain(fan)
        assert (first.peer, first.ok) == (A, True)
        assert trio.current_time() == TIMEOUT
        assert (second.peer, second.timed_out, second.ok) == (B, True, False)
        assert caller.timeouts == 1
        assert ("down", B) in peers.detector
        # The late response is dropped, not delivered a second time.
        peers.release.set()
        assert await caller.call(B, "whoami", (), trio.current_time() + 1) == Answer(
            B, result=B.port
        )
        assert await fan.receive() is None
        assert caller.timeouts == 1


async def test_a_crashed_peer_answers_with_an_unreachable_error_immediately(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        fan = caller.fan_out([(A, "hang", ("a",)), (B, "hang", ("b",))], TIMEOUT)
        await trio.sleep(1)
        network.unregister(A)
        network.unregister(B)
        answers = await drain(fan)
        assert trio.current_time() == 1  # long before the deadline
        assert {answer.peer for answer in answers} == {A, B}
        assert all(isinstance(answer.error, RpcConnectionError) for answer in answers)
        assert sorted(peers.detector) == [("down", A), ("down", B)]
        assert caller.errors == 2
        # A peer that refuses connections is answered at once too.
        (refused,) = await drain(caller.fan_out([(A, "whoami", ())], trio.current_time() + 1))
        assert isinstance(refused.error, RpcConnectionError)
        assert trio.current_time() == 1
        assert peers.detector[-1] == ("down", A)


async def test_an_error_answer_means_the_peer_is_up(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        (answer,) = await drain(caller.fan_out([(A, "refuse", ())], TIMEOUT))
        assert isinstance(answer.error, RpcBadRequest)
        assert peers.detector == [("up", A)]
        assert caller.errors == 1


async def test_unsendable_params_fail_only_that_call(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (_, caller):
        fan = caller.fan_out([(A, "whoami", (object(),)), (B, "whoami", ())], TIMEOUT)
        answers = {answer.peer: answer for answer in await drain(fan)}
        assert isinstance(answers[A].error, RpcBadRequest)
        assert answers[B].result == B.port


async def test_listen_gets_the_late_answers_then_finishes_once(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        fan = caller.fan_out([(A, "whoami", ()), (B, "hang", ("b",))], TIMEOUT)
        first = await fan.receive()
        assert first is not None
        assert first.peer == A
        late: list[Answer] = []
        finished: list[float] = []
        fan.listen(late.append, lambda: finished.append(trio.current_time()))
        assert (late, finished) == ([], [])
        await trio.sleep(1)
        peers.release.set()
        await trio.sleep(1)
        assert [(answer.peer, answer.result) for answer in late] == [(B, "b")]
        assert finished == [1]


async def test_listen_after_everything_came_finishes_immediately(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (_, caller):
        fan = caller.fan_out([(A, "whoami", ()), (B, "whoami", ())], TIMEOUT)
        await trio.sleep(1)
        late: list[Answer] = []
        finished: list[bool] = []
        fan.listen(late.append, lambda: finished.append(True))
        assert {answer.peer for answer in late} == {A, B}
        assert finished == [True]


async def test_a_failing_listener_does_not_break_the_transport(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (_, caller):
        fan = caller.fan_out([(A, "whoami", ())], TIMEOUT)

        def explode(answer: Answer) -> None:
            raise RuntimeError("listener bug")

        fan.listen(explode, lambda: None)
        await trio.sleep(1)
        assert await caller.transport.call(A, "whoami") == A.port


async def test_closed_fan_out_drops_answers_but_the_detector_still_hears(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (peers, caller):
        fan = caller.fan_out([(A, "whoami", ()), (B, "hang", ("b",))], TIMEOUT)
        fan.close()
        await trio.sleep(TIMEOUT + 1)
        assert await fan.receive() is None
        assert caller.timeouts == 1
        assert peers.detector == [("up", A), ("down", B)]


async def test_after_shutdown_calls_answer_immediately_without_blaming_peers(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    peers = Peers(network)
    async with trio.open_nursery() as closed:
        pass
    caller = peers.caller(closed)
    (answer,) = await drain(caller.fan_out([(A, "whoami", ())], TIMEOUT))
    assert isinstance(answer.error, RpcConnectionError)
    assert trio.current_time() == 0
    assert peers.detector == []


async def test_calls_added_by_a_listener_delay_the_finish_until_they_are_answered(
    autojump_clock: trio.testing.MockClock, network: Network
) -> None:
    async with calling(network) as (_, caller):
        fan = caller.fan_out([(A, "whoami", ())], TIMEOUT)
        seen: list[object] = []
        finished: list[float] = []

        def on_answer(answer: Answer) -> None:
            seen.append(answer.result)
            if len(seen) < 3:  # ask again twice, as a partial replica_read answer does
                caller.add_calls(fan, [(B, "whoami", ())], TIMEOUT)

        fan.listen(on_answer, lambda: finished.append(trio.current_time()))
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [A.port, B.port, B.port]
        assert len(finished) == 1
        assert await fan.receive() is None


def scripted(index: int, delay: float, kind: str) -> Pending[int]:
    """Answer ``index`` after ``delay`` seconds, or fail as unreachable, or never answer."""

    async def answer() -> int:
        if kind == "silent":
            await trio.sleep_forever()
        await trio.sleep(delay)
        if kind == "error":
            raise RpcConnectionError("gone")
        return index

    return Pending(answer())


@pytest.mark.parametrize("seed", range(10))
async def test_every_call_is_answered_once_by_its_deadline(
    autojump_clock: trio.testing.MockClock, network: Network, seed: int
) -> None:
    """Fan-outs with assorted deadlines; peers answer at random times, fail, or never answer."""
    rng = random.Random(seed)
    network.register(A, {"scripted": scripted})
    expected: dict[int, tuple[str, float]] = {}  # call index -> (outcome, when)
    seen: dict[int, list[tuple[Answer, float]]] = {}  # fan-out -> answers and when
    finished: list[int] = []
    calls: dict[int, range] = {}  # fan-out -> its call indices
    async with trio.open_nursery() as background:
        caller = PeerCaller(
            network.transport_for(SELF),
            background,
            on_success=lambda node: None,
            on_failure=lambda node: None,
        )
        for number in range(rng.randint(1, 6)):
            await trio.sleep(rng.choice([0, 0.5, 1]))
            now = trio.current_time()
            deadline = now + rng.choice([1, 2, 3])
            first = len(expected)
            batch = []
            for index in range(first, first + rng.randint(1, 3)):
                kind = rng.choice(["answer", "error", "silent"])
                delay = rng.uniform(0.01, 4)
                batch.append((A, "scripted", (index, delay, kind)))
                on_time = kind != "silent" and now + delay < deadline
                expected[index] = (kind, now + delay) if on_time else ("timeout", deadline)
            fan = caller.fan_out(batch, deadline)
            calls[number] = range(first, len(expected))
            answers = seen[number] = []
            fan.listen(partial(_note, answers), partial(finished.append, number))
    assert sorted(finished) == sorted(seen)  # every fan-out finished, once
    for number, answers in seen.items():
        got = sorted((_kind(answer), round(when, 6)) for answer, when in answers)
        want = sorted(
            (kind, round(when, 6)) for kind, when in [expected[index] for index in calls[number]]
        )
        assert got == want
        assert {answer.result for answer, _ in answers if answer.ok} == {
            index for index in calls[number] if expected[index][0] == "answer"
        }
    timed_out = {index for index, (kind, _) in expected.items() if kind == "timeout"}
    assert caller.timeouts == len(timed_out)
    assert caller.errors == sum(kind == "error" for kind, _ in expected.values())


def _note(answers: list[tuple[Answer, float]], answer: Answer) -> None:
    answers.append((answer, trio.current_time()))


def _kind(answer: Answer) -> str:
    if answer.timed_out:
        return "timeout"
    assert answer.error is None or isinstance(answer.error, RpcError)
    return "answer" if answer.ok else "error"
