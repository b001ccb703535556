"""The pure core never imports trio, plyvel or socket (DESIGN §2, STYLE rule 2).

The rule is a folder rule: every module under ``kai/core/`` is checked, each in a clean
interpreter, so a new module there is covered without being listed.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import kai.core

CORE = pathlib.Path(kai.core.__file__).parent
PURE_MODULES = sorted(
    ".".join(("kai", "core", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )
    for path in CORE.rglob("*.py")
)


def test_the_core_has_modules() -> None:
    assert "kai.core.ring" in PURE_MODULES
    assert "kai.core.memcache.protocol" in PURE_MODULES


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
