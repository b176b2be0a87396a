"""Predicted distribution time of roost's relay plan for fleets too large for the testbed.

The testbed (``python -m bench``) measures 16 hosts on one machine; nobody can run
10,000. This simulation runs roost's *real* planning code (``build_plan`` of
``roost.tracker.relay`` and the request order of ``roost.runtime.picker.pick_relay``)
for fleets of any size and predicts T_first, T_p50, T_last and η = T_min / T_last,
so its prediction at N = 16 can be checked against the testbed before trusting it
at N = 10,000.

What it models
--------------
A piece-level pipeline recurrence, not a packet simulator:

- Every host has an uplink and a downlink of rate B; the origin's uplink is
  B_origin. In the plan each host has one source per stripe (piece *i* is in
  stripe ``i mod k``); an edge source -> child carries that stripe.
- A source's uplink is shared equally by all its outgoing edges (its children
  over all stripes; the origin's edges are the stripe roots), and a host's
  downlink equally by its k incoming edges: rate = min(uplink / out-edges, B / k).
- Racks (``--racks R``: contiguous, near-equal blocks of hosts, as on the testbed):
  the edges entering a rack from outside (the origin is outside every rack)
  share its uplink U equally: rate = min(rate, U / edges entering the rack).
  Each such edge carries its stripe's bytes across once.
- A host asks its source for a stripe's pieces in the runtime's order, ahead of
  time, and the source forwards a piece once it has verified it, so piece *i*
  reaches host *h* from source *p* over an edge of rate *r* at
  ``a(h, i) = max(a(p, i) + hop_delay, a(h, previous piece), start) + len(i) / r``,
  with ``a(origin, i) = 0``. ``hop_delay`` stands for verifying and writing a
  piece; ``start`` (``--startup``) for the time a host's process takes to start.
- A host is done when its last piece arrives; T_min is the benchmark's
  max(S/B_origin, S/B, N·S/(B_origin + N·B)) (``bench.report.t_min``).

What it ignores
---------------
TCP dynamics (slow start, losses, retransmits), protocol headers (pass the
testbed's *measured* B, e.g. ``--bandwidth 96mbit``, to compare), the tracker's
gathering phase and announces (the plan is taken as fixed from time zero), CPU
limits, disks, the swarm fallback and endgame, hosts failing, and bandwidth an
idle edge leaves to its siblings (shares are fixed, not max-min fair). A rack
uplink's outbound direction is not modelled apart: in the plan's chain of racks
a rack sends out as many edges as it takes in.

Run from the repository root::

    python -m bench.sim [--hosts 16,1000,10000] [--size 128M] [--piece-size SIZE]
                        [--bandwidth 100M] [--origin-bandwidth RATE] [--racks R]
                        [--uplink RATE] [--stripes auto|K] [--startup SECONDS]
                        [--hop-delay SECONDS] [--out DIR]

Rates are in bits/s as tc writes them (100M = 100mbit); sizes in powers of 1024.
Writes results.json, results.md and eta.png (η against fleet size for 1, 2, 4, 8
and auto stripes; needs matplotlib) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from bench.common import argv_used, log
from bench.report import fmt_num, pyplot, save_chart, t_min
from bench.testbed import format_rate, parse_rate
from roost import __version__ as roost_version
from roost.runtime.cli import format_size, parse_size
from roost.runtime.manifest import auto_piece_size
from roost.runtime.picker import pick_relay
from roost.tracker.policy import PeerView
from roost.tracker.relay import RelayConfig, build_plan

ORIGIN = "f" * 32  # the seeder's peer id; hosts are numbered 1..N in the same 32-hex form
SWEEP = (1, 2, 4, 8, 0)  # stripe counts drawn in eta.png (0 = automatic)
MAX_STRIPES = 16  # RelayConfig's own bound


class PlanError(ValueError):
    """A relay plan the recurrence cannot run: some host's sources never reach a seeder."""


@dataclass(frozen=True)
class Network:
    """Rates in bytes/s and delays in seconds: the only physics the recurrence knows."""

    bandwidth: float
    origin_bandwidth: float
    uplink: float | None = None  # a rack's uplink U; None without racks
    hop_delay: float = 0.001
    startup: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """Everything but the fleet size: one scenario is simulated for each ``--hosts`` value."""

    size: int
    piece_size: int
    network: Network
    racks: int = 0
    stripes: int = 0  # 0 = automatic, as the tracker's --stripes auto


