"""The examples keep working against a real node."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kai.core.config import load_config_file

from .conftest import Server

pytestmark = pytest.mark.system

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_basic_usage_runs_against_kai(kai_server: Server) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "basic_usage.py"), f"127.0.0.1:{kai_server.port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "get greeting -> b'hello'" in lines
    assert "get_many -> 100 keys" in lines
    assert "cas with the fresh token -> True" in lines
    assert "cas with the stale token -> False" in lines
    assert "incr visits -> b'5'" in lines
    assert "after delete -> None" in lines


def test_sample_config_is_valid() -> None:
    path = EXAMPLES / "kai.toml"
    assert tomllib.loads(path.read_text())  # parses as TOML
    config = load_config_file(path)
    assert str(config.listen) == "127.0.0.1:11211"
