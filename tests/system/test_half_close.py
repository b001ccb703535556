"""Clients that send their requests and then shut down their write side, as ``nc -q1`` does.

Such a client must get every reply and then a close, however its last bytes and its end of
file arrive (together in one segment, or apart): a connection the server leaves open would
stay in CLOSE-WAIT, keep counting in ``curr_connections`` and, under ``--max-connections``,
lock every other client out. Real processes, real sockets; every wait has a deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from kai.testing.process import KaiProcess
from tests.system.conftest import (
    HOST,
    IO_TIMEOUT,
    RawConnection,
    Server,
    assert_serving,
    wait_for,
)

#: Half-closed connections per test; under the limit of five, five left open lock every client out.
ROUNDS = 200
MAX_CONNECTIONS = 5
PIPELINE = b"set greeting 0 0 5\r\nhello\r\nget greeting\r\nversion\r\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KaiProcess]:
    """A node that serves at most five clients at a time."""
    data_dir = tmp_path_factory.mktemp("half-close") / "data"
    with KaiProcess(data_dir, extra_args=["--max-connections", str(MAX_CONNECTIONS)]) as process:
        yield process


def curr_connections(port: int) -> int:
    """The node's own count of open client connections (this one included)."""
    with RawConnection(port) as connection:
        connection.send(b"stats\r\n")
        report = connection.read_until(b"END\r\n")
    for line in report.split(b"\r\n"):
        if line.startswith(b"STAT curr_connections "):
            return int(line.split()[2])
    raise AssertionError(f"no curr_connections in {report!r}")


def send_and_half_close(port: int, pipeline: bytes) -> bytes:
    """Send ``pipeline``, shut down the write side, and read until the server closes."""
    deadline = time.monotonic() + IO_TIMEOUT
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(pipeline)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no close in {IO_TIMEOUT}s after {bytes(received)!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no close in {IO_TIMEOUT}s after {bytes(received)!r}") from None
            if not chunk:
                return bytes(received)
            received += chunk


def test_a_half_closed_client_gets_its_replies_and_a_close_as_from_memcached(
    server: Server, unique_key: Callable[[], str]
) -> None:
    key = unique_key().encode()
    pipeline = b"set %s 0 0 5\r\nhello\r\nget %s\r\n" % (key, key)
    expected = b"STORED\r\nVALUE %s 0 5\r\nhello\r\nEND\r\n" % key
    for _ in range(20):
        assert send_and_half_close(server.port, pipeline) == expected


def test_half_closed_clients_get_their_replies_and_a_close(node: KaiProcess) -> None:
    baseline = curr_connections(node.port)
    version = send_and_half_close(node.port, b"version\r\n")
    assert version.startswith(b"VERSION ")
    expected = b"STORED\r\nVALUE greeting 0 5\r\nhello\r\nEND\r\n" + version
    for round_number in range(ROUNDS):
        assert send_and_half_close(node.port, PIPELINE) == expected, f"round {round_number}"
    wait_for(
        lambda: curr_connections(node.port) == baseline,
        timeout=IO_TIMEOUT,
        what=f"curr_connections back at {baseline}",
    )
    assert_serving(node.port)


def test_health_checks_that_half_close_never_use_up_the_connection_limit(
    node: KaiProcess,
) -> None:
    for _ in range(ROUNDS):
        assert send_and_half_close(node.port, b"version\r\n").startswith(b"VERSION ")
    with RawConnection(node.port) as connection:
        assert connection.request(b"version\r\n").startswith(b"VERSION ")
    assert_serving(node.port)