@dataclass(frozen=True)
class Prediction:
    """What ``simulate`` derives from one plan: per-host completion times and the plan's shape."""

    completion: dict[str, float]
    depth: int  # most hops from the origin, over all stripes
    max_children: int  # most distinct children of one host
    origin_egress_bytes: int
    cross_rack_bytes: int


# -- the model ------------------------------------------------------------------------------


def piece_lengths(size: int, piece_size: int) -> list[int]:
    """The length of every piece: all ``piece_size`` but a shorter last one."""
    return [min(piece_size, size - start) for start in range(0, size, piece_size)]


def request_orders(pieces: int, stripes: int) -> list[list[int]]:
    """Per stripe, the order in which a host asks its source for that stripe's pieces.

    It is the runtime's own ``pick_relay``, asked for every piece by a host that holds
    nothing and has requested nothing: every host starts so, so one call per stripe
    gives every host's order.
    """
    missing, requested = bytearray([1]) * pieces, [0] * pieces
    return [
        pick_relay(missing, requested, (stripes, frozenset({s})), pieces) for s in range(stripes)
    ]


def edge_arrivals(
    source_arrivals: Sequence[float], durations: Sequence[float], hop_delay: float, start: float
) -> list[float]:
    """The pipeline recurrence over one edge: when each piece of a stripe reaches the child.

    A piece leaves once the source has it (plus ``hop_delay``), the previous piece has
    arrived (the edge carries one piece at a time) and the child has started, and then
    takes its duration (length / edge rate).
    """
    arrivals = []
    ready = start
    for held, duration in zip(source_arrivals, durations):
        sent = held + hop_delay
        if sent > ready:
            ready = sent
        ready += duration
        arrivals.append(ready)
    return arrivals


def edge_rates(
    sources: Mapping[str, Sequence[str]],
    origins: frozenset[str],
    racks: Mapping[str, str],
    network: Network,
) -> dict[tuple[str, int], float]:
    """The rate of every edge, keyed by (child, stripe): shares of uplinks and downlinks.

    ``racks`` maps a host to its rack label; hosts without one and the origin are in
    no rack, so an edge from the origin into a rack crosses that rack's uplink.
    """
    out_edges = Counter(src for srcs in sources.values() for src in srcs)
    entering = Counter(
        racks[child]
        for child, srcs in sources.items()
        for src in srcs
        if _crosses(src, child, racks)
    )
    rates = {}
    for child, srcs in sources.items():
        downlink_share = network.bandwidth / len(srcs)
        for stripe, src in enumerate(srcs):
            uplink = network.origin_bandwidth if src in origins else network.bandwidth
            rate = min(uplink / out_edges[src], downlink_share)
            if _crosses(src, child, racks):
                if network.uplink is None:
                    raise ValueError("hosts in racks need the racks' uplink rate")
                rate = min(rate, network.uplink / entering[racks[child]])
            rates[child, stripe] = rate
    return rates


def _crosses(src: str, child: str, racks: Mapping[str, str]) -> bool:
    """Whether the edge src -> child enters the child's rack from outside it."""
    return child in racks and racks.get(src) != racks[child]


