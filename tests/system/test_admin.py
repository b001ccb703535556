"""kai-admin against a real node: status, stats, members, ring, locate, and a wrong secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kai.testing.process import KaiProcess

from .conftest import Server, make_client

pytestmark = pytest.mark.system


def admin(
    server: Server, *args: str, secret: Path | None = None
) -> subprocess.CompletedProcess[str]:
    process = server.process
    assert isinstance(process, KaiProcess)
    rpc_port = process.rpc_port
    data_dir = process.data_dir
    secret_file = secret if secret is not None else data_dir / "cluster.secret"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kai.admin",
            "--node",
            f"127.0.0.1:{rpc_port}",
            "--secret-file",
            str(secret_file),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_and_json_stats(kai_server: Server) -> None:
    status = admin(kai_server, "--json", "status")
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert isinstance(kai_server.process, KaiProcess)
    assert parsed["node"] == f"127.0.0.1:{kai_server.process.rpc_port}"
    assert parsed["effective_quorum"] == "1,1,1"
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
    assert result.returncode == 1
    assert "secret" in result.stderr.lower() or "authentic" in result.stderr.lower()
