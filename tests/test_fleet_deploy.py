"""``roost deploy`` end to end over real OpenSSH, on the network-namespace fleet (tests/fleet.py).

Every host is a namespace with its own sshd, its own DEST, HOME and /tmp; the
test process is the controller. Each test runs the real ``roost`` command line
and then checks the hosts from outside: trees byte for byte, ``current`` links,
no process of roost's left on any host, no temporary file left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from conftest import SRC, write_tree
from roost.runtime.manifest import Manifest
from roost.runtime.pack import pack

if TYPE_CHECKING:
    from fleet import Fleet

MiB = 1024 * 1024
LINGER = "1"
DEPLOY_TIMEOUT = 120


# -- release trees --------------------------------------------------------------------


def make_release(root: Path, label: str, size: int) -> Path:
    """A tree with every kind of entry, ``size`` bytes of random data in a few files."""
    spec: dict[str, object] = {
        "VERSION": label.encode() + b"\n",
        "bin/start": (b"#!/bin/sh\necho " + label.encode() + b"\n", 0o755),
        "conf/secret.conf": (b"private\n", 0o600),
        "conf/app.conf": b"name = app\n",
        "lib/deep/er/module.py": b"X = 1\n",
        "spaces in name.txt": b"spaces",
        "unicodé.txt": "ñ".encode(),
        "zero": b"",
        "link-to-version": ("->", "VERSION"),
        "link-to-dir": ("->", "lib/deep"),
        "empty/": None,
    }
    chunks = [size // 2, size // 4, size // 8, size - size // 2 - size // 4 - size // 8]
    for i, n in enumerate(chunks):
        spec[f"data/part{i}.bin"] = os.urandom(n)
    return write_tree(root, spec)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("releases")
    return {
        "v1": make_release(base / "v1", "v1", 4 * MiB),
        "v2": make_release(base / "v2", "v2", 6 * MiB),
        "big": make_release(base / "big", "big", 16 * MiB),
    }


def manifest_of(tree: Path) -> Manifest:
    return pack(str(tree))


# -- running roost --------------------------------------------------------------------


def roost_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "roost", *args]


def roost_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC)}


def fleet_options(fleet: Fleet, hosts_file: Path | None = None, *, dest: bool = True) -> list[str]:
    return [
        "--hosts", str(hosts_file or fleet.hosts_file),
        *(["--dest", fleet.dest] if dest else []),
        "--ssh-config", str(fleet.ssh_config),
        "--connect-timeout", "5",
    ]  # fmt: skip


def deploy_argv(fleet: Fleet, src: Path, *extra: str, hosts_file: Path | None = None) -> list[str]:
    return roost_argv(
        "deploy", str(src), *fleet_options(fleet, hosts_file),
        "--advertise", fleet.controller_address,
        "--linger", LINGER,
        *extra,
    )  # fmt: skip


def deploy(
    fleet: Fleet, src: Path, *extra: str, hosts_file: Path | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        deploy_argv(fleet, src, *extra, hosts_file=hosts_file),
        capture_output=True,
        text=True,
        env=roost_env(),
        timeout=DEPLOY_TIMEOUT,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def roost(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        roost_argv(*args), capture_output=True, text=True, env=roost_env(), timeout=DEPLOY_TIMEOUT
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """Every line of ``--json`` output is one JSON object with an event name and a time."""
    events = []
    for line in stdout.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict)
        assert isinstance(event["event"], str)
        assert isinstance(event["time"], float)
        events.append(event)
    return events


def final_states(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last ``host`` event of each host."""
    states: dict[str, dict[str, Any]] = {}
    for event in events:
        if event["event"] == "host":
            states[event["name"]] = event
    return states


