"""What every system shares: the release, the interface of an adapter, and the harness
that runs one system once on the testbed and measures it.

A system adapter says how to start its origin side (in the origin namespace, before
the clock starts), which command each host runs (the same for every host but its
own address and directory) and where a host's copy of the release ends up. Host
commands print JSON lines on stdout: ``{"event": "progress", "done": n, "total": m}``,
``{"event": "complete", "time": <time.time()>}`` (once the host holds the complete
release, checked by the system itself), ``{"event": "error", "message": ...}``.

The harness starts the clock, then launches every host's command in its namespace
one after the other; a host's time is its ``complete`` event's timestamp minus the
clock's start. When every host is done (or failed, or the run timed out) it reads
the link counters and the CPU idle share, stops every process (collecting their CPU
time with ``wait4``) and only then checks every host's tree against the manifest,
byte for byte (:func:`roost.runtime.tree.verify_tree`): a host counts as correct
only if that check passes, whatever the system reported.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.testbed import CpuSampler, Node, Testbed, UploadSampler, kill_netns_processes
from roost.runtime.manifest import Manifest, load_manifest
from roost.runtime.pack import pack
from roost.runtime.tree import verify_tree

PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
STOP_GRACE = 5.0
TREE_VERSION = 1


# ---------------------------------------------------------------------------
# the release


@dataclass
class Release:
    tree: str  # the release's files (the origin serves them from here)
    manifest_path: str
    manifest: Manifest

    @property
    def size(self) -> int:
        return self.manifest.total_size


def make_tree(root: str, size: int, seed: int = 1) -> int:
    """A realistic release of exactly ``size`` bytes of incompressible data under ``root``:
    three large files (40 %, 20 % and 10 % of it) and small files (sizes log-uniform
    between 64 B and 64 KiB, a few thousand for 128 MiB) in nested directories, as a
    virtualenv or a build directory looks. Returns the number of files."""
    rng = random.Random(f"roost-bench-tree-{TREE_VERSION}-{seed}")
    large = [("lib/model.bin", 0.40), ("bin/app", 0.20), ("share/assets.pack", 0.10)]
    files: list[tuple[str, int]] = []
    budget = size
    for path, share in large:
        n = int(size * share)
        files.append((path, n))
        budget -= n
    k = 0
    while budget > 0:
        n = min(budget, int(64 * 1024 ** rng.random()))  # 64 B .. 64 KiB, log-uniform
        pkg, mod = divmod(k, 40)
        files.append((f"site-packages/pkg{pkg // 20:02d}/sub{pkg % 20:02d}/mod{mod:02d}.py", n))
        budget -= n
        k += 1
    for path, n in files:
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            left = n
            while left:
                chunk = min(left, 8 << 20)
                f.write(rng.randbytes(chunk))
                left -= chunk
        os.chmod(full, 0o644)
    return len(files)


def make_release(workdir: str, size: int, piece_size: int | None, seed: int = 1) -> Release:
    tree = os.path.join(workdir, "origin", "release")
    os.makedirs(tree)
    make_tree(tree, size, seed)
    manifest = pack(tree, piece_size=piece_size)
    path = os.path.join(workdir, "release.manifest")
    with open(path, "wb") as f:
        f.write(manifest.to_bytes())
    return Release(tree, path, load_manifest(path))


# ---------------------------------------------------------------------------
# processes


def compile_sources() -> None:
    """Byte-compile roost and the bench's Python clients, as ``pip install`` does for an
    installed package. Hosts then load bytecode instead of compiling ~5,000 lines
    each at start (sixteen of them on two cores), also where the environment sets
    ``PYTHONDONTWRITEBYTECODE`` or the checkout's bytecode is stale."""
    for tree in (os.path.join(REPO, "src"), os.path.join(REPO, "bench")):
        compileall.compile_dir(tree, quiet=1)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process in a namespace: its stdout read line by line on a thread, its
    stderr in a log file, its CPU time collected with ``wait4`` when it ends."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str,
        on_line: Callable[[Proc, str], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.on_line = on_line
        self.lines: list[str] = []
        self.status: int | None = None
        self.cpu_seconds = 0.0
        self.cpu_system_seconds = 0.0  # of which in the kernel (syscalls, network stack)
        self._changed = threading.Condition()
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                env=child_env(),
                start_new_session=True,
                umask=0o022,
            )
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
            if self.on_line is not None:
                self.on_line(self, line)

    def wait_line(self, pred: Callable[[str], bool], timeout: float) -> str:
        """The first stdout line that satisfies ``pred``; raises if the process ends first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                if self.poll():
                    raise RuntimeError(f"{self.name} exited ({self.status}): {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: not ready after {timeout:.0f} s")
                self._changed.wait(0.1)

    def poll(self) -> bool:
        """True once the process has ended (and was reaped with its resource usage)."""
        if self.status is not None:
            return True
        try:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        except ChildProcessError:
            self.status = -1
            self.popen.returncode = -1
            return True
        if pid == 0:
            return False
        self.status = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.status
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.cpu_system_seconds = usage.ru_stime
        return True

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reaps it."""
        if self.poll():
            return
        with contextlib.suppress(OSError):
            os.kill(self.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not self.poll():
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)
        self._reader.join(timeout=5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return "(no log)"


# ---------------------------------------------------------------------------
# the interface of a system


class System:
    """One way of distributing the release. Subclasses set ``name`` and ``description``."""

    name = ""
    description = ""

    def unavailable(self) -> str | None:
        """Why this system cannot run here (a missing module, ...), or None."""
        return None

    def prepare(self, bench: Bench) -> None:
        """Once per benchmark, before any run (e.g. make a torrent); not timed."""

    def start_origin(self, run: Run) -> None:
        """Start the origin side in ``run.testbed.origin`` and wait until it serves."""
        raise NotImplementedError

    def host_argv(self, run: Run, node: Node) -> list[str]:
        """The command host ``node`` runs (the same for every host but its own values)."""
        raise NotImplementedError

    def host_tree(self, run: Run, node: Node) -> str:
        """Where host ``node`` holds its copy of the release once complete."""
        raise NotImplementedError

    def interpret(self, event: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
        """(progress fraction, completion timestamp, error message) from one event line."""
        kind = event.get("event")
        if kind == "progress" and event.get("total"):
            return event["done"] / event["total"], None, None
        if kind == "complete":
            return 1.0, float(event["time"]), None
        if kind == "error":
            return None, None, str(event.get("message", "error"))
        return None, None, None


@dataclass
class Bench:
    """What stays the same for every run: the testbed, the release, the work directory."""

    testbed: Testbed
    release: Release
    workdir: str
    timeout: float
    logs: str | None = None  # where each run's logs are kept (None: discarded)
    profiles: str | None = None  # roost's processes sampled into here (bench.hostprofile)
    state: dict[str, Any] = field(default_factory=dict)  # systems keep their prepared things


@dataclass
class HostState:
    node: Node
    proc: Proc | None = None
    fraction: float = 0.0
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (seconds, fraction)
    completed_at: float | None = None  # seconds since the clock started
    error: str | None = None


class Run:
    """One run of one system: its directory, its processes, its measurements."""

    def __init__(self, bench: Bench, system: System, index: int) -> None:
        self.bench = bench
        self.system = system
        self.index = index
        self.testbed = bench.testbed
        self.release = bench.release
        self.dir = os.path.join(bench.workdir, "runs", f"{system.name}-{index}")
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.logs)
        self.origin_procs: list[Proc] = []
        self.hosts = {n.name: HostState(n) for n in self.testbed.host_nodes}
        self.t0 = 0.0
        self._lock = threading.Lock()

    def host_dir(self, node: Node) -> str:
        path = os.path.join(self.dir, "hosts", node.name)
        os.makedirs(path, exist_ok=True)
        return path

    def spawn_origin(self, name: str, argv: Sequence[str]) -> Proc:
        proc = Proc(
            f"origin:{name}",
            self.testbed.exec_argv(self.testbed.origin, argv),
            os.path.join(self.logs, f"origin-{name}.log"),
        )
        self.origin_procs.append(proc)
        return proc

    def run_in(self, node: Node, argv: Sequence[str], timeout: float = 60.0) -> str:
        """Run a command in ``node``'s namespace to its end; its stdout."""
        result = subprocess.run(
            self.testbed.exec_argv(node, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[:3]} on {node.name} failed: {result.stderr.strip()}")
        return result.stdout

    def wait_port(self, node: Node, port: int, timeout: float = 30.0) -> None:
        """Wait until something accepts TCP connections on ``node``'s address and ``port``
        (checked from inside its namespace)."""
        code = (
            "import socket,sys,time\n"
            "end=time.monotonic()+float(sys.argv[3])\n"
            "while True:\n"
            "    try:\n"
            "        socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close()\n"
            "        break\n"
            "    except OSError:\n"
            "        if time.monotonic()>end: sys.exit(1)\n"
            "        time.sleep(0.05)\n"
        )
        argv = [PYTHON, "-c", code, node.address, str(port), str(timeout)]
        result = subprocess.run(self.testbed.exec_argv(node, argv), timeout=timeout + 10)
        if result.returncode != 0:
            raise RuntimeError(f"nothing listens on {node.name} {node.address}:{port}")

    def _on_host_line(self, state: HostState, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        fraction, done, error = self.system.interpret(event)
        with self._lock:
            if fraction is not None and fraction > state.fraction:
                state.fraction = fraction
                state.timeline.append((round(time.time() - self.t0, 3), round(fraction, 4)))
            if done is not None and state.completed_at is None:
                state.completed_at = done - self.t0
            if error is not None and state.error is None:
                state.error = error

    def execute(self, progress: Callable[[Run, float], None]) -> dict[str, Any]:
        """Start the origin, launch every host, wait, stop everything, verify; the figures."""
        tb = self.testbed
        sampler = CpuSampler()
        problems: list[str] = []
        timed_out = False
        try:
            try:
                self.system.start_origin(self)
            except Exception as exc:  # a broken system fails its run, not the benchmark
                logs = "; ".join(f"{p.name}: {p.log_tail(5)}" for p in self.origin_procs)
                return self._failed(f"the origin side did not start: {exc}; {logs}")
            before = tb.counters()
            sampler.start()
            self.t0 = time.time()
            uploads = UploadSampler(self.origin_procs[0].pid).start(self.t0)
            for state in self.hosts.values():
                argv = tb.exec_argv(state.node, self.system.host_argv(self, state.node))
                state.proc = Proc(
                    state.node.name,
                    argv,
                    os.path.join(self.logs, f"{state.node.name}.log"),
                    on_line=lambda _p, line, s=state: self._on_host_line(s, line),
                )
            deadline = time.monotonic() + self.bench.timeout
            while True:
                pending = 0
                for state in self.hosts.values():
                    if state.completed_at is not None or state.error is not None:
                        continue
                    assert state.proc is not None
                    if state.proc.poll():
                        state.proc._reader.join(timeout=2)  # its last lines
                        if state.completed_at is None and state.error is None:
                            state.error = f"exited ({state.proc.status}) before completing"
                        continue
                    pending += 1
                progress(self, time.time() - self.t0)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.1)
            after = tb.counters()
            wall = time.time() - self.t0
            cpu = sampler.stop()
            origin_upload = uploads.stop()
        finally:
            if sampler._thread is not None and not sampler._stop.is_set():
                sampler.stop()
            self._stop_all()
        for state in self.hosts.values():
            if state.completed_at is None:
                why = state.error or ("timed out" if timed_out else "did not complete")
                problems.append(f"{state.node.name}: {why}")
                if state.proc is not None:
                    problems.append(f"{state.node.name} log: {state.proc.log_tail(5)}")
        problems += self._verify()
        cpu_seconds = sum(p.cpu_seconds for p in self._procs())
        times = {n: s.completed_at for n, s in self.hosts.items()}
        return {
            "system": self.system.name,
            "index": self.index,
            "host_times": times,
            "host_progress": {n: s.timeline for n, s in self.hosts.items()},
            "origin_upload": origin_upload,
            "wall_s": wall,
            "timed_out": timed_out,
            "counters_before": before,
            "counters_after": after,
            "cpu_idle": cpu["idle"],
            "cpu_idle_min_1s": cpu["idle_min_1s"],
            "cpu_seconds": cpu_seconds,
            "cpu_system_seconds": sum(p.cpu_system_seconds for p in self._procs()),
            "cpu_seconds_origin": sum(p.cpu_seconds for p in self.origin_procs),
            "correct": not problems,
            "problems": problems[:40],
        }

    def _failed(self, problem: str) -> dict[str, Any]:
        return {
            "system": self.system.name,
            "index": self.index,
            "host_times": {n: None for n in self.hosts},
            "wall_s": 0.0,
            "timed_out": False,
            "counters_before": None,
            "counters_after": None,
            "cpu_idle": None,
            "cpu_idle_min_1s": None,
            "cpu_seconds": 0.0,
            "cpu_system_seconds": 0.0,
            "cpu_seconds_origin": 0.0,
            "correct": False,
            "problems": [problem],
        }

    def _procs(self) -> list[Proc]:
        hosts = [s.proc for s in self.hosts.values() if s.proc is not None]
        return hosts + self.origin_procs

    def _stop_all(self) -> None:
        procs = [s.proc for s in self.hosts.values() if s.proc is not None]
        for group in (procs, self.origin_procs):
            for p in group:
                if not p.poll():
                    with contextlib.suppress(OSError):
                        os.kill(p.pid, signal.SIGTERM)
            for p in group:
                p.stop()
        for node in self.testbed.nodes.values():  # whatever they may have left behind
            kill_netns_processes(node.netns)

    def _verify(self) -> list[str]:
        """Every host's tree against the manifest, byte for byte (after the run: untimed)."""
        manifest = self.release.manifest

        def check(state: HostState) -> list[str]:
            if state.completed_at is None:
                return []
            path = self.system.host_tree(self, state.node)
            if not os.path.isdir(path):
                return [f"{state.node.name}: no release at {path}"]
            found = verify_tree(os.path.realpath(path), manifest, content=True)
            return [f"{state.node.name}: {p}" for p in found[:5]]

        with ThreadPoolExecutor(max_workers=2) as pool:
            return [p for ps in pool.map(check, self.hosts.values()) for p in ps]

    def cleanup(self) -> None:
        if self.bench.logs is not None:  # every process's stderr, for a look after the run
            keep = os.path.join(self.bench.logs, f"{self.system.name}-{self.index}")
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(self.logs, keep)
        shutil.rmtree(self.dir, ignore_errors=True)
