"""roost against the physical limit and the alternatives, side by side, on a testbed of
network namespaces (see docs/benchmark.md and ../shared/BENCHMARK.md).

    python -m bench [--quick] [--systems roost,http,libtorrent] [--repeat K] [--out DIR]
                    [--hosts N] [--bandwidth 100mbit] [--origin-bandwidth RATE] [--size 128M]
                    [--racks R --uplink RATE] [--piece-size SIZE]
                    [--preset slow-origin|racks] [--cleanup]

Needs root, iproute2 (``ip``, ``tc``) and, for the libtorrent system, ``pip install
libtorrent`` (the ``bench`` extra). Builds the testbed, checks it, runs every system
``--repeat`` times (interleaved), writes results.json, results.md and completion.png
to ``--out``, and always removes what it created (also on Ctrl-C or SIGTERM; after a
SIGKILL, the next run or ``--cleanup`` removes the leftovers).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import hostprofile, report
from bench.systems import SYSTEMS
from bench.systems.base import Bench, Run, compile_sources, make_release
from bench.testbed import (
    PREFIX,
    Testbed,
    TestbedError,
    check_twice,
    cleanup_leftovers,
    format_rate,
    missing_requirements,
    parse_rate,
    self_check,
    work_base,
)
from roost import __version__ as roost_version
from roost.runtime.cli import format_size, parse_size

DEFAULTS = {"hosts": 16, "size": "128M", "bandwidth": "100mbit"}
QUICK = {"hosts": 4, "size": "16M"}
PRESETS = ("slow-origin", "racks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="roost vs the physical limit, central HTTP and libtorrent, on a"
        " network-namespace testbed.",
    )
    p.add_argument("--quick", action="store_true", help="N=4, S=16M: the CI scenario")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, run in this order (default {','.join(SYSTEMS)})",
    )
    p.add_argument("--repeat", type=int, default=1, metavar="K", help="runs per system (medians)")
    p.add_argument("--out", default="results/bench", metavar="DIR", help="results folder")
    p.add_argument("--hosts", type=int, metavar="N", help="hosts (default 16; quick 4)")
    p.add_argument("--bandwidth", metavar="RATE", help="B per host, e.g. 100mbit (default)")
    p.add_argument("--origin-bandwidth", metavar="RATE", help="B_origin (default B)")
    p.add_argument("--size", metavar="SIZE", help="release size S (default 128M; quick 16M)")
    p.add_argument("--racks", type=int, metavar="R", help="racks (hosts split evenly)")
    p.add_argument("--uplink", metavar="RATE", help="rack uplink U (default 2·B)")
    p.add_argument("--piece-size", type=parse_size, metavar="SIZE", help="force a piece size")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="slow-origin: B_origin = B/4; racks: 4 racks x 4 hosts, uplinks at 2·B",
    )
    p.add_argument("--timeout", type=float, metavar="S", help="give up on a run after S s")
    p.add_argument("--seed", type=int, default=1, help="seed of the release's contents")
    p.add_argument("--cleanup", action="store_true", help="remove leftovers of crashed runs")
    p.add_argument(
        "--profile-hosts",
        action="store_true",
        help="sample where roost's processes spend their CPU (bench.hostprofile): profiles"
        " in OUT/profiles, a summary per run in OUT/host-profile.md; slows them a little",
    )
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then --quick, then the preset, then explicit flags."""
    sc: dict[str, Any] = dict(DEFAULTS)
    sc.update({"racks": 0, "uplink": None, "origin_bandwidth": None})
    if args.quick:
        sc.update(QUICK)
    if args.preset == "racks":
        sc.update({"racks": 4, "hosts": 16})
    for key in ("hosts", "size", "bandwidth", "origin_bandwidth", "racks", "uplink"):
        value = getattr(args, key)
        if value is not None:
            sc[key] = value
    b = parse_rate(sc["bandwidth"])
    if sc["origin_bandwidth"] is not None:
        bo = parse_rate(sc["origin_bandwidth"])
    elif args.preset == "slow-origin":
        bo = b / 4
    else:
        bo = b
    uplink = parse_rate(sc["uplink"]) if sc["uplink"] else (2 * b if sc["racks"] else None)
    if sc["hosts"] < 1:
        raise SystemExit("--hosts must be at least 1")
    if sc["racks"] and not 1 <= sc["racks"] <= sc["hosts"]:
        raise SystemExit("--racks must be between 1 and the number of hosts")
    return {
        "hosts": sc["hosts"],
        "size_bytes": parse_size(sc["size"]),
        "bandwidth_bps": b,
        "origin_bandwidth_bps": bo,
        "bandwidth": format_rate(b),
        "origin_bandwidth": format_rate(bo),
        "racks": sc["racks"],
        "uplink_bps": uplink,
        "uplink": format_rate(uplink) if uplink else None,
        "piece_size_forced": args.piece_size,
        "preset": args.preset,
        "quick": args.quick,
        "repeat": args.repeat,
        "seed": args.seed,
    }


