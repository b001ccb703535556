"""The coordinator's fan-out: every call answered exactly once, by its deadline, without a task.

Most tests run the real RPC client and server over in-process socket pairs in virtual time; the
seeded table at the end drives the deadline sweeper with a scripted transport.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from kai.cluster.fanout import Answer, FanOut, PeerCaller
from kai.core.errors import RpcBadRequest, RpcConnectionError, RpcError
from kai.core.pending import waits
from kai.core.ring import NodeId
from kai.rpc.server import Handler, handle_rpc_connection
from kai.rpc.transport import CancelCall, OnDone, RpcTransport

SECRET = b"cluster-secret-0123456789abcdef!"
A = NodeId("127.0.0.1", 11011)
B = NodeId("127.0.0.1", 11012)
TIMEOUT = 5.0


class Peers:
    """In-memory RPC servers for A and B, with handlers the tests control."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.release = trio.Event()
        self.scopes: list[trio.CancelScope] = []
        self.detector: list[tuple[str, NodeId]] = []

    def handlers(self, node_port: int) -> dict[str, Handler]:
        @waits
        async def hang(tag: str) -> str:
            await self.release.wait()
            return tag

        def refuse() -> None:
            raise RpcBadRequest("no")

        return {"whoami": lambda: node_port, "hang": hang, "refuse": refuse}

    async def open_socket(self, host: str, port: int) -> socket.socket:
        client_side, server_side = socket.socketpair()
        scope = trio.CancelScope()
        self.scopes.append(scope)
        self.nursery.start_soon(self._serve, server_side, port, scope)
        return client_side

    async def _serve(self, sock: socket.socket, port: int, scope: trio.CancelScope) -> None:
        with scope:
            await handle_rpc_connection(sock, secret=SECRET, handlers=self.handlers(port))

    def crash(self) -> None:
        for scope in self.scopes:
            scope.cancel()

    def caller(self, transport: RpcTransport, background: trio.Nursery) -> PeerCaller:
        return PeerCaller(
            transport,
            background,
            on_success=lambda node: self.detector.append(("up", node)),
            on_failure=lambda node: self.detector.append(("down", node)),
        )


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[Peers, RpcTransport, PeerCaller, trio.Nursery]]:
    """Peers A and B, a transport already connected to both, and a caller."""
    async with trio.open_nursery() as servers:
        peers = Peers(servers)
        async with trio.open_nursery() as background:
            transport = RpcTransport(SECRET, background, open_socket=peers.open_socket)
            assert await transport.call(A, "whoami") == A.port
            assert await transport.call(B, "whoami") == B.port
            yield peers, transport, peers.caller(transport, background), background
            peers.release.set()
            await transport.aclose()
        servers.cancel_scope.cancel()


async def drain(fan: FanOut) -> list[Answer]:
    answers = []
    while (answer := await fan.receive()) is not None:
        answers.append(answer)
    return answers


async def test_answers_come_without_a_task_per_call(autojump_clock: object) -> None:
    async with connected() as (_peers, _, caller, background):
        tasks_before = len(background.child_tasks)
        deadline = trio.current_time() + TIMEOUT
        fan = caller.fan_out([(A, "whoami", ()), (B, "whoami", ())], deadline)
        assert len(background.child_tasks) == tasks_before + 1  # the deadline sweeper only
        answers = await drain(fan)
        assert sorted((answer.peer, answer.result) for answer in answers) == [
            (A, A.port),
            (B, B.port),
        ]
        assert all(answer.ok for answer in answers)
        assert await fan.receive() is None
        assert caller.timeouts == caller.errors == 0
        await trio.testing.wait_all_tasks_blocked()
        # Nothing is pending, but the sweeper only finds out when it wakes at its deadline:
        # ending it at once would cost a cancellation and a new task per quiet moment.
        assert len(background.child_tasks) == tasks_before + 1
        await trio.sleep_until(deadline)
        await trio.testing.wait_all_tasks_blocked()
        assert len(background.child_tasks) == tasks_before  # ended at the calls' deadline
        assert caller.timeouts == 0


