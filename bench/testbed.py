"""The benchmark's testbed: a fleet of hosts as network namespaces on one machine.

Layout (every name starts with ``roost-b<pid>-``, so parallel runs never collide
and :func:`cleanup_leftovers` can tell a crashed run's leftovers by its dead pid):

* ``roost-b<pid>-net``: the switch. A core bridge ``br0``; with racks, one bridge
  ``rk<r>`` per rack joined to the core by a veth pair ``cu<r>`` (core side) /
  ``up<r>`` (rack side), both directions shaped to the uplink rate U.
* ``roost-b<pid>-origin``: the origin (tracker, seeder, HTTP server), ``eth0`` on
  the core bridge, both directions shaped to B_origin.
* ``roost-b<pid>-h<i>``: host i, ``eth0`` on its rack's bridge (the core bridge
  without racks), both directions shaped to B.

Shaping is ``tbf`` on the egress of both ends of every veth (``eth0`` in the host
shapes its upload, the bridge port ``p<i>`` shapes its download). None of these
namespaces has a link to the machine's own namespace, so nothing sent inside them
can leave them; processes run in them with ``ip netns exec``.

The self-check (:func:`self_check`) runs a small TCP sender/receiver (``python -m
bench.testbed probe``, this module) in the namespaces: one flow host to host, one
flow origin to host, and an all-to-all mesh between the hosts (within each rack
when there are racks, plus a cross-rack check of the uplinks). Goodput is counted
by the receivers.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import ipaddress
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from bench import netns as _netns
from bench.common import cpu_seconds
from bench.netns import NetnsError, tool
from bench.netns import alive as _alive

PREFIX = "roost-b"  # namespaces and work directories: roost-b<pid>-...
SUBNET_FIRST = 217  # the testbed's subnet: the first 10.<k>.0.0/16 (k >= 217) no route overlaps
KiB = 1024
MiB = 1024 * KiB
# tbf: a bucket that holds one full 64 KiB GSO/TSO segment (so tbf never has to split
# one) or 1 ms at line rate if that is more; a queue of about 20 ms at line rate.
TBF_MIN_BURST = 64 * KiB + 2 * KiB
TBF_BURST_TIME = 0.001
TBF_QUEUE_TIME = 0.020
TBF_MIN_LIMIT = 4 * TBF_MIN_BURST
SELF_CHECK_SHARE = 0.90  # of the nominal rate, per host, for the self-check to pass
PROBE_PORT = 5201
PROBE_CHUNK = 256 * KiB


class TestbedError(NetnsError):
    """The testbed could not be built, used or torn down."""


def missing_requirements() -> list[str]:
    """What this machine lacks to build a testbed, one readable item each."""
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()})")
    if tool("ip") is None:
        missing.append("`ip` (apt-get install iproute2)")
    if tool("tc") is None:
        missing.append("`tc` (apt-get install iproute2)")
    if missing:
        return missing
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run([tool("ip") or "ip", "netns", "add", probe])
    except TestbedError as exc:
        return [f"network namespaces (`ip netns add` fails: {exc})"]
    try:
        _run([tool("ip") or "ip", "-n", probe, "link", "add", "t0", "type", "veth", "peer", "t1"])
        _run([tool("tc") or "tc", "-n", probe, "qdisc", "add", "dev", "t0", "root", "tbf",
              "rate", "1mbit", "burst", "10k", "limit", "30k"])  # fmt: skip
    except TestbedError as exc:
        missing.append(f"veth pairs shaped with tc tbf ({exc})")
    finally:
        with contextlib.suppress(TestbedError):
            _run([tool("ip") or "ip", "netns", "del", probe])
    return missing


# ---------------------------------------------------------------------------
# rates and sizes


_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps|b)?(?:/s)?", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """A link rate as tc writes it ('100mbit', '1gbit', '500kbit', or bits/s) -> bits/s.

    Decimal prefixes, as for network rates. 'mbps' means megabytes per second (tc's
    convention); 'b' after the prefix means bits.
    """
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 100mbit or 1gbit)")
    value = float(match[1]) * 1000 ** " kmgt".index(match[2].lower() or " ")
    if (match[3] or "").lower() == "bps":
        value *= 8
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive: {text!r}")
    return value


def format_rate(bits_per_second: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g} {unit}"
    return f"{bits_per_second:g} bit/s"


@dataclass
class Tbf:
    rate: float  # bits/s
    burst: int  # bytes
    limit: int  # bytes

    @classmethod
    def for_rate(cls, rate: float) -> Tbf:
        burst = max(TBF_MIN_BURST, int(rate / 8 * TBF_BURST_TIME))
        limit = max(TBF_MIN_LIMIT, int(rate / 8 * TBF_QUEUE_TIME), 2 * burst)
        return cls(rate, burst, limit)

    def tc_args(self) -> list[str]:
        return ["rate", f"{int(self.rate)}bit", "burst", str(self.burst), "limit", str(self.limit)]

    def describe(self) -> dict[str, Any]:
        return {"rate_bps": self.rate, "burst_bytes": self.burst, "limit_bytes": self.limit}


# ---------------------------------------------------------------------------
# processes


_run = functools.partial(_netns.run, error=TestbedError)
_ip = functools.partial(_netns.ip, error=TestbedError)
kill_netns_processes = functools.partial(_netns.kill_netns_processes, error=TestbedError)


# ---------------------------------------------------------------------------
# leftovers of crashed runs

_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")


def _dead(pid_text: str) -> bool:
    pid = int(pid_text)
    return pid != os.getpid() and not _alive(pid)


def work_base() -> str:
    """Where runs keep their trees: tmpfs (/dev/shm) when there is one, so the machine's
    shared disk does not distort network figures."""
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/var/tmp"
    )


def cleanup_leftovers(bases: Sequence[str] = ()) -> list[str]:
    """Remove namespaces (with their processes, links and bridges) and work directories of
    testbeds whose process is gone, recognised by the ``roost-b<pid>-`` prefix."""
    removed = []
    if tool("ip") is not None:
        for line in _ip("netns", "list", check=False).splitlines():
            name = line.split()[0] if line.split() else ""
            m = _NAME_RE.match(name)
            if m and _dead(m.group(1)):
                with contextlib.suppress(TestbedError):
                    kill_netns_processes(name)
                _ip("netns", "del", name, check=False)
                removed.append(f"netns {name}")
    for base in {*bases, work_base(), "/var/tmp"}:
        with contextlib.suppress(OSError):
            for entry in sorted(os.listdir(base)):
                m = _NAME_RE.match(entry)
                path = os.path.join(base, entry)
                if m and _dead(m.group(1)) and os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(f"dir {path}")
    return removed


# ---------------------------------------------------------------------------
# the testbed


@dataclass
class Node:
    name: str  # "origin", "h1" .. "hN"
    netns: str
    address: str
    rack: int | None = None  # 1-based rack number; None: on the core bridge
    port: str = ""  # its bridge port in the switch namespace


@dataclass
class Testbed:
    """N hosts and an origin in network namespaces, shaped with tbf. A context manager."""

    hosts: int
    bandwidth: float  # B, bits/s
    origin_bandwidth: float  # B_origin, bits/s
    racks: int = 0
    uplink: float | None = None  # U, bits/s (racks only)
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    nodes: dict[str, Node] = field(default_factory=dict)
    subnet: str = ""
    _created: list[str] = field(default_factory=list)
    _started: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.hosts <= 1000:
            raise ValueError("a testbed has 1..1000 hosts")
        if self.racks < 0 or self.racks > self.hosts:
            raise ValueError("racks must be between 0 and the number of hosts")
        if self.racks and self.uplink is None:
            self.uplink = 2 * self.bandwidth

    # -- names -------------------------------------------------------------------

    @property
    def net(self) -> str:
        return f"{self.tag}-net"

    @property
    def origin(self) -> Node:
        return self.nodes["origin"]

    @property
    def host_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.name != "origin"]

    def rack_of(self, index: int) -> int | None:
        """Rack (1-based) of host ``index`` (1-based): contiguous blocks of hosts."""
        return (index - 1) * self.racks // self.hosts + 1 if self.racks else None

    def exec_argv(self, node: Node | str, argv: Sequence[str]) -> list[str]:
        netns = node.netns if isinstance(node, Node) else node
        return [tool("ip") or "ip", "netns", "exec", netns, *argv]

    # -- life cycle ---------------------------------------------------------------

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Testbed:
        missing = missing_requirements()
        if missing:
            raise TestbedError("the testbed needs " + "; ".join(missing))
        self._started = True
        atexit.register(self.stop)
        try:
            self._choose_subnet()
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every process in the namespaces, delete them (links and bridges go with
        them). Safe to call twice; raises after trying everything if something is left."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        errors = []
        for name in self._created:
            try:
                kill_netns_processes(name)
            except TestbedError as exc:
                errors.append(str(exc))
        for name in reversed(self._created):
            try:
                _ip("netns", "del", name)
            except TestbedError as exc:
                errors.append(str(exc))
        self._created.clear()
        if errors:
            raise TestbedError("testbed teardown incomplete: " + "; ".join(errors))

    def _choose_subnet(self) -> None:
        taken = []
        for line in _ip("-4", "route", "show", "table", "all").splitlines():
            words = line.split()
            word = words[0] if words else ""
            if word in ("broadcast", "local", "unicast", "multicast") and len(words) > 1:
                word = words[1]
            with contextlib.suppress(ValueError):
                if word != "default":
                    taken.append(ipaddress.ip_network(word, strict=False))
        for k in range(SUBNET_FIRST, 255):
            net = ipaddress.ip_network(f"10.{k}.0.0/16")
            if not any(net.overlaps(t) for t in taken):
                break
        else:
            raise TestbedError("no free 10.<k>.0.0/16 subnet for the testbed")
        self.subnet = str(net)
        base = net.network_address
        self.nodes["origin"] = Node("origin", f"{self.tag}-origin", str(base + 2))
        for i in range(1, self.hosts + 1):
            self.nodes[f"h{i}"] = Node(
                f"h{i}", f"{self.tag}-h{i}", str(base + 256 + i), rack=self.rack_of(i)
            )

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("link", "set", "lo", "up", netns=name)

    def _shape(self, netns: str, dev: str, rate: float) -> None:
        tc = tool("tc") or "tc"
        _run([tc, "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf",
              *Tbf.for_rate(rate).tc_args()])  # fmt: skip

    def _build(self) -> None:
        net = self.net
        self._add_netns(net)
        # A switch, not a firewall: bridged frames skip netfilter (br_netfilter's hooks
        # cost CPU even with no rules), where the kernel has that knob.
        for knob in ("iptables", "ip6tables", "arptables"):
            path = f"/proc/sys/net/bridge/bridge-nf-call-{knob}"
            if os.path.exists(path):
                _run([*self.exec_argv(net, ["sh", "-c", f"echo 0 > {path}"])])
        _ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", netns=net)
        _ip("link", "set", "br0", "up", netns=net)
        for r in range(1, self.racks + 1):
            assert self.uplink is not None
            _ip("link", "add", f"rk{r}", "type", "bridge", "forward_delay", "0", netns=net)
            _ip("link", "set", f"rk{r}", "up", netns=net)
            _ip("link", "add", f"cu{r}", "type", "veth", "peer", "name", f"up{r}", netns=net)
            _ip("link", "set", f"cu{r}", "master", "br0", "up", netns=net)
            _ip("link", "set", f"up{r}", "master", f"rk{r}", "up", netns=net)
            self._shape(net, f"cu{r}", self.uplink)  # core -> rack
            self._shape(net, f"up{r}", self.uplink)  # rack -> core
        prefix = self.subnet.split("/")[1]
        for i, node in enumerate(self.nodes.values()):
            rate = self.origin_bandwidth if node.name == "origin" else self.bandwidth
            bridge = f"rk{node.rack}" if node.rack else "br0"
            node.port = f"p{i}"
            self._add_netns(node.netns)
            veth = ["link", "add", node.port, "type", "veth", "peer", "name", "eth0"]
            _ip(*veth, "netns", node.netns, netns=net)
            _ip("link", "set", node.port, "master", bridge, "up", netns=net)
            _ip("addr", "add", f"{node.address}/{prefix}", "dev", "eth0", netns=node.netns)
            _ip("link", "set", "eth0", "up", netns=node.netns)
            self._shape(node.netns, "eth0", rate)  # the node's upload
            self._shape(net, node.port, rate)  # the node's download

    # -- counters ----------------------------------------------------------------

    def link_bytes(self, netns: str, dev: str) -> tuple[int, int]:
        """(tx, rx) bytes of ``dev`` in ``netns``, as the kernel counts them (with headers)."""
        out = _ip("-s", "-j", "link", "show", "dev", dev, netns=netns)
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def counters(self) -> dict[str, int]:
        """Bytes the origin sent, and bytes that entered each rack through its uplink."""
        values = {"origin_tx": self.link_bytes(self.origin.netns, "eth0")[0]}
        for r in range(1, self.racks + 1):
            values[f"rack{r}_in"] = self.link_bytes(self.net, f"cu{r}")[0]
        return values

    def describe(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "subnet": self.subnet,
            "racks": self.racks,
            "tbf_host": Tbf.for_rate(self.bandwidth).describe(),
            "tbf_origin": Tbf.for_rate(self.origin_bandwidth).describe(),
            "tbf_uplink": Tbf.for_rate(self.uplink).describe() if self.uplink else None,
        }


# ---------------------------------------------------------------------------
# CPU idle share


def cpu_times() -> tuple[float, float]:
    """(idle, total) CPU seconds of the whole machine (idle includes iowait)."""
    v = cpu_seconds()
    return v[3] + v[4], sum(v)


class CpuSampler:
    """Idle share of all cores between start() and stop(); also its lowest 1-second value."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first = (0.0, 0.0)
        self._last = (0.0, 0.0)
        self.windows: list[float] = []

    def start(self) -> CpuSampler:
        self._first = self._last = cpu_times()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            now = cpu_times()
            self._window(now)

    def _window(self, now: tuple[float, float]) -> None:
        d_total = now[1] - self._last[1]
        if d_total > 0:
            self.windows.append((now[0] - self._last[0]) / d_total)
        self._last = now

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = cpu_times()
        d_total = now[1] - self._first[1]
        idle = (now[0] - self._first[0]) / d_total if d_total > 0 else 1.0
        return {
            "idle": round(idle, 4),
            "idle_min_1s": round(min(self.windows), 4) if self.windows else round(idle, 4),
        }


