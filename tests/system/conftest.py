"""Fixtures for the system tests: real server processes and real clients.

``server`` runs each conformance test twice, once against a real ``memcached -t 1`` and once
against a ``kai`` node, so every expectation is checked against what memcached really does.
``kai_server`` is for Kai-only tests. Both servers live for the whole session and are always
stopped; tests use unique keys (``unique_key``) so their order does not matter.

Missing binaries (memcached, the libmemcached tools) skip the tests that need them, unless
``KAI_REQUIRE_TOOLS=1`` is set (CI), in which case they fail.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import attrs
import pytest
from pymemcache.client.base import Client

from kai.testing.netns import NetnsLab, available
from kai.testing.process import KaiProcess, MemcachedProcess, ServerProcess

HOST = "127.0.0.1"
#: Longest value Kai stores under its default max_item_size.
KAI_MAX_VALUE = 1024 * 1024
#: Longest value memcached 1.6 (-I 1m) stores under a one-byte key (item header overhead).
MEMCACHED_MAX_VALUE_ONE_BYTE_KEY = 1_048_516
#: Seconds any single socket operation in a test may take.
IO_TIMEOUT = 10.0


def tools_required() -> bool:
    """Whether missing external binaries are a failure (CI) rather than a skip."""
    return os.environ.get("KAI_REQUIRE_TOOLS") == "1"


def require_binaries(*names: str) -> None:
    """Skip (or, with KAI_REQUIRE_TOOLS=1, fail) unless every binary in ``names`` is on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    reason = (
        f"required binaries not found on PATH: {', '.join(missing)} "
        "(Debian packages: memcached, libmemcached-tools)"
    )
    if tools_required():
        pytest.fail(f"{reason}; KAI_REQUIRE_TOOLS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@attrs.frozen
class Server:
    """A running server under test."""

    name: str
    host: str
    port: int
    process: ServerProcess
    #: The longest value the server stores under a one-byte key.
    max_value_one_byte_key: int

    @property
    def is_kai(self) -> bool:
        return self.name == "kai"


def make_client(port: int, *, host: str = HOST, **kwargs: object) -> Client:
    """A pymemcache client with no serde (raw bytes) that waits for every reply."""
    return Client(
        (host, port),
        connect_timeout=IO_TIMEOUT,
        timeout=IO_TIMEOUT,
        default_noreply=False,
        **kwargs,
    )


class RawConnection:
    """A blocking socket with helpers for byte-exact protocol checks; every read has a deadline."""

    def __init__(self, port: int, *, host: str = HOST, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no reply in {self.timeout}s; buffered {self.buffer[:200]!r}")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(256 * 1024)
        if not chunk:
            raise ConnectionError(f"connection closed; buffered {self.buffer[:200]!r}")
        self.buffer += chunk

    def read_exact(self, size: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while len(self.buffer) < size:
            self._fill(deadline)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_until(self, terminator: bytes) -> bytes:
        """Everything up to and including the first ``terminator``."""
        deadline = time.monotonic() + self.timeout
        while (end := self.buffer.find(terminator)) < 0:
            self._fill(deadline)
        end += len(terminator)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def read_line(self) -> bytes:
        return self.read_until(b"\r\n")

    def request(self, data: bytes, *, terminator: bytes = b"\r\n") -> bytes:
        """Send ``data`` and read the reply up to ``terminator``."""
        self.send(data)
        return self.read_until(terminator)

    def read_to_close(self) -> bytes:
        """Everything the server sends until it closes the connection (or raise on timeout)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._fill(deadline)
            except ConnectionError:  # the close, or a reset
                data, self.buffer = self.buffer, b""
                return data

    def assert_quiet(self, *, probe: bytes = b"version\r\n") -> bytes:
        """Prove nothing stray was sent: the next reply must be ``probe``'s (VERSION)."""
        line = self.request(probe)
        assert line.startswith(b"VERSION "), f"stray reply before VERSION: {line!r}"
        return line


def stats_of_server(port: int, *, host: str = HOST) -> dict[str, str]:
    """A server's general ``stats`` as name -> value (values may contain spaces)."""
    with RawConnection(port, host=host) as connection:
        reply = connection.request(b"stats\r\n", terminator=b"END\r\n")
    fields = {}
    for line in reply.decode().split("\r\n"):
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            fields[parts[1]] = parts[2]
    return fields


def assert_serving(port: int) -> None:
    """A well-behaved client still gets version, set and get answered."""
    key = f"alive-{uuid.uuid4().hex}"
    client = make_client(port)
    try:
        assert client.version().startswith(b"1."), "version reply"
        assert client.set(key, b"still-here", flags=7) is True
        assert client.get(key) == b"still-here"
    finally:
        client.close()


@pytest.fixture
def unique_key(request: pytest.FixtureRequest) -> Callable[[], str]:
    """A factory of keys that no other test (or earlier call) uses."""
    prefix = f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}".replace(" ", "_")
    prefix = "".join(char if char.isalnum() or char in "-_" else "_" for char in prefix)
    counter = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[Server]:
    """A real ``memcached -t 1`` for the whole session."""
    require_binaries("memcached")
    with MemcachedProcess(threads=1) as process:
        yield Server(
            "memcached",
            HOST,
            process.port,
            process,
            max_value_one_byte_key=MEMCACHED_MAX_VALUE_ONE_BYTE_KEY,
        )


@pytest.fixture(scope="session")
def kai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A single kai node on a fresh data directory for the whole session."""
    data_dir = tmp_path_factory.mktemp("kai-session") / "data"
    with KaiProcess(data_dir) as process:
        yield Server("kai", HOST, process.port, process, max_value_one_byte_key=KAI_MAX_VALUE)
        assert process.process is not None
        assert process.process.poll() is None, f"kai died during the session:\n{process.log_text()}"


@pytest.fixture(params=["memcached", "kai"])
def server(request: pytest.FixtureRequest) -> Server:
    """Parametrised: the test runs against real memcached and against kai."""
    found: Server = request.getfixturevalue(f"{request.param}_server")
    return found


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    """A raw-bytes pymemcache client of ``server``."""
    connection = make_client(server.port)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def raw(server: Server) -> Iterator[RawConnection]:
    """A raw socket to ``server`` for byte-exact checks."""
    with RawConnection(server.port) as connection:
        yield connection


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = ""
) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails the test after
    ``timeout`` seconds."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)  # poll interval of a deadline-bounded wait


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    """Three network namespaces on a bridge (tests/system/netns_cluster.py runs nodes in
    them); skipped with the reason where they cannot be made, failed under
    ``KAI_REQUIRE_TOOLS=1``."""
    possible, reason = available()
    if not possible:
        if tools_required():
            pytest.fail(f"{reason}; KAI_REQUIRE_TOOLS=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    with NetnsLab(3) as made:
        yield made
