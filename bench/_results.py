"""Publishing a benchmark run: its JSON under bench/results/ and its table in bench/README.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


def add_output_options(parser: argparse.ArgumentParser, *, quiet_machine: bool = False) -> None:
    """The options every scenario shares: where results go, and (optionally) waiting for quiet."""
    add = parser.add_argument
    if quiet_machine:
        add("--max-load", type=float, default=1.5, help="wait for a load average below this (1.5)")
        add("--load-wait", type=float, default=180.0, help="longest wait for it, seconds (180)")
    add("--results-dir", type=Path, default=BENCH_DIR / "results", help="JSON output dir")
    add("--update-readme", action="store_true", help="write the table into bench/README.md")


def update_readme(name: str, summary: str, table: str) -> None:
    """Replace the block between the ``<!-- name start/end -->`` markers in bench/README.md."""
    readme = BENCH_DIR / "README.md"
    text = readme.read_text()
    start_marker, end_marker = f"<!-- {name} start -->", f"<!-- {name} end -->"
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        print(f"README.md has no {start_marker} block; not updated", file=sys.stderr)
        return
    block = f"{start_marker}\n{summary}\n\n{table}\n"
    readme.write_text(text[:start] + block + text[end:])
    print(f"updated {readme}")


def publish(
    results_dir: Path, scenario: str, document: dict[str, Any], *, readme_block: str | None
) -> Path:
    """Write ``document`` as ``<scenario>-<time>.json``; with ``readme_block``, its table too.

    ``document`` must hold ``summary`` and ``markdown`` (the table) for the README.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    output = results_dir / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {output}")
    if readme_block is not None:
        update_readme(readme_block, document["summary"], document["markdown"])
    return output