def netns_tx_bytes(pid: int, dev: str) -> int | None:
    """Bytes ``dev`` has sent, in the network namespace of process ``pid`` (None once it
    is gone). Read from ``/proc/<pid>/net/dev``: cheap enough to sample many times a second."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            for line in f:
                name, sep, fields = line.partition(":")
                if sep and name.strip() == dev:
                    return int(fields.split()[8])
    except (OSError, ValueError, IndexError):
        return None
    return None


class UploadSampler:
    """How many bytes one node has uploaded over time: (seconds since start, bytes) every
    ``interval``, read from a process inside its namespace. Shows where an uploader idles."""

    def __init__(self, pid: int, dev: str = "eth0", interval: float = 0.25) -> None:
        self.pid = pid
        self.dev = dev
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, t0: float) -> UploadSampler:
        first = netns_tx_bytes(self.pid, self.dev)

        def loop() -> None:
            while first is not None and not self._stop.wait(self.interval):
                now = netns_tx_bytes(self.pid, self.dev)
                if now is None:
                    return
                self.samples.append((round(time.time() - t0, 3), now - first))

        self._thread = threading.Thread(target=loop, name="upload-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples


# ---------------------------------------------------------------------------
# the self-check


def self_check(tb: Testbed, *, duration: float, warmup: float, say: Callable[[str], None]) -> dict:
    """Measure what the shaped links deliver to TCP (payload bytes/s counted by receivers).

    Returns the measured B and B_origin, the framing overhead (wire bytes per payload
    byte on a bulk flow) and whether every check reached ``SELF_CHECK_SHARE`` of its
    nominal rate.
    """
    hosts = tb.host_nodes
    b_nominal = tb.bandwidth / 8
    o_nominal = tb.origin_bandwidth / 8
    checks: list[dict[str, Any]] = []

    # 1. one flow host -> host, and one flow origin -> another host, side by side
    flows = []
    if len(hosts) >= 2:
        flows.append((hosts[0], hosts[1]))
    origin_target = hosts[-1] if len(hosts) >= 3 or len(hosts) == 1 else None
    if origin_target is not None:
        flows.append((tb.origin, origin_target))
    tx_before = tb.link_bytes(tb.origin.netns, "eth0")[0]
    result = _probe(tb, flows, duration, warmup)
    tx_after = tb.link_bytes(tb.origin.netns, "eth0")[0]
    if len(hosts) == 2:  # the origin flow would share h1's links: run it on its own
        tx_before = tb.link_bytes(tb.origin.netns, "eth0")[0]
        more = _probe(tb, [(tb.origin, hosts[0])], duration, warmup)
        tx_after = tb.link_bytes(tb.origin.netns, "eth0")[0]
        result["pairs"].update(more["pairs"])
        result["totals"].update(more["totals"])
        result["cpu"] = {"idle": min(result["cpu"]["idle"], more["cpu"]["idle"])}
        origin_target = hosts[0]
    framing = None
    if origin_target is not None:
        key = (tb.origin.name, origin_target.name)
        payload = result["totals"].get(key, 0)
        framing = (tx_after - tx_before) / payload if payload else None
    measured_b = None
    if len(hosts) >= 2:
        rate = result["pairs"].get((hosts[0].name, hosts[1].name), 0.0)
        measured_b = rate
        checks.append(_check("one flow host -> host", rate, b_nominal))
    if origin_target is not None:
        rate = result["pairs"].get((tb.origin.name, origin_target.name), 0.0)
        nominal = min(o_nominal, b_nominal)
        checks.append(_check("one flow origin -> host", rate, nominal))
        if measured_b is None:
            measured_b = rate if b_nominal <= o_nominal else rate * b_nominal / o_nominal
        measured_o = rate if o_nominal <= b_nominal else measured_b * o_nominal / b_nominal
    else:
        measured_o = measured_b * o_nominal / b_nominal
    for c in checks:
        say(f"self-check: {c['name']}: {c['rate'] / 1e6:.2f} MB/s ({c['share']:.1%} of nominal)")
    cpu = [result["cpu"]["idle"]]

    # 2. all-to-all between hosts (within each rack when there are racks)
    groups: dict[int | None, list[Node]] = {}
    for h in hosts:
        groups.setdefault(h.rack, []).append(h)
    mesh_flows = [(a, b) for g in groups.values() for a in g for b in g if a is not b]
    if mesh_flows:
        mesh = _probe(tb, mesh_flows, duration, warmup)
        cpu.append(mesh["cpu"]["idle"])
        rx: dict[str, float] = {h.name: 0.0 for h in hosts if len(groups[h.rack]) > 1}
        tx: dict[str, float] = dict(rx)
        for (src, dst), rate in mesh["pairs"].items():
            tx[src] += rate
            rx[dst] += rate
        worst = min(min(rx.values()), min(tx.values()))
        name = "all-to-all mesh" + (" within racks" if tb.racks else "")
        c = _check(name + " (worst host, either direction)", worst, b_nominal)
        c["per_host_rx"] = {k: round(v) for k, v in rx.items()}
        c["per_host_tx"] = {k: round(v) for k, v in tx.items()}
        c["median_host_rx"] = statistics.median(rx.values())
        checks.append(c)
        say(
            f"self-check: {name}: worst host {worst / 1e6:.2f} MB/s ({c['share']:.1%}),"
            f" median download {c['median_host_rx'] / 1e6:.2f} MB/s"
        )

    # 3. racks: every host of rack 1 sends to one host of rack 2 (the uplinks)
    if tb.racks >= 2:
        r1 = [h for h in hosts if h.rack == 1]
        r2 = [h for h in hosts if h.rack == 2]
        pairs = list(zip(r1, r2))
        up = _probe(tb, pairs, duration, warmup)
        cpu.append(up["cpu"]["idle"])
        total = sum(up["pairs"].values())
        assert tb.uplink is not None
        nominal = min(tb.uplink / 8, len(pairs) * b_nominal)
        c = _check(f"rack 1 -> rack 2, {len(pairs)} flows (uplink)", total, nominal)
        checks.append(c)
        say(f"self-check: {c['name']}: {total / 1e6:.2f} MB/s ({c['share']:.1%} of nominal)")
    passed = all(c["passed"] for c in checks)
    return {
        "passed": passed,
        "threshold": SELF_CHECK_SHARE,
        "bandwidth_Bps": measured_b,
        "origin_bandwidth_Bps": measured_o,
        "framing_overhead": framing,
        "cpu_idle_min": min(cpu),
        "duration_s": duration,
        "warmup_s": warmup,
        "checks": checks,
    }


def check_twice(check: Callable[[], dict], *, say: Callable[[str], None]) -> dict:
    """Run the self-check, and once more if it fails; the second result keeps the first.

    The probes share the machine with everything else on it: a host's share of a
    240-flow mesh dips to 88-89 % of B now and then, a different host each time.
    A testbed that cannot deliver fails twice.
    """
    result = check()
    if result["passed"]:
        return result
    say("self-check: below the threshold; running it once more")
    again = check()
    again["first_attempt"] = result
    return again


def _check(name: str, rate: float, nominal: float) -> dict[str, Any]:
    share = rate / nominal if nominal else 0.0
    return {
        "name": name,
        "rate": rate,
        "nominal": nominal,
        "share": share,
        "passed": share >= SELF_CHECK_SHARE,
    }


def _probe(
    tb: Testbed, flows: list[tuple[Node, Node]], duration: float, warmup: float
) -> dict[str, Any]:
    """Run the TCP probe for ``flows`` (sender, receiver) at once; receiver-side goodput."""
    nodes: dict[str, Node] = {}
    targets: dict[str, list[str]] = {}
    for src, dst in flows:
        nodes[src.name] = src
        nodes[dst.name] = dst
        targets.setdefault(src.name, []).append(f"{dst.address}:{PROBE_PORT}")
        targets.setdefault(dst.name, [])
    procs: dict[str, subprocess.Popen] = {}
    sampler = CpuSampler()
    try:
        for name, node in nodes.items():
            argv = [sys.executable, "-m", "bench.testbed", "probe",
                    "--listen", f"{node.address}:{PROBE_PORT}",
                    "--duration", str(duration), "--warmup", str(warmup)]  # fmt: skip
            for t in targets[name]:
                argv += ["--to", t]
            procs[name] = subprocess.Popen(
                tb.exec_argv(node, argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=_repo_root(),
                env=_child_env(),
                start_new_session=True,
            )
        for name, p in procs.items():
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise TestbedError(f"probe on {name} did not start: {line!r}")
        go = time.time() + 0.3
        sampler.start()
        for p in procs.values():
            assert p.stdin is not None
            p.stdin.write(f"go {go}\n")
            p.stdin.flush()
        results = {}
        for name, p in procs.items():
            out, _ = p.communicate(timeout=duration + 30)
            if p.returncode != 0:
                raise TestbedError(f"probe on {name} failed ({p.returncode})")
            results[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        cpu = sampler.stop() if sampler._thread is not None else {"idle": 1.0}
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    by_address = {n.address: n.name for n in tb.nodes.values()}
    pairs: dict[tuple[str, str], float] = {}
    totals: dict[tuple[str, str], int] = {}
    for dst, res in results.items():
        for src_addr, rate in res["rx_rate"].items():
            pairs[(by_address[src_addr], dst)] = rate
        for src_addr, n in res["rx_total"].items():
            totals[(by_address[src_addr], dst)] = n
    for src, dst in flows:
        pairs.setdefault((src.name, dst.name), 0.0)
    return {"pairs": pairs, "totals": totals, "cpu": cpu}


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = _repo_root()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------
# the probe itself (runs inside a namespace)


def probe_main(argv: Sequence[str]) -> int:
    """One process per node, one thread: accept from anyone, send to every ``--to`` target
    from ``go`` for ``--duration`` seconds; count what arrives per source address."""
    p = argparse.ArgumentParser(prog="python -m bench.testbed probe")
    p.add_argument("--listen", required=True)
    p.add_argument("--to", action="append", default=[])
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, required=True)
    args = p.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    server = socket.create_server((host, int(port)), backlog=1024)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, "accept")
    print("ready", flush=True)
    go = float(sys.stdin.readline().split()[1])
    end = go + args.duration
    data = memoryview(os.urandom(PROBE_CHUNK))
    buf = bytearray(PROBE_CHUNK)
    received: dict[str, int] = {}
    # Connect now, while every link is idle, and send from ``go``: connecting at ``go``,
    # a handshake could be dropped by a queue already full of the others' data and
    # retried a second or more later, and with few flows per host (the mesh within a
    # rack) one such flow left a host far below its link's rate.
    outgoing = []
    for target in args.to:
        h, _, pt = target.rpartition(":")
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((h, int(pt)))
        outgoing.append(s)
    sockets = list(outgoing)
    first: dict[str, int] | None = None
    t1 = t2 = 0.0
    while True:
        now = time.time()
        if outgoing and now >= go:
            for s in outgoing:
                sel.register(s, selectors.EVENT_WRITE, "send")
            outgoing = []
        if first is None and now >= go + args.warmup:
            t1, first = now, dict(received)
        if now >= end:
            t2 = now
            break
        timeout = max(0.0, min(go, end) - now) if now < go else min(0.05, end - now)
        for key, _ in sel.select(timeout=timeout):
            sock = key.fileobj
            if key.data == "accept":
                with contextlib.suppress(BlockingIOError):
                    conn, addr = sock.accept()  # type: ignore[union-attr]
                    conn.setblocking(False)
                    # wake up for 64 KiB at a time, not for every segment: less CPU
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, PROBE_CHUNK // 4)
                    sel.register(conn, selectors.EVENT_READ, addr[0])
                    sockets.append(conn)
            elif key.data == "send":
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    try:
                        sock.send(data)  # type: ignore[union-attr]
                    except OSError:
                        sel.unregister(sock)
            else:
                try:
                    n = sock.recv_into(buf)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    n = 0
                if not n:
                    sel.unregister(sock)
                    continue
                received[key.data] = received.get(key.data, 0) + n
    first = first or {}
    rates = {a: (n - first.get(a, 0)) / (t2 - t1) for a, n in received.items()}
    print(json.dumps({"rx_rate": rates, "rx_total": received}), flush=True)
    for s in sockets:
        s.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        sys.exit(probe_main(sys.argv[2:]))
    sys.exit("usage: python -m bench.testbed probe ... (the bench runs it in a namespace)")
