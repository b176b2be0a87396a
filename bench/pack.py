"""Packing benchmark: is ``roost pack`` bounded by sha256, not by Python?

Generates two trees once (cached in a work dir between runs):

- ``small``: many small files (default 50,000; sizes spread log-uniformly from
  16 B to 64 KiB, 2 % empty) in a few levels of directories;
- ``large``: a few large files totalling ``--large-size`` (default 1 GiB).

It then runs the real ``roost pack`` command (or, with ``--command runtime``,
the runtime's own ``python -m roost.runtime pack`` that target hosts run) in a
child process ``--repeat`` times per tree and reports medians: MB/s, files/s,
the ratio to raw single-thread ``hashlib.sha256`` (measured in memory, in this
process, right before every run, so each ratio is taken side by side), and the
child's peak RSS (from ``os.wait4``, so every run is measured on its own). The
command's start-up (``--version``) is measured too, and the "net" figures
subtract it: they show packing itself, apart from interpreter start and imports.

The page cache is warmed first, so the figures measure hashing plus Python, not
the disk. MB = 10^6 bytes. Results go to ``--out`` as results.json and
results.md. Nothing outside the work dir is written, except ``--out``; nothing
outside the work dir is ever deleted.

Run from the repository root::

    python -m bench.pack [--small-files N] [--large-size SIZE] [--repeat K]
                         [--command roost|runtime] [--workdir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import argv_used, cpu_seconds, log
from roost import __version__ as roost_version
from roost.runtime.cli import format_size, parse_size

# The command that packs, after "python": the controller's CLI, or the runtime's own.
COMMANDS = {"roost": ["-m", "roost"], "runtime": ["-m", "roost.runtime"]}
GENERATOR_VERSION = 1  # bump when the tree layout changes, so cached trees are rebuilt
MB = 1e6
RAW_BUFFER = 64 * 1024 * 1024
RAW_CHUNK = 1024 * 1024
RAW_PASSES = 4  # one raw sample hashes RAW_BUFFER this many times
SMALL_MAX = 64 * 1024
SMALL_MIN = 16
FILES_PER_DIR = 40
# Another process using more than this many cores during a run makes it suspect.
BUSY_THRESHOLD = 0.25


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    trees = []
    if args.small_files > 0:
        trees.append(small_tree(workdir, args.small_files, args.seed))
    if args.large_size > 0:
        trees.append(large_tree(workdir, args.large_size, args.large_files, args.seed))
    if not trees:
        raise SystemExit("nothing to measure: both trees are disabled")

    for tree in trees:
        say(f"warming the page cache: reading {tree.name} tree ({format_size(tree.bytes)})")
        tree.warm_read_mbps = warm_cache(tree.path)

    command = [sys.executable, *COMMANDS[args.command]]
    say(f"measuring start-up: {' '.join(COMMANDS[args.command])} --version")
    startup = [run_child([*command, "--version"]) for _ in range(args.repeat)]
    startup_s = statistics.median(r.wall for r in startup)

    raw_buffer = os.urandom(RAW_BUFFER)
    raw_samples: list[float] = []
    results = []
    manifests = os.path.join(workdir, "manifests")
    os.makedirs(manifests, exist_ok=True)
    for tree in trees:
        runs = []
        for k in range(args.repeat):
            label = f"[{tree.name} {k + 1}/{args.repeat}]"
            tries = []
            for _ in range(1 + args.retries):
                tries.append(measure_pack(command, tree, raw_buffer, startup_s, manifests))
                run = tries[-1]
                raw_samples.append(run.raw_sha256_mbps)
                say(
                    f"{label} raw sha256 {run.raw_sha256_mbps:.0f} MB/s; pack {run.wall:.2f} s,"
                    f" {run.mbps:.0f} MB/s ({run.mbps / run.raw_sha256_mbps:.0%} of raw;"
                    f" {tree.bytes / run.net_s / MB / run.raw_sha256_mbps:.0%} net of start-up),"
                    f" {run.files_per_s:,.0f} files/s, peak RSS {run.max_rss / 2**20:.0f} MiB"
                    + (f"; other load {run.other_load:.2f} cores: retrying" if run.busy else "")
                )
                if not run.busy:
                    break
            runs.append(min(tries, key=lambda r: r.other_load))
            runs[-1].attempts = len(tries)
        ids = {run.release for run in runs}
        if len(ids) != 1:
            raise SystemExit(f"{tree.name}: runs disagree on the release id: {sorted(ids)}")
        results.append(summarize(tree, runs))

    report = {
        "benchmark": "pack",
        "command": "python -m bench.pack " + " ".join(shlex.quote(a) for a in argv_used(argv)),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "roost_version": roost_version,
        "cache": "warm (trees read once before measuring: figures are hashing + Python, not disk)",
        "units": {"MB": "10^6 bytes", "rss": "bytes"},
        "raw_sha256": {
            "what": f"single-thread hashlib.sha256, in memory, {RAW_CHUNK // 1024} KiB updates",
            "median_mbps": statistics.median(raw_samples),
            "samples_mbps": raw_samples,
        },
        "pack_command": f"python {' '.join(COMMANDS[args.command])} pack TREE -o FILE -q",
        "startup": {
            "what": f"python {' '.join(COMMANDS[args.command])} --version: interpreter start and"
            " imports, included in every pack run; the net figures subtract it",
            "median_wall_s": startup_s,
            "max_rss": max(r.max_rss for r in startup),
        },
        "trees": results,
    }
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    table = markdown(report)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    say(f"wrote {out}/results.json and {out}/results.md")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pack", description=__doc__.split("\n")[0])
    p.add_argument(
        "--small-files", type=int, default=50_000, metavar="N", help="0 skips the small tree"
    )
    p.add_argument(
        "--large-size",
        type=parse_size,
        default=parse_size("1G"),
        metavar="SIZE",
        help="total size of the large tree, e.g. 1G (0 skips it)",
    )
    p.add_argument("--large-files", type=int, default=4, metavar="N", help="files in large tree")
    p.add_argument("--repeat", type=int, default=3, metavar="K", help="runs per tree")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="R",
        help=f"repeat a run disturbed by other processes (> {BUSY_THRESHOLD} cores) up to R"
        " times, keeping the least disturbed (default: %(default)s)",
    )
    p.add_argument(
        "--command",
        choices=sorted(COMMANDS),
        default="roost",
        help="roost: the controller's 'roost pack' (default); runtime: the runtime's own CLI,"
        " as target hosts run it ('python -m roost.runtime pack')",
    )
    p.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "roost-bench-pack"),
        metavar="DIR",
        help="where the trees are generated and cached (default: %(default)s)",
    )
    p.add_argument("--out", default=os.path.join("results", "pack"), metavar="DIR")
    p.add_argument("--seed", type=int, default=1, help="layout seed of the generated trees")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.large_files < 1 or args.small_files < 0 or args.retries < 0:
        p.error("--repeat and --large-files must be >= 1, --small-files and --retries >= 0")
    return args


def say(message: str) -> None:
    log("bench.pack", message)


# -- trees --------------------------------------------------------------------------------


@dataclass
class Tree:
    name: str
    path: str
    files: int
    bytes: int
    warm_read_mbps: float = 0.0


def small_tree(workdir: str, count: int, seed: int) -> Tree:
    """Many small files: the per-file cost of packing (open, stat, hash objects) dominates."""
    rng = random.Random(seed)
    # Log-uniform sizes: most files are a few KiB, like source trees and virtualenvs.
    sizes = [
        0
        if rng.random() < 0.02
        else int(math.exp(rng.uniform(math.log(SMALL_MIN), math.log(SMALL_MAX))))
        for _ in range(count)
    ]
    fanout = max(1, math.ceil((count / FILES_PER_DIR) ** (1 / 3)))
    paths = []
    for i in range(count):
        depth = rng.choices((1, 2, 3), weights=(1, 2, 7))[0]
        parts = [f"pkg{rng.randrange(fanout):02d}", f"mod{rng.randrange(fanout):02d}"]
        parts.append(f"sub{rng.randrange(fanout):02d}")
        paths.append("/".join([*parts[:depth], f"file{i:06d}.dat"]))

    def write(root: str) -> None:
        pool = os.urandom(16 * 1024 * 1024)
        made: set[str] = set()
        for i, (rel, size) in enumerate(zip(paths, sizes)):
            parent = os.path.dirname(rel)
            if parent not in made:
                os.makedirs(os.path.join(root, parent), exist_ok=True)
                made.add(parent)
            start = rng.randrange(len(pool) - size)
            with open(os.path.join(root, rel), "wb") as f:
                f.write(pool[start : start + size])
            if (i + 1) % max(1, count // 10) == 0:
                say(f"  generated {i + 1:,}/{count:,} small files")

    key = {"kind": "small", "files": count, "seed": seed, "generator": GENERATOR_VERSION}
    return cached_tree(workdir, f"small-{count}-s{seed}", key, write, count, sum(sizes))


def large_tree(workdir: str, total: int, count: int, seed: int) -> Tree:
    """A few large files of uneven sizes (not piece multiples): sha256 itself should dominate."""
    weights = list(range(count, 0, -1))
    sizes = [total * w // sum(weights) for w in weights]
    sizes[0] += total - sum(sizes)

    def write(root: str) -> None:
        block = 16 * 1024 * 1024
        written = 0
        for i, size in enumerate(sizes):
            with open(os.path.join(root, f"blob{i}.bin"), "wb") as f:
                left = size
                while left:
                    n = min(block, left)
                    f.write(os.urandom(n))
                    left -= n
                    written += n
            say(f"  generated {i + 1}/{count} large files ({format_size(written)})")

    key = {"kind": "large", "bytes": total, "files": count, "generator": GENERATOR_VERSION}
    return cached_tree(workdir, f"large-{total}-{count}", key, write, count, total)


def cached_tree(workdir: str, name: str, key: dict, write: Any, files: int, size: int) -> Tree:
    """Reuse a tree generated by an earlier run with the same parameters, else build it.

    A tree is built under a temporary name and renamed only once complete, so an
    interrupted run never leaves a half tree that a later run would trust.
    """
    path = os.path.join(workdir, name)
    stamp = path + ".json"
    kind = key["kind"]
    try:
        with open(stamp) as f:
            if json.load(f) == key and os.path.isdir(path):
                say(f"using cached {kind} tree {path}")
                return Tree(kind, path, files, size)
    except (OSError, ValueError):
        pass
    for stale in (path, path + ".partial"):
        if os.path.lexists(stale):
            shutil.rmtree(stale)  # our own directory inside the work dir
    say(f"generating {kind} tree: {files:,} files, {format_size(size)} -> {path}")
    os.makedirs(path + ".partial")
    write(path + ".partial")
    os.rename(path + ".partial", path)
    with open(stamp, "w") as f:
        json.dump(key, f)
    os.sync()  # no write-back during the measurements
    return Tree(kind, path, files, size)


def warm_cache(root: str) -> float:
    """Read every file once, so the runs below measure hashing, not the disk; return MB/s."""
    buffer = bytearray(1024 * 1024)
    total = 0
    started = time.perf_counter()
    for directory, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    total += n
    return total / max(time.perf_counter() - started, 1e-9) / MB


# -- measuring ----------------------------------------------------------------------------


def measure_pack(
    command: list[str], tree: Tree, raw_buffer: bytes, startup_s: float, manifests: str
) -> Run:
    """One pack run, with raw sha256 measured right before it (same conditions)."""
    raw = raw_sha256_mbps(raw_buffer)
    output = os.path.join(manifests, f"{tree.name}.manifest")
    run = run_child([*command, "pack", tree.path, "-o", output, "-q"])
    check_pack_output(tree, run)
    run.raw_sha256_mbps = raw
    run.mbps = tree.bytes / run.wall / MB
    run.files_per_s = tree.files / run.wall
    run.net_s = max(run.wall - startup_s, 1e-6)
    return run


def raw_sha256_mbps(buffer: bytes) -> float:
    """Single-thread hashlib.sha256 over an in-memory buffer: the ceiling for one hash stream."""
    view = memoryview(buffer)
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(RAW_PASSES):
            h = hashlib.sha256()
            for offset in range(0, len(view), RAW_CHUNK):
                h.update(view[offset : offset + RAW_CHUNK])
            h.digest()
        samples.append(RAW_PASSES * len(view) / (time.perf_counter() - started) / MB)
    return statistics.median(samples)


@dataclass
class Run:
    cmd: list[str]
    wall: float
    cpu: float  # user + system seconds of the child
    max_rss: int  # bytes
    other_load: float  # cores used by other processes during the run
    stdout: str
    release: str = ""
    raw_sha256_mbps: float = 0.0
    mbps: float = 0.0
    files_per_s: float = 0.0
    net_s: float = 0.0  # wall minus the command's median start-up
    attempts: int = 1  # runs disturbed by other processes are retried (--retries)
    notes: list[str] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.other_load > BUSY_THRESHOLD


# Runs in a minimal interpreter between us and the measured command. A child's peak RSS
# includes the memory of the process it was spawned from (the kernel carries the
# pre-exec high-water mark over), so spawning from this big process would inflate it.
LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
t = time.perf_counter() - t
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(f"{t!r} {ru.ru_utime!r} {ru.ru_stime!r} {ru.ru_maxrss} {code}")
"""


