"""A data directory keeps the RPC address its node was created with, against real processes.

Restarted under another ``--rpc`` address, ``kai`` refuses with one line naming both addresses
and status 2, and the data is all there when it starts again under its own. A node started
with rpc port 0 comes back on the port it first bound, and ``--rpc 0.0.0.0:PORT`` is refused
before a data directory is made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kai.testing.process import KaiProcess, free_port

from .conftest import HOST, make_client, stats_of_server
from .test_operator_errors import run_kai

pytestmark = pytest.mark.system


def members(node: KaiProcess) -> tuple[str, str]:
    """The node's ``kai_node`` and ``kai_curr_nodes`` stats."""
    stats = stats_of_server(node.port)
    return stats["kai_node"], stats["kai_curr_nodes"]


def test_a_data_directory_refuses_another_rpc_address_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with KaiProcess(data_dir) as first:
        client = make_client(first.port)
        try:
            assert client.set("kept", b"value") is True
        finally:
            client.close()
    assert first.process is not None
    assert first.process.returncode == 0, first.log_text()
    old = f"{HOST}:{first.rpc_port}"
    other = f"{HOST}:{free_port()}"

    result = run_kai(
        tmp_path, "--data-dir", "data", "--listen", f"{HOST}:{free_port()}", "--rpc", other
    )
    assert result.stderr == (
        f"kai: data directory data belongs to node {old}, not {other}: start it with --rpc"
        f" {old}, or move the node: start a fresh node (a new data directory) at {other} and"
        f" run `kai-admin replace {old} {other}`\n"
    )
    assert (result.returncode, result.stdout) == (2, "")

    with KaiProcess(data_dir, rpc_port=first.rpc_port) as again:
        client = make_client(again.port)
        try:
            assert client.get("kept") == b"value"
        finally:
            client.close()
        # One member, the node's own address: the refused start left no ghost behind.
        assert members(again) == (old, old)


def test_rpc_port_0_comes_back_on_the_port_it_first_bound(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with KaiProcess(data_dir, rpc_port=0) as first:
        identity, _ = members(first)
    host, port = identity.rsplit(":", 1)
    assert (host, port != "0") == (HOST, True)
    with KaiProcess(data_dir, rpc_port=0) as again:
        assert members(again) == (identity, identity)
    assert f"rpc port 0: reusing port {port}, this data directory's identity" in again.log_text()


@pytest.mark.parametrize("how", ["flag", "hostname"])
def test_rpc_0_0_0_0_is_refused_in_one_line(tmp_path: Path, how: str) -> None:
    port = free_port()
    if how == "flag":
        given = ["--rpc", f"0.0.0.0:{port}"]
        prefix, setting = "", "rpc"
    else:
        (tmp_path / "kai.toml").write_text(f'hostname = "0.0.0.0"\nrpc_port = {port}\n')
        given = ["--config", "kai.toml"]
        prefix, setting = "config file kai.toml: ", "hostname"
    result = run_kai(tmp_path, "--data-dir", "data", "--listen", f"0.0.0.0:{free_port()}", *given)
    assert result.stderr == (
        f"kai: {prefix}{setting}: 0.0.0.0 cannot be the node's address: the RPC address is its"
        ' identity and other nodes cannot reach "0.0.0.0"; give the address peers should use'
        " to reach this node (its address on their network, or 127.0.0.1 for a node on its"
        " own); listen and metrics may be 0.0.0.0\n"
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert not (tmp_path / "data").exists()
