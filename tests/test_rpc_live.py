"""End-to-end tests of the RPC server and client over real TCP and in-process socket pairs."""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import msgpack
import pytest
import trio
import trio.testing

from kai.core.errors import (
    RpcAuthenticationError,
    RpcBadRequest,
    RpcConnectionError,
    RpcError,
    RpcMethodNotFound,
    RpcRemoteError,
)
from kai.core.pending import waits
from kai.rpc.client import RpcClient
from kai.rpc.pool import RpcClientPool
from kai.rpc.server import (
    MAX_CONCURRENT_REQUESTS_PER_CONNECTION,
    Handler,
    handle_rpc_connection,
    serve_rpc,
    serve_rpc_listeners,
)
from kai.rpc.sockets import MAX_BACKLOG

SECRET = b"cluster-secret-0123456789abcdef!"
OTHER_SECRET = b"another-secret-0123456789abcdef!"
LOCALHOST = "127.0.0.1"
#: Real-time guard for TCP tests only; virtual-time tests assert exact times instead.
TCP_GUARD = 10


class Service:
    """RPC handlers that record every invocation."""

    def __init__(self) -> None:
        self.calls = 0
        self.started: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.gates: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.notes: list[object] = []
        self.noted = trio.Event()

    @waits
    async def echo(self, *args: object) -> object:
        self.calls += 1
        return list(args)

    @waits
    async def gate(self, name: str) -> str:
        """Returns ``name`` once the test opens ``gates[name]``."""
        self.calls += 1
        self.started[name].set()
        await self.gates[name].wait()
        return name

    @waits
    async def fail(self, kind: str) -> None:
        self.fail_now(kind)

    @waits
    async def unsendable(self) -> object:
        return self.unsendable_now()

    def echo_now(self, *args: object) -> object:
        """A handler that answers at once: it runs in the connection's reader."""
        self.calls += 1
        return list(args)

    def fail_now(self, kind: str) -> None:
        self.calls += 1
        if kind == "bad-request":
            raise RpcBadRequest("key too long")
        if kind == "not-found":
            raise RpcMethodNotFound("inner method missing")
        raise ValueError("boom")

    def unsendable_now(self) -> object:
        self.calls += 1
        return object()

    @waits
    async def note(self, value: object) -> None:
        self.calls += 1
        self.notes.append(value)
        self.noted.set()

    def handlers(self) -> dict[str, Handler]:
        return {
            "echo": self.echo,
            "gate": self.gate,
            "fail": self.fail,
            "unsendable": self.unsendable,
            "note": self.note,
            "echo_now": self.echo_now,
            "fail_now": self.fail_now,
            "unsendable_now": self.unsendable_now,
        }


class CountingListener(trio.abc.Listener[trio.abc.Stream]):
    """A TCP listener that counts the connections it accepts."""

    def __init__(self, inner: trio.SocketListener) -> None:
        self.inner = inner
        self.accepted = 0

    @property
    def port(self) -> int:
        port: int = self.inner.socket.getsockname()[1]
        return port

    async def accept(self) -> trio.abc.Stream:
        stream = await self.inner.accept()
        self.accepted += 1
        return stream

    async def aclose(self) -> None:
        await self.inner.aclose()


async def start_tcp_server(
    nursery: trio.Nursery,
    service: Service,
    *,
    secret: bytes = SECRET,
    port: int = 0,
    scope: trio.CancelScope | None = None,
    stopped: trio.Event | None = None,
) -> CountingListener:
    """Serve ``service`` on 127.0.0.1 inside ``scope``; ``stopped`` is set when it ends."""
    (inner,) = await trio.open_tcp_listeners(port, host=LOCALHOST)
    listener = CountingListener(inner)

    async def run(task_status: trio.TaskStatus[list[CountingListener]]) -> None:
        try:
            with scope or trio.CancelScope():
                await serve_rpc_listeners(
                    [listener],
                    secret,
                    service.handlers(),
                    handshake_timeout=2,
                    task_status=task_status,
                )
        finally:
            if stopped is not None:
                stopped.set()

    await nursery.start(run)
    return listener


