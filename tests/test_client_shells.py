"""kai.client's two shells (blocking ``Client``, trio ``AsyncClient``) over real loopback
sockets, against fake nodes: the in-memory cluster of test_client_calls served over TCP.

What only a shell can get wrong is checked here: connections are pooled and reused, a
connection that saw a timeout is never reused, an idle connection the node closed is noticed
before a request is sent on it, a refused connection fails over, every socket is closed.
Every wait has a deadline; the only delays are the client timeouts under test.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import trio

from kai.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    Context,
    KaiError,
    Sibling,
    Timeout,
)
from kai.client.records import Address
from kai.core.memcache.protocol import CLOSED, NEED_DATA, MemcacheParser
from kai.core.ring import NodeId, Ring

from .test_client_calls import FakeCluster

#: Short, so the timeout tests are quick; long enough for a loaded machine's loopback.
SHORT_TIMEOUT = 0.3
WAIT = 10.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # poll interval of a deadline-bounded wait


class FakeNodeServer:
    """One fake node on a loopback port: a thread per connection answers from ``cluster``."""

    def __init__(self, cluster: FakeCluster, lock: threading.Lock) -> None:
        self.cluster = cluster
        self.lock = lock
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = Address("127.0.0.1", self.listener.getsockname()[1])
        self.accepted = 0
        self.requests: list[bytes] = []
        #: While set, requests are read and never answered.
        self.silent = threading.Event()
        self.connections: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            with self.lock:
                self.accepted += 1
                self.connections.append(connection)
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        parser = MemcacheParser()
        with contextlib.suppress(OSError):
            while data := connection.recv(65536):
                parser.receive_data(data)
                while (event := parser.next_event()) is not NEED_DATA and event is not CLOSED:
                    with self.lock:
                        self.requests.append(type(event).__name__.encode())
                        reply = self.cluster.answer_event(event)
                    if not self.silent.is_set():
                        connection.sendall(reply)
        connection.close()

    def close_connections(self) -> None:
        """Close every connection, as a node that restarts does."""
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def stop(self) -> None:
        """Stop listening (connections are refused from now on) and close every connection."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        self.close_connections()


@pytest.fixture
def servers() -> Iterator[list[FakeNodeServer]]:
    cluster = FakeCluster()
    lock = threading.Lock()
    started = [FakeNodeServer(cluster, lock) for _ in range(3)]
    cluster.members = {
        server.address: NodeId("127.0.0.1", 7001 + index) for index, server in enumerate(started)
    }
    try:
        yield started
    finally:
        for server in started:
            server.stop()
        for server in started:
            for thread in server.threads:
                thread.join(timeout=WAIT)


def seeds(servers: Sequence[FakeNodeServer]) -> list[str]:
    return [str(server.address) for server in servers]


def first_primary(servers: Sequence[FakeNodeServer], key: bytes) -> FakeNodeServer:
    members = servers[0].cluster.members
    ring = Ring(members.values(), buckets=64, virtual_nodes=16)
    node = ring.primaries_of(key, 3)[0]
    return next(server for server in servers if members[server.address] == node)


def union(siblings: Sequence[Sibling]) -> bytes:
    items: set[bytes] = set()
    for sibling in siblings:
        items |= set(sibling.value.split(b","))
    return b",".join(sorted(items - {b""}))


def adding(item: bytes) -> Callable[[bytes | None], bytes]:
    return lambda current: union([Sibling(current or b""), Sibling(item)])


# --- the blocking client ----------------------------------------------------------------------


def test_round_trips_go_to_the_keys_first_primary_over_one_pooled_connection(
    servers: list[FakeNodeServer],
) -> None:
    with Client(seeds(servers[:1])) as client:
        key = b"cart:7"
        primary = first_primary(servers, key)
        fetched = client.get(key)
        assert fetched.siblings == ()
        context = client.put(key, b"a", context=fetched.context, flags=9)
        assert isinstance(context, Context)
        assert client.get(key).siblings == (Sibling(b"a", 9, None),)
        assert client.update(key, adding(b"b"), merge=union) == b"a,b"
        client.delete(key, context=client.get(key).context)
        assert client.get(key).siblings == ()
        assert primary.requests.count(b"MetaSet") == 2
        assert primary.requests.count(b"MetaDelete") == 1
        assert primary.accepted == 1  # one connection for all (and the ring read, if the seed)


def test_a_connection_that_timed_out_is_never_reused(servers: list[FakeNodeServer]) -> None:
    key = b"slow"
    primary = first_primary(servers, key)
    with Client(seeds(servers), timeout=SHORT_TIMEOUT) as client:
        client.get(key)
        assert primary.accepted == 1
        primary.silent.set()
        started = time.monotonic()
        with pytest.raises(Timeout) as raised:
            client.put(key, b"v")
        assert SHORT_TIMEOUT * 0.9 <= time.monotonic() - started < SHORT_TIMEOUT + 2
        assert raised.value.outcome_unknown
        assert not raised.value.retryable
        primary.silent.clear()
        client.get(key)  # goes to another node: the primary is marked failed
        client.router.node_answered(primary.address)
        client.get(key)
        assert primary.accepted == 2  # a new connection: the one that timed out was closed


