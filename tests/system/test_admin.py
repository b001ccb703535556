"""kai-admin against real nodes: status, stats, members, ring, locate, a wrong secret, the
exit statuses scripts depend on, and the one-line errors an operator reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kai import __version__
from kai.core.errors import RpcBadRequest
from kai.rpc.client import RpcClient
from kai.testing.process import KaiProcess, free_port

from .conftest import Server, make_client, wait_for

pytestmark = pytest.mark.system


def run_admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kai.admin", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def admin_of(node: KaiProcess, *args: str) -> subprocess.CompletedProcess[str]:
    secret = node.data_dir / "cluster.secret"
    return run_admin("--node", f"127.0.0.1:{node.rpc_port}", "--secret-file", str(secret), *args)


def admin(
    server: Server, *args: str, secret: Path | None = None
) -> subprocess.CompletedProcess[str]:
    process = server.process
    assert isinstance(process, KaiProcess)
    secret_file = secret if secret is not None else process.data_dir / "cluster.secret"
    return run_admin(
        "--node", f"127.0.0.1:{process.rpc_port}", "--secret-file", str(secret_file), *args
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``kai-admin: ...`` line a failed command printed, with no Python repr."""
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("kai-admin: "), line
    assert "['" not in line, line
    assert "Traceback" not in line, line
    return line


def test_status_and_json_stats(kai_server: Server) -> None:
    status = admin(kai_server, "--json", "status")
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert isinstance(kai_server.process, KaiProcess)
    assert parsed["node"] == f"127.0.0.1:{kai_server.process.rpc_port}"
    assert parsed["effective_quorum"] == "1,1,1"
    assert parsed["phase"] == "settled"
    assert parsed["copies_pending"] == parsed["staged_changes"] == 0
    stats = json.loads(admin(kai_server, "--json", "stats").stdout)
    assert stats["pid"] == kai_server.process.pid
    assert stats["kai_store"] == "leveldb"
    text = admin(kai_server, "status")
    assert text.returncode == 0
    assert "actor " in text.stdout


def test_members_and_ring(kai_server: Server) -> None:
    members = json.loads(admin(kai_server, "--json", "members").stdout)
    assert [member["status"] for member in members] == ["valid"]
    ring = json.loads(admin(kai_server, "--json", "ring").stdout)
    assert ring["buckets"] == 1024
    assert sum(ring["partitions_per_node"].values()) == 1024


def test_locate_shows_the_clock_of_a_written_key(kai_server: Server) -> None:
    client = make_client(kai_server.port)
    try:
        client.set(b"locate-me", b"value")
        client.set(b"locate-me", b"value2")
    finally:
        client.close()
    located = json.loads(admin(kai_server, "--json", "locate", "locate-me").stdout)
    (replica,) = located["replicas"]
    assert replica["holds"] is True
    (version,) = replica["versions"]
    assert version["dot"][1] == 2  # the second write of this actor
    assert list(version["context"].values()) == [1]  # it superseded the first
    assert version["bytes"] == 6
    missing = json.loads(admin(kai_server, "--json", "locate", "never-written").stdout)
    assert missing["replicas"][0]["holds"] is False


