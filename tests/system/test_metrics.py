"""``kai --metrics``: real nodes scraped over HTTP, read with prometheus_client's parser.

The figures follow the memcached commands a client sends, a peer that stops shows as down,
other paths are 404, a slow client holds up neither scrapes nor memcached, and a metrics
port in use stops ``kai`` with the same one line as its other listeners.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kai.testing.process import KaiProcess, free_port

from .conftest import IO_TIMEOUT, assert_serving, make_client, wait_for

pytestmark = pytest.mark.system

#: Gossip often and give up on a stopped peer soon, so its state changes quickly.
CONFIG = 'membership_interval = 200\nrequest_timeout = 1000\nquorum = "2,1,1"\n'


def scrape(port: int, path: str = "/metrics") -> dict[str, list[Sample]]:
    """Every sample the node exports, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=IO_TIMEOUT) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=")
        text = reply.read().decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str) -> float:
    [sample] = samples[name]
    return sample.value


def peer_states(port: int) -> dict[str, float]:
    return {sample.labels["peer"]: sample.value for sample in scrape(port)["kai_peer_up"]}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KaiProcess, int]]:
    """One node with its metrics on a free port: (process, metrics port)."""
    metrics_port = free_port()
    base = tmp_path_factory.mktemp("metrics")
    process = KaiProcess(
        base / "n1", config=CONFIG, extra_args=["--metrics", f"127.0.0.1:{metrics_port}"]
    )
    process.start()
    try:
        yield process, metrics_port
    finally:
        # The metrics listener closes with the others: a clean shutdown.
        assert process.stop() == 0, process.log_text()


def test_the_stats_follow_the_commands(node: tuple[KaiProcess, int]) -> None:
    process, metrics_port = node
    before = scrape(metrics_port)
    client = make_client(process.port)
    try:
        assert client.set("metrics-key", b"value") is True
        assert client.get("metrics-key") == b"value"
        assert client.get("metrics-missing") is None
        during = scrape(metrics_port)
    finally:
        client.close()
    for name, grown in (
        ("kai_cmd_get_total", 2),
        ("kai_get_hits_total", 1),
        ("kai_get_misses_total", 1),
        ("kai_cmd_set_total", 1),
        ("kai_get_latency_seconds_count", 2),
        ("kai_set_latency_seconds_count", 1),
    ):
        assert value(during, name) - value(before, name) == grown, name
    assert value(during, "kai_curr_connections") >= 1  # the client above is connected
    assert value(during, "kai_curr_items") >= 1
    assert value(during, "kai_quorum_failures_total") == 0
    [info] = during["kai_info"]
    assert info.labels["node"] == f"127.0.0.1:{process.rpc_port}"
    assert info.labels["version"].startswith("1.6.21-kai-")
    assert "process_resident_memory_bytes" in during
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in process.log_text()


def test_other_paths_are_not_found(node: tuple[KaiProcess, int]) -> None:
    process, metrics_port = node
    with pytest.raises(urllib.error.HTTPError) as raised:
        scrape(metrics_port, "/other")
    assert raised.value.code == 404
    raised.value.close()
    assert_serving(process.port)


def test_a_slow_client_holds_up_neither_scrapes_nor_memcached(
    node: tuple[KaiProcess, int],
) -> None:
    process, metrics_port = node
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=IO_TIMEOUT) as slow:
        slow.sendall(b"GET /metr")  # and nothing more, for now
        assert "kai_cmd_get_total" in scrape(metrics_port)
        assert_serving(process.port)
        slow.sendall(b"ics HTTP/1.1\r\n\r\n")
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_stopped_peer_is_down(tmp_path: Path) -> None:
    metrics_port = free_port()
    with KaiProcess(
        tmp_path / "n1", config=CONFIG, extra_args=["--metrics", str(metrics_port)]
    ) as first:
        secret_path = tmp_path / "n2" / "cluster.secret"
        secret_path.parent.mkdir()
        secret_path.write_bytes((first.data_dir / "cluster.secret").read_bytes())
        secret_path.chmod(0o600)
        second = KaiProcess(
            tmp_path / "n2", config=CONFIG, extra_args=["--seed", f"127.0.0.1:{first.rpc_port}"]
        )
        peer = f"127.0.0.1:{second.rpc_port}"
        with second:
            wait_for(
                lambda: peer_states(metrics_port) == {peer: 1},
                timeout=30,
                what="the second node to be a peer that is up",
            )
        # Stopped: the next gossip round or replica call cannot reach it.
        wait_for(
            lambda: peer_states(metrics_port) == {peer: 0},
            timeout=30,
            what="the stopped peer to be down",
        )
        samples = scrape(metrics_port)
        assert value(samples, "kai_down_nodes_count") == 1
        assert value(samples, "kai_peer_transitions_total") >= 1
        assert_serving(first.port)


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kai",
                "--data-dir",
                str(tmp_path / "n1"),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--rpc",
                f"127.0.0.1:{free_port()}",
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"kai: cannot listen on 127.0.0.1:{port} (metrics, --metrics): Address already in use"
        " (is another kai or memcached running there?)"
    ]