def deploy_json(
    fleet: Fleet, src: Path, *extra: str, hosts_file: Path | None = None
) -> tuple[int, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    result = deploy(fleet, src, "--json", *extra, hosts_file=hosts_file)
    events = parse_events(result.stdout)
    return result.returncode, events, final_states(events)


def hosts_file_with(tmp_path: Path, *names: str, name: str = "hosts.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def midway(event: dict[str, Any]) -> bool:
    """A host holds some but not all of the release."""
    return 0 < event["have"] < event["pieces"]


def deploy_and_strike(
    fleet: Fleet,
    src: Path,
    victim: str,
    strike: Callable[[str], None],
    *extra: str,
    when: Callable[[dict[str, Any]], bool] = midway,
) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """Run a ``--json`` deploy and ``strike(victim)`` at the victim's first event that
    satisfies ``when``; (exit code, events, the event struck at)."""
    lines = []
    struck_at = None
    process = subprocess.Popen(
        deploy_argv(fleet, src, "--json", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=roost_env(),
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            event = json.loads(line)
            if (
                struck_at is None
                and event["event"] == "host"
                and event["name"] == victim
                and when(event)
            ):
                strike(victim)
                struck_at = event
        code = process.wait(timeout=DEPLOY_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()
    return code, parse_events("".join(lines)), struck_at


# -- checking hosts from outside ------------------------------------------------------


def describe(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Every entry below ``root``: kind, permission bits, and content or link target."""
    entries: dict[str, tuple[str, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", mode, None)
            else:
                assert stat.S_ISREG(st.st_mode), path
                entries[rel] = ("file", mode, Path(path).read_bytes())
    return entries


def assert_same_tree(src: Path, copy: Path) -> None:
    want, got = describe(src), describe(copy)
    assert sorted(got) == sorted(want), f"{copy} differs from {src} in its entries"
    for rel in want:
        assert got[rel] == want[rel], f"{copy / rel} differs from {src / rel}"


def current(fleet: Fleet, host: str) -> str | None:
    link = fleet.host_path(host, "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def release_names(fleet: Fleet, host: str) -> set[str]:
    releases = fleet.host_path(host, "releases")
    return set(os.listdir(releases)) if releases.is_dir() else set()


def cached_runtimes(fleet: Fleet, host: str) -> list[Path]:
    """The runtime zipapps cached on the host. Found by name pattern rather than this
    process's own build: while roost is being worked on, its runtime sources (so the
    bundle's hash) may change between two deploys of one test."""
    cache = fleet.host_path(host, "/root/.cache/roost/runtime")
    return sorted(cache.glob("roost-runtime-*.pyz"), key=lambda p: p.stat().st_mtime_ns)


def runtime_path(fleet: Fleet, host: str) -> Path:
    """The most recently installed runtime zipapp on the host."""
    cached = cached_runtimes(fleet, host)
    assert cached, f"{host}: no cached runtime"
    return cached[-1]


def leftover_processes(fleet: Fleet, host: str) -> list[str]:
    """Command lines of every process on the host but its sshd listener."""
    listener = fleet.sshd_pid(host)
    found = []
    for pid in fleet.pids(host):
        if pid == listener:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append(f"{pid}: {cmdline}")
    return found


def assert_no_processes(fleet: Fleet, hosts: list[str], wait: float = 10.0) -> None:
    """Nothing of roost's (nor any ssh session) is left on the hosts, after a short grace
    period for sshd to tear sessions down."""
    deadline = time.monotonic() + wait
    while True:
        left = {h: leftover_processes(fleet, h) for h in hosts}
        left = {h: procs for h, procs in left.items() if procs}
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"processes left on hosts: {left}")
        time.sleep(0.1)


def assert_no_temp_files(fleet: Fleet, hosts: list[str]) -> None:
    """Only the cached runtime, the (empty) pid-record directory and the store remain."""
    for host in hosts:
        tmp = fleet.host_path(host, "/tmp")
        assert sorted(os.listdir(tmp)) == [], f"{host}: files left in /tmp"
        cache = fleet.host_path(host, "/root/.cache/roost")
        found = sorted(
            os.path.relpath(os.path.join(d, f), cache)
            for d, dirs, files in os.walk(cache)
            for f in files
        )
        runtimes = [f"runtime/{p.name}" for p in cached_runtimes(fleet, host)]
        assert runtimes and found == sorted(runtimes), f"{host}: {found}"
        dest = fleet.host_path(host)
        if (dest / ".roost").exists():
            for scratch in ("staging", "trash"):
                path = dest / ".roost" / scratch
                assert not path.exists() or os.listdir(path) == [], f"{host}: {path} not empty"


def assert_clean(fleet: Fleet, hosts: list[str] | None = None) -> None:
    hosts = hosts or fleet.hosts
    assert_no_processes(fleet, hosts)
    assert_no_temp_files(fleet, hosts)


@contextlib.contextmanager
def slow_origin(fleet: Fleet, rate: str = "40mbit") -> Iterator[None]:
    """Shape the controller's own link into the fleet (a token bucket on its veth), so a
    release takes seconds to leave the origin and a deploy has a 'middle' to act in."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(rf"^\d+:\s+(\S+)\s+inet {re.escape(fleet.controller_address)}/", out, re.M)
    assert match, f"no interface holds {fleet.controller_address}"
    dev = match.group(1)
    subprocess.run(
        ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
         "burst", "64kb", "latency", "400ms"],
        check=True,
    )  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)


# -- the tests ------------------------------------------------------------------------


def test_deploy_to_six_hosts_byte_for_byte(fleet: Fleet, releases: dict[str, Path]) -> None:
    src = releases["v2"]
    manifest = manifest_of(src)
    code, events, states = deploy_json(fleet, src, "--tag", "v2")
    assert code == 0, events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "phase"
    assert "start" in kinds
    assert kinds[-1] == "finish"
    start = next(e for e in events if e["event"] == "start")
    assert start["release"] == manifest.id
    assert start["hosts"] == fleet.hosts
    finish = events[-1]
    assert (finish["ok"], finish["failed"]) == (6, 0)
    origin = next(e for e in events if e["event"] == "origin")
    assert 0 < origin["uploaded"] <= 2 * manifest.total_size
    assert sorted(states) == fleet.hosts
    for host, state in states.items():
        assert state["state"] == "verified", state
        assert state["activated"] is True
        assert state["error"] is None
        assert state["from_origin"] + state["from_peers"] == manifest.total_size
        assert state["have"] == state["pieces"] == manifest.piece_count
        assert current(fleet, host) == "v2"
        assert_same_tree(src, fleet.host_path(host, "releases/v2"))
        assert_same_tree(src, fleet.host_path(host, "current"))
    assert_clean(fleet)


def test_table_when_not_a_terminal(fleet: Fleet, releases: dict[str, Path]) -> None:
    result = deploy(fleet, releases["v1"])
    assert result.returncode == 0, result.stdout + result.stderr
    for host in fleet.hosts:
        assert re.search(rf"│ {host}\s+│ ok\s+│", result.stdout), result.stdout
    assert "all 6 hosts hold the verified release" in result.stdout
    assert_clean(fleet)


def test_unreachable_hosts_are_reported_and_the_others_succeed(
    fleet: Fleet, releases: dict[str, Path], tmp_path: Path
) -> None:
    names = [*fleet.hosts[:3], fleet.unreachable, *fleet.hosts[3:], fleet.blackhole]
    hosts_file = hosts_file_with(tmp_path, *names)
    quick = ("--connect-timeout", "2")
    code, events, states = deploy_json(fleet, releases["v1"], *quick, hosts_file=hosts_file)
    assert code != 0
    refused, silent = states[fleet.unreachable], states[fleet.blackhole]
    assert refused["state"] == silent["state"] == "failed"
    assert refused["error"].startswith("unreachable: "), refused
    assert "connection refused" in refused["error"].lower(), refused
    assert "timed out" in silent["error"].lower(), silent
    for host in fleet.hosts:
        assert states[host]["state"] == "verified", states[host]
        assert_same_tree(releases["v1"], fleet.host_path(host, "current"))
    assert (events[-1]["ok"], events[-1]["failed"]) == (6, 2)
    # The same run in plain text (not a terminal): each failure with its reason, the table.
    result = deploy(fleet, releases["v1"], *quick, hosts_file=hosts_file)
    assert result.returncode == 1
    assert f"roost: {fleet.unreachable}: failed (unreachable: " in result.stdout
    assert re.search(r"│ h1\s+│ ok\s+│", result.stdout)
    assert re.search(r"│ blackhole\s+│ failed\s+│", result.stdout)
    assert f"2 of 8 hosts FAILED: {fleet.unreachable}, {fleet.blackhole}" in result.stdout
    assert_clean(fleet)


def test_host_whose_sshd_dies_mid_deploy(fleet: Fleet, releases: dict[str, Path]) -> None:
    victim = "h3"
    src = releases["big"]
    manifest = manifest_of(src)
    with slow_origin(fleet):
        code, events, killed_at = deploy_and_strike(fleet, src, victim, fleet.kill_sshd)
    assert killed_at is not None, "the victim never reported progress"
    assert code == 1
    states = final_states(events)
    assert states[victim]["state"] == "failed"
    assert states[victim]["error"].startswith("connection lost"), states[victim]
    survivors = [h for h in fleet.hosts if h != victim]
    for host in survivors:
        assert states[host]["state"] == "verified", states[host]
        assert states[host]["from_origin"] + states[host]["from_peers"] == manifest.total_size
        assert_same_tree(src, fleet.host_path(host, "current"))
    # The dead host holds no release and no half-written one in releases/.
    assert current(fleet, victim) is None
    assert release_names(fleet, victim) == set()
    assert_no_processes(fleet, survivors)
    assert_no_temp_files(fleet, survivors)


def test_all_or_nothing_leaves_current_unchanged_when_a_host_fails(
    fleet: Fleet, releases: dict[str, Path], tmp_path: Path
) -> None:
    code, _, _ = deploy_json(fleet, releases["v1"], "--tag", "v1")
    assert code == 0
    hosts_file = hosts_file_with(tmp_path, *fleet.hosts, fleet.unreachable)
    code, events, states = deploy_json(
        fleet, releases["v2"], "--tag", "v2", "--all-or-nothing", hosts_file=hosts_file
    )
    assert code != 0
    assert states[fleet.unreachable]["state"] == "failed"
    phases = [e["text"] for e in events if e["event"] == "phase"]
    assert any("not activating anywhere" in p for p in phases), phases
    for host in fleet.hosts:
        assert states[host]["activated"] is False
        assert current(fleet, host) == "v1"
        assert release_names(fleet, host) == {"v1", "v2"}  # distributed, not switched
    # With every host up, --all-or-nothing switches them all.
    code, _, states = deploy_json(fleet, releases["v2"], "--tag", "v2", "--all-or-nothing")
    assert code == 0
    for host in fleet.hosts:
        assert states[host]["activated"] is True
        assert current(fleet, host) == "v2"
    assert_clean(fleet)


def test_all_or_nothing_switches_back_when_an_activation_fails(
    fleet: Fleet, releases: dict[str, Path]
) -> None:
    assert deploy_json(fleet, releases["v1"], "--tag", "v1")[0] == 0
    victim = "h2"
    # The victim dies after it holds v2, before the fleet switches: its switch fails.
    code, events, struck = deploy_and_strike(
        fleet,
        releases["v2"],
        victim,
        fleet.kill_sshd,
        "--tag", "v2", "--all-or-nothing", "--hook", "touch hooked",
        when=lambda e: e["state"] == "complete",
    )  # fmt: skip
    assert struck is not None
    assert code == 1
    states = final_states(events)
    assert states[victim]["state"] == "failed"
    assert states[victim]["error"].startswith("activation failed: "), states[victim]
    phases = [e["text"] for e in events if e["event"] == "phase"]
    assert f"--all-or-nothing: activation failed on {victim}: switching the others back" in phases
    for host in fleet.hosts:
        assert current(fleet, host) == "v1"
        assert not fleet.host_path(host, "current/hooked").exists()
        if host != victim:
            assert states[host]["state"] == "verified"
            assert states[host]["activated"] is False
            assert release_names(fleet, host) == {"v1", "v2"}
    survivors = [h for h in fleet.hosts if h != victim]
    assert_no_processes(fleet, survivors)
    assert_no_temp_files(fleet, survivors)


def test_second_deploy_of_the_same_release_transfers_nothing(
    fleet: Fleet, releases: dict[str, Path]
) -> None:
    src = releases["v1"]
    code, _, first = deploy_json(fleet, src)
    assert code == 0
    assert all(s["from_origin"] + s["from_peers"] > 0 for s in first.values())
    runtimes = {h: [(p, p.stat()) for p in cached_runtimes(fleet, h)] for h in fleet.hosts}
    code, events, again = deploy_json(fleet, src)
    assert code == 0
    for host, state in again.items():
        assert state["state"] == "verified"
        assert state["from_origin"] + state["from_peers"] == 0, state
        assert state["downloaded"] == 0
        # The runtime was not sent again: the same file, untouched, and no other one.
        after = [(p, p.stat()) for p in cached_runtimes(fleet, host)]
        assert [p for p, _ in after] == [p for p, _ in runtimes[host]]
        for (_, now), (_, then) in zip(after, runtimes[host]):
            assert (now.st_ino, now.st_mtime_ns) == (then.st_ino, then.st_mtime_ns)
    origin = next(e for e in events if e["event"] == "origin")
    assert origin["uploaded"] == 0
    assert_clean(fleet)


def test_two_concurrent_deploys_to_overlapping_hosts(
    fleet: Fleet, releases: dict[str, Path], tmp_path: Path
) -> None:
    first = hosts_file_with(tmp_path, *fleet.hosts[:4], name="first.txt")
    second = hosts_file_with(tmp_path, *fleet.hosts[2:], name="second.txt")
    runs = [
        subprocess.Popen(
            deploy_argv(fleet, releases[tag], "--json", "--tag", tag, hosts_file=hosts),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=roost_env(),
        )
        for tag, hosts in (("v1", first), ("v2", second))
    ]
    outputs = [run.communicate(timeout=DEPLOY_TIMEOUT) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stdout + stderr
        assert all(s["state"] == "verified" for s in final_states(parse_events(stdout)).values())
    for host in fleet.hosts:
        expected = ({"v1"} if host in fleet.hosts[:4] else set()) | (
            {"v2"} if host in fleet.hosts[2:] else set()
        )
        assert release_names(fleet, host) == expected
        for tag in expected:
            assert_same_tree(releases[tag], fleet.host_path(host, f"releases/{tag}"))
        assert current(fleet, host) in expected
    assert_clean(fleet)


def test_rollback_returns_every_host_to_its_previous_release(
    fleet: Fleet, releases: dict[str, Path]
) -> None:
    for tag in ("v1", "v2"):
        code, _, _ = deploy_json(fleet, releases[tag], "--tag", tag)
        assert code == 0
    assert {current(fleet, h) for h in fleet.hosts} == {"v2"}
    result = roost("rollback", *fleet_options(fleet))
    assert result.returncode == 0, result.stdout + result.stderr
    for host in fleet.hosts:
        assert current(fleet, host) == "v1"
        assert_same_tree(releases["v1"], fleet.host_path(host, "current"))
        assert re.search(rf"│ {host}\s+│ ok\s+│", result.stdout), result.stdout
    assert_clean(fleet)


def test_rollback_reports_hosts_with_nothing_to_return_to(
    fleet: Fleet, releases: dict[str, Path], tmp_path: Path
) -> None:
    code, _, _ = deploy_json(fleet, releases["v1"], "--tag", "v1")
    assert code == 0
    hosts_file = hosts_file_with(tmp_path, "h1", fleet.unreachable)
    result = roost("rollback", *fleet_options(fleet, hosts_file))
    assert result.returncode == 1
    assert re.search(r"│ h1\s+│ FAILED\s+│", result.stdout), result.stdout
    assert re.search(rf"│ {fleet.unreachable}\s+│ FAILED\s+│ unreachable", result.stdout)
    assert current(fleet, "h1") == "v1"
    assert_clean(fleet)


def test_hook_exit_code_and_output_tail_are_reported(
    fleet: Fleet, releases: dict[str, Path]
) -> None:
    failing = fleet.address("h2")
    hook = (
        'echo "in $PWD"; cat VERSION; '
        f'case " $(hostname -I)" in *" {failing} "*) echo boom >&2; exit 3;; esac; echo fine'
    )
    code, _, states = deploy_json(fleet, releases["v1"], "--tag", "v1", "--hook", hook)
    assert code != 0
    bad = states["h2"]
    assert bad["state"] == "failed"
    assert bad["hook"] == "exit 3: boom"
    assert bad["error"] == f"hook failed (exit 3): in {fleet.dest}/current | v1 | boom"
    assert bad["activated"] is True  # the hook runs after activation, which stands
    for host in fleet.hosts:
        if host != "h2":
            assert states[host]["state"] == "verified"
            assert states[host]["hook"] == "exit 0: fine"
        assert current(fleet, host) == "v1"
    assert_clean(fleet)


def test_no_activate_distributes_only(fleet: Fleet, releases: dict[str, Path]) -> None:
    code, _, states = deploy_json(
        fleet, releases["v1"], "--tag", "v1", "--no-activate", "--hook", "touch hooked"
    )
    assert code == 0
    for host in fleet.hosts:
        assert states[host]["state"] == "verified"
        assert states[host]["activated"] is False
        assert states[host]["hook"] is None  # nothing was activated, so no hook ran
        assert current(fleet, host) is None
        assert_same_tree(releases["v1"], fleet.host_path(host, "releases/v1"))
    assert_clean(fleet)


def test_keep_prunes_old_releases(fleet: Fleet, releases: dict[str, Path]) -> None:
    for tag in ("v1", "v2"):
        assert deploy_json(fleet, releases[tag], "--tag", tag)[0] == 0
    assert deploy_json(fleet, releases["big"], "--tag", "big", "--keep", "2")[0] == 0
    for host in fleet.hosts:
        assert release_names(fleet, host) == {"v2", "big"}
        assert current(fleet, host) == "big"
    assert_clean(fleet)


def test_cleanup_stops_strays_by_recorded_pid_only(fleet: Fleet, releases: dict[str, Path]) -> None:
    src = releases["v1"]
    manifest = manifest_of(src)
    code, _, _ = deploy_json(fleet, src, "--tag", "v1")
    assert code == 0
    host = "h4"
    runtime = f"/root/.cache/roost/runtime/{runtime_path(fleet, host).name}"
    run_dir = fleet.host_path(host, "/root/.cache/roost/run")
    # A stray peer, left running as if a deploy's controller had died without a trace.
    started = fleet.run(
        host,
        f"umask 077; python3 -c 'import os; print(os.urandom(32).hex())' > /tmp/secret; "
        f"nohup python3 {runtime} seed {fleet.dest}/.roost/manifests/{manifest.id} "
        f"{fleet.dest}/releases/v1 --secret-file /tmp/secret --listen 127.0.0.1:0 "
        "</dev/null >/dev/null 2>&1 & echo $!",
        check=True,
    )
    stray = int(started.stdout.split()[-1])
    # Unrelated processes whose names look like roost's: one innocently named, and one
    # whose pid a forged (or stale, recycled) record names with another command line.
    decoys = fleet.run(
        host,
        "for i in 1 2; do nohup python3 -c 'import time; time.sleep(600)' "
        "roost-runtime seed fetch </dev/null >/dev/null 2>&1 & echo $!; done",
        check=True,
    )
    innocent, recycled = (int(p) for p in decoys.stdout.split())
    deadline = time.monotonic() + 10
    while not (run_dir / f"{stray}.json").exists():
        assert time.monotonic() < deadline, "the stray peer never recorded itself"
        time.sleep(0.05)
    (run_dir / f"{recycled}.json").write_text(
        json.dumps({"pid": recycled, "argv": ["python3", "roost-runtime.pyz", "seed"]})
    )
    try:
        result = roost("cleanup", *fleet_options(fleet, dest=False))
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(rf"│ {host}\s+│ ok\s+│ stopped 1 process\(es\)", result.stdout)
        for other in fleet.hosts:
            if other != host:
                assert re.search(rf"│ {other}\s+│ ok\s+│ stopped 0 process", result.stdout)
        assert not os.path.exists(f"/proc/{stray}")
        assert os.path.exists(f"/proc/{innocent}")
        assert os.path.exists(f"/proc/{recycled}")
        assert os.listdir(run_dir) == []  # the stray's record and the stale one are gone
    finally:
        for pid in (stray, innocent, recycled):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    fleet.run(host, "rm -f /tmp/secret", check=True)
    assert_clean(fleet)


def test_seeder_host_takes_over_from_the_controller(
    fleet: Fleet, releases: dict[str, Path]
) -> None:
    src = releases["v2"]
    manifest = manifest_of(src)
    relay = "h4"
    with slow_origin(fleet):  # the case --seeder is for: this machine's uplink is slow
        code, events, states = deploy_json(fleet, src, "--tag", "v2", "--seeder", relay)
    assert code == 0, events
    phases = [e["text"] for e in events if e["event"] == "phase"]
    assert f"seeding {relay}, which then seeds the others" in phases
    # Our uplink carried the release about once, all of it to the seeder host ...
    origin = next(e for e in events if e["event"] == "origin")
    assert manifest.total_size <= origin["uploaded"] <= 1.1 * manifest.total_size
    assert states[relay]["from_origin"] == manifest.total_size
    assert states[relay]["uploaded"] >= manifest.total_size  # it served, and that is counted
    # ... which held it before any other host started, and was the others' only source.
    relay_done = next(
        i
        for i, e in enumerate(events)
        if e["event"] == "host" and e["name"] == relay and e["state"] == "complete"
    )
    others = [h for h in fleet.hosts if h != relay]
    first_other = min(
        i
        for i, e in enumerate(events)
        if e["event"] == "host" and e["name"] in others and e["state"] == "running"
    )
    assert relay_done < first_other
    for host in fleet.hosts:
        assert states[host]["state"] == "verified", states[host]
        assert_same_tree(src, fleet.host_path(host, "current"))
    # The seeder host is the others' origin (announced as a seeder), and spares its
    # upload like one: far less than one copy per other host.
    for host in others:
        assert states[host]["from_origin"] + states[host]["from_peers"] == manifest.total_size
    from_relay = sum(states[h]["from_origin"] for h in others)
    print(f"seeder host sent {from_relay / manifest.total_size:.2f} x S to {len(others)} hosts")
    assert manifest.total_size <= from_relay < len(others) * manifest.total_size / 2
    assert_clean(fleet)


def test_seeder_must_be_one_of_the_hosts(fleet: Fleet, releases: dict[str, Path]) -> None:
    result = deploy(fleet, releases["v1"], "--seeder", "elsewhere")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "roost: error: --seeder elsewhere: not one of the hosts being deployed to"
    )
    assert all(not fleet.host_path(h).joinpath(".roost").exists() for h in fleet.hosts)


def test_host_that_vanishes_silently_mid_deploy(fleet: Fleet, releases: dict[str, Path]) -> None:
    """Its link goes dead (packets unanswered, nothing reset): ssh's keep-alives notice,
    the others are not held up, and the deploy ends."""
    victim = "h5"
    src = releases["v2"]
    with slow_origin(fleet, "24mbit"):
        code, events, killed_at = deploy_and_strike(fleet, src, victim, fleet.kill_host)
    assert killed_at is not None, "the victim never reported progress"
    assert code == 1
    states = final_states(events)
    assert states[victim]["state"] == "failed"
    assert states[victim]["error"].startswith("connection lost"), states[victim]
    survivors = [h for h in fleet.hosts if h != victim]
    for host in survivors:
        assert states[host]["state"] == "verified", states[host]
        assert_same_tree(src, fleet.host_path(host, "current"))
    assert_no_processes(fleet, survivors)
    assert_no_temp_files(fleet, survivors)


def test_dest_that_is_not_a_store_is_left_alone(fleet: Fleet, releases: dict[str, Path]) -> None:
    precious = fleet.host_path("h2") / "precious.txt"
    precious.write_text("do not delete\n")
    code, _, states = deploy_json(fleet, releases["v1"])
    assert code == 1
    assert states["h2"]["state"] == "failed"
    assert "roost store" in states["h2"]["error"], states["h2"]
    assert sorted(os.listdir(fleet.host_path("h2"))) == ["precious.txt"]
    assert precious.read_text() == "do not delete\n"
    for host in fleet.hosts:
        if host != "h2":
            assert states[host]["state"] == "verified"
    assert_clean(fleet)


def test_bounded_concurrency(fleet: Fleet, releases: dict[str, Path]) -> None:
    code, _, states = deploy_json(fleet, releases["v1"], "--concurrency", "2")
    assert code == 0
    assert all(s["state"] == "verified" for s in states.values())
    for host in fleet.hosts:
        assert_same_tree(releases["v1"], fleet.host_path(host, "current"))
    assert_clean(fleet)


def test_deploy_through_a_running_tracker(
    fleet: Fleet, releases: dict[str, Path], tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind((fleet.controller_address, 0))
        port = probe.getsockname()[1]
    token = tmp_path / "tracker.token"
    tracker = subprocess.Popen(
        roost_argv(
            "tracker", "--host", fleet.controller_address, "--port", str(port),
            "--db", str(tmp_path / "tracker.db"), "--token-file", str(token),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=roost_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect((fleet.controller_address, port))
                break
            assert tracker.poll() is None, tracker.stderr.read() if tracker.stderr else ""
            assert time.monotonic() < deadline, "the tracker did not start"
            time.sleep(0.1)
        url = f"http://{fleet.controller_address}:{port}"
        code, _, states = deploy_json(
            fleet, releases["v1"], "--tracker", url, "--tracker-token-file", str(token)
        )
        assert code == 0
        assert all(s["state"] == "verified" for s in states.values())
    finally:
        tracker.send_signal(signal.SIGTERM)
        tracker.wait(timeout=30)
    for host in fleet.hosts:
        assert_same_tree(releases["v1"], fleet.host_path(host, "current"))
    assert_clean(fleet)


def test_controller_side_failure_fails_every_host_with_the_reason(
    fleet: Fleet, releases: dict[str, Path]
) -> None:
    # An address this machine does not have: the tracker and seeder cannot listen there.
    code, events, states = deploy_json(fleet, releases["v1"], "--advertise", fleet.address("h1"))
    assert code == 1
    assert any(e["event"] == "phase" and "deploy aborted" in e["text"] for e in events)
    for host in fleet.hosts:
        assert states[host]["state"] == "failed"
        assert states[host]["error"].startswith("deploy aborted: "), states[host]
        assert current(fleet, host) is None
    assert events[-1]["event"] == "finish"
    assert_clean(fleet)


def table_rows(stdout: str) -> dict[str, str]:
    """host -> result, from a fleet command's table (rollback, cleanup)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 2 and cells[1] in ("ok", "FAILED"):
            rows[cells[0]] = cells[1]
    return rows


def test_every_inventory_source_reaches_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    ssh = ("--ssh-config", str(fleet.ssh_config))
    from_stdin = subprocess.run(
        roost_argv("cleanup", "--hosts", "-", *ssh),
        input="# from a pipe\nh1\nh2 rack=r1\n",
        capture_output=True,
        text=True,
        env=roost_env(),
        timeout=DEPLOY_TIMEOUT,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert table_rows(from_stdin.stdout) == {"h1": "ok", "h2": "ok"}
    from_list = roost("cleanup", "-H", "h3,h4", *ssh)
    assert from_list.returncode == 0, from_list.stderr
    assert table_rows(from_list.stdout) == {"h3": "ok", "h4": "ok"}
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        f"[web]\nh5\n[db]\ndatabase ansible_host={fleet.address('h6')}\n"
        "[app:children]\nweb\ndb\n[other]\nh1\n"
    )
    from_ansible = roost("cleanup", "--hosts", str(inventory), "--group", "app", *ssh)
    assert from_ansible.returncode == 0, from_ansible.stderr
    assert table_rows(from_ansible.stdout) == {"h5": "ok", "database": "ok"}
    unknown = roost("cleanup", "--hosts", str(inventory), "--group", "nope", *ssh)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith(f"roost: error: {inventory}: no group 'nope'")


def test_host_key_policy(fleet: Fleet, tmp_path: Path) -> None:
    """Strict by default: a host whose key does not match known_hosts is refused."""
    keys = {
        line.split(",")[0]: line.split(" ", 1)[1]
        for line in fleet.known_hosts.read_text().splitlines()
    }
    known_hosts = tmp_path / "known_hosts"
    config = tmp_path / "ssh_config"
    config.write_text(
        fleet.ssh_config.read_text().replace(str(fleet.known_hosts), str(known_hosts))
    )
    # h1's name and address listed with h2's key: an impostor, as far as ssh can tell.
    known_hosts.write_text(
        f"h1,{fleet.address('h1')} {keys['h2']}\nh2,{fleet.address('h2')} {keys['h2']}\n"
    )
    args = ("cleanup", "-H", "h1,h2", "--ssh-config", str(config))
    strict = roost(*args)
    assert strict.returncode == 1
    assert table_rows(strict.stdout) == {"h1": "FAILED", "h2": "ok"}
    assert "Host key verification failed" in strict.stdout
    assert table_rows(roost(*args, "--host-key-policy", "accept-new").stdout)["h1"] == "FAILED"
    # An unknown host: refused when strict, learnt with accept-new.
    known_hosts.write_text("")
    assert table_rows(roost(*args).stdout) == {"h1": "FAILED", "h2": "FAILED"}
    learnt = roost(*args, "--host-key-policy", "accept-new")
    assert table_rows(learnt.stdout) == {"h1": "ok", "h2": "ok"}
    assert keys["h1"].strip() in known_hosts.read_text()
    known_hosts.write_text("")
    assert table_rows(roost(*args, "--host-key-policy", "off").stdout) == {"h1": "ok", "h2": "ok"}