def run_child(cmd: list[str]) -> Run:
    """Run one command; its wall time, CPU and peak RSS come from wait4 on that very child."""
    with tempfile.TemporaryDirectory(prefix="roost-bench-") as tmp:
        usage_file = os.path.join(tmp, "usage")
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        launcher = [sys.executable, "-S", "-c", LAUNCHER, usage_file, *cmd]
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            cpu_before = machine_busy_seconds()
            subprocess.run(launcher, stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL, check=True)
            busy = machine_busy_seconds() - cpu_before
        with open(usage_file) as f:
            wall_s, utime, stime, maxrss, code = f.read().split()
        with open(out) as f:
            stdout = f.read()
        with open(err) as f:
            stderr = f.read()
    wall, cpu = float(wall_s), float(utime) + float(stime)
    if int(code) != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({code}):\n{stdout}{stderr}")
    return Run(
        cmd=cmd,
        wall=wall,
        cpu=cpu,
        max_rss=int(maxrss) * 1024,  # KiB on Linux
        other_load=max(0.0, busy - cpu) / wall,
        stdout=stdout,
    )


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used so far (Linux /proc/stat), or 0 if unknown."""
    try:
        v = cpu_seconds()
    except (OSError, ValueError):
        return 0.0
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def check_pack_output(tree: Tree, run: Run) -> None:
    """The child must report the tree we generated, and a release id."""
    files = re.search(r"packed (\d+) files", run.stdout)
    release = re.search(r"release ([0-9a-f]{64})", run.stdout)
    if not files or not release or int(files[1]) != tree.files:
        raise SystemExit(f"unexpected output from roost pack on {tree.path}:\n{run.stdout}")
    run.release = release[1]
    pieces = re.search(r"in (\d+) pieces of (.+)$", run.stdout, re.MULTILINE)
    if pieces:
        run.notes.append(f"{pieces[1]} pieces of {pieces[2]}")


def summarize(tree: Tree, runs: list[Run]) -> dict[str, Any]:
    median = statistics.median
    return {
        "tree": tree.name,
        "path": tree.path,
        "files": tree.files,
        "bytes": tree.bytes,
        "pieces": runs[0].notes[0] if runs[0].notes else "",
        "release": runs[0].release,
        "warm_read_mbps": tree.warm_read_mbps,
        "median_wall_s": median(r.wall for r in runs),
        "median_mbps": median(r.mbps for r in runs),
        "median_files_per_s": median(r.files_per_s for r in runs),
        "median_ratio_to_raw_sha256": median(r.mbps / r.raw_sha256_mbps for r in runs),
        "median_net_s": median(r.net_s for r in runs),
        "median_net_mbps": median(tree.bytes / r.net_s / MB for r in runs),
        "median_net_files_per_s": median(tree.files / r.net_s for r in runs),
        "median_net_ratio_to_raw_sha256": median(
            tree.bytes / r.net_s / MB / r.raw_sha256_mbps for r in runs
        ),
        "median_cpu_s": median(r.cpu for r in runs),
        "max_peak_rss": max(r.max_rss for r in runs),
        "max_other_load_cores": max(r.other_load for r in runs),
        "runs": [
            {k: v for k, v in asdict(r).items() if k not in ("stdout", "notes")} for r in runs
        ],
    }


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "system": platform.platform(),
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    raw = report["raw_sha256"]["median_mbps"]
    startup = report["startup"]
    lines = [
        "## roost pack: throughput vs raw sha256",
        "",
        f"`{report['command']}` — {report['when']}, {m['cpu']}, {m['cores']} cores,"
        f" Python {m['python']}, {m['openssl']}.",
        "",
        "Warm page cache: the trees are read once before measuring, so these figures measure"
        " hashing + Python, not the disk. MB = 10^6 bytes. Medians of"
        f" {len(report['trees'][0]['runs'])} runs of `{report['pack_command']}` in a child"
        f" process. Its start-up ({startup['median_wall_s'] * 1000:.0f} ms and"
        f" {startup['max_rss'] / 2**20:.0f} MiB RSS for `--version`) is included in the first"
        " figures and subtracted in the net ones."
        f" Raw single-thread `hashlib.sha256` (in memory): **{raw:.0f} MB/s**.",
        "",
        "| tree | files | size | pieces | time s | MB/s | files/s | vs raw sha256"
        " | net MB/s | net files/s | net vs raw | CPU s | peak RSS | other load |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in report["trees"]:
        lines.append(
            f"| {t['tree']} | {t['files']:,} | {format_size(t['bytes'])} | {t['pieces']}"
            f" | {t['median_wall_s']:.2f} | {t['median_mbps']:.0f}"
            f" | {t['median_files_per_s']:,.0f} | {t['median_ratio_to_raw_sha256']:.0%}"
            f" | {t['median_net_mbps']:.0f} | {t['median_net_files_per_s']:,.0f}"
            f" | {t['median_net_ratio_to_raw_sha256']:.0%}"
            f" | {t['median_cpu_s']:.2f} | {t['max_peak_rss'] / 2**20:.0f} MiB"
            f" | {t['max_other_load_cores']:.2f} cores |"
        )
    lines += [
        "",
        "vs raw sha256: pack MB/s over raw sha256 MB/s measured right before each run."
        " Pack hashes every byte twice (per file and per piece), on two threads."
        " Peak RSS: the child's own, from wait4. Other load: cores used by other processes"
        f" during the run, worst of the runs kept; a run above {BUSY_THRESHOLD} cores is"
        " retried (`--retries`) and the least disturbed try is kept.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