class PairNetwork:
    """Connects clients to the server's connection handler over in-process socket pairs."""

    def __init__(self, nursery: trio.Nursery, service: Service, *, secret: bytes = SECRET) -> None:
        self.nursery = nursery
        self.service = service
        self.secret = secret
        self.connections = 0
        self.scopes: list[trio.CancelScope] = []

    async def open_socket(self) -> socket.socket:
        client_side, server_side = socket.socketpair()
        self.connections += 1
        scope = trio.CancelScope()
        self.scopes.append(scope)
        self.nursery.start_soon(self._serve, server_side, scope)
        return client_side

    async def _serve(self, sock: socket.socket, scope: trio.CancelScope) -> None:
        with scope:
            await handle_rpc_connection(sock, secret=self.secret, handlers=self.service.handlers())

    def drop_all(self) -> None:
        """Kill every server-side connection, as a crashed peer would."""
        for scope in self.scopes:
            scope.cancel()


@asynccontextmanager
async def memory_client(service: Service) -> AsyncIterator[tuple[RpcClient, PairNetwork]]:
    async with trio.open_nursery() as nursery:
        network = PairNetwork(nursery, service)
        try:
            async with RpcClient("peer", 1, SECRET, open_socket=network.open_socket) as client:
                yield client, network
        finally:
            network.drop_all()


async def receive_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    received = bytearray()
    try:
        while data := await stream.receive_some():
            received += data
    except trio.BrokenResourceError:
        pass
    return bytes(received)


# --- Calls over TCP -----------------------------------------------------------------------


async def test_call_returns_the_result_over_tcp(nursery: trio.Nursery) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, listener.port, SECRET) as client:
            connected_before = client.connected
            result = await client.call("echo", b"\x00bytes", "text", 7, None)
            assert result == [b"\x00bytes", "text", 7, None]
            assert (connected_before, client.connected) == (False, True)
            assert await client.call("echo") == []
    assert listener.accepted == 1


async def test_serve_rpc_reports_the_bound_port(nursery: trio.Nursery) -> None:
    service = Service()
    listeners = await nursery.start(serve_rpc, LOCALHOST, 0, SECRET, service.handlers())
    port = listeners[0].socket.getsockname()[1]
    assert port != 0
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, port, SECRET) as client:
            assert await client.call("echo", 1) == [1]


async def test_many_concurrent_calls_and_large_values_share_one_connection(
    nursery: trio.Nursery,
) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    count = 3 * MAX_CONCURRENT_REQUESTS_PER_CONNECTION
    large = bytes(range(256)) * 16384  # 4 MiB
    results: dict[int, object] = {}

    async def call(client: RpcClient, index: int) -> None:
        results[index] = await client.call("echo", index, large if index % 100 == 0 else b"")

    with trio.fail_after(TCP_GUARD):
        async with (
            RpcClient(LOCALHOST, listener.port, SECRET) as client,
            trio.open_nursery() as callers,
        ):
            for index in range(count):
                callers.start_soon(call, client, index)
    assert results == {i: [i, large if i % 100 == 0 else b""] for i in range(count)}
    assert listener.accepted == 1


@pytest.mark.parametrize("suffix", ["", "_now"], ids=["async-handlers", "inline-handlers"])
async def test_handler_errors_keep_their_codes(nursery: trio.Nursery, suffix: str) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, listener.port, SECRET) as client:
            with pytest.raises(RpcBadRequest, match="key too long") as bad_request:
                await client.call("fail" + suffix, "bad-request")
            assert not bad_request.value.unreachable  # the peer answered
            with pytest.raises(RpcMethodNotFound, match="inner method missing"):
                await client.call("fail" + suffix, "not-found")
            with pytest.raises(RpcRemoteError, match="ValueError: boom"):
                await client.call("fail" + suffix, "crash")
            with pytest.raises(RpcMethodNotFound, match="no_such_method"):
                await client.call("no_such_method", 1)
            with pytest.raises(RpcRemoteError, match="cannot be sent"):
                await client.call("unsendable" + suffix)
            with pytest.raises(RpcRemoteError, match="TypeError"):
                await client.call("gate" if not suffix else "fail_now")  # Wrong arity.
            # None of that broke the connection.
            assert await client.call("echo" + suffix, "still here") == ["still here"]
    assert listener.accepted == 1
    assert service.calls == 5  # every handler ran but the missing one and the wrong arity


