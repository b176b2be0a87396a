"""A fleet of real SSH "hosts" on this machine, for end-to-end tests of ``roost deploy``.

Each host is a network namespace with its own address on a private test subnet
(``10.213.<k>.0/24``), joined by a veth pair to a bridge that lives in a
namespace of its own; the test process (the controller) sits on the same
bridge through one more veth pair, at ``<subnet>.1``. Every host runs its own
OpenSSH ``sshd`` (its own host key, key-only auth with a per-fleet client key)
inside a private mount namespace in which three directories are the host's own:

* the parent of DEST (``/srv`` for the default DEST ``/srv/roost-fleet``),
* ``/root`` (root's HOME, so ``~/.cache/roost`` is per host),
* ``/tmp``.

They are backed by ``<fleet dir>/hosts/<name>/{srv,home,tmp}`` on the root
filesystem; :meth:`Fleet.host_path` maps a path as a host sees it to the path
backing it, so tests compare trees byte for byte from outside. Nothing is
created at DEST on the root filesystem.

The controller gets an ``ssh_config`` (``ssh -F fleet.ssh_config h1 true``) with
one entry per host alias (``h1`` .. ``hN``; the host's address matches the same
entry), a ``known_hosts`` holding each host's key, and a ``hosts_file`` listing
the aliases. Two failure targets: ``unreachable`` (an address where nothing
listens: connections are refused at once) and ``blackhole`` (an address where
nobody answers: connections time out).

Every name this module creates starts with ``roost-t<pid>-`` (namespaces, the
fleet's directory under ``/var/tmp``) or ``rft<pid>x`` (the controller's veth in
the root namespace), so parallel runs never collide and
:func:`cleanup_leftovers` removes what crashed runs left behind, by the dead
run's pid and the sshd pids it recorded, never by matching process names.

Needs root, ``ip`` (iproute2), ``sshd`` (openssh-server), ``ssh``/``ssh-keygen``
(openssh-client), ``unshare``/``mount`` (util-linux, mount) and ``/usr/bin/python3``
>= 3.9 (the hosts' Python); the fixtures skip, naming what is missing, otherwise.

Fixtures (import them into a test module, or list this module in
``pytest_plugins`` of the top conftest):

* ``fleet`` - a clean 6-host fleet for each test (one session-wide fleet,
  :meth:`Fleet.reset` before every test: sshd restarted, host dirs wiped);
* ``fleet_factory`` - ``fleet_factory(n=6, **kwargs)`` starts a fresh fleet,
  stopped when the test ends.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from bench import netns as _netns
from bench.netns import NetnsError
from bench.netns import alive as _alive
from bench.netns import tool as _tool

PREFIX = "roost-t"  # namespaces and directories: roost-t<pid>-<seq>-...
LINK_PREFIX = "rft"  # the controller's veth in the root namespace: rft<pid>x<seq>
DEFAULT_DEST = "/srv/roost-fleet"
DEFAULT_HOSTS = 6
BASE_DIR = "/var/tmp"  # not /tmp: hosts get a private /tmp, the fleet's files must stay visible
SUBNET_PREFIX = "10.213."
LOCK_FILE = "/run/lock/roost-fleet.lock"
HOST_PYTHON = "/usr/bin/python3"
MIN_PYTHON = (3, 9)
UNREACHABLE = "unreachable"
BLACKHOLE = "blackhole"
START_TIMEOUT = 10.0

# tool -> Debian package that provides it
TOOLS = {
    "ip": "iproute2",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "unshare": "util-linux",
    "mount": "mount",
}
APT_PACKAGES = sorted(set(TOOLS.values()) | {"python3"})

_seq = itertools.count()


class FleetError(NetnsError):
    """The fleet could not be set up or torn down."""


def missing_requirements() -> list[str]:
    """What this machine lacks to run a fleet, one readable item each; empty when all is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()}; namespaces, mounts and sshd need it)")
    for tool, package in TOOLS.items():
        if _tool(tool) is None:
            missing.append(f"`{tool}` (apt-get install {package})")
    if not os.access(HOST_PYTHON, os.X_OK):
        missing.append(f"{HOST_PYTHON} for the hosts (apt-get install python3)")
    else:
        try:
            out = subprocess.run(
                [HOST_PYTHON, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            version = (int(out[0]), int(out[1]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            missing.append(f"a working {HOST_PYTHON} for the hosts ({exc})")
        else:
            if version < MIN_PYTHON:
                missing.append(
                    f"{HOST_PYTHON} >= 3.9 for the hosts (it is {version[0]}.{version[1]})"
                )
    if not missing:
        probe = f"{PREFIX}{os.getpid()}-probe"
        try:
            _ip("netns", "add", probe)
        except FleetError as exc:
            missing.append(f"network namespaces (`ip netns add` fails: {exc})")
        else:
            with contextlib.suppress(FleetError):
                _ip("netns", "del", probe)
    return missing


def skip_unless_possible() -> None:
    """``pytest.skip`` with the exact list of what is missing, if anything is."""
    missing = missing_requirements()
    if missing:
        pytest.skip("fleet fixture needs " + "; ".join(missing))


# ---------------------------------------------------------------------------
# small process helpers


_ip = functools.partial(_netns.ip, error=FleetError)
_netns_pids = functools.partial(_netns.netns_pids, error=FleetError)
_kill_pids = functools.partial(_netns.kill_pids, error=FleetError)
_kill_netns_processes = functools.partial(_netns.kill_netns_processes, error=FleetError)


def _pid_is_dead(pid_text: str) -> bool:
    pid = int(pid_text)
    return pid != os.getpid() and not _alive(pid)


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Serialises subnet choice and leftover cleanup between concurrent runs."""
    path = LOCK_FILE if os.path.isdir(os.path.dirname(LOCK_FILE)) else "/tmp/roost-fleet.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# leftovers of crashed runs

_NETNS_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_LINK_RE = re.compile(rf"^{re.escape(LINK_PREFIX)}(\d+)x\d+$")


def _fleet_netns() -> list[str]:
    out = _ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_recorded_sshd(fleet_dir: Path) -> None:
    """Kill the sshd processes a (dead) fleet recorded in its pid files, after checking
    that each pid still is that fleet's sshd (its command line names the fleet's config)."""
    for pidfile in fleet_dir.glob("hosts/*/sshd.pid"):
        try:
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        config = str(pidfile.parent / "sshd_config").encode()
        if config in cmdline:
            _kill_pids([pid])


def cleanup_leftovers(base_dir: str = BASE_DIR) -> list[str]:
    """Remove namespaces, veths, sshd processes and directories left by fleets of runs
    whose process is gone (by the ``roost-t<pid>-`` prefix). Returns what it removed."""
    removed: list[str] = []
    with _global_lock():
        dirs = []
        for entry in sorted(Path(base_dir).glob(f"{PREFIX}*")):
            m = _NETNS_RE.match(entry.name)
            if m and entry.is_dir() and _pid_is_dead(m.group(1)):
                dirs.append(entry)
                _kill_recorded_sshd(entry)
        for name in _fleet_netns():
            m = _NETNS_RE.match(name)
            if m and _pid_is_dead(m.group(1)):
                _kill_netns_processes(name)
                _ip("netns", "del", name, check=False)
                removed.append(f"netns {name}")
        for line in _ip("-o", "link", "show", check=False).splitlines():
            parts = line.split(":")
            if len(parts) < 2:
                continue
            name = parts[1].strip().split("@")[0]
            m = _LINK_RE.match(name)
            if m and _pid_is_dead(m.group(1)):
                _ip("link", "del", name, check=False)
                removed.append(f"link {name}")
        for entry in dirs:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"dir {entry}")
    return removed


# ---------------------------------------------------------------------------
# the fleet


@dataclass
class Host:
    name: str  # ssh alias: h1 .. hN
    address: str
    netns: str
    dir: Path  # <fleet dir>/hosts/<name>
    proc: subprocess.Popen | None = None

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"


class Fleet:
    """N SSH hosts in network namespaces. Use as a context manager (or ``start``/``stop``).

    ``dest`` is the path that is private per host (its parent directory is bind-mounted
    per host, so it must not be ``/``-level and its parent must exist on the root fs).
    """

    def __init__(
        self,
        n: int = DEFAULT_HOSTS,
        *,
        dest: str = DEFAULT_DEST,
        base_dir: str = BASE_DIR,
    ) -> None:
        if not 1 <= n <= 200:
            raise ValueError("a fleet has 1..200 hosts")
        dest = os.path.normpath(dest)
        parent = os.path.dirname(dest)
        if not os.path.isabs(dest) or parent == "/":
            raise ValueError(f"dest must be an absolute path below a top-level directory: {dest}")
        if parent in ("/root", "/tmp") or parent.startswith(("/root/", "/tmp/")):
            raise ValueError(f"dest must not be under /root or /tmp (already private): {dest}")
        base = os.path.normpath(os.path.abspath(base_dir))
        if any(base == d or base.startswith(d + "/") for d in (parent, "/root", "/tmp")):
            raise ValueError(f"base_dir {base} would be hidden on hosts ({parent}, /root, /tmp)")
        self.n = n
        self.dest = dest
        self.base_dir = base
        self.seq = next(_seq)
        self.tag = f"{PREFIX}{os.getpid()}-{self.seq}"
        self.dir = Path()
        self.subnet = ""  # e.g. "10.213.7.0/24"
        self.controller_address = ""
        self.hosts: list[str] = [f"h{i}" for i in range(1, n + 1)]
        self.unreachable = UNREACHABLE
        self.blackhole = BLACKHOLE
        self._hosts: dict[str, Host] = {}
        self._bridge_netns = f"{self.tag}-net"
        self._unreachable_netns = f"{self.tag}-{UNREACHABLE}"
        self._link = f"{LINK_PREFIX}{os.getpid()}x{self.seq}"
        self._created_netns: list[str] = []
        self._started = False
        self.startup_seconds = 0.0

    # -- paths the tests use ------------------------------------------------

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def client_key(self) -> Path:
        return self.dir / "client_key"

    @property
    def hosts_file(self) -> Path:
        """One alias a line, h1 .. hN."""
        return self.dir / "hosts.txt"

    @property
    def ssh_options(self) -> list[str]:
        """Arguments that make ``ssh`` use this fleet's config: ``["-F", <ssh_config>]``."""
        return ["-F", str(self.ssh_config)]

    @property
    def private_dirs(self) -> dict[str, str]:
        """Path on a host -> name of the per-host directory backing it."""
        return {os.path.dirname(self.dest): "srv", "/root": "home", "/tmp": "tmp"}

    def _host(self, host: str) -> Host:
        try:
            return self._hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this fleet (hosts: {self.hosts})") from None

    def address(self, host: str) -> str:
        if host == self.unreachable:
            return self._addr(253)
        if host == self.blackhole:
            return self._addr(254)
        return self._host(host).address

    def netns(self, host: str) -> str:
        """The host's network namespace (for ``ip -n``, ``tc``, ``ip netns exec``)."""
        return self._host(host).netns

    def sshd_log(self, host: str) -> Path:
        return self._host(host).log

    def sshd_pid(self, host: str) -> int | None:
        proc = self._host(host).proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def pids(self, host: str) -> list[int]:
        """Every live process on the host (sshd, sessions, what they started)."""
        return [p for p in _netns_pids(self.netns(host)) if _alive(p)]

    def host_path(self, host: str, path: str | None = None) -> Path:
        """The root-fs path backing ``path`` as ``host`` sees it (default: DEST).

        A relative ``path`` is taken relative to DEST; an absolute one must lie in one of
        the host's private directories (DEST's parent, ``/root``, ``/tmp``)."""
        h = self._host(host)
        if path is None:
            path = self.dest
        elif not os.path.isabs(path):
            path = os.path.join(self.dest, path)
        path = os.path.normpath(path)
        for mount, name in self.private_dirs.items():
            if path == mount or path.startswith(mount + "/"):
                return h.dir / name / os.path.relpath(path, mount)
        raise ValueError(f"{path} is not private to a host (private: {list(self.private_dirs)})")

    # -- commands -------------------------------------------------------------

    def ssh_argv(self, host: str, *remote: str) -> list[str]:
        """``ssh -F <config> <host> [remote...]``."""
        return ["ssh", *self.ssh_options, host, *remote]

    def run(
        self,
        host: str,
        cmd: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a shell string, or an argv that gets quoted) on ``host`` over ssh."""
        remote = cmd if isinstance(cmd, str) else shlex.join(cmd)
        result = subprocess.run(
            self.ssh_argv(host, remote),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ssh {host} {remote!r} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    # -- failures -------------------------------------------------------------

    def kill_sshd(self, host: str, *, all_processes: bool = True) -> None:
        """SIGKILL the host's sshd. With ``all_processes`` (default) also every other process
        on the host (ssh sessions and whatever they started, e.g. roost's peer): the host is
        dead, its connections reset. Without it only the listener dies; sessions go on."""
        h = self._host(host)
        if all_processes:
            _kill_netns_processes(h.netns)
        elif h.proc is not None:
            _kill_pids([h.proc.pid])
        if h.proc is not None:
            h.proc.wait(timeout=10)
            h.proc = None

    def kill_host(self, host: str) -> None:
        """A host that vanishes silently: every process killed and its link taken down, so
        packets to it go unanswered (connections time out instead of being reset)."""
        # Link first: the dying processes' FIN/RST never reach the controller.
        _ip("link", "set", "eth0", "down", netns=self.netns(host))
        self.kill_sshd(host, all_processes=True)

    def restart_sshd(self, host: str, *, wait: bool = True) -> None:
        """Bring a killed host back (link up, a new sshd; its files are kept)."""
        h = self._host(host)
        if h.proc is not None and h.proc.poll() is None:
            return
        _ip("link", "set", "eth0", "up", netns=h.netns)
        self._start_sshd(h)
        if wait:
            self._wait_listening([h])

    def reset(self) -> None:
        """Return every host to a fresh state: all processes on hosts killed, DEST's parent,
        HOME and /tmp emptied, links up, a new sshd on each host."""
        for h in self._hosts.values():
            self.kill_sshd(h.name)
            _ip("link", "set", "eth0", "up", netns=h.netns)
            self._make_host_dirs(h, wipe=True)
        for h in self._hosts.values():
            self._start_sshd(h)
        self._wait_listening(list(self._hosts.values()))

    # -- life cycle -----------------------------------------------------------

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Fleet:
        missing = missing_requirements()
        if missing:
            raise FleetError("fleet needs " + "; ".join(missing))
        cleanup_leftovers(self.base_dir)
        began = time.monotonic()
        self._started = True
        atexit.register(self.stop)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir=self.base_dir))
            self.dir.chmod(0o755)
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privsep directory
            os.makedirs(os.path.dirname(self.dest), exist_ok=True)
            keygen = self._generate_keys()
            with _global_lock():
                self._choose_subnet()
                self._make_network()
            for proc in keygen:
                if proc.wait(timeout=30) != 0:
                    raise FleetError(f"ssh-keygen failed: {proc.args}")
            self._write_client_files()
            for h in self._hosts.values():
                self._make_host_dirs(h, wipe=False)
                self._write_sshd_config(h)
                self._start_sshd(h)
            self._wait_listening(list(self._hosts.values()))
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Remove everything: processes, namespaces (with their veths and bridge), the
        controller's veth, the fleet directory. Safe to call twice; raises if anything
        could not be removed, after trying everything."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        for name in self._created_netns:
            attempt(f"kill processes in {name}", lambda name=name: _kill_netns_processes(name))
        for h in self._hosts.values():
            if h.proc is not None:
                with contextlib.suppress(OSError):
                    h.proc.kill()
                attempt(f"reap sshd of {h.name}", lambda h=h: h.proc.wait(timeout=10))
                h.proc = None
        for name in reversed(self._created_netns):
            attempt(f"delete netns {name}", lambda name=name: _ip("netns", "del", name))
        self._created_netns.clear()
        if Path(f"/sys/class/net/{self._link}").exists():
            attempt(f"delete link {self._link}", lambda: _ip("link", "del", self._link))
        if self.dir != Path() and self.dir.exists():
            attempt(f"remove {self.dir}", lambda: shutil.rmtree(self.dir))
        if errors:
            raise FleetError("fleet teardown incomplete: " + "; ".join(errors))

    # -- set-up steps -----------------------------------------------------------

    def _addr(self, last: int) -> str:
        return self.subnet.rsplit(".", 1)[0] + f".{last}"

    def _choose_subnet(self) -> None:
        """The first 10.213.<k>.0/24 that no route in the root namespace overlaps."""
        taken = []
        for line in _ip("-4", "route", "show", "table", "all").splitlines():
            word = line.split()[0] if line.split() else ""
            if word in ("broadcast", "local", "unicast", "multicast"):
                word = line.split()[1]
            with contextlib.suppress(ValueError):
                if word != "default":
                    taken.append(ipaddress.ip_network(word, strict=False))
        for k in range(1, 255):
            net = ipaddress.ip_network(f"{SUBNET_PREFIX}{k}.0/24")
            if not any(net.overlaps(t) for t in taken):
                self.subnet = str(net)
                break
        else:
            raise FleetError(f"no free {SUBNET_PREFIX}<k>.0/24 subnet")
        self.controller_address = self._addr(1)
        for i, name in enumerate(self.hosts, start=1):
            self._hosts[name] = Host(
                name=name,
                address=self._addr(10 + i),
                netns=f"{self.tag}-{name}",
                dir=self.dir / "hosts" / name,
            )

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created_netns.append(name)
        _ip("link", "set", "lo", "up", netns=name)

    def _make_network(self) -> None:
        br = self._bridge_netns
        self._add_netns(br)
        _ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", netns=br)
        _ip("link", "set", "br0", "up", netns=br)
        # the controller: root namespace <-> bridge
        _ip("link", "add", self._link, "type", "veth", "peer", "name", "ctl", "netns", br)
        _ip("link", "set", "ctl", "master", "br0", "up", netns=br)
        _ip("addr", "add", f"{self.controller_address}/24", "dev", self._link)
        _ip("link", "set", self._link, "up")
        ports = [(h.netns, h.address) for h in self._hosts.values()]
        ports.append((self._unreachable_netns, self.address(self.unreachable)))
        for i, (netns, address) in enumerate(ports):
            self._add_netns(netns)
            port = f"p{i}"
            veth = ["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns]
            _ip(*veth, netns=br)
            _ip("link", "set", port, "master", "br0", "up", netns=br)
            _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
            _ip("link", "set", "eth0", "up", netns=netns)

    def _generate_keys(self) -> list[subprocess.Popen]:
        keygen = _tool("ssh-keygen") or "ssh-keygen"
        targets = [self.client_key]
        for name in self.hosts:
            (self.dir / "hosts" / name).mkdir(parents=True)
            targets.append(self.dir / "hosts" / name / "ssh_host_ed25519_key")
        return [
            subprocess.Popen(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"{self.tag}", "-f", str(t)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            for t in targets
        ]

    def _write_client_files(self) -> None:
        lines = []
        for h in self._hosts.values():
            key = (h.dir / "ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"{h.name},{h.address} {key[0]} {key[1]}\n")
        self.known_hosts.write_text("".join(lines))
        self.hosts_file.write_text("".join(f"{name}\n" for name in self.hosts))
        entries = [(h.name, h.address) for h in self._hosts.values()]
        entries += [(name, self.address(name)) for name in (self.unreachable, self.blackhole)]
        config = [f"# roost test fleet {self.tag}: ssh -F {self.ssh_config} h1\n"]
        for name, address in entries:
            config.append(f"Host {name} {address}\n    HostName {address}\n")
        config.append(
            "Host *\n"
            "    User root\n"
            "    Port 22\n"
            f'    IdentityFile "{self.client_key}"\n'
            "    IdentitiesOnly yes\n"
            "    IdentityAgent none\n"
            f'    UserKnownHostsFile "{self.known_hosts}"\n'
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    CheckHostIP no\n"
            "    UpdateHostKeys no\n"
            "    BatchMode yes\n"
            "    ConnectTimeout 5\n"
            "    LogLevel ERROR\n"
        )
        self.ssh_config.write_text("".join(config))

    def _make_host_dirs(self, h: Host, *, wipe: bool) -> None:
        for name in self.private_dirs.values():
            d = h.dir / name
            if wipe and d.exists():
                shutil.rmtree(d)
            d.mkdir(exist_ok=True)
        (h.dir / "srv" / os.path.basename(self.dest)).mkdir(exist_ok=True)
        (h.dir / "srv").chmod(0o755)
        (h.dir / "home").chmod(0o700)
        (h.dir / "tmp").chmod(0o1777)
        ssh_dir = h.dir / "home" / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text((self.dir / "client_key.pub").read_text())
        authorized.chmod(0o600)

    def _write_sshd_config(self, h: Host) -> None:
        h.sshd_config.write_text(
            f"ListenAddress {h.address}:22\n"
            f"HostKey {h.dir / 'ssh_host_ed25519_key'}\n"
            f"PidFile {h.dir / 'sshd.pid'}\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "AuthenticationMethods publickey\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "AuthorizedKeysFile .ssh/authorized_keys\n"
            "StrictModes yes\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "X11Forwarding no\n"
            "MaxStartups 200\n"
            "MaxSessions 200\n"
            "LoginGraceTime 30\n"
            "LogLevel VERBOSE\n"
            "AcceptEnv LANG LC_*\n"
            "Subsystem sftp internal-sftp\n"
        )

    def _start_sshd(self, h: Host) -> None:
        binds = "".join(
            f"mount --bind {shlex.quote(str(h.dir / name))} {shlex.quote(mount)}\n"
            for mount, name in self.private_dirs.items()
        )
        script = (
            "set -e\n"
            f"{binds}"
            f"exec {shlex.quote(_tool('sshd') or 'sshd')} -D "
            f"-f {shlex.quote(str(h.sshd_config))} -E {shlex.quote(str(h.log))}\n"
        )
        argv = [
            _tool("ip") or "ip", "netns", "exec", h.netns,
            _tool("unshare") or "unshare", "--mount", "--propagation", "private",
            "/bin/sh", "-c", script,
        ]  # fmt: skip
        with open(h.log, "ab") as log:
            h.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def _wait_listening(self, hosts: list[Host]) -> None:
        pending = list(hosts)
        deadline = time.monotonic() + START_TIMEOUT
        while pending:
            for h in list(pending):
                if h.proc is None or h.proc.poll() is not None:
                    raise FleetError(f"sshd on {h.name} exited:\n{self._log_tail(h)}")
                with socket.socket() as s:
                    s.settimeout(0.5)
                    try:
                        s.connect((h.address, 22))
                    except OSError:
                        continue
                pending.remove(h)
            if pending:
                if time.monotonic() > deadline:
                    names = [h.name for h in pending]
                    raise FleetError(f"sshd not listening on {names} after {START_TIMEOUT}s")
                time.sleep(0.02)

    @staticmethod
    def _log_tail(h: Host) -> str:
        try:
            return "\n".join(h.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


# ---------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def fleet_session() -> Iterator[Fleet]:
    """One 6-host fleet for the whole session (use ``fleet`` for a clean one per test)."""
    skip_unless_possible()
    with Fleet(DEFAULT_HOSTS) as f:
        yield f


@pytest.fixture
def fleet(fleet_session: Fleet) -> Fleet:
    """A 6-host fleet in a fresh state: every sshd up, every host's files wiped."""
    fleet_session.reset()
    return fleet_session


@pytest.fixture
def fleet_factory() -> Iterator[Callable[..., Fleet]]:
    """``fleet_factory(n=6, **kwargs)`` -> a started :class:`Fleet`, stopped after the test."""
    skip_unless_possible()
    started: list[Fleet] = []

    def make(n: int = DEFAULT_HOSTS, **kwargs: object) -> Fleet:
        f = Fleet(n, **kwargs)  # type: ignore[arg-type]
        started.append(f)
        return f.start()

    yield make
    errors = []
    for f in reversed(started):
        try:
            f.stop()
        except FleetError as exc:
            errors.append(str(exc))
    if errors:
        raise FleetError("; ".join(errors))