def simulate(
    sources: Mapping[str, Sequence[str]],
    origins: frozenset[str],
    racks: Mapping[str, str],
    lengths: Sequence[int],
    network: Network,
) -> Prediction:
    """Run the recurrence over a relay plan (``sources[host][stripe]`` = its source).

    Each stripe is a forest rooted at the origins; walking it breadth-first computes
    every source before its children, and keeps only the frontier's arrival times.
    Raises ``PlanError`` when a host's chain of sources does not reach an origin.
    """
    stripes = len(next(iter(sources.values()), ()))
    if any(len(srcs) != stripes for srcs in sources.values()):
        raise PlanError("relay plan: hosts disagree on the number of stripes")
    rates = edge_rates(sources, origins, racks, network)
    completion = dict.fromkeys(sources, network.startup)
    depth = origin_egress = cross_rack = 0
    for stripe, order in enumerate(request_orders(len(lengths), stripes)):
        stripe_lengths = [lengths[i] for i in order]
        stripe_bytes = sum(stripe_lengths)
        children: dict[str, list[str]] = {}
        for child, srcs in sources.items():
            children.setdefault(srcs[stripe], []).append(child)
        durations: dict[float, list[float]] = {}  # edges of equal rate share their durations
        frontier = deque((origin, [0.0] * len(order), 0) for origin in origins)
        reached: set[str] = set()
        while frontier:
            src, held, hops = frontier.popleft()
            for child in children.get(src, ()):
                rate = rates[child, stripe]
                if rate not in durations:
                    durations[rate] = [n / rate for n in stripe_lengths]
                arrivals = edge_arrivals(held, durations[rate], network.hop_delay, network.startup)
                if arrivals:
                    completion[child] = max(completion[child], arrivals[-1])
                frontier.append((child, arrivals, hops + 1))
                reached.add(child)
                depth = max(depth, hops + 1)
                origin_egress += stripe_bytes if src in origins else 0
                cross_rack += stripe_bytes if _crosses(src, child, racks) else 0
        if len(reached) != len(sources):
            stranded = sorted(set(sources) - reached)
            raise PlanError(
                f"relay plan, stripe {stripe}: {len(stranded)} host(s) whose chain of sources"
                f" never reaches a seeder (a cycle or an unknown source), e.g. {stranded[:3]}"
            )
    return Prediction(
        completion=completion,
        depth=depth,
        max_children=max(_distinct_children(sources, origins).values(), default=0),
        origin_egress_bytes=origin_egress,
        cross_rack_bytes=cross_rack,
    )


def _distinct_children(
    sources: Mapping[str, Sequence[str]], origins: frozenset[str]
) -> Counter[str]:
    """How many hosts fetch at least one stripe from each host (the origin left out)."""
    return Counter(src for srcs in sources.values() for src in set(srcs) if src not in origins)


# -- one fleet ------------------------------------------------------------------------------


def host_id(index: int) -> str:
    """Host ``index``'s peer id (1-based), in the tracker's 32-hex form, ordered by index."""
    return f"{index:032x}"


def rack_label(index: int, hosts: int, racks: int) -> str:
    """The rack of host ``index`` (1-based): contiguous blocks, numbered as on the testbed."""
    return f"rack{(index - 1) * racks // hosts + 1}"


def fleet(hosts: int, racks: int) -> list[PeerView]:
    """The origin and ``hosts`` hosts as the tracker sees them, joined in index order."""
    peers = [PeerView(ORIGIN, seeder=True)]
    for i in range(1, hosts + 1):
        rack = rack_label(i, hosts, racks) if racks else None
        peers.append(PeerView(host_id(i), rack=rack, first_seen=float(i)))
    return peers


def predict(hosts: int, scenario: Scenario) -> dict[str, Any]:
    """The figures of one fleet size: the tracker's plan, the recurrence over it, and η."""
    peers = fleet(hosts, scenario.racks)
    plan = build_plan(peers, RelayConfig(stripes=scenario.stripes), expected=hosts)
    if len(plan.sources) != hosts:
        raise PlanError(f"relay plan: {hosts - len(plan.sources)} host(s) have no sources")
    racks = {p.peer: p.rack for p in peers if p.rack is not None}
    net = scenario.network
    got = simulate(
        plan.sources,
        frozenset({ORIGIN}),
        racks,
        piece_lengths(scenario.size, scenario.piece_size),
        net,
    )
    times = sorted(got.completion.values())
    limit = t_min(scenario.size, hosts, net.bandwidth, net.origin_bandwidth)
    figures = {
        "hosts": hosts,
        "stripes": plan.stripes,
        "depth": got.depth,
        "t_min": limit,
        "t_first": times[0],
        "t_p50": statistics.median(times),
        "t_last": times[-1],
        "eta": limit / times[-1],
        "max_children": got.max_children,
        "origin_egress_ratio": got.origin_egress_bytes / scenario.size,
    }
    if scenario.racks:
        figures["cross_rack_ratio"] = got.cross_rack_bytes / (scenario.racks * scenario.size)
    return figures


# -- command line ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad input ends with one line on stderr, not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(f"{self.prog}: {message}")


def _hosts_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of host counts: {text!r}") from None
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"host counts must be at least 1: {text!r}")
    return counts