async def test_inline_handlers_answer_while_a_slow_handler_waits(nursery: trio.Nursery) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        async with (
            RpcClient(LOCALHOST, listener.port, SECRET) as client,
            trio.open_nursery() as calls,
        ):
            gated: list[object] = []

            async def call_gate() -> None:
                gated.append(await client.call("gate", "slow"))

            calls.start_soon(call_gate)
            await service.started["slow"].wait()
            answers = [await client.call("echo_now", index) for index in range(20)]
            assert answers == [[index] for index in range(20)]
            assert gated == []
            service.gates["slow"].set()
        assert gated == ["slow"]


async def test_unencodable_params_fail_only_that_call(nursery: trio.Nursery) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, listener.port, SECRET) as client:
            with pytest.raises(RpcBadRequest, match="cannot encode"):
                await client.call("echo", object())
            assert await client.call("echo", 1) == [1]


async def test_notification_runs_the_handler_without_a_reply(nursery: trio.Nursery) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, listener.port, SECRET) as client:
            await client.notify("no_such_method", 1)  # Ignored by the server (logged).
            await client.notify("note", {"key": b"value"})
            await service.noted.wait()
            assert service.notes == [{"key": b"value"}]
            assert await client.call("echo", 2) == [2]


async def test_server_restart_then_the_client_reconnects(nursery: trio.Nursery) -> None:
    service = Service()
    first_scope, first_stopped = trio.CancelScope(), trio.Event()
    listener = await start_tcp_server(nursery, service, scope=first_scope, stopped=first_stopped)
    port = listener.port
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, port, SECRET, nursery=nursery) as client:
            assert await client.call("echo", "before") == ["before"]
            first_scope.cancel()
            await first_stopped.wait()
            # The server is gone: the next call fails as unreachable (refused or lost).
            with pytest.raises(RpcConnectionError) as lost:
                await client.call("echo", "during")
            assert lost.value.unreachable
            listener = await start_tcp_server(nursery, service, port=port)
            assert await client.call("echo", "after") == ["after"]
            assert listener.accepted == 1


async def test_connection_refused_is_unreachable() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, port, SECRET) as client:
            with pytest.raises(RpcConnectionError, match="could not connect") as refused:
                await client.call("echo")
    assert refused.value.unreachable


async def test_client_pool_reuses_one_client_per_peer(nursery: trio.Nursery) -> None:
    service_a, service_b = Service(), Service()
    listener_a = await start_tcp_server(nursery, service_a)
    listener_b = await start_tcp_server(nursery, service_b)
    with trio.fail_after(TCP_GUARD):
        async with RpcClientPool(SECRET) as pool:
            client_a = pool.client(LOCALHOST, listener_a.port)
            assert pool.client(LOCALHOST, listener_a.port) is client_a
            assert pool.client(LOCALHOST, listener_b.port) is not client_a
            assert await pool.call(LOCALHOST, listener_a.port, "echo", "a") == ["a"]
            assert await pool.call(LOCALHOST, listener_b.port, "echo", "b") == ["b"]
            assert await client_a.call("echo", "again") == ["again"]
        with pytest.raises(RpcConnectionError, match="closed"):
            pool.client(LOCALHOST, listener_a.port)
    assert (listener_a.accepted, listener_b.accepted) == (1, 1)
    assert (service_a.calls, service_b.calls) == (2, 1)


async def test_client_without_a_nursery_says_how_to_get_one() -> None:
    client = RpcClient(LOCALHOST, 1, SECRET)
    with pytest.raises(RuntimeError, match="async with RpcClient"):
        await client.call("echo")


