"""The SSH fleet fixture itself: real sshd in network namespaces, private files per host,
failure helpers, and teardown that leaves nothing behind."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    from fleet import Fleet

# The fleet, fleet_session and fleet_factory fixtures. The module itself is imported only
# through this (not at the top of this file) so that pytest can register it as a plugin.
pytest_plugins = ["fleet"]


@pytest.fixture
def lib() -> ModuleType:
    """tests/fleet.py itself."""
    return importlib.import_module("fleet")


def ssh(
    f: Fleet, host: str, *cmd: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(f.ssh_config), *options, host, *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_every_host_answers_over_ssh_by_alias_and_address(fleet: Fleet) -> None:
    assert fleet.hosts == [f"h{i}" for i in range(1, 7)]
    assert fleet.hosts_file.read_text().split() == fleet.hosts
    for host in fleet.hosts:
        result = ssh(fleet, host, "hostname -I")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [fleet.address(host)]
    by_address = ssh(fleet, fleet.address("h3"), "hostname -I")
    assert by_address.returncode == 0, by_address.stderr
    assert by_address.stdout.split() == [fleet.address("h3")]
    assert len({fleet.address(h) for h in fleet.hosts}) == 6


def test_host_keys_are_checked_strictly(fleet: Fleet, tmp_path: Path) -> None:
    # Same config, but a known_hosts that holds h2's key under h1's name and address.
    lines = fleet.known_hosts.read_text().splitlines()
    h2_key = lines[1].split(" ", 1)[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"h1,{fleet.address('h1')} {h2_key}\n")
    result = ssh(fleet, "h1", "true", options=("-o", f"UserKnownHostsFile={wrong}"))
    assert result.returncode == 255
    assert "host key" in result.stderr.lower()


def test_each_host_has_its_own_dest_home_and_tmp(fleet: Fleet) -> None:
    dest = fleet.dest
    fleet.run("h1", f"echo one > {dest}/marker && mkdir -p ~/.cache/roost && echo c > "
              "~/.cache/roost/c && echo t > /tmp/t", check=True)  # fmt: skip
    assert fleet.run("h1", f"cat {dest}/marker", check=True).stdout == "one\n"
    # invisible on another host ...
    for probe in (f"{dest}/marker", "~/.cache/roost/c", "/tmp/t"):
        assert fleet.run("h2", f"test -e {probe}").returncode == 1, probe
    # ... and on the root filesystem, except through host_path
    assert not os.path.exists(os.path.join(dest, "marker"))
    assert (fleet.host_path("h1") / "marker").read_bytes() == b"one\n"
    assert fleet.host_path("h1", "marker") == fleet.host_path("h1") / "marker"
    assert fleet.host_path("h1", "/root/.cache/roost/c").read_text() == "c\n"
    assert fleet.host_path("h1", "/tmp/t").read_text() == "t\n"
    assert not (fleet.host_path("h2") / "marker").exists()
    # a file written from outside shows up on that host only
    (fleet.host_path("h4") / "from-outside").write_bytes(b"\0\1\2")
    assert fleet.run("h4", f"od -An -tx1 {dest}/from-outside", check=True).stdout.split() == [
        "00",
        "01",
        "02",
    ]
    assert fleet.run("h5", f"ls -A {dest}", check=True).stdout == ""
    with pytest.raises(ValueError):
        fleet.host_path("h1", "/etc/passwd")


def test_hosts_run_python3_of_at_least_3_9(fleet: Fleet) -> None:
    result = fleet.run(
        "h2",
        "command -v python3 && python3 -c 'import sys; print(*sys.version_info[:2])'",
        check=True,
    )
    path, version = result.stdout.splitlines()
    assert path in ("/usr/bin/python3", "/bin/python3")
    assert tuple(int(v) for v in version.split()) >= (3, 9)
    assert fleet.run("h2", "python3 --version", check=True).stdout.startswith("Python 3.")
    # nothing of roost is preinstalled: the controller's environment does not leak in
    no_roost = fleet.run("h2", ["python3", "-c", "import roost"])
    assert no_roost.returncode == 1
    assert "ModuleNotFoundError" in no_roost.stderr
    assert fleet.run("h2", "env", check=True).stdout.count("PYTHONPATH") == 0


def test_hosts_reach_the_controller_on_its_bridge_address(fleet: Fleet) -> None:
    """What roost's tracker and seeder need: hosts connect to the controller's address."""
    server = socket.create_server((fleet.controller_address, 0))
    port = server.getsockname()[1]
    received: list[bytes] = []

    def accept() -> None:
        server.settimeout(30)
        for _ in range(2):
            conn, _addr = server.accept()
            with conn:
                received.append(conn.recv(100))

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        for host in ("h1", "h6"):
            address = (fleet.controller_address, port)
            script = f"import socket; socket.create_connection({address!r}).sendall(b'{host}')"
            fleet.run(host, ["python3", "-c", script], check=True)
    finally:
        thread.join(timeout=30)
        server.close()
    assert sorted(received) == [b"h1", b"h6"]


def test_killed_sshd_makes_one_host_unreachable_and_restart_brings_it_back(fleet: Fleet) -> None:
    # a session process on h3 that would outlive a killed listener
    fleet.run("h3", "setsid sleep 300 </dev/null >/dev/null 2>&1 &", check=True)
    assert len(fleet.pids("h3")) >= 2
    fleet.kill_sshd("h3")
    assert fleet.pids("h3") == []
    assert fleet.sshd_pid("h3") is None
    down = ssh(fleet, "h3", "true")
    assert down.returncode == 255
    assert "refused" in down.stderr
    for host in ("h1", "h2", "h4", "h5", "h6"):
        assert ssh(fleet, host, "true").returncode == 0, host
    fleet.restart_sshd("h3")
    assert ssh(fleet, "h3", "true").returncode == 0


def test_kill_sshd_listener_only_keeps_sessions(fleet: Fleet) -> None:
    fleet.run("h1", "setsid sleep 300 </dev/null >/dev/null 2>&1 &", check=True)
    fleet.kill_sshd("h1", all_processes=False)
    assert ssh(fleet, "h1", "true").returncode == 255
    assert fleet.pids("h1"), "the session's process should survive"


def test_killed_host_goes_silent_and_failure_targets(fleet: Fleet) -> None:
    fast = ("-o", "ConnectTimeout=1")
    began = time.monotonic()
    refused = ssh(fleet, fleet.unreachable, "true", options=fast)
    assert refused.returncode == 255
    assert "refused" in refused.stderr
    assert time.monotonic() - began < 1.0

    fleet.kill_host("h5")
    for target in ("h5", fleet.blackhole):
        began = time.monotonic()
        silent = ssh(fleet, target, "true", options=fast)
        assert silent.returncode == 255, target
        assert "refused" not in silent.stderr, target
        assert time.monotonic() - began >= 0.9, target
    assert ssh(fleet, "h4", "true").returncode == 0


def test_reset_restores_every_host(fleet: Fleet) -> None:
    fleet.run("h1", f"touch {fleet.dest}/x ~/y /tmp/z", check=True)
    fleet.kill_sshd("h2")
    fleet.kill_host("h3")
    fleet.reset()
    for host in fleet.hosts:
        assert ssh(fleet, host, "true").returncode == 0, host
    assert list(fleet.host_path("h1").iterdir()) == []
    assert not fleet.host_path("h1", "/root/y").exists()
    assert not fleet.host_path("h1", "/tmp/z").exists()


def _fleet_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def test_teardown_leaves_nothing_behind(lib: ModuleType) -> None:
    lib.skip_unless_possible()
    with lib.Fleet(2) as f:
        assert ssh(f, "h2", "true").returncode == 0
        f.run("h1", "setsid sleep 300 </dev/null >/dev/null 2>&1 &", check=True)
        namespaces = [n for n in _fleet_netns() if n.startswith(f.tag + "-")]
        pids = [p for h in f.hosts for p in f.pids(h)]
        directory, link = f.dir, f._link
        assert len(namespaces) == 4  # h1, h2, unreachable, the bridge
        assert len(pids) >= 3
        assert Path("/sys/class/net", link).exists()
        # the hosts' bind mounts live in their own mount namespaces only
        assert str(directory) not in Path("/proc/self/mountinfo").read_text()
    assert not [n for n in _fleet_netns() if n.startswith(f.tag + "-")]
    assert not [p for p in pids if lib._alive(p)]
    assert not directory.exists()
    assert not Path("/sys/class/net", link).exists()
    assert not os.path.exists(f.dest)  # DEST never exists on the root filesystem
    f.stop()  # twice is harmless


def test_teardown_after_a_failing_test_body(lib: ModuleType) -> None:
    lib.skip_unless_possible()
    with pytest.raises(ZeroDivisionError), lib.Fleet(1) as f:
        directory = f.dir
        _ = 1 / 0
    assert not directory.exists()
    assert not [n for n in _fleet_netns() if n.startswith(f.tag + "-")]


CRASHING_RUN = """
import json, os, signal, sys
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # tests/, the repo root
from fleet import Fleet
f = Fleet(2).start()
pids = [p for h in f.hosts for p in f.pids(h)]
print(json.dumps({"tag": f.tag, "dir": str(f.dir), "link": f._link, "pids": pids}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no atexit
"""


def test_cleanup_leftovers_removes_what_a_crashed_run_left(
    fleet_factory: Callable[..., Fleet], lib: ModuleType
) -> None:
    live = fleet_factory(1)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == -9, crashed.stderr
    left = json.loads(crashed.stdout)
    assert [n for n in _fleet_netns() if n.startswith(left["tag"] + "-")]
    assert [p for p in left["pids"] if lib._alive(p)]

    removed = lib.cleanup_leftovers()

    assert f"dir {left['dir']}" in removed
    assert not [n for n in _fleet_netns() if n.startswith(left["tag"] + "-")]
    assert not [p for p in left["pids"] if lib._alive(p)]
    assert not Path(left["dir"]).exists()
    assert not Path("/sys/class/net", left["link"]).exists()
    # the live fleet of this very process is untouched
    assert ssh(live, "h1", "true").returncode == 0


def test_cleanup_leftovers_removes_a_stray_link_of_a_dead_run(lib: ModuleType) -> None:
    lib.skip_unless_possible()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    link = f"{lib.LINK_PREFIX}{dead.pid}x0"
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
    try:
        assert f"link {link}" in lib.cleanup_leftovers()
        assert not Path("/sys/class/net", link).exists()
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def test_missing_requirements_are_named(lib: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lib.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(lib, "_tool", lambda name: None if name == "sshd" else f"/usr/bin/{name}")
    missing = lib.missing_requirements()
    assert any(m.startswith("root (running as uid 1000") for m in missing)
    assert "`sshd` (apt-get install openssh-server)" in missing
