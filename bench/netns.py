"""Small helpers for network namespaces and the processes in them.

Shared by the benchmark's testbed (:mod:`bench.testbed`) and the tests' SSH fleet
(``tests/fleet.py``). Each helper that can fail takes ``error``, the exception class
to raise (a subclass of :class:`NetnsError`), so each caller keeps its own error type.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)


class NetnsError(RuntimeError):
    """A command failed, or processes would not die."""


def tool(name: str) -> str | None:
    """The full path of the program ``name`` (also looked up in the sbin directories)."""
    return shutil.which(name, path=SEARCH_PATH)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    error: type[NetnsError] = NetnsError,
) -> str:
    """Run ``argv`` (no stdin) and return its stdout; raise ``error`` if it cannot be run,
    times out, or (with ``check``) exits non-zero."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{shlex.join(argv)}: {exc}") from exc
    if check and result.returncode != 0:
        raise error(f"{shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def ip(
    *args: str,
    netns: str | None = None,
    check: bool = True,
    error: type[NetnsError] = NetnsError,
) -> str:
    """``ip [-n netns] args...``, as :func:`run`."""
    argv = [tool("ip") or "ip"]
    if netns is not None:
        argv += ["-n", netns]
    return run([*argv, *args], check=check, error=error)


def alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def netns_pids(netns: str, *, error: type[NetnsError] = NetnsError) -> list[int]:
    """The pids of the processes in ``netns``, never this process's own."""
    out = ip("netns", "pids", netns, check=False, error=error)
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def kill_pids(
    pids: Sequence[int], *, timeout: float = 10.0, error: type[NetnsError] = NetnsError
) -> None:
    """SIGKILL ``pids`` and wait until none of them is alive."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise error(f"processes survive SIGKILL: {[p for p in pids if alive(p)]}")
        time.sleep(0.01)


def kill_netns_processes(
    netns: str, *, timeout: float = 10.0, error: type[NetnsError] = NetnsError
) -> None:
    """SIGKILL everything in ``netns`` until nothing is left (new children included)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = netns_pids(netns, error=error)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise error(f"processes in {netns} survive SIGKILL: {pids}")
        kill_pids(pids, timeout=max(0.1, deadline - time.monotonic()), error=error)