async def test_a_silent_peer_times_out_exactly_at_the_deadline(autojump_clock: object) -> None:
    async with connected() as (peers, _, caller, _background):
        started = trio.current_time()
        fan = caller.fan_out([(A, "whoami", ()), (B, "hang", ("late",))], started + TIMEOUT)
        first, second = await drain(fan)
        assert (first.peer, first.ok) == (A, True)
        assert trio.current_time() == started + TIMEOUT
        assert (second.peer, second.timed_out, second.ok) == (B, True, False)
        assert caller.timeouts == 1
        assert ("down", B) in peers.detector
        # The late response is dropped, not delivered a second time.
        peers.release.set()
        assert await caller.call(B, "whoami", (), trio.current_time() + 1) == Answer(
            B, result=B.port
        )
        assert await fan.receive() is None


async def test_a_lost_connection_answers_with_an_unreachable_error(autojump_clock: object) -> None:
    async with connected() as (peers, _, caller, _background):
        fan = caller.fan_out([(A, "hang", ("a",)), (B, "hang", ("b",))], trio.current_time() + 5)
        await trio.sleep(1)
        peers.crash()
        answers = await drain(fan)
        assert trio.current_time() < 5  # long before the deadline
        assert {answer.peer for answer in answers} == {A, B}
        assert all(isinstance(answer.error, RpcConnectionError) for answer in answers)
        assert sorted(peers.detector[-2:]) == [("down", A), ("down", B)]
        assert caller.errors == 2


async def test_an_error_answer_means_the_peer_is_up(autojump_clock: object) -> None:
    async with connected() as (peers, _, caller, _background):
        (answer,) = await drain(caller.fan_out([(A, "refuse", ())], trio.current_time() + 5))
        assert isinstance(answer.error, RpcBadRequest)
        assert peers.detector[-1] == ("up", A)
        assert caller.errors == 1


async def test_unsendable_params_fail_only_that_call(autojump_clock: object) -> None:
    async with connected() as (_, _, caller, _background):
        fan = caller.fan_out(
            [(A, "whoami", (object(),)), (B, "whoami", ())], trio.current_time() + 5
        )
        answers = {answer.peer: answer for answer in await drain(fan)}
        assert isinstance(answers[A].error, RpcBadRequest)
        assert answers[B].result == B.port


async def test_listen_gets_the_late_answers_then_finishes_once(autojump_clock: object) -> None:
    async with connected() as (peers, _, caller, _background):
        fan = caller.fan_out([(A, "whoami", ()), (B, "hang", ("b",))], trio.current_time() + 5)
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
        assert len(finished) == 1


async def test_listen_after_everything_came_finishes_at_once(autojump_clock: object) -> None:
    async with connected() as (_, _, caller, _background):
        fan = caller.fan_out([(A, "whoami", ()), (B, "whoami", ())], trio.current_time() + 5)
        await trio.sleep(1)
        late: list[Answer] = []
        finished: list[bool] = []
        fan.listen(late.append, lambda: finished.append(True))
        assert {answer.peer for answer in late} == {A, B}
        assert finished == [True]


async def test_a_failing_listener_does_not_break_the_connection(autojump_clock: object) -> None:
    async with connected() as (_, transport, caller, _background):
        fan = caller.fan_out([(A, "whoami", ())], trio.current_time() + 5)

        def explode(answer: Answer) -> None:
            raise RuntimeError("listener bug")

        fan.listen(explode, lambda: None)
        await trio.sleep(1)
        assert await transport.call(A, "whoami") == A.port


async def test_closed_fan_out_drops_answers_but_the_detector_still_hears(
    autojump_clock: object,
) -> None:
    async with connected() as (peers, _, caller, _background):
        fan = caller.fan_out([(A, "whoami", ()), (B, "hang", ("b",))], trio.current_time() + 5)
        fan.close()
        await trio.sleep(6)
        assert await fan.receive() is None
        assert caller.timeouts == 1
        assert ("up", A) in peers.detector
        assert ("down", B) in peers.detector