def _stripes(text: str) -> int:
    if text == "auto":
        return 0
    if not text.isdigit() or not 1 <= int(text) <= MAX_STRIPES:
        raise argparse.ArgumentTypeError(f"expected auto or 1..{MAX_STRIPES}, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive: {text!r}")
    return size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.sim", description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=_hosts_list, default=[16, 1000, 10_000], metavar="N,N,...")
    p.add_argument("--size", type=_positive_size, default=parse_size("128M"), metavar="SIZE")
    p.add_argument(
        "--piece-size",
        type=_positive_size,
        metavar="SIZE",
        help="default: what `roost pack` chooses for --size (256 KiB for 128 MiB)",
    )
    p.add_argument("--bandwidth", type=parse_rate, default=parse_rate("100M"), metavar="RATE")
    p.add_argument("--origin-bandwidth", type=parse_rate, metavar="RATE", help="default: B")
    p.add_argument("--racks", type=int, default=0, metavar="R", help="hosts split evenly")
    p.add_argument("--uplink", type=parse_rate, metavar="RATE", help="rack uplink U (2·B)")
    p.add_argument("--stripes", type=_stripes, default=0, metavar="auto|K")
    p.add_argument(
        "--startup", type=_seconds, default=0.0, metavar="SECONDS", help="hosts start at"
    )
    p.add_argument(
        "--hop-delay",
        type=_seconds,
        default=0.001,
        metavar="SECONDS",
        help="verify + write per piece and hop (default: %(default)s)",
    )
    p.add_argument("--out", default=os.path.join("results", "sim"), metavar="DIR")
    args = p.parse_args(argv)
    if args.racks and not 1 <= args.racks <= min(args.hosts):
        p.error("--racks must be between 1 and the smallest number of hosts")
    if args.uplink is not None and not args.racks:
        p.error("--uplink needs --racks")
    return args


def scenario_of(args: argparse.Namespace) -> Scenario:
    """The command line's scenario, rates converted from bits/s to bytes/s."""
    b = args.bandwidth / 8
    origin = args.origin_bandwidth / 8 if args.origin_bandwidth else b
    uplink = (args.uplink / 8 if args.uplink else 2 * b) if args.racks else None
    network = Network(b, origin, uplink, hop_delay=args.hop_delay, startup=args.startup)
    piece_size = args.piece_size or auto_piece_size(args.size)
    return Scenario(args.size, piece_size, network, args.racks, args.stripes)


def stripes_label(stripes: int) -> str:
    return str(stripes) if stripes else "auto"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = scenario_of(args)
    fleets = []
    sweep: dict[str, list[dict[str, Any]]] = {stripes_label(s): [] for s in SWEEP}
    for hosts in args.hosts:
        runs: dict[int, dict[str, Any]] = {}
        for stripes in dict.fromkeys((scenario.stripes, *SWEEP)):  # the chosen one first
            started = time.perf_counter()
            try:
                runs[stripes] = predict(hosts, _with_stripes(scenario, stripes))
            except PlanError as exc:
                raise SystemExit(f"bench.sim: {exc}") from None
            f = runs[stripes]
            say(
                f"{hosts:,} hosts, stripes {stripes_label(stripes)} (k={f['stripes']}):"
                f" depth {f['depth']}, T_last {f['t_last']:.2f} s, η {f['eta']:.3f}"
                f" ({time.perf_counter() - started:.1f} s)"
            )
        fleets.append(runs[scenario.stripes])
        for stripes in SWEEP:
            sweep[stripes_label(stripes)].append(runs[stripes])
    report = {
        "benchmark": "sim",
        "command": "python -m bench.sim " + " ".join(shlex.quote(a) for a in argv_used(argv)),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "roost_version": roost_version,
        "scenario": describe(scenario),
        "fleets": fleets,
        "sweep": {label: [(f["hosts"], f["eta"]) for f in runs] for label, runs in sweep.items()},
    }
    out = os.path.abspath(args.out)
    for path in write(report, out):
        say(f"wrote {path}")
    print(markdown(report))
    return 0


def _with_stripes(scenario: Scenario, stripes: int) -> Scenario:
    return Scenario(scenario.size, scenario.piece_size, scenario.network, scenario.racks, stripes)


def say(message: str) -> None:
    log("bench.sim", message)


# -- output ---------------------------------------------------------------------------------