# --- Unauthenticated peers never reach a handler ----------------------------------------


async def test_client_with_the_wrong_secret_is_refused(nursery: trio.Nursery) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, listener.port, OTHER_SECRET) as impostor:
            with pytest.raises(RpcAuthenticationError, match="rejected") as refused:
                await impostor.call("echo", "sneaky")
            assert refused.value.unreachable  # not a peer of ours
        async with RpcClient(LOCALHOST, listener.port, SECRET) as member:
            assert service.calls == 0
            assert await member.call("echo", "ok") == ["ok"]
    assert service.calls == 1


async def test_server_with_the_wrong_secret_never_sees_a_request(nursery: trio.Nursery) -> None:
    impostor_service = Service()
    listener = await start_tcp_server(nursery, impostor_service, secret=OTHER_SECRET)
    with trio.fail_after(TCP_GUARD):
        async with RpcClient(LOCALHOST, listener.port, SECRET) as client:
            with pytest.raises(RpcAuthenticationError):
                await client.call("echo", "secret data")
    assert impostor_service.calls == 0


@pytest.mark.parametrize(
    "garbage",
    [
        msgpack.packb([0, 1, "echo", ["no handshake"]]),
        msgpack.packb([2, "note", ["no handshake"]]),
        b"GET / HTTP/1.1\r\nHost: kai\r\n\r\n",
        b"\x80\x01\x00\x00",
    ],
    ids=["request", "notification", "http", "binary"],
)
async def test_raw_socket_sending_garbage_is_disconnected(
    nursery: trio.Nursery, garbage: bytes
) -> None:
    service = Service()
    listener = await start_tcp_server(nursery, service)
    with trio.fail_after(TCP_GUARD):
        stream = await trio.open_tcp_stream(LOCALHOST, listener.port)
        async with stream:
            hello = msgpack.unpackb(await stream.receive_some())
            assert hello[0] == "kai-hello"
            await stream.send_all(garbage)
            assert await receive_until_closed(stream) == b""
    assert service.calls == 0


