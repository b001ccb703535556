"""The pure core never imports trio or plyvel (DESIGN §2, STYLE rule 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE_MODULES = [
    "kai.ring",
    "kai.membership.view",
    "kai.cluster.quorum",
    "kai.vclock",
    "kai.versions",
    "kai.config",
    "kai.stats",
    "kai.memcache.protocol",
    "kai.memcache.requests",
    "kai.memcache.replies",
    "kai.memcache.report",
    "kai.rpc.protocol",
    "kai.rpc.auth",
    "kai.storage.engine",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_framework(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in ('trio', 'plyvel', 'socket') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"{module} pulls in {result.stdout.strip()}"
