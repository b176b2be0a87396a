"""Helpers shared by the stand-alone benchmarks (``bench.pack``, ``bench.swarm``)."""

from __future__ import annotations

import sys
import time


def argv_used(argv: list[str] | None) -> list[str]:
    """The command-line arguments a benchmark ran with (``sys.argv[1:]`` by default)."""
    return list(sys.argv[1:] if argv is None else argv)


def log(source: str, message: str) -> None:
    """One progress line on stderr: ``[<source> HH:MM:SS] <message>``."""
    print(f"[{source} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