async def test_raw_socket_sending_nothing_is_disconnected_after_the_timeout(
    nursery: trio.Nursery,
) -> None:
    service = Service()
    (inner,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
    await nursery.start(
        partial(serve_rpc_listeners, [inner], SECRET, service.handlers(), handshake_timeout=0.05)
    )
    with trio.fail_after(TCP_GUARD):
        stream = await trio.open_tcp_stream(LOCALHOST, inner.socket.getsockname()[1])
        async with stream:
            hello = await receive_until_closed(stream)
    assert msgpack.unpackb(hello)[0] == "kai-hello"
    assert service.calls == 0


async def test_silent_peer_is_dropped_at_the_handshake_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    client_end, server_end = socket.socketpair()
    start = trio.current_time()
    await handle_rpc_connection(
        server_end, secret=SECRET, handlers=service.handlers(), handshake_timeout=5
    )
    assert trio.current_time() - start == 5
    with trio.socket.from_stdlib_socket(client_end) as client_side:
        assert msgpack.unpackb(await client_side.recv(4096))[0] == "kai-hello"
        assert await client_side.recv(4096) == b""
    assert service.calls == 0


async def test_client_gives_up_on_a_silent_server_at_its_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    silent_ends: list[socket.socket] = []

    async def open_silent_socket() -> socket.socket:
        client_side, server_side = socket.socketpair()
        silent_ends.append(server_side)
        return client_side

    start = trio.current_time()
    async with RpcClient("peer", 1, SECRET, open_socket=open_silent_socket, connect_timeout=3) as c:
        with pytest.raises(RpcConnectionError, match="within 3"):
            await c.call("echo")
    assert trio.current_time() - start == 3
    for end in silent_ends:
        end.close()


# --- Multiplexing, cancellation and loss, in virtual time over socket pairs -----------


async def test_calls_complete_out_of_order_on_one_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    completed: list[object] = []
    done: defaultdict[str, trio.Event] = defaultdict(trio.Event)

    async def call(client: RpcClient, name: str) -> None:
        completed.append(await client.call("gate", name))
        done[name].set()

    async with memory_client(service) as (client, network), trio.open_nursery() as callers:
        for name in ("first", "second", "third"):
            callers.start_soon(call, client, name)
        for name in ("first", "second", "third"):
            await service.started[name].wait()
        for name in ("third", "first", "second"):
            service.gates[name].set()
            await done[name].wait()
        assert completed == ["third", "first", "second"]
        assert network.connections == 1


async def test_cancelled_caller_does_not_disturb_others(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kai.rpc.client")
    service = Service()
    async with memory_client(service) as (client, network):
        other_done = trio.Event()
        other_result: list[object] = []

        async def other_caller() -> None:
            other_result.append(await client.call("gate", "other"))
            other_done.set()

        async with trio.open_nursery() as callers:
            callers.start_soon(other_caller)
            start = trio.current_time()
            with trio.move_on_after(1) as scope:
                await client.call("gate", "abandoned")
            assert scope.cancelled_caught
            assert trio.current_time() - start == 1
            assert await client.call("echo", "meanwhile") == ["meanwhile"]
            service.gates["abandoned"].set()
            service.gates["other"].set()
            await other_done.wait()
        assert other_result == ["other"]
        assert await client.call("echo", "after") == ["after"]
        assert network.connections == 1
        assert client.connected
    assert "its caller gave up" in caplog.text


async def test_lost_connection_fails_every_waiting_call_then_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    failures: list[RpcError] = []

    async def doomed_call(client: RpcClient, name: str) -> None:
        with pytest.raises(RpcConnectionError, match="lost") as lost:
            await client.call("gate", name)
        failures.append(lost.value)

    async with memory_client(service) as (client, network):
        async with trio.open_nursery() as callers:
            for name in ("a", "b"):
                callers.start_soon(doomed_call, client, name)
            for name in ("a", "b"):
                await service.started[name].wait()
            network.drop_all()
        assert len(failures) == 2
        assert all(failure.unreachable for failure in failures)
        assert not client.connected
        assert await client.call("echo", "back") == ["back"]
        assert network.connections == 2


async def test_aclose_fails_waiting_calls_and_later_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    async with memory_client(service) as (client, _network):

        async def close_when_started() -> None:
            await service.started["pending"].wait()
            await client.aclose()

        async with trio.open_nursery() as tasks:
            tasks.start_soon(close_when_started)
            with pytest.raises(RpcConnectionError, match="closed"):
                await client.call("gate", "pending")
        with pytest.raises(RpcConnectionError, match="closed"):
            await client.call("echo")


async def test_concurrent_first_calls_open_a_single_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    async with memory_client(service) as (client, network), trio.open_nursery() as callers:
        for index in range(20):
            callers.start_soon(client.call, "echo", index)
    assert network.connections == 1
    assert service.calls == 20


async def test_handlers_run_concurrently_up_to_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    limit = MAX_CONCURRENT_REQUESTS_PER_CONNECTION
    names = [str(index) for index in range(limit + 1)]
    async with memory_client(service) as (client, _network), trio.open_nursery() as callers:
        for name in names:
            callers.start_soon(client.call, "gate", name)
        await trio.testing.wait_all_tasks_blocked()
        # The server stopped reading at the limit: one request has not reached a handler.
        assert service.calls == limit
        waiting = [name for name in names if not service.started[name].is_set()]
        assert len(waiting) == 1
        service.gates[names[0] if waiting != names[:1] else names[1]].set()
        await service.started[waiting[0]].wait()
        assert service.calls == limit + 1
        for name in names:
            service.gates[name].set()


# --- Started calls: held until the connection is up or has room -------------------------


class Outcomes:
    """``on_done`` callbacks that record each call's outcome by name."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}
        self.errors: dict[str, RpcError] = {}
        self.changed = trio.Event()

    def on_done(self, name: str) -> Callable[[object, RpcError | None], None]:
        def record(result: object, error: RpcError | None) -> None:
            assert name not in self.results, "answered twice"
            assert name not in self.errors, "answered twice"
            if error is None:
                self.results[name] = result
            else:
                self.errors[name] = error
            self.changed.set()
            self.changed = trio.Event()

        return record

    async def wait_for(self, count: int) -> None:
        while len(self.results) + len(self.errors) < count:
            await self.changed.wait()


async def test_calls_started_before_the_connection_is_up_are_sent_once_it_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    outcomes = Outcomes()
    connect = trio.Event()
    async with trio.open_nursery() as nursery:
        network = PairNetwork(nursery, service)

        async def slow_connect() -> socket.socket:
            await connect.wait()
            return await network.open_socket()

        async with RpcClient("peer", 1, SECRET, open_socket=slow_connect) as client:
            for name in ("first", "dropped", "second"):
                cancel = client.start_call("echo", (name,), outcomes.on_done(name))
            client.start_call("echo", ("dropped",), outcomes.on_done("dropped"))()
            connected_before = client.connected
            await trio.sleep(1)
            assert outcomes.results == {}
            assert service.calls == 0
            connect.set()
            await outcomes.wait_for(3)
            assert outcomes.results == {
                "first": ["first"],
                "dropped": ["dropped"],
                "second": ["second"],
            }
            assert (connected_before, client.connected) == (False, True)
            cancel()  # too late: answered already, so nothing happens
        network.drop_all()
    assert service.calls == 3, "the call cancelled while held was never sent"
    assert network.connections == 1


async def test_a_failed_connect_fails_every_held_call_with_its_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    outcomes = Outcomes()
    async with trio.open_nursery() as nursery:
        network = PairNetwork(nursery, service, secret=OTHER_SECRET)
        async with RpcClient("peer", 1, SECRET, open_socket=network.open_socket) as client:
            for name in ("a", "b"):
                client.start_call("echo", (name,), outcomes.on_done(name))
            await outcomes.wait_for(2)
        network.drop_all()
    assert set(outcomes.errors) == {"a", "b"}
    assert all(isinstance(error, RpcAuthenticationError) for error in outcomes.errors.values())
    assert outcomes.errors["a"] is not outcomes.errors["b"], "each caller raises its own"
    assert service.calls == 0


async def test_closing_while_connecting_fails_held_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes = Outcomes()

    async def never_connect() -> socket.socket:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with RpcClient("peer", 1, SECRET, open_socket=never_connect) as client:
        client.start_call("echo", (), outcomes.on_done("held"))
        await trio.sleep(1)
        await client.aclose()
        assert isinstance(outcomes.errors["held"], RpcConnectionError)
        with pytest.raises(RpcConnectionError, match="closed"):
            client.start_call("echo", (), outcomes.on_done("late"))


async def test_calls_wait_their_turn_while_the_peer_does_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    outcomes = Outcomes()
    gates = [str(index) for index in range(MAX_CONCURRENT_REQUESTS_PER_CONNECTION + 1)]
    big = b"x" * (MAX_BACKLOG + 1024 * 1024)
    async with memory_client(service) as (client, _network):
        for name in gates:
            client.start_call("gate", (name,), outcomes.on_done(name))
        await trio.testing.wait_all_tasks_blocked()
        # Every handler slot is taken: the server holds the last gate and stops reading, so
        # the big request fills the socket and the client's send queue stays over the limit.
        assert service.calls == len(gates) - 1
        client.start_call("echo", (big,), outcomes.on_done("big"))
        await trio.testing.wait_all_tasks_blocked()
        for name in ("held", "dropped", "last"):
            cancel = client.start_call("echo", (name,), outcomes.on_done(name))
            if name == "dropped":
                cancel()
        await trio.sleep(1)
        assert service.calls == len(gates) - 1
        for name in gates:
            service.gates[name].set()
        await outcomes.wait_for(len(gates) + 3)
        assert outcomes.results["big"] == [big]
        assert (outcomes.results["held"], outcomes.results["last"]) == (["held"], ["last"])
        assert "dropped" not in outcomes.results
    assert service.calls == len(gates) + 3, "the call cancelled while held was never sent"
