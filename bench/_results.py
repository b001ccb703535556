"""Publishing a benchmark run: its JSON under bench/results/ and its table in bench/README.md.

Each kind of run has one result file, ``<name>.json``, which the next run of that kind
overwrites: bench/results/ holds the latest run of each kind, and git holds the older ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR / "README.md"


def add_output_options(parser: argparse.ArgumentParser, *, quiet_machine: bool = False) -> None:
    """The options every scenario shares: where results go, and (optionally) waiting for quiet."""
    add = parser.add_argument
    if quiet_machine:
        add("--max-load", type=float, default=1.5, help="wait for a load average below this (1.5)")
        add("--load-wait", type=float, default=180.0, help="longest wait for it, seconds (180)")
    add(
        "--results-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="where the run's JSON goes, overwriting the previous run's (bench/results)",
    )
    add("--update-readme", action="store_true", help="write the table into bench/README.md")


def update_readme(block: str, summary: str, table: str, readme: Path = README) -> bool:
    """Replace the block between the ``<!-- block start/end -->`` markers of ``readme``.

    Returns whether the block was found (a missing block is reported, not created).
    """
    text = readme.read_text()
    start_marker, end_marker = f"<!-- {block} start -->", f"<!-- {block} end -->"
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        print(f"{readme.name} has no {start_marker} block; not updated", file=sys.stderr)
        return False
    replacement = f"{start_marker}\n{summary}\n\n{table}\n"
    readme.write_text(text[:start] + replacement + text[end:])
    print(f"updated {readme}")
    return True


def publish(
    results_dir: Path, name: str, document: dict[str, Any], *, readme_block: str | None
) -> Path:
    """Write ``document`` as ``<name>.json`` (replacing the previous run's); with
    ``readme_block``, put its ``summary`` and ``markdown`` table into that README block."""
    results_dir.mkdir(parents=True, exist_ok=True)
    output = results_dir / f"{name}.json"
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {output}")
    if readme_block is not None:
        update_readme(readme_block, document["summary"], document["markdown"])
    return output