def test_wrong_secret_is_refused(kai_server: Server, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    result = admin(kai_server, "status", secret=wrong)
    assert result.returncode == 3
    line = one_error_line(result)
    assert line.startswith("kai-admin: authentication failed: ")
    assert str(wrong) in line  # which secret file to replace


def test_json_is_accepted_before_or_after_the_subcommand(kai_server: Server) -> None:
    before = admin(kai_server, "--json", "ring")
    after = admin(kai_server, "ring", "--json")
    assert before.returncode == after.returncode == 0, after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    status = admin(kai_server, "status", "--json")
    assert json.loads(status.stdout)["version"] == __version__


def test_version_is_printed() -> None:
    result = run_admin("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kai-admin {__version__}"


def test_exit_statuses(kai_server: Server, tmp_path: Path) -> None:
    assert admin(kai_server, "status").returncode == 0
    # 2: the command line is wrong (argparse's own usage errors included).
    assert run_admin().returncode == 2
    assert run_admin("frobnicate").returncode == 2
    bad_node = run_admin("--node", "no-port", "status")
    assert bad_node.returncode == 2
    assert "--node" in one_error_line(bad_node)
    # 3: nothing listens there, or we have no secret to authenticate with.
    closed = free_port()
    secret = str(tmp_path / "absent.secret")
    unreachable = run_admin("--node", f"127.0.0.1:{closed}", "--secret-file", secret, "status")
    assert unreachable.returncode == 3
    no_secret = admin(kai_server, "status", secret=tmp_path / "absent.secret")
    assert no_secret.returncode == 3
    assert secret in one_error_line(no_secret)
    process = kai_server.process
    assert isinstance(process, KaiProcess)
    with_secret = ("--secret-file", str(process.data_dir / "cluster.secret"))
    refused = run_admin("--node", f"127.0.0.1:{closed}", *with_secret, "status")
    assert refused.returncode == 3
    assert f"127.0.0.1:{closed}" in one_error_line(refused)
    # 1: the node answered with an error (status 4, not available, is tests/test_cli.py's).
    commit = admin(kai_server, "commit")
    assert commit.returncode == 1
    assert "nothing is staged" in one_error_line(commit)
    # The help documents every status.
    epilog = run_admin("--help").stdout.split("exit status:")[1]
    for status in range(5):
        assert f"  {status}  " in epilog


@pytest.mark.parametrize("key", ["with space", "tab\there", "x" * 251, "new\nline", ""], ids=repr)
def test_locate_refuses_a_key_memcached_clients_cannot_send(kai_server: Server, key: str) -> None:
    result = admin(kai_server, "locate", key)
    assert result.returncode == 2
    assert "250 bytes" in one_error_line(result)


async def test_the_node_refuses_to_locate_an_invalid_key(kai_server: Server) -> None:
    process = kai_server.process
    assert isinstance(process, KaiProcess)
    secret = (process.data_dir / "cluster.secret").read_bytes()
    with trio.fail_after(10):
        async with RpcClient("127.0.0.1", process.rpc_port, secret) as client:
            with pytest.raises(RpcBadRequest):
                await client.call("locate", b"with space")
            located = await client.call("locate", b"x" * 250)
    assert isinstance(located, dict)
    assert located["n"] == 1


def test_json_stats_are_numbers(kai_server: Server) -> None:
    stats = json.loads(admin(kai_server, "stats", "--json").stdout)
    assert stats["kai_curr_nodes_count"] == 1
    assert stats["kai_down_nodes_count"] == 0
    assert isinstance(stats["rusage_user"], float)
    assert isinstance(stats["kai_get_latency_p99_ms"], float)
    assert isinstance(stats["uptime"], int)
    assert stats["kai_quorum"] == "3,2,2"  # not a number: stays text
    written_as_text = [
        name
        for name, value in stats.items()
        if isinstance(value, str) and re.fullmatch(r"-?[0-9.]+", value)
    ]
    assert written_as_text == []


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[list[KaiProcess]]:
    """Two nodes with N=1: each partition has one primary and one fallback."""
    config = 'quorum = "1,1,1"\nmembership_interval = 200\n'
    first_rpc, second_rpc = free_port(), free_port()
    nodes = [KaiProcess(tmp_path / "n1", rpc_port=first_rpc, config=config)]
    try:
        nodes[0].start()
        second_dir = tmp_path / "n2"
        second_dir.mkdir()
        (second_dir / "cluster.secret").write_bytes(
            (nodes[0].data_dir / "cluster.secret").read_bytes()
        )
        (second_dir / "cluster.secret").chmod(0o600)
        seed = ["--seed", f"127.0.0.1:{first_rpc}"]
        nodes.append(KaiProcess(second_dir, rpc_port=second_rpc, config=config, extra_args=seed))
        nodes[1].start()
        for node in nodes:
            wait_for(
                lambda node=node: node_stats(node).get("kai_curr_nodes_count") == 2,  # type: ignore[misc]
                timeout=30,
                what=f"node {node.rpc_port} to see both members",
            )
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def node_stats(node: KaiProcess) -> dict[str, object]:
    result = admin_of(node, "stats", "--json")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def test_locate_lists_the_primaries_then_the_fallbacks(two_nodes: list[KaiProcess]) -> None:
    everyone = {f"127.0.0.1:{node.rpc_port}" for node in two_nodes}
    located = json.loads(admin_of(two_nodes[0], "locate", "some-key", "--json").stdout)
    assert located["n"] == 1
    assert len(located["preference_list"]) == 1
    assert len(located["fallbacks"]) == 1
    assert set(located["preference_list"] + located["fallbacks"]) == everyone
    assert [replica["node"] for replica in located["replicas"]] == located["preference_list"]
    text = admin_of(two_nodes[0], "locate", "some-key").stdout.splitlines()
    assert f"preference list (N=1): {located['preference_list'][0]}" in text
    assert f"fallbacks: {located['fallbacks'][0]}" in text


def test_down_nodes_are_counted(two_nodes: list[KaiProcess]) -> None:
    first, second = two_nodes
    assert node_stats(first)["kai_down_nodes_count"] == 0
    second.stop()
    wait_for(
        lambda: node_stats(first).get("kai_down_nodes_count") == 1,
        timeout=30,
        what="node 1 to count node 2 as down",
    )
    stats = node_stats(first)
    assert stats["kai_down_nodes"] == f"127.0.0.1:{second.rpc_port}"
    assert stats["kai_curr_nodes_count"] == 2  # down is not gone: it is still a member
