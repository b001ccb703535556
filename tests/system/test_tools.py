"""The libmemcached command-line tools work unchanged against kai.

``memccapable -a`` (27 ascii protocol tests) runs against kai and, as a control, against real
memcached; ``memcstat`` must see kai's pid and version; ``memccp`` then ``memccat`` must return
the very bytes that were copied. Every tool runs with a subprocess timeout.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.system.conftest import Server, make_client, require_binaries

pytestmark = pytest.mark.system

#: Seconds a tool may run before the test fails.
TOOL_TIMEOUT = 60


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a tool with stderr folded into stdout (memccapable reports failures on stderr)."""
    require_binaries(argv[0])
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def test_memccapable_ascii(server: Server) -> None:
    result = run_tool("memccapable", "-h", server.host, "-p", str(server.port), "-a", "-t", "2")
    report = f"memccapable against {server.name} exited {result.returncode}:\n{result.stdout}"
    assert result.returncode == 0, report
    assert "All tests passed" in result.stdout, report
    assert result.stdout.count("[pass]") == 27, report
    assert "[FAIL]" not in result.stdout, report


def test_memcstat_shows_kai(kai_server: Server) -> None:
    result = run_tool("memcstat", f"--servers={kai_server.host}:{kai_server.port}")
    assert result.returncode == 0, result.stdout
    fields = {}
    for line in result.stdout.splitlines():
        name, colon, value = line.strip().partition(": ")
        if colon:
            fields[name] = value
    assert f"Server: {kai_server.host} ({kai_server.port})" in result.stdout, result.stdout
    assert fields.get("pid") == str(kai_server.process.pid), result.stdout
    assert fields.get("version", "").startswith("1.6."), result.stdout
    assert "kai" in fields.get("version", ""), result.stdout
    assert int(fields.get("curr_connections", "0")) >= 1, result.stdout


def test_memccp_then_memccat_round_trip(kai_server: Server, tmp_path: Path) -> None:
    # A seeded, binary payload with the protocol's own delimiters inside it.
    payload = random.Random(20240611).randbytes(200_000) + b"\r\nEND\r\n\x00"
    source = tmp_path / f"blob-{uuid.uuid4().hex}.bin"
    source.write_bytes(payload)
    servers = f"--servers={kai_server.host}:{kai_server.port}"
    copied = run_tool("memccp", servers, "--flags=77", str(source))
    assert copied.returncode == 0, copied.stdout
    target = tmp_path / "copy.bin"
    fetched = run_tool("memccat", servers, f"--file={target}", source.name)
    assert fetched.returncode == 0, fetched.stdout
    assert target.read_bytes() == payload
    # The key is the file's base name; any memcached client sees the same bytes and flags.
    client = make_client(kai_server.port)
    try:
        assert client.get(source.name) == payload
        with_flags = run_tool("memccat", servers, "--flags", source.name)
        assert with_flags.returncode == 0
        assert with_flags.stdout.startswith("77\n"), with_flags.stdout[:40]
    finally:
        client.close()
    missing = run_tool("memccat", servers, f"missing-{uuid.uuid4().hex}")
    assert missing.returncode != 0
