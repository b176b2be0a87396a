"""Where a host's CPU goes: a sampling profiler for the processes the testbed launches.

``python -m bench --profile-hosts`` launches every roost process (hosts and the
seeder) as ``python -m bench.hostprofile --out OUT/profiles/<run> MODULE ARGS...``,
which runs ``MODULE`` as ``python -m MODULE ARGS...`` would, and meanwhile samples
the Python stack every 4 ms of the process's CPU time (``ITIMER_PROF``: user and
system time, so a system call's cost is charged to the line that made it; the kernel
checks the timer at its clock tick, 4 ms here, so a shorter interval would not sample
more often). At exit it writes ``<pid>.json`` there, with the process's CPU time.
A deterministic profiler (``cProfile``) was no use here: it times in wall-clock
seconds, which on a saturated machine measures waiting for the CPU, and its per-call
cost changes what it measures.

``python -m bench.hostprofile --report DIR`` sums the processes' samples: each
function's share of all CPU samples, by itself and with what it calls. Samples are
taken on the main thread; time that other threads use is charged to whatever the
main thread was doing (roost's runtime only hands pieces over 256 KiB and tracker
announces to threads).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import signal
import statistics
import sys
import time
from collections import Counter
from types import FrameType

INTERVAL = 0.004  # seconds of the process's CPU time between samples


class Sampler:
    """Counts, per function, the CPU samples that found it running (``own``) or on the
    stack (``total``)."""

    def __init__(self) -> None:
        self.samples = 0
        self.own: Counter[str] = Counter()
        self.total: Counter[str] = Counter()

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, INTERVAL, INTERVAL)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        self.samples += 1
        if frame is None:
            return
        self.own[_name(frame)] += 1
        seen = set()
        while frame is not None:
            name = _name(frame)
            if name not in seen:  # recursion counts once
                seen.add(name)
                self.total[name] += 1
            frame = frame.f_back

    def to_json(self) -> dict[str, object]:
        return {
            "cpu_seconds": time.process_time(),
            "interval": INTERVAL,
            "samples": self.samples,
            "own": dict(self.own),
            "total": dict(self.total),
        }


def _name(frame: FrameType) -> str:
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{code.co_name}"


def run_module(out: str, module: str, args: list[str]) -> None:
    """Run ``module`` as the main module under the sampler; write the profile at exit."""
    sampler = Sampler()

    def write() -> None:
        sampler.stop()
        with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": [module, *args], **sampler.to_json()}, f)

    atexit.register(write)  # also after SystemExit, and after SIGTERM where it unwinds
    sys.argv = [module, *args]
    sampler.start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def load(directory: str) -> list[dict]:
    profiles = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                profiles.append(json.load(f))
    return profiles


def report(directory: str, rows: int = 25) -> str:
    """A markdown summary of every profile in ``directory``."""
    profiles = load(directory)
    if not profiles:
        return f"no profiles in {directory}\n"
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for p in profiles:
        own.update(p["own"])
        total.update(p["total"])
    samples = sum(p["samples"] for p in profiles) or 1
    per_process = [p["cpu_seconds"] for p in profiles]
    lines = [
        f"{len(profiles)} processes, {samples} samples of {profiles[0]['interval'] * 1e3:g} ms"
        f" of CPU; CPU per process: median {statistics.median(per_process):.2f} s,"
        f" max {max(per_process):.2f} s",
        "",
        "| function | own % | with callees % |",
        "|---|---:|---:|",
    ]
    for name, count in own.most_common(rows):
        lines.append(
            f"| `{name}` | {100 * count / samples:.1f} | {100 * total[name] / samples:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(profiles: str, out: str) -> str:
    """``out/host-profile.md``: a summary of each run's folder of profiles."""
    sections = [f"# Where roost's processes spent their CPU (`{INTERVAL * 1e3:g}` ms samples)\n"]
    for run in sorted(os.listdir(profiles)):
        folder = os.path.join(profiles, run)
        if os.path.isdir(folder):
            sections.append(f"## {run}\n\n{report(folder)}")
    path = os.path.join(out, "host-profile.md")
    with open(path, "w") as f:
        f.write("\n".join(sections))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.hostprofile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", metavar="DIR", help="write this process's profile into DIR")
    p.add_argument("--report", metavar="DIR", help="summarize the profiles in DIR")
    p.add_argument("module", nargs="?", help="the module to run, as python -m MODULE")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)
    if args.report:
        if not os.path.isdir(args.report):
            p.error(f"{args.report} is not a directory")
        sys.stdout.write(report(args.report))
        return 0
    if not args.out or not args.module:
        p.error("give --out DIR MODULE [ARGS...], or --report DIR")
    os.makedirs(args.out, exist_ok=True)
    run_module(args.out, args.module, args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