def test_an_idle_connection_the_node_closed_is_noticed_before_sending(
    servers: list[FakeNodeServer],
) -> None:
    key = b"restarted"
    primary = first_primary(servers, key)
    with Client(seeds(servers)) as client:
        client.get(key)
        primary.close_connections()
        wait_until(lambda: primary.accepted == 1 and not primary.connections, "the close")
        (pooled,) = client._pool._idle[primary.address]  # the socket under test
        wait_until(lambda: _readable(pooled.sock), "the client's socket to see the close")
        client.put(key, b"v")  # would be ConnectionLost if sent on the closed connection
        assert primary.accepted == 2
        assert primary.requests[-1] == b"MetaSet"


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_node_that_refuses_connections_is_failed_over(servers: list[FakeNodeServer]) -> None:
    key = b"moved"
    primary = first_primary(servers, key)
    with Client(seeds(servers)) as client:
        client.put(key, b"v")
        primary.stop()
        assert client.get(key).values == (b"v",)
        client.put(key, b"w", context=client.get(key).context)
        assert client.router.is_failed(primary.address, time.monotonic())
    others = [server for server in servers if server is not primary]
    assert sum(server.requests.count(b"MetaSet") for server in others) == 1


def test_when_no_node_can_be_reached_the_error_is_retryable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with Client([f"127.0.0.1:{port}"]) as client, pytest.raises(ConnectionFailed) as raised:
        client.put("k", b"v")
    assert raised.value.retryable
    assert "nothing was sent" in str(raised.value)


def test_threads_share_one_client(servers: list[FakeNodeServer]) -> None:
    errors: list[KaiError] = []
    with Client(seeds(servers), pool_size=2) as client:

        def add(thread: int) -> None:
            try:
                for index in range(20):
                    client.update(b"shared", adding(b"%d-%d" % (thread, index)), merge=union)
            except KaiError as exc:  # reported by the test thread
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(thread,)) for thread in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT * 3)
        assert not errors
        merged = union(client.get(b"shared").siblings)
    assert set(merged.split(b",")) == {b"%d-%d" % (t, i) for t in range(4) for i in range(20)}
    assert sum(server.accepted for server in servers) <= 4 * 3 + 1


def test_a_closed_client_closes_its_sockets_and_refuses_calls(
    servers: list[FakeNodeServer],
) -> None:
    client = Client(seeds(servers))
    client.get("k")
    client.close()
    wait_until(lambda: all(not t.is_alive() for s in servers for t in s.threads[1:]), "EOF")
    with pytest.raises(RuntimeError, match="closed"):
        client.get("k")


def test_nodes_must_be_a_list_of_addresses() -> None:
    with pytest.raises(TypeError, match="not one string"):
        Client("127.0.0.1:11211")
    with pytest.raises(ValueError, match="host:port"):
        Client(["127.0.0.1"])
    with pytest.raises(ValueError, match="timeout"):
        Client(["127.0.0.1:1"], timeout=0)


# --- the trio client --------------------------------------------------------------------------


async def test_async_round_trips_over_one_pooled_stream(servers: list[FakeNodeServer]) -> None:
    key = b"cart:8"
    primary = first_primary(servers, key)
    async with AsyncClient(seeds(servers)) as client:
        fetched = await client.get(key)
        await client.put(key, b"a", context=fetched.context)
        await client.put(key, b"b", context=fetched.context)  # a sibling of a
        assert {s.value for s in (await client.get(key)).siblings} == {b"a", b"b"}
        assert await client.update(key, adding(b"c"), merge=union) == b"a,b,c"
        assert (await client.get(key)).values == (b"a,b,c",)
        await client.delete(key, context=(await client.get(key)).context)
        assert (await client.get(key)).siblings == ()
    assert primary.accepted == 1


async def test_async_timeout_discards_the_stream_and_fails_over_reads(
    servers: list[FakeNodeServer],
) -> None:
    key = b"slow"
    primary = first_primary(servers, key)
    async with AsyncClient(seeds(servers), timeout=SHORT_TIMEOUT) as client:
        await client.get(key)
        primary.silent.set()
        started = trio.current_time()
        with pytest.raises(Timeout):
            await client.put(key, b"v")
        assert trio.current_time() - started >= SHORT_TIMEOUT * 0.9
        primary.silent.clear()
        await client.get(key)  # another node: the primary is marked failed
        client.router.node_answered(primary.address)
        await client.get(key)
    assert primary.accepted == 2


async def test_async_idle_stream_closed_by_the_node_is_noticed(
    servers: list[FakeNodeServer],
) -> None:
    key = b"restarted"
    primary = first_primary(servers, key)
    async with AsyncClient(seeds(servers)) as client:
        await client.get(key)
        primary.close_connections()
        (pooled,) = client._pool._idle[primary.address]  # the stream under test
        with trio.fail_after(WAIT):
            await trio.lowlevel.wait_readable(pooled.stream.socket)
        await client.put(key, b"v")
    assert primary.accepted == 2


async def test_async_refused_node_is_failed_over(servers: list[FakeNodeServer]) -> None:
    key = b"moved"
    primary = first_primary(servers, key)
    async with AsyncClient(seeds(servers)) as client:
        await client.put(key, b"v")
        primary.stop()
        assert (await client.get(key)).values == (b"v",)
    with pytest.raises(RuntimeError, match="closed"):
        await client.get(key)
