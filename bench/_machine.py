"""Readings of the machine and of running processes from /proc: CPU time and memory.

Only reads; never starts or signals a process. Linux only, like the rest of bench/.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process from /proc, in KiB (empty if unavailable)."""
    found: dict[str, int] = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return found
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, from /proc/stat)."""
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    ticks = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one running process (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()  # fields after the command name, from state on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (loadgen and its workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """The machine's CPU use over a stretch of time: servers, generator, everything else.

    "Everything else" is what other processes on the machine took while the benchmark ran,
    so a run disturbed by other work shows it.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.own = own_cpu_seconds()
        self.nodes = [process_cpu_seconds(pid) for pid in self.pids]

    def read(self) -> dict[str, float]:
        """Average cores used since construction: ``nodes``, ``generator``, ``other``."""
        wall = max(time.monotonic() - self.started, 1e-9)
        nodes = sum(process_cpu_seconds(pid) for pid in self.pids) - sum(self.nodes)
        generator = own_cpu_seconds() - self.own
        other = machine_busy_seconds() - self.busy - nodes - generator
        return {
            "seconds": wall,
            "nodes": nodes / wall,
            "generator": generator / wall,
            "other": max(other, 0.0) / wall,
        }
