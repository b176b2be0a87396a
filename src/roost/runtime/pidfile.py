"""A record of each running roost process, so ``roost cleanup`` can stop strays by id.

The record holds the pid and the exact command line; cleanup only signals a
process whose ``/proc/<pid>/cmdline`` still matches, so a recycled pid is never
touched, and nothing is ever found by pattern-matching process names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

RUN_DIR = "~/.cache/roost/run"


@contextmanager
def recorded_process(directory: str = RUN_DIR) -> Iterator[None]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:  # no /proc: nothing to record, nothing cleanup could check
        yield
        return
    run_dir = os.path.expanduser(directory)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    path = os.path.join(run_dir, f"{os.getpid()}.json")
    tmp = f"{path}.tmp"  # renamed into place: cleanup never reads a half-written record
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "argv": argv}, f)
    os.replace(tmp, path)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
