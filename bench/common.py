"""Helpers shared by the benchmarks (``bench.pack``, ``bench.swarm``, the testbed...)."""

from __future__ import annotations

import os
import sys
import time


def argv_used(argv: list[str] | None) -> list[str]:
    """The command-line arguments a benchmark ran with (``sys.argv[1:]`` by default)."""
    return list(sys.argv[1:] if argv is None else argv)


def log(source: str, message: str) -> None:
    """One progress line on stderr: ``[<source> HH:MM:SS] <message>``."""
    print(f"[{source} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> list[float]:
    """The whole machine's CPU time so far, in seconds, by kind (Linux ``/proc/stat``):
    user, nice, system, idle, iowait, irq, softirq, steal (guest time is in user).
    Raises OSError or ValueError where that is unavailable."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    fields += [0] * (8 - len(fields))
    tick = os.sysconf("SC_CLK_TCK")
    return [v / tick for v in fields]
