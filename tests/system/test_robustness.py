"""A running kai node survives bad clients and keeps serving good ones.

Each test abuses the node in one way (garbage bytes, the binary protocol, HTTP, over-long
lines, keys and values, a client vanishing mid-value, thousands of connections) and then
checks with a version/set/get round trip that a well-behaved client is still served.
"""

from __future__ import annotations

import random
import resource
import selectors
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kai.testing.process import KaiProcess
from tests.system.conftest import (
    HOST,
    RawConnection,
    assert_serving,
    make_client,
    wait_for,
)

pytestmark = pytest.mark.system

TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
#: Seconds a whole many-connection scenario may take.
SCENARIO_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def kai(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KaiProcess]:
    """A kai node with the default configuration, shared by this module's abuse tests."""
    with KaiProcess(tmp_path_factory.mktemp("kai-robust") / "data") as process:
        yield process
        assert process.process is not None
        assert process.process.poll() is None, f"kai died:\n{process.log_text()}"


def ensure_open_files(wanted: int) -> None:
    """Raise this process's open-file limit to ``wanted`` (skip if the hard limit forbids)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def stats(port: int) -> dict[str, str]:
    client = make_client(port)
    try:
        return {name.decode(): str(value) for name, value in client.stats().items()}
    finally:
        client.close()


# --- bad bytes ----------------------------------------------------------------------------------


def test_random_garbage(kai: KaiProcess) -> None:
    rng = random.Random(1234)
    for _ in range(20):
        garbage = rng.randbytes(rng.randrange(1, 8192))
        with RawConnection(kai.port, timeout=5) as raw:
            try:
                raw.send(garbage)
                raw.sock.shutdown(socket.SHUT_WR)
                raw.read_to_close()  # whatever the replies, the node must close or answer
            except ConnectionError:
                pass  # a reset is a fine answer to garbage; the node must just survive
        assert_serving(kai.port)


def test_random_garbage_lines(kai: KaiProcess) -> None:
    """Printable junk with newlines: every line gets an error reply, the connection stays."""
    rng = random.Random(99)
    alphabet = b"abcdefgxyz0123456789 -\t"
    with RawConnection(kai.port) as raw:
        for _ in range(50):
            line = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 100))).strip()
            if not line or line.split()[0] in {b"get", b"gets", b"quit"}:
                continue
            reply = raw.request(b"zz" + line + b"\r\n")
            assert reply.startswith((b"ERROR", b"CLIENT_ERROR")), (line, reply)
        raw.assert_quiet()
    assert_serving(kai.port)


def test_binary_protocol_is_refused(kai: KaiProcess) -> None:
    # A binary-protocol GET request header (magic 0x80, opcode 0x00, key length 1) plus key.
    packet = bytes([0x80, 0x00, 0x00, 0x01]) + bytes(4) + (1).to_bytes(4, "big") + bytes(12) + b"k"
    with RawConnection(kai.port) as raw:
        raw.send(packet)
        reply = raw.read_to_close()
    assert reply.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")), reply
    assert reply.endswith(b"\r\n")
    assert reply.count(b"\r\n") == 1
    assert_serving(kai.port)


def test_http_request_is_refused(kai: KaiProcess) -> None:
    with RawConnection(kai.port) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
        reply = raw.read_to_close()
    assert reply == b"", reply  # closed without a byte, as memcached does
    assert_serving(kai.port)


def test_over_long_line_without_newline_is_closed(kai: KaiProcess) -> None:
    with RawConnection(kai.port) as raw:
        raw.send(b"set " + b"x" * 3000)
        reply = raw.read_to_close()  # raises unless the node closes the connection
    # memcached closes silently; an explanatory error line before the close is fine too.
    assert reply == b"" or (reply.startswith(b"CLIENT_ERROR ") and reply.count(b"\r\n") == 1)
    assert_serving(kai.port)


def test_long_get_line_is_allowed(kai: KaiProcess) -> None:
    """The 2048-byte line limit does not apply to multi-gets."""
    client = make_client(kai.port)
    keys = [f"long-get-{uuid.uuid4().hex}" for _ in range(400)]
    try:
        assert client.set(keys[-1], b"last") is True
    finally:
        client.close()
    line = b"get " + b" ".join(key.encode() for key in keys)
    assert len(line) > 10_000
    with RawConnection(kai.port) as raw:
        raw.send(line[:5000])  # well past 2048 bytes with no newline yet
        raw.send(line[5000:] + b"\r\n")
        reply = raw.read_until(b"END\r\n")
    assert reply == b"VALUE %s 0 4\r\nlast\r\nEND\r\n" % keys[-1].encode()


def test_over_long_key(kai: KaiProcess) -> None:
    key = b"k" * 251
    with RawConnection(kai.port) as raw:
        assert raw.request(b"get %s\r\n" % key) == b"CLIENT_ERROR bad command line format\r\n"
        assert raw.request(b"set %s 0 0 1\r\nx\r\n" % key).startswith(b"CLIENT_ERROR ")
        assert raw.read_line() == b"ERROR\r\n"  # the data line, not swallowed, as memcached
        assert raw.request(b"delete %s\r\n" % key).startswith(b"CLIENT_ERROR ")
        raw.assert_quiet()
    assert_serving(kai.port)


def test_over_long_value(kai: KaiProcess) -> None:
    key = f"too-big-{uuid.uuid4().hex}".encode()
    size = 2 * 1024 * 1024
    with RawConnection(kai.port) as raw:
        reply = raw.request(b"set %s 0 0 %d\r\n%s\r\nget %s\r\n" % (key, size, b"v" * size, key))
        assert reply == b"SERVER_ERROR object too large for cache\r\n"
        assert raw.read_line() == b"END\r\n"  # the data was swallowed, the get answered
        assert raw.request(b"set %s 0 0 2\r\nok\r\n" % key) == b"STORED\r\n"
    assert_serving(kai.port)


def test_client_disconnects_mid_value(kai: KaiProcess) -> None:
    key = f"half-{uuid.uuid4().hex}"
    for cut in (0, 1, 500, 999, 1000, 1001):
        with socket.create_connection((HOST, kai.port), timeout=5) as sock:
            sock.sendall(b"set %s 0 0 1000\r\n%s" % (key.encode(), b"h" * cut))
        assert_serving(kai.port)
    client = make_client(kai.port)
    try:
        assert client.get(key) is None  # nothing half-written was stored
    finally:
        client.close()


def test_client_resets_mid_value(kai: KaiProcess) -> None:
    key = f"reset-{uuid.uuid4().hex}"
    sock = socket.create_connection((HOST, kai.port), timeout=5)
    sock.sendall(b"set %s 0 0 100000\r\n%s" % (key.encode(), b"r" * 50_000))
    # SO_LINGER with a zero timeout: close() sends a RST instead of a FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert_serving(kai.port)
    client = make_client(kai.port)
    try:
        assert client.get(key) is None
    finally:
        client.close()


# --- many connections ---------------------------------------------------------------------------


@attrs.define(eq=False)
class _Peer:
    sock: socket.socket
    request: bytes
    sent: int = 0
    received: bytes = b""
    closed: bool = False
    done: bool = False


def _open_nonblocking(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect_ex((HOST, port))  # EINPROGRESS: completion shows up as writability
    return sock


def _pump(peers: list[_Peer], *, until_done: int, timeout: float) -> None:
    """Send each peer's request and read replies until ``until_done`` peers are done.

    A peer is done when its reply ends with ``END\\r\\n`` or the server closed it.
    """
    selector = selectors.DefaultSelector()
    try:
        for peer in peers:
            if not peer.done:
                events = selectors.EVENT_READ
                if peer.sent < len(peer.request):
                    events |= selectors.EVENT_WRITE
                selector.register(peer.sock, events, peer)
        finished = sum(peer.done for peer in peers)
        deadline = time.monotonic() + timeout
        while finished < until_done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stuck = [peer for peer in peers if not peer.done][:3]
                pytest.fail(
                    f"only {finished} of {until_done} connections finished in {timeout}s; "
                    f"e.g. {[(peer.sent, peer.received[:80]) for peer in stuck]}"
                )
            for key, mask in selector.select(timeout=min(remaining, 1.0)):
                peer = key.data
                if mask & selectors.EVENT_WRITE:
                    try:
                        peer.sent += peer.sock.send(peer.request[peer.sent :])
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        peer.sent = len(peer.request)  # refused or reset: the read shows it
                    if peer.sent >= len(peer.request):
                        selector.modify(peer.sock, selectors.EVENT_READ, peer)
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = peer.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    if chunk:
                        peer.received += chunk
                        peer.done = peer.received.endswith(b"END\r\n")
                    else:
                        peer.closed = peer.done = True
                    if peer.done:
                        selector.unregister(peer.sock)
                        finished += 1
    finally:
        selector.close()


def test_2000_concurrent_clients(tmp_path: Path) -> None:
    ensure_open_files(2000 + 256)
    with KaiProcess(tmp_path / "data", config="max_connections = 2100\n") as kai:
        peers: list[_Peer] = []
        try:
            for index in range(2000):
                key = b"conn-%d" % index
                value = b"value-%d" % index
                request = b"set %s %d 0 %d\r\n%s\r\nget %s\r\n" % (
                    key,
                    index,
                    len(value),
                    value,
                    key,
                )
                peers.append(_Peer(_open_nonblocking(kai.port), request))
            _pump(peers, until_done=len(peers), timeout=SCENARIO_TIMEOUT)
            failures = []
            for index, peer in enumerate(peers):
                value = b"value-%d" % index
                expected = b"STORED\r\nVALUE conn-%d %d %d\r\n%s\r\nEND\r\n" % (
                    index,
                    index,
                    len(value),
                    value,
                )
                if peer.received != expected:
                    failures.append((index, peer.received[:100]))
            assert failures == [], f"{len(failures)} of 2000 clients failed, e.g. {failures[:5]}"
            during = stats(kai.port)
            assert int(during["curr_connections"]) >= 2000
            assert int(during["rejected_connections"]) == 0
        finally:
            for peer in peers:
                peer.sock.close()
        assert_serving(kai.port)


def test_connection_limit_rejects_extra_clients(tmp_path: Path) -> None:
    ensure_open_files(1100 + 256)
    with KaiProcess(tmp_path / "data") as kai:
        earlier = make_client(kai.port)
        sockets: list[socket.socket] = []
        try:
            assert earlier.set("earlier", b"first") is True
            # Only the earlier client is connected (the start-up probe has gone away).
            wait_for(
                lambda: int(earlier.stats()[b"curr_connections"]) == 1,
                timeout=10,
                what="the start-up probe connection to close",
            )
            baseline = int(earlier.stats()[b"total_connections"])
            for _ in range(1100):
                sockets.append(socket.create_connection((HOST, kai.port), timeout=10))
            # Wait until the node has handled every one of the 1,100 connections.
            wait_for(
                lambda: int(earlier.stats()[b"total_connections"]) >= baseline + 1100,
                timeout=SCENARIO_TIMEOUT,
                what="1,100 connections to be accepted or rejected",
            )
            counters = earlier.stats()
            accepted = int(counters[b"curr_connections"]) - 1
            rejected = int(counters[b"rejected_connections"])
            assert (accepted, rejected) == (1023, 77)
            # The rejected ones were told so and closed; read without sending anything.
            peers = [_Peer(sock, b"", done=False) for sock in sockets]
            for sock in sockets:
                sock.setblocking(False)
            _pump(peers, until_done=rejected, timeout=SCENARIO_TIMEOUT)
            refused = [peer for peer in peers if peer.done]
            assert len(refused) == rejected
            assert all(peer.closed for peer in refused)
            assert {peer.received for peer in refused} == {TOO_MANY_CONNECTIONS}
            # Every accepted connection is still served.
            for peer in peers:
                if not peer.done:
                    peer.request = b"get earlier\r\n"
            _pump(peers, until_done=len(peers), timeout=SCENARIO_TIMEOUT)
            served = [peer for peer in peers if peer not in refused]
            assert len(served) == 1023
            assert {peer.received for peer in served} == {b"VALUE earlier 0 5\r\nfirst\r\nEND\r\n"}
            # The client connected before the flood keeps working throughout.
            assert earlier.get("earlier") == b"first"
            assert earlier.set("earlier", b"still") is True
            assert int(earlier.stats()[b"rejected_connections"]) > 0
        finally:
            for sock in sockets:
                sock.close()
            earlier.close()
        # Once the flood is gone there is room again.
        probe = make_client(kai.port)
        try:
            wait_for(
                lambda: int(probe.stats()[b"curr_connections"]) <= 2,
                timeout=SCENARIO_TIMEOUT,
                what="the node to notice the closed connections",
            )
        finally:
            probe.close()
        assert_serving(kai.port)
