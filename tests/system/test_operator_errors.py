"""Operator mistakes against real ``kai`` processes: one clear line each, never a traceback.

A node that would join a cluster without its secret refuses to start; a node holding another
cluster's secret and the seed it tries both log an ERROR naming the other side; a port in
use, a data directory that is a file and a secret file in a missing directory each stop
``kai`` with one ``kai: ...`` line naming the address or path and status 2; SIGHUP is logged
and ignored; ``--log-format json`` makes every line of the log a JSON object.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kai.core.errors import RpcError
from kai.rpc.client import RpcClient
from kai.testing.process import KaiProcess, free_port, memcache_version

from .conftest import RawConnection, wait_for

pytestmark = pytest.mark.system

#: Seconds a refusing ``kai`` may take to exit (it does so before opening anything).
EXIT_TIMEOUT = 20.0
#: Seconds to wait for a line to appear in a running node's log.
LOG_TIMEOUT = 8.0
#: Gossip every 200 ms, so a peer with the wrong secret is tried at once.
CONFIG = "membership_interval = 200\n"
TRACEBACK = "Traceback (most recent call last)"


def run_kai(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``kai`` to completion in ``tmp_path`` (it is expected to refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "kai", *args],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


def free_addresses() -> list[str]:
    """``--listen`` and ``--rpc`` on free loopback ports."""
    return ["--listen", f"127.0.0.1:{free_port()}", "--rpc", f"127.0.0.1:{free_port()}"]


def assert_one_line(result: subprocess.CompletedProcess[str], pattern: str) -> str:
    """Status 2 and exactly one line on stderr, matching ``pattern``; that line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    return lines[0]


def write_secret(path: Path, secret: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(secret)


async def call_with_wrong_secret(rpc_port: int) -> str:
    """Ping a node with a secret it does not share; the error's class name."""
    with trio.fail_after(LOG_TIMEOUT):
        async with RpcClient("127.0.0.1", rpc_port, os.urandom(32)) as rpc:
            try:
                await rpc.call("ping")
            except RpcError as error:
                return type(error).__name__
    return "succeeded"


@pytest.fixture
def listening_socket() -> Iterator[int]:
    """A port another process is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_node_given_seeds_without_the_secret_refuses_to_start(tmp_path: Path) -> None:
    seed = f"127.0.0.1:{free_port()}"
    result = run_kai(tmp_path, "--data-dir", "n5", *free_addresses(), "--seed", seed)
    assert_one_line(
        result,
        rf"kai: cluster secret file n5/cluster\.secret does not exist and this node joins the"
        rf" cluster of {seed}: copy that cluster's secret file .* to n5/cluster\.secret, .*",
    )
    assert not (tmp_path / "n5" / "cluster.secret").exists()


def test_a_node_with_another_secret_and_its_seed_both_log_an_error(tmp_path: Path) -> None:
    with KaiProcess(tmp_path / "seed", config=CONFIG) as seed:
        write_secret(tmp_path / "stranger" / "cluster.secret", os.urandom(32))
        seed_address = f"127.0.0.1:{seed.rpc_port}"
        with KaiProcess(
            tmp_path / "stranger", config=CONFIG, extra_args=["--seed", seed_address]
        ) as stranger:
            joining_error = re.compile(
                rf" ERROR kai\.membership\.detector: cannot authenticate to {seed_address}: "
                r"server rejected this node: authentication failed: the cluster secrets differ;"
                r" this node does not hold that cluster's secret"
            )
            seed_error = re.compile(
                r" ERROR kai\.rpc\.server: RPC peer 127\.0\.0\.1:\d+ failed authentication: "
                r"client proof is wrong: the cluster secrets differ"
            )
            wait_for(
                lambda: bool(joining_error.search(stranger.log_text())),
                timeout=LOG_TIMEOUT,
                what="the joining node's authentication error",
            )
            wait_for(
                lambda: bool(seed_error.search(seed.log_text())),
                timeout=LOG_TIMEOUT,
                what="the seed's authentication error",
            )
            # Rate-limited: one line per peer a minute, however often it retries. The seed
            # logs before it sends its rejection, so once these attempts are refused their
            # failures are counted.
            for _ in range(3):
                assert trio.run(call_with_wrong_secret, seed.rpc_port) == "RpcAuthenticationError"
            assert len(seed_error.findall(seed.log_text())) == 1
            assert len(joining_error.findall(stranger.log_text())) == 1
    assert TRACEBACK not in seed.log_text() + stranger.log_text()


@pytest.mark.parametrize("setting", ["listen", "rpc"])
def test_a_port_in_use_is_one_line_naming_the_address(
    tmp_path: Path, listening_socket: int, setting: str
) -> None:
    busy = f"127.0.0.1:{listening_socket}"
    other = "rpc" if setting == "listen" else "listen"
    result = run_kai(
        tmp_path,
        "--data-dir",
        "data",
        f"--{setting}",
        busy,
        f"--{other}",
        f"127.0.0.1:{free_port()}",
    )
    assert_one_line(
        result,
        rf"kai: cannot listen on {re.escape(busy)} \({setting}, --{setting}\): "
        r"Address already in use \(is another kai or memcached running there\?\)",
    )


def test_a_data_directory_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory\n")
    result = run_kai(tmp_path, "--data-dir", "data", *free_addresses())
    assert_one_line(
        result, r"kai: data directory data exists but is not a directory; set another .*"
    )


def test_a_secret_file_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "secret"
    result = run_kai(
        tmp_path, "--data-dir", "data", "--secret-file", str(missing), *free_addresses()
    )
    assert_one_line(
        result,
        rf"kai: cluster secret file {re.escape(str(missing))}: its directory "
        rf"{re.escape(str(missing.parent))} does not exist; create it or set another .*",
    )
    assert not missing.parent.exists()


def test_sighup_is_logged_once_and_the_node_keeps_serving(tmp_path: Path) -> None:
    with KaiProcess(tmp_path / "data") as node:
        node.signal(signal.SIGHUP)
        wait_for(
            lambda: "received SIGHUP" in node.log_text(), timeout=LOG_TIMEOUT, what="SIGHUP line"
        )
        assert memcache_version(node.host, node.port) is not None
        assert node.process is not None
        assert node.process.poll() is None
        status = node.stop()
    assert status == 0
    lines = [line for line in node.log_text().splitlines() if "SIGHUP" in line]
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING kai: received SIGHUP: ignored, still"
        r" serving \(nothing to reload: .*\)",
        lines[0],
    ), lines[0]


def test_json_log_format_makes_every_line_a_json_object(tmp_path: Path) -> None:
    with KaiProcess(tmp_path / "data", extra_args=["--log-format", "json"]) as node:
        with RawConnection(node.port) as connection:
            assert connection.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
            assert connection.request(b"flush_all\r\n") == b"OK\r\n"
        node.signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP" in node.log_text(), timeout=LOG_TIMEOUT, what="SIGHUP line")
        assert node.stop() == 0
    lines = node.log_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) > 3
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    messages = [entry["message"] for entry in entries]
    assert any(
        message.startswith("kai ") and "serving memcached" in message for message in messages
    )
    flushes = [message for message in messages if "flush_all" in message]
    assert flushes, messages
    assert re.fullmatch(
        r"cluster-wide flush_all at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", flushes[0]
    ), flushes[0]
