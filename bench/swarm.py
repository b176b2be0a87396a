"""Loopback swarm benchmark: how fast does one host take a release in, and what does it cost?

Everything runs on 127.0.0.1, unshaped, so the figures show roost's own ceiling on
this machine (CPU, copies, disk), not a network's. Three scenarios, run
``--repeat`` times each, interleaved, medians reported:

- ``A``: one seeder -> one peer, a release of ``--size`` (default 1 GiB):
  throughput including piece verification, disk writes and publishing (the store
  syncs the file system before ``current`` may point at a release);
- ``A/4``: the same with a release 4x smaller, to show that a peer's peak RSS
  does not grow with the release size;
- ``B``: one seeder -> ``--peers`` peers (default 8) in a static full mesh:
  aggregate throughput, CPU seconds per GB delivered, origin egress.

The seeder is ``python -m roost.runtime seed`` and every peer is
``python -m roost.runtime fetch --events --activate``, each a child process. A
peer's clock starts when its launch begins and stops at its ``complete`` event,
which comes after the last piece is verified, written, synced and the release
published. CPU seconds and peak RSS come from ``os.wait4`` on each child (via a
tiny launcher, so the benchmark's own memory never counts); origin egress is the
seeder's ``sendfile`` bytes (``wchar`` in ``/proc/PID/io``). After every run each
peer's ``current`` is checked byte for byte against the manifest, then deleted.

The release trees (a few large files of incompressible data) and the swarm secret
are generated once and cached in ``--workdir``; the seeder's tree is read once
before measuring, so it serves from the page cache. MB = 10^6 bytes. Nothing
outside the work dir is written, except ``--out``; nothing outside it is deleted.

Run from the repository root::

    python -m bench.swarm [--size 1G] [--peers 8] [--repeat 3] [--workdir DIR] [--out DIR]
                          [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.common import argv_used, cpu_seconds, log
from bench.pack import large_tree, machine_info, warm_cache
from roost import __version__ as roost_version
from roost.runtime.cli import format_size, parse_size
from roost.runtime.errors import ManifestError
from roost.runtime.manifest import Manifest, load_manifest
from roost.runtime.pack import pack
from roost.runtime.swarm import write_secret
from roost.runtime.tree import verify_tree

MB = 1e6
GB = 1e9
HOST = "127.0.0.1"
TARGET_MBPS = 600  # the target for A
TARGET_RSS = 100 * 2**20  # the target for a peer's peak RSS with a 1 GiB release
BUSY_THRESHOLD = 0.25  # cores used by other processes that make a run suspect
STOP_TIMEOUT = 10.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    sizes = {"A": args.size, "A/4": args.size // 4, "B": args.size}
    releases = {
        size: prepare_release(workdir, size, args.files, args.seed)
        for size in sorted({sizes[name] for name in args.scenarios}, reverse=True)
    }
    secret = os.path.join(workdir, "swarm.secret")
    if not os.path.exists(secret):
        write_secret(secret)
    for release in releases.values():
        say(f"warming the page cache: reading {release.tree} ({format_size(release.bytes)})")
        warm_cache(release.tree)

    scenarios = [
        Scenario(
            name,
            releases[sizes[name]],
            args.peers if name == "B" else 1,
            args.linger if name == "B" else 0.0,  # A's peer exits once complete
        )
        for name in ("A", "A/4", "B")
        if name in args.scenarios
    ]
    runs: dict[str, list[Run]] = {s.name: [] for s in scenarios}
    for k in range(args.repeat):
        for scenario in scenarios:
            tag = f"[{scenario.name} {k + 1}/{args.repeat}]"
            say(
                f"{tag} 1 seeder -> {scenario.peers} peer(s), {format_size(scenario.release.bytes)}"
                f" in {scenario.release.manifest.piece_count} pieces of"
                f" {format_size(scenario.release.manifest.piece_size)} ..."
            )
            wait_quiet(args.wait_idle)
            run = run_scenario(scenario, workdir, secret, k, args.runtime)
            runs[scenario.name].append(run)
            say(f"{tag} {run.describe()}")

    report = {
        "benchmark": "swarm",
        "command": shlex.join(["python", "-m", "bench.swarm", *argv_used(argv)]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "roost_version": roost_version,
        "network": "loopback (127.0.0.1), unshaped",
        "runtime": shlex.join(args.runtime),
        "units": {"MB": "10^6 bytes", "GB": "10^9 bytes", "rss": "bytes", "times": "seconds"},
        "targets": {"A_mbps": TARGET_MBPS, "peer_peak_rss_bytes_1GiB": TARGET_RSS},
        "scenarios": [summarize(s, runs[s.name]) for s in scenarios],
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
    correct = all(r.correct for rs in runs.values() for r in rs)
    if not correct:
        say("some runs did NOT deliver a correct release: see the table and the logs")
    return 0 if correct else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.swarm", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, metavar="SIZE", help="release size (default 1G)")
    p.add_argument("--peers", type=int, metavar="N", help="peers in scenario B (default 8)")
    p.add_argument("--repeat", type=int, metavar="K", help="runs per scenario (default 3)")
    p.add_argument("--files", type=int, default=4, metavar="N", help="files in the release")
    p.add_argument(
        "--linger",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long B's peers keep serving after completing (default %(default)s)",
    )
    p.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "roost-bench-swarm"),
        metavar="DIR",
        help="where releases are generated and cached, and peers write (default: %(default)s)",
    )
    p.add_argument("--out", default=os.path.join("results", "swarm"), metavar="DIR")
    p.add_argument(
        "--runtime",
        type=shlex.split,
        default=[sys.executable, "-m", "roost.runtime"],
        metavar="CMD",
        help="the runtime command every seeder and peer runs, e.g. 'python3 roost.pyz'"
        " (default: this Python's -m roost.runtime)",
    )
    p.add_argument(
        "--scenarios",
        type=lambda text: text.split(","),
        default=["A", "A/4", "B"],
        metavar="LIST",
        help="which scenarios to run, comma-separated (default A,A/4,B)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to leave the CPU"
        f" (below {BUSY_THRESHOLD} cores; default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1, help="layout seed of the generated release")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 64 MiB, 4 peers, 1 run (unless given)"
    )
    args = p.parse_args(argv)
    defaults = (64 * 2**20, 4, 1) if args.quick else (2**30, 8, 3)
    for name, default in zip(("size", "peers", "repeat"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.repeat < 1 or args.peers < 1 or args.files < 1 or args.size < 4 * 2**20:
        p.error("--repeat, --peers and --files must be >= 1, --size >= 4M")
    unknown = set(args.scenarios) - {"A", "A/4", "B"}
    if unknown or not args.scenarios:
        p.error(f"unknown scenarios {sorted(unknown)}: choose from A, A/4, B")
    if args.linger < 0:
        p.error("--linger must be >= 0")
    return args


def say(message: str) -> None:
    log("bench.swarm", message)


# -- releases -----------------------------------------------------------------------------


@dataclass
class Release:
    tree: str
    manifest_path: str
    manifest: Manifest
    bytes: int


def prepare_release(workdir: str, size: int, files: int, seed: int) -> Release:
    """A cached tree of a few large incompressible files, and its manifest (packed once)."""
    tree = large_tree(workdir, size, files, seed)
    manifest_path = tree.path + ".manifest"
    stamp = tree.path + ".json"
    manifest = None
    if os.path.exists(manifest_path) and os.path.getmtime(manifest_path) >= os.path.getmtime(stamp):
        with contextlib.suppress(ManifestError):  # another version's: pack again
            manifest = load_manifest(manifest_path)
    if manifest is None:
        say(f"packing {tree.path}")
        manifest = pack(tree.path)
        with open(manifest_path + ".partial", "wb") as f:
            f.write(manifest.to_bytes())
        os.replace(manifest_path + ".partial", manifest_path)
    if manifest.total_size != size:
        raise SystemExit(f"{manifest_path} describes {manifest.total_size} bytes, not {size}")
    return Release(tree.path, manifest_path, manifest, size)


# -- child processes ------------------------------------------------------------------------

# Runs between us and each measured command, in a minimal interpreter: a child's peak RSS
# includes the memory of the process it was forked from (the kernel carries the pre-exec
# high-water mark over), so forking it from this process would inflate it. The launcher
# dies with us (PR_SET_PDEATHSIG) and its child with it, so nothing outlives a killed
# benchmark; it ignores SIGINT/SIGTERM itself, so it always reports the child's rusage.
LAUNCHER = """
import ctypes, os, signal, sys
prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1
parent = os.getppid()
prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
if os.getppid() != parent:
    sys.exit(1)