async def test_an_unconnected_peer_is_called_from_a_task(autojump_clock: object) -> None:
    async with trio.open_nursery() as servers:
        peers = Peers(servers)
        async with trio.open_nursery() as background:
            transport = RpcTransport(SECRET, background, open_socket=peers.open_socket)
            caller = peers.caller(transport, background)
            fan = caller.fan_out([(A, "whoami", ()), (B, "whoami", ())], 5)
            assert {answer.result for answer in await drain(fan)} == {A.port, B.port}
            await transport.aclose()
        servers.cancel_scope.cancel()


async def test_after_shutdown_calls_answer_at_once_without_blaming_peers(
    autojump_clock: object,
) -> None:
    async with connected() as (peers, transport, _, _background):
        async with trio.open_nursery() as closed:
            pass
        caller = peers.caller(transport, closed)
        seen = len(peers.detector)
        fan = caller.fan_out([(A, "whoami", ())], trio.current_time() + 5)
        (answer,) = await drain(fan)
        assert isinstance(answer.error, RpcConnectionError)
        assert len(peers.detector) == seen


class ScriptedTransport:
    """Starts calls by recording their callbacks; the test decides when each one answers."""

    def __init__(self) -> None:
        self.started: list[tuple[NodeId, OnDone]] = []
        self.cancelled: set[int] = set()

    async def call(self, peer: NodeId, method: str, *params: object) -> object:
        raise AssertionError("every call is started, none awaited")

    def start_call(
        self, peer: NodeId, method: str, params: tuple[object, ...], on_done: OnDone
    ) -> CancelCall | None:
        index = len(self.started)
        self.started.append((peer, on_done))
        return lambda: self.cancelled.add(index)


@pytest.mark.parametrize("seed", range(25))
async def test_every_call_is_answered_once_by_its_deadline(
    autojump_clock: object, seed: int
) -> None:
    """Fan-outs with assorted deadlines; peers answer at random times or never."""
    rng = random.Random(seed)
    transport = ScriptedTransport()
    expected: dict[int, tuple[str, float]] = {}  # call index -> (outcome, when)
    seen: dict[int, list[tuple[Answer, float]]] = {}  # fan-out -> answers and when
    finished: list[int] = []
    calls: dict[int, range] = {}  # fan-out -> its call indices
    async with trio.open_nursery() as background:
        caller = PeerCaller(
            transport, background, on_success=lambda node: None, on_failure=lambda node: None
        )

        async def answer_later(index: int, delay: float, error: RpcError | None) -> None:
            await trio.sleep(delay)
            transport.started[index][1](None if error else index, error)

        for number in range(rng.randint(1, 6)):
            await trio.sleep(rng.choice([0, 0.5, 1]))
            now = trio.current_time()
            deadline = now + rng.choice([1, 2, 3])
            first = len(transport.started)
            fan = caller.fan_out([(A, "m", ()) for _ in range(rng.randint(1, 3))], deadline)
            for index in range(first, len(transport.started)):
                kind = rng.choice(["answer", "error", "silent"])
                delay = rng.uniform(0.01, 4)
                if kind != "silent":
                    error = RpcConnectionError("gone") if kind == "error" else None
                    background.start_soon(answer_later, index, delay, error)
                on_time = kind != "silent" and now + delay < deadline
                expected[index] = (kind, now + delay) if on_time else ("timeout", deadline)
            calls[number] = range(first, len(transport.started))
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
    assert transport.cancelled == timed_out
    assert caller.timeouts == len(timed_out)


def _note(answers: list[tuple[Answer, float]], answer: Answer) -> None:
    answers.append((answer, trio.current_time()))


def _kind(answer: Answer) -> str:
    return "timeout" if answer.timed_out else "answer" if answer.ok else "error"


async def test_calls_added_by_a_listener_delay_the_finish_until_they_are_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected() as (_, _, caller, _background):
        deadline = trio.current_time() + 5
        fan = caller.fan_out([(A, "whoami", ())], deadline)
        seen: list[object] = []
        finished: list[float] = []

        def on_answer(answer: Answer) -> None:
            seen.append(answer.result)
            if len(seen) < 3:  # ask again twice, as a partial replica_read answer does
                caller.add_calls(fan, [(B, "whoami", ())], deadline)

        fan.listen(on_answer, lambda: finished.append(trio.current_time()))
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [A.port, B.port, B.port]
        assert len(finished) == 1
        assert await fan.receive() is None