class Screen:
    """Progress on stderr: one line rewritten in place on a terminal, else every 5 s."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._open = False

    def say(self, text: str) -> None:
        self.end_line()
        print(text, file=sys.stderr, flush=True)

    def status(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text)
            sys.stderr.flush()
            self._open = True
        elif now - self._last >= 5:
            self._last = now
            print(text, file=sys.stderr, flush=True)

    def end_line(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            self._open = False


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "roost": roost_version,
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
        with open("/proc/meminfo") as f:
            info["memory_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        import libtorrent

        info["libtorrent"] = libtorrent.__version__
    except ImportError:
        info["libtorrent"] = None
    try:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["commit"] = head + ("-dirty" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    screen = Screen()
    if args.cleanup:
        removed = cleanup_leftovers()
        for item in removed:
            screen.say(f"removed {item}")
        screen.say(f"removed {len(removed)} leftover(s) of earlier runs")
        return 0
    missing = missing_requirements()
    if missing:
        screen.say("the benchmark needs " + "; ".join(missing))
        return 2
    scenario = resolve(args)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        screen.say(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
        return 2
    systems = [SYSTEMS[n]() for n in names]
    skipped = {}
    for s in list(systems):
        reason = s.unavailable()
        if reason:
            skipped[s.name] = reason
            systems.remove(s)
            screen.say(f"skipping {s.name}: {reason}")
    if not systems:
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    for item in cleanup_leftovers():
        screen.say(f"removed leftover {item}")

    n, size = scenario["hosts"], scenario["size_bytes"]
    base = work_base()
    if base == "/dev/shm" and shutil.disk_usage(base).free < size * (n + 3) + (256 << 20):
        base = "/var/tmp"
    workdir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)
    testbed = Testbed(
        n,
        scenario["bandwidth_bps"],
        scenario["origin_bandwidth_bps"],
        racks=scenario["racks"],
        uplink=scenario["uplink_bps"],
    )
    try:
        return _bench(args, raw_argv, scenario, systems, skipped, testbed, workdir, screen)
    except KeyboardInterrupt:
        screen.say("interrupted: tearing the testbed down")
        return 130
    except TestbedError as exc:
        screen.say(f"testbed error: {exc}")
        return 2
    finally:
        try:
            testbed.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(
    args: argparse.Namespace,
    raw_argv: list[str],
    scenario: dict[str, Any],
    systems: list,
    skipped: dict[str, str],
    testbed: Testbed,
    workdir: str,
    screen: Screen,
) -> int:
    n, size = scenario["hosts"], scenario["size_bytes"]
    racks = f", {scenario['racks']} racks behind {scenario['uplink']}" if scenario["racks"] else ""
    screen.say(
        f"roost bench: {n} hosts at {scenario['bandwidth']}, origin at"
        f" {scenario['origin_bandwidth']}{racks}, {format_size(size)};"
        f" systems {', '.join(s.name for s in systems)}; {args.repeat} run(s) each"
    )
    began = time.monotonic()
    testbed.start()
    screen.say(f"testbed up: {n + 2} namespaces, subnet {testbed.subnet}, work dir {workdir}")
    release = make_release(workdir, size, scenario["piece_size_forced"], args.seed)
    m = release.manifest
    screen.say(
        f"release: {len(m.files)} files, {format_size(m.total_size)}, {m.piece_count} pieces"
        f" of {format_size(m.piece_size)}"
    )
    compile_sources()
    duration, warmup = (3.0, 1.0) if args.quick else (5.0, 1.0)
    check = check_twice(
        lambda: self_check(testbed, duration=duration, warmup=warmup, say=screen.say),
        say=screen.say,
    )
    if not check["passed"]:
        screen.say(
            "self-check FAILED: the links do not deliver 90 % of B per host"
            f" (CPU idle down to {check['cpu_idle_min']:.0%}); figures will be flagged"
        )
    b, bo = check["bandwidth_Bps"], check["origin_bandwidth_Bps"]
    limit = report.t_min(size, n, b, bo)
    timeout = args.timeout or max(60.0, 3 * n * size / bo + 60)
    logs = os.path.join(os.path.abspath(args.out), "logs")
    profiles = None
    if args.profile_hosts:
        profiles = os.path.join(os.path.abspath(args.out), "profiles")
        shutil.rmtree(profiles, ignore_errors=True)  # the last --profile-hosts run's
    bench = Bench(testbed, release, workdir, timeout, logs=logs, profiles=profiles)
    for s in systems:
        s.prepare(bench)

    raw: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    total_runs = args.repeat * len(systems)
    k = 0
    for r in range(args.repeat):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]  # interleaved
        for system in order:
            k += 1
            tag = f"[{k}/{total_runs}] {system.name:<10}"
            run = Run(bench, system, r)

            def progress(run: Run, elapsed: float, tag: str = tag) -> None:
                states = list(run.hosts.values())
                done = sum(1 for s in states if s.completed_at is not None)
                failed = sum(1 for s in states if s.error is not None and s.completed_at is None)
                share = sum(s.fraction for s in states) / len(states)
                screen.status(
                    f"{tag} {elapsed:6.1f} s  hosts done {done}/{len(states)}"
                    + (f" ({failed} failed)" if failed else "")
                    + f"  data {share:6.1%}  (T_min {limit:.1f} s)"
                )

            try:
                result = run.execute(progress)
            finally:
                run.cleanup()
            raw[system.name].append(result)
            times = [t for t in result["host_times"].values() if t is not None]
            screen.end_line()
            screen.say(
                f"{tag} "
                + (f"T_last {max(times):.2f} s" if len(times) == n else f"{len(times)}/{n} done")
                + f", CPU idle {report.fmt_num(result['cpu_idle'], '{:.0%}')}, "
                + ("correct" if result["correct"] else "NOT CORRECT: " + "; ".join(
                    result["problems"][:3]))
            )  # fmt: skip
            time.sleep(1.0)  # let queues drain and sockets close before the next run

    summaries = {
        name: report.summarize(runs, size, limit, scenario["racks"]) for name, runs in raw.items()
    }
    report.add_ratios(summaries)
    scenario.update(
        {
            "systems": [s.name for s in systems],
            "files": len(m.files),
            "pieces": m.piece_count,
            "piece_size": m.piece_size,
            "release_id": m.id,
        }
    )
    results = {
        "command": "python -m bench " + shlex.join(raw_argv),
        "scenario": scenario,
        "environment": environment(),
        "testbed": {
            **testbed.describe(),
            "bandwidth_Bps": b,
            "origin_bandwidth_Bps": bo,
            "framing_overhead": check["framing_overhead"],
            "t_min": limit,
            "self_check": check,
        },
        "systems_description": {s.name: s.description for s in systems},
        "systems": summaries,
        "skipped": skipped,
        "units": {"times": "seconds since the launch began", "rates": "bytes/s of TCP payload"},
        "duration_s": time.monotonic() - began,
    }
    written = report.write(results, os.path.abspath(args.out))
    if profiles is not None and os.path.isdir(profiles):
        written.append(hostprofile.write_report(profiles, os.path.abspath(args.out)))
    screen.end_line()
    print(report.markdown(results))
    screen.say("wrote " + ", ".join(written))
    if not any(w.endswith(".png") for w in written):
        screen.say("no chart: matplotlib is not installed (pip install matplotlib)")
    return 0 if all(s["correct"] for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