usage = sys.argv[1]
pid = os.fork()
if pid == 0:
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # even if we were started ignoring it
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(usage + ".pid", "w") as f:
    f.write(str(pid))
_, status, ru = os.wait4(pid, 0)
with open(usage + ".partial", "w") as f:
    code = os.waitstatus_to_exitcode(status)
    f.write(f"{ru.ru_utime!r} {ru.ru_stime!r} {ru.ru_maxrss} {code}")
os.rename(usage + ".partial", usage)
"""


@dataclass
class Usage:
    cpu: float  # user + system seconds
    max_rss: int  # bytes
    code: int  # exit code, negative: killed by that signal


class Child:
    """One measured process: launched in its own process group, events read from stdout."""

    def __init__(self, name: str, cmd: list[str], rundir: str, *, events: bool) -> None:
        self.name = name
        self.cmd = cmd
        self.usage_path = os.path.join(rundir, f"{name}.usage")
        self.log_path = os.path.join(rundir, f"{name}.log")
        self.events: list[dict[str, Any]] = []
        self.complete_at: float | None = None  # time.time() in the child's complete event
        self.done: dict[str, Any] | None = None
        self._pid: int | None = None
        self._changed = threading.Condition()
        with open(self.log_path, "wb") as log:
            self.started = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-c", LAUNCHER, self.usage_path, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if events else subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # our Ctrl-C is not theirs; we stop them ourselves
            )
        self._reader = None
        if events:
            self._reader = threading.Thread(target=self._read_events, daemon=True)
            self._reader.start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                self.events.append(event)
                if event.get("event") == "complete" and self.complete_at is None:
                    self.complete_at = float(event["time"])
                elif event.get("event") == "done":
                    self.done = event
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int | None:
        """The measured process itself (the launcher's child), once it exists."""
        if self._pid is None:
            try:
                with open(self.usage_path + ".pid") as f:
                    self._pid = int(f.read())
            except (OSError, ValueError):
                return None
        return self._pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_complete(self, deadline: float) -> bool:
        """Wait until this peer reports complete, exits, or the deadline passes."""
        with self._changed:
            while self.complete_at is None and self.alive() and time.monotonic() < deadline:
                self._changed.wait(0.1)
        return self.complete_at is not None

    def wait_exit(self, deadline: float) -> bool:
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.alive()

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Ask politely (the whole process group), then kill it; always reaps the launcher."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def usage(self) -> Usage | None:
        try:
            with open(self.usage_path) as f:
                utime, stime, maxrss, code = f.read().split()
        except (OSError, ValueError):
            return None
        return Usage(float(utime) + float(stime), int(maxrss) * 1024, int(code))  # KiB on Linux

    def io(self) -> dict[str, int]:
        """/proc/PID/io of the measured process (while it runs), or {} if unavailable."""
        pid = self.pid
        if pid is None:
            return {}
        try:
            with open(f"/proc/{pid}/io") as f:
                return {k: int(v) for k, v in (line.split(": ") for line in f if ": " in line)}
        except (OSError, ValueError):
            return {}

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return ""


def machine_cpu() -> dict[str, float]:
    """CPU seconds the machine has used so far, by kind (Linux /proc/stat), or zeros."""
    try:
        v = cpu_seconds()
    except (OSError, ValueError):
        v = [0.0] * 8
    return {"user": v[0] + v[1], "system": v[2], "irq": v[5] + v[6], "steal": v[7]}


def wait_quiet(timeout: float) -> None:
    """Wait (up to ``timeout`` s) until the machine is nearly idle: the runs share it."""
    deadline = time.monotonic() + timeout
    while True:
        before = machine_cpu()
        time.sleep(0.5)
        after = machine_cpu()
        load = (after["user"] + after["system"] - before["user"] - before["system"]) / 0.5
        if load <= BUSY_THRESHOLD:
            return
        if time.monotonic() > deadline:
            say(f"the machine is still busy ({load:.2f} cores used by others): measuring anyway")
            return


def free_ports(count: int) -> list[int]:
    """Ports that are free on 127.0.0.1 right now (all bound at once, so all distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? (/proc/net/tcp: no connection made.)"""
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                address, state = fields[1], fields[3]
                host, _, hex_port = address.partition(":")
                if state == "0A" and int(hex_port, 16) == port and host in ("0100007F", "00000000"):
                    return True
        return False
    except (OSError, StopIteration, ValueError, IndexError):
        with socket.socket() as s:  # no /proc: fall back to connecting once
            return s.connect_ex((HOST, port)) == 0


def wait_listening(child: Child, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if not child.alive():
            raise RunFailed(f"{child.name} exited before listening: {child.log_tail()}")
        if time.monotonic() > deadline:
            raise RunFailed(f"{child.name} is not listening on {HOST}:{port} after {timeout} s")
        time.sleep(0.01)


class RunFailed(Exception):
    pass


# -- one run --------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    release: Release
    peers: int
    linger: float


@dataclass
class Run:
    scenario: str
    peers: int
    bytes: int
    correct: bool = False
    error: str = ""
    times: list[float] = field(default_factory=list)  # each peer's launch -> complete, sorted
    t_first: float = 0.0
    t_p50: float = 0.0
    t_last: float = 0.0
    mbps: float = 0.0  # A: S / t; B: N*S / t_last (aggregate)
    per_peer_mbps: float = 0.0  # S / t_last
    seeder_cpu: float = 0.0
    peers_cpu: float = 0.0
    cpu_s_per_gb: float = 0.0  # all children's CPU / GB delivered
    peer_max_rss: int = 0  # largest peak RSS of any peer
    seeder_max_rss: int = 0
    origin_egress: int = -1  # seeder's sendfile bytes, -1 if unknown
    peers_uploaded: int = 0  # sum of peers' "uploaded" (incl. duplicates sent in endgame)
    from_peers: int = 0
    bad_pieces: int = 0
    verify_s: float = 0.0
    other_load: float = 0.0  # cores used by other processes during the run
    irq_load: float = 0.0  # cores spent in (soft) interrupts: loopback TCP, block I/O
    steal: float = 0.0  # cores the hypervisor gave to other guests

    def describe(self) -> str:
        if self.error:
            return f"FAILED: {self.error}"
        egress = (
            f", origin egress {self.origin_egress / self.bytes:.2f} x S"
            if self.origin_egress >= 0
            else ""
        )
        when = (
            f"T_first {self.t_first:.2f} s, T_p50 {self.t_p50:.2f} s, T_last {self.t_last:.2f} s,"
            f" aggregate {self.mbps:.0f} MB/s ({self.per_peer_mbps:.0f} MB/s per peer)"
            if self.peers > 1
            else f"{self.t_last:.2f} s, {self.mbps:.0f} MB/s"
        )
        return (
            f"{when}, {self.cpu_s_per_gb:.2f} CPU s/GB (seeder {self.seeder_cpu:.1f} s,"
            f" peers {self.peers_cpu:.1f} s), peer peak RSS {self.peer_max_rss / 2**20:.0f} MiB,"
            f" seeder {self.seeder_max_rss / 2**20:.0f} MiB{egress};"
            f" {'correct' if self.correct else 'INCORRECT'} (verified in {self.verify_s:.1f} s)"
            + (f"; other load {self.other_load:.2f} cores" if self.busy else "")
            + f"; irq {self.irq_load:.2f}, steal {self.steal:.2f} cores"
        )

    @property
    def busy(self) -> bool:
        return self.other_load > BUSY_THRESHOLD


def run_scenario(scenario: Scenario, workdir: str, secret: str, k: int, runtime: list[str]) -> Run:
    release = scenario.release
    rundir = os.path.join(workdir, "runs", f"{scenario.name.replace('/', '_')}-{k + 1}")
    _remove_inside(workdir, rundir)
    os.makedirs(rundir)
    run = Run(scenario.name, scenario.peers, release.bytes)
    ports = free_ports(scenario.peers + 1)
    seeder_port, peer_ports = ports[0], ports[1:]
    children: list[Child] = []
    peers: list[Child] = []
    cpu_before = machine_cpu()
    started = time.monotonic()
    try:
        seeder = Child(
            "seeder",
            [
                *runtime,
                "seed",
                release.manifest_path,
                release.tree,
                "--secret-file",
                secret,
                "--listen",
                f"{HOST}:{seeder_port}",
            ],
            rundir,
            events=False,
        )
        children.append(seeder)
        wait_listening(seeder, seeder_port)
        addresses = [f"{HOST}:{p}" for p in ports]
        for i, port in enumerate(peer_ports):
            others = [a for a in addresses if a != f"{HOST}:{port}"]
            cmd = [
                *runtime,
                "fetch",
                release.manifest_path,
                "--dest",
                os.path.join(rundir, f"dest{i}"),
                "--activate",
                "--secret-file",
                secret,
                "--listen",
                f"{HOST}:{port}",
                "--linger",
                str(scenario.linger),
                "--events",
            ]
            for address in others:
                cmd += ["--peer", address]
            peer = Child(f"peer{i}", cmd, rundir, events=True)
            children.append(peer)
            peers.append(peer)
        # Generous: 20 MB/s per peer would be a bad regression, but must still finish.
        deadline = time.monotonic() + 60 + scenario.peers * release.bytes / (20 * MB)
        for peer in peers:
            if not peer.wait_complete(deadline):
                raise RunFailed(
                    f"{peer.name} did not complete"
                    + (f" (exit {peer.proc.returncode})" if not peer.alive() else " in time")
                    + f": {peer.log_tail()}"
                )
        # Peers linger, then exit on their own; the seeder serves until then.
        for peer in peers:
            if not peer.wait_exit(time.monotonic() + scenario.linger + 30):
                raise RunFailed(f"{peer.name} did not exit after its linger")
        io = seeder.io()
        if "wchar" in io:
            run.origin_egress = io["wchar"]
    except RunFailed as exc:
        run.error = str(exc)
    finally:
        for child in reversed(children):  # peers first, then the seeder
            child.stop()
    elapsed = time.monotonic() - started

    usages = {c.name: c.usage() for c in children}
    missing = [name for name, u in usages.items() if u is None]
    if missing and not run.error:
        run.error = f"no resource usage from {', '.join(missing)}"
    failed = [
        f"{c.name} exit {usages[c.name].code}"  # type: ignore[union-attr]
        for c in peers
        if usages[c.name] is not None and usages[c.name].code != 0  # type: ignore[union-attr]
    ]
    if failed and not run.error:
        run.error = "; ".join(failed)
    peer_usages = [usages[c.name] for c in peers if usages[c.name] is not None]
    seeder_usage = usages.get("seeder")
    run.peers_cpu = sum(u.cpu for u in peer_usages)  # type: ignore[union-attr]
    run.seeder_cpu = seeder_usage.cpu if seeder_usage else 0.0
    run.peer_max_rss = max((u.max_rss for u in peer_usages), default=0)  # type: ignore[union-attr]
    run.seeder_max_rss = seeder_usage.max_rss if seeder_usage else 0
    cpu_after = machine_cpu()
    used = {k: (cpu_after[k] - cpu_before[k]) / max(elapsed, 1e-6) for k in cpu_before}
    ours = (run.peers_cpu + run.seeder_cpu) / max(elapsed, 1e-6)
    run.other_load = max(0.0, used["user"] + used["system"] - ours)
    run.irq_load = used["irq"]
    run.steal = used["steal"]

    if not run.error:
        run.times = sorted(p.complete_at - p.started for p in peers)  # type: ignore[operator]
        run.t_first, run.t_last = run.times[0], run.times[-1]
        run.t_p50 = statistics.median(run.times)
        delivered = scenario.peers * release.bytes
        run.mbps = delivered / run.t_last / MB
        run.per_peer_mbps = release.bytes / run.t_last / MB
        run.cpu_s_per_gb = (run.peers_cpu + run.seeder_cpu) / (delivered / GB)
        for peer in peers:
            stats = peer.done or {}
            run.peers_uploaded += int(stats.get("uploaded", 0))
            run.from_peers += int(stats.get("from_peers", 0))
            run.bad_pieces += int(stats.get("bad_pieces", 0))
        verify_started = time.monotonic()
        problems = verify_all(
            [os.path.join(rundir, f"dest{i}", "current") for i in range(len(peers))],
            release.manifest,
        )
        run.verify_s = time.monotonic() - verify_started
        run.correct = not problems
        if problems:
            run.error = f"delivered release differs: {problems[0]}"
    for i in range(len(peers)):
        _remove_inside(workdir, os.path.join(rundir, f"dest{i}"))
    if run.correct:
        _remove_inside(workdir, rundir)  # logs of failed runs stay for a look
    else:
        run.error += f" (logs in {rundir})"
    return run


def verify_all(currents: list[str], manifest: Manifest) -> list[str]:
    """Check every peer's ``current`` byte for byte; hashing runs on two threads."""

    def check(current: str) -> list[str]:
        if not os.path.isdir(current):
            return [f"{current}: missing (no release was activated)"]
        return [f"{current}: {p}" for p in verify_tree(current, manifest, content=True)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return [p for problems in pool.map(check, currents) for p in problems]


def _remove_inside(workdir: str, path: str) -> None:
    """Delete ``path``, which must lie inside the work dir."""
    path, workdir = os.path.realpath(path), os.path.realpath(workdir)
    if os.path.commonpath([path, workdir]) != workdir or path == workdir:
        raise RuntimeError(f"refusing to delete {path}: not inside {workdir}")
    if os.path.lexists(path):
        shutil.rmtree(path)


# -- results --------------------------------------------------------------------------------


def summarize(scenario: Scenario, runs: list[Run]) -> dict[str, Any]:
    good = [r for r in runs if r.correct]
    median = statistics.median
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "peers": scenario.peers,
        "bytes": scenario.release.bytes,
        "files": len(scenario.release.manifest.files),
        "piece_size": scenario.release.manifest.piece_size,
        "pieces": scenario.release.manifest.piece_count,
        "linger_s": scenario.linger,
        "runs_total": len(runs),
        "runs_correct": len(good),
        "runs": [r.__dict__ for r in runs],
    }
    if good:
        summary.update(
            median_t_first_s=median(r.t_first for r in good),
            median_t_p50_s=median(r.t_p50 for r in good),
            median_t_last_s=median(r.t_last for r in good),
            median_mbps=median(r.mbps for r in good),
            median_per_peer_mbps=median(r.per_peer_mbps for r in good),
            median_cpu_s=median(r.peers_cpu + r.seeder_cpu for r in good),
            median_seeder_cpu_s=median(r.seeder_cpu for r in good),
            median_peers_cpu_s=median(r.peers_cpu for r in good),
            median_cpu_s_per_gb=median(r.cpu_s_per_gb for r in good),
            median_peer_peak_rss=median(r.peer_max_rss for r in good),
            max_peer_peak_rss=max(r.peer_max_rss for r in good),
            max_seeder_peak_rss=max(r.seeder_max_rss for r in good),
            median_origin_egress_ratio=(
                median(r.origin_egress / r.bytes for r in good)
                if all(r.origin_egress >= 0 for r in good)
                else None
            ),
            median_peers_uploaded_ratio=median(r.peers_uploaded / r.bytes for r in good),
            max_other_load_cores=max(r.other_load for r in good),
        )
    return summary


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    first = report["scenarios"][0]
    runtime = report["runtime"].replace(sys.executable, "python")
    lines = [
        "## roost swarm on loopback: throughput, CPU, memory",
        "",
        f"`{report['command']}` — {report['when']}, {m['cpu']}, {m['cores']} cores,"
        f" Python {m['python']}.",
        "",
        f"One seeder (`{runtime} seed`) and fetching peers (`{runtime} fetch --events"
        " --activate`), each its own process, on 127.0.0.1"
        f" (unshaped). Medians of {first['runs_total']} runs per scenario, interleaved."
        " Time: from a peer's launch to its `complete` event (every piece verified, written,"
        " the file system synced, the release published and activated); A's MB/s = S / time;"
        " B's = N·S / T_last (aggregate). MB = 10^6 bytes, GB = 10^9 bytes. CPU: user + system"
        " seconds of all children (seeder and peers, from wait4) per GB delivered. Peak RSS:"
        " the largest of any peer (max over runs). Origin egress: the seeder's sendfile"
        " bytes ÷ S.",
        "",
        "| scenario | release | peers | T_first s | T_last s | MB/s | MB/s per peer"
        " | CPU s/GB | CPU s (seeder + peers) | peer peak RSS | seeder peak RSS"
        " | origin egress ÷ S | correct | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["scenarios"]:
        release = (
            f"{format_size(s['bytes'])} ({s['files']} files,"
            f" {s['pieces']} × {format_size(s['piece_size'])})"
        )
        if not s["runs_correct"]:
            lines.append(
                f"| {s['scenario']} | {release} | {s['peers']} | – | – | – | – | – | – | – | –"
                f" | – | 0/{s['runs_total']} | – |"
            )
            continue
        egress = s["median_origin_egress_ratio"]
        lines.append(
            f"| {s['scenario']} | {release} | {s['peers']} | {s['median_t_first_s']:.2f}"
            f" | {s['median_t_last_s']:.2f} | **{s['median_mbps']:.0f}**"
            f" | {s['median_per_peer_mbps']:.0f} | {s['median_cpu_s_per_gb']:.2f}"
            f" | {s['median_cpu_s']:.1f} ({s['median_seeder_cpu_s']:.1f} +"
            f" {s['median_peers_cpu_s']:.1f}) | {s['max_peer_peak_rss'] / 2**20:.0f} MiB"
            f" | {s['max_seeder_peak_rss'] / 2**20:.0f} MiB"
            f" | {'–' if egress is None else f'{egress:.2f}'}"
            f" | {s['runs_correct']}/{s['runs_total']} | {s['max_other_load_cores']:.2f} cores |"
        )
    lines += [
        "",
        f"Targets (from the issue): A ≥ {TARGET_MBPS} MB/s; a peer's peak RSS ≤"
        f" {TARGET_RSS // 2**20} MiB for a 1 GiB release and not growing with the release"
        " size (compare A and A/4). Other load: cores used by other processes during the run"
        f" (> {BUSY_THRESHOLD} makes a run suspect on a shared machine). The store syncs the"
        " whole file system (syncfs) before publishing, so other writers on it slow a run.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
