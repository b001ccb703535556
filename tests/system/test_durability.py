"""Acknowledged writes survive ``kill -9``, clean shutdowns and restarts.

Writes go through pymemcache and count only once the node answered (STORED/DELETED). The node
is then killed with SIGKILL (or stopped with SIGTERM), a new process opens the same data
directory, and every acknowledged write must be there with the right value and flags, and
every acknowledged delete must stay deleted. A second node on a data directory already in use
must refuse to start and leave the first one serving.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from kai.testing.process import KaiProcess, free_port
from tests.system.conftest import HOST, assert_serving, make_client

pytestmark = pytest.mark.system

KEYS = 10_000
CHUNK = 500


class FlagsSerde:
    """Values stay raw bytes; reads return ``(value, flags)`` so flags can be checked."""

    def serialize(self, key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: bytes, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


def flags_client(port: int) -> Client:
    return make_client(port, serde=FlagsSerde())


def expected_records() -> dict[str, tuple[bytes, int]]:
    """Key -> (value, flags) for the durability workload, flags varying per chunk."""
    records = {}
    for index in range(KEYS):
        chunk = index // CHUNK
        value = b"value-%05d-" % index + bytes([index % 256]) * (index % 97)
        records[f"durable-{index:05d}"] = (value, (chunk * 2_654_435_761) % 2**32)
    return records


def write_acknowledged(port: int, records: dict[str, tuple[bytes, int]]) -> None:
    """Store ``records`` in chunks with one flags value each; every key must be STORED."""
    client = make_client(port)
    try:
        by_flags: dict[int, dict[str, bytes]] = {}
        for key, (value, flags) in records.items():
            by_flags.setdefault(flags, {})[key] = value
        for flags, values in by_flags.items():
            assert client.set_many(values, flags=flags) == [], f"unacknowledged (flags {flags})"
    finally:
        client.close()


def read_all(port: int, keys: list[str]) -> dict[str, tuple[bytes, int]]:
    client = flags_client(port)
    try:
        found: dict[str, tuple[bytes, int]] = {}
        for start in range(0, len(keys), 1000):
            found.update(client.get_many(keys[start : start + 1000]))
        return found
    finally:
        client.close()


def restart(process: KaiProcess) -> KaiProcess:
    """A new node process on the same data directory and ports."""
    return KaiProcess(process.data_dir, port=process.port, rpc_port=process.rpc_port)


@pytest.fixture
def kai(tmp_path: Path) -> Iterator[KaiProcess]:
    with KaiProcess(tmp_path / "data") as process:
        yield process


def test_acknowledged_writes_survive_kill_9(kai: KaiProcess) -> None:
    records = expected_records()
    write_acknowledged(kai.port, records)
    # Overwrites and deletes are acknowledged writes too.
    client = make_client(kai.port)
    try:
        for index in range(100):
            key = f"durable-{index:05d}"
            assert client.set(key, b"overwritten-%d" % index, flags=7) is True
            records[key] = (b"overwritten-%d" % index, 7)
        deleted = [f"durable-{index:05d}" for index in range(100, 200)]
        for key in deleted:
            assert client.delete(key) is True
            del records[key]
    finally:
        client.close()

    kai.kill()
    assert kai.process is not None
    assert kai.process.returncode == -signal.SIGKILL

    with restart(kai) as revived:
        found = read_all(revived.port, [f"durable-{index:05d}" for index in range(KEYS)])
        lost = sorted(set(records) - set(found))
        resurrected = sorted(set(deleted) & set(found))
        wrong = sorted(key for key in records if key in found and found[key] != records[key])
        assert (lost[:5], resurrected[:5], wrong[:5]) == ([], [], [])
        assert len(found) == KEYS - 100
        client = make_client(revived.port)
        try:
            assert int(client.stats()[b"curr_items"]) == KEYS - 100
        finally:
            client.close()
        assert_serving(revived.port)


def terminate(
    kai: KaiProcess, *, signum: int = signal.SIGTERM, timeout: float = 8.0
) -> tuple[int, float]:
    """Signal the node with an idle client connected; (exit code, seconds it took)."""
    idle = make_client(kai.port)  # an idle client must not hold the shutdown up
    try:
        assert idle.version().startswith(b"1.6")
        started = time.monotonic()
        kai.signal(signum)
        assert kai.process is not None
        try:
            exit_code = kai.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kai did not exit within {timeout} s of {signum}:\n{kai.log_text()}")
        return exit_code, time.monotonic() - started
    finally:
        idle.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_logs_the_shutdown(kai: KaiProcess, signum: int) -> None:
    exit_code, elapsed = terminate(kai, signum=signum)
    log = kai.log_text()
    assert elapsed < 8
    assert f"received {signal.Signals(signum).name}" in log, log
    assert "shutting down" in log, log
    assert "storage closed" in log, log
    assert "Traceback" not in log, log
    assert exit_code == 0, log


def test_data_survives_sigterm_and_restart(kai: KaiProcess) -> None:
    records = {f"term-{index}": (b"v%d" % index, index) for index in range(200)}
    write_acknowledged(kai.port, records)
    _, elapsed = terminate(kai)
    assert elapsed < 8
    log = kai.log_text()
    assert "shutting down" in log, log
    assert "storage closed" in log, log
    kai.stop()  # closes the log file; the process is already gone
    with restart(kai) as revived:
        assert read_all(revived.port, list(records)) == records


def test_second_node_on_the_same_data_directory_is_refused(kai: KaiProcess) -> None:
    client = make_client(kai.port)
    try:
        assert client.set("first-node", b"mine") is True
    finally:
        client.close()
    argv = [
        sys.executable,
        "-m",
        "kai",
        "--data-dir",
        str(kai.data_dir),
        "--listen",
        f"{HOST}:{free_port()}",
        "--rpc",
        f"{HOST}:{free_port()}",
    ]
    second = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = second.stdout + second.stderr
    assert second.returncode != 0, output
    assert str(kai.data_dir) in output, output
    assert "data directory" in output, output
    assert "Traceback" not in output, output
    # The first node never noticed.
    assert kai.process is not None
    assert kai.process.poll() is None
    client = make_client(kai.port)
    try:
        assert client.get("first-node") == b"mine"
    finally:
        client.close()
    assert_serving(kai.port)