def describe(scenario: Scenario) -> dict[str, Any]:
    net = scenario.network
    return {
        "size_bytes": scenario.size,
        "piece_size": scenario.piece_size,
        "pieces": len(piece_lengths(scenario.size, scenario.piece_size)),
        "bandwidth": format_rate(net.bandwidth * 8),
        "bandwidth_Bps": net.bandwidth,
        "origin_bandwidth": format_rate(net.origin_bandwidth * 8),
        "origin_bandwidth_Bps": net.origin_bandwidth,
        "racks": scenario.racks,
        "uplink": format_rate(net.uplink * 8) if net.uplink else None,
        "uplink_Bps": net.uplink,
        "stripes": stripes_label(scenario.stripes),
        "startup_s": net.startup,
        "hop_delay_s": net.hop_delay,
    }


def markdown(report: dict[str, Any]) -> str:
    sc = report["scenario"]
    racks = sc["racks"]
    lines = [
        "## roost relay plan: predicted distribution time (simulation)",
        "",
        f"`{report['command']}` — roost {report['roost_version']}, {report['when']}.",
        "",
        f"S = {format_size(sc['size_bytes'])} ({sc['pieces']} pieces of"
        f" {format_size(sc['piece_size'])}), B = {sc['bandwidth']},"
        f" B_origin = {sc['origin_bandwidth']}"
        + (f", {racks} racks behind {sc['uplink']} uplinks" if racks else "")
        + f", stripes {sc['stripes']}, hosts start at {sc['startup_s']:g} s,"
        f" {sc['hop_delay_s'] * 1000:g} ms per hop. A model, not a measurement:"
        " see `bench/sim.py` for what it ignores.",
        "",
    ]
    head = ["hosts", "stripes k", "depth", "T_min s", "T_first s", "T_p50 s", "T_last s", "η",
            "max children", "origin egress ÷ S"]  # fmt: skip
    if racks:
        head.append("cross-rack ÷ (racks·S)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for f in report["fleets"]:
        row = [f"{f['hosts']:,}", str(f["stripes"]), str(f["depth"])]
        row += [f"{f[key]:.2f}" for key in ("t_min", "t_first", "t_p50", "t_last")]
        row += [f"{f['eta']:.3f}", str(f["max_children"]), f"{f['origin_egress_ratio']:.2f}"]
        if racks:
            row.append(fmt_num(f.get("cross_rack_ratio"), "{:.2f}"))
        lines.append("| " + " | ".join(row) + " |")
    labels = list(report["sweep"])
    lines += ["", "η by stripe count:", "", "| hosts | " + " | ".join(labels) + " |"]
    lines.append("|" + "---:|" * (len(labels) + 1))
    for i, f in enumerate(report["fleets"]):
        etas = [f"{report['sweep'][label][i][1]:.3f}" for label in labels]
        lines.append(f"| {f['hosts']:,} | " + " | ".join(etas) + " |")
    lines += ["", "η = T_min / T_last; depth = most hops from the origin.", ""]
    return "\n".join(lines)


def eta_chart(report: dict[str, Any], path: str) -> str | None:
    """A PNG of predicted η against fleet size, one line per stripe count; None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    sc = report["scenario"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, points in report["sweep"].items():
        hosts, etas = zip(*points)
        style = "--" if label == "auto" else "-"  # auto overlies the count it picks: dashed
        ax.plot(hosts, etas, marker="o", linestyle=style, label=f"stripes {label}")
    ax.set_xscale("log")
    ax.set_xlabel("hosts")
    ax.set_ylabel("predicted η = T_min / T_last")
    ax.set_ylim(0, 1.05)
    title = (
        f"{format_size(sc['size_bytes'])}, B = {sc['bandwidth']},"
        f" B_origin = {sc['origin_bandwidth']}" + (f", {sc['racks']} racks" if sc["racks"] else "")
    )
    return save_chart(plt, fig, ax, path, title, legend="lower left")


def write(report: dict[str, Any], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    json_path, md_path = os.path.join(out, "results.json"), os.path.join(out, "results.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown(report))
    png = eta_chart(report, os.path.join(out, "eta.png"))
    if png is None:
        say("matplotlib is not installed: no eta.png")
    return [json_path, md_path, *([png] if png else [])]


if __name__ == "__main__":
    sys.exit(main())
