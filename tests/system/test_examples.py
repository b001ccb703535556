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


def run_example(name: str, *args: str) -> list[str]:
    """Run ``examples/<name>`` with ``args``; the lines it printed (it must exit 0)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_shopping_cart_runs_against_kai(kai_server: Server) -> None:
    lines = run_example("shopping_cart.py", "--node", f"127.0.0.1:{kai_server.port}")
    assert lines == [
        "cart -> book, pen",
        "siblings after two tabs -> 2",
        "both tabs' items kept -> book, lamp, mug, pen",
        "after the next change -> book, cable, lamp, mug, pen (1 sibling)",
        "after removing pen -> book, cable, lamp, mug",
        "a removal raced an add -> book, cable, lamp, mug, stapler",
        "the removed mug came back -> True",
        "after checkout -> (empty) (0 siblings)",
    ]


def test_session_store_runs_against_kai(kai_server: Server) -> None:
    lines = run_example("session_store.py", "--node", f"127.0.0.1:{kai_server.port}")
    assert lines == [
        "login -> alice on /home",
        "expires within the session ttl -> True",
        "after a request -> page /cart",
        "siblings after two tabs -> 2",
        "merged -> page /checkout theme dark",
        "siblings after the next request -> 1",
        "an idle session expired -> True",
        "after logout -> None",
    ]


def test_sample_config_is_valid() -> None:
    path = EXAMPLES / "kai.toml"
    assert tomllib.loads(path.read_text())  # parses as TOML
    config = load_config_file(path)
    assert str(config.listen) == "127.0.0.1:11211"
