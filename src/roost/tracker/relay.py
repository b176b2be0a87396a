"""The relay plan: who forwards which part of a release to whom (pure functions).

Why a plan
----------
A swarm where every peer picks sources for itself (BitTorrent's rarest-first)
wastes the scarce resource of a homogeneous fleet, upload time: peers holding
nothing new sit idle, the origin sends some pieces twice, and the last pieces
wait on whoever happens to hold them. With every host on a link of rate B, the
physical limit T_min = S/B is reached only if every host receives at B from
the first second to the last and the origin sends each byte once. The tracker
sees the whole swarm, so it can arrange exactly that (as Meta's Owl steers its
peers), and the peers keep their swarm behaviour as the fallback.

The shape
---------
The pieces are dealt into ``k`` *stripes* (piece *i* belongs to stripe
``i mod k``). Each stripe flows down its own tree, SplitStream-style: every
host has exactly one *source* per stripe and receives each stripe at about
B/k, so B in all. Trees are built breadth-first, and a host takes children
only while it sends fewer than ``k`` streams over all stripes, so its upload
is about B too. The origin sends each stripe once, to that stripe's root: S
bytes in all. A piece is forwarded as soon as it is verified (children ask
for pieces ahead of their source holding them), so a tree of depth d delays
the last host by about d piece-times at B/k, not by whole-release copies;
depth is about log_k of the fleet size (8 hops from the origin for 10,000
hosts at k = 4). ``k = 1`` is a pipelined chain.

Racks: hosts are grouped by rack. Within a rack each stripe has its own
breadth-first tree; the racks are chained (or, with ``rack_fanout`` > 1, form
a tree) through the racks' entry members, one cross-rack edge per stripe, so
each rack receives each byte over its uplink once: cross-rack traffic is
racks × S. A chained rack adds a hop, so with many racks depth grows with
their number (the price of crossing each uplink once); an entry feeding the
next racks may send one stream more than ``k`` when ``k`` is odd.

Stability: when the fleet size is known (``expected``), the tracker waits
until the fleet has joined before handing out a plan (``policy.gathering``),
so the first peers do not fetch stripes from the origin that other roots then
fetch again; the plan is rebuilt only when membership changes. A departed
host's children get a new source at their next announce, and meanwhile fetch
its stripes from the swarm (the peer engine's fallback).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from roost.tracker.policy import PeerLike

# With fewer receivers than this, one chain (k = 1) is as shallow as striped trees.
CHAIN_BELOW = 8
DEFAULT_STRIPES = 4


@dataclass(frozen=True)
class RelayConfig:
    """``stripes``: 0 = automatic (1 for small swarms, else 4); ``rack_fanout``: how many
    racks each rack feeds per stripe (1 = a chain of racks, the fewest cross-rack bytes)."""

    stripes: int = 0
    rack_fanout: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.stripes <= 16:
            raise ValueError("stripes must be in [0, 16] (0 = automatic)")
        if not 1 <= self.rack_fanout <= 16:
            raise ValueError("rack_fanout must be in [1, 16]")


DEFAULT_RELAY = RelayConfig()


@dataclass(frozen=True)
class RelayPlan:
    """``sources[peer][s]`` is the peer id ``peer`` fetches stripe ``s`` from."""

    stripes: int
    sources: dict[str, tuple[str, ...]]

    def children(self, peer: str) -> set[str]:
        """The peers that fetch at least one stripe from ``peer``."""
        return {p for p, srcs in self.sources.items() if peer in srcs}


def stripe_count(receivers: int, config: RelayConfig = DEFAULT_RELAY) -> int:
    if config.stripes:
        return config.stripes
    return 1 if receivers < CHAIN_BELOW else DEFAULT_STRIPES


def relay_order(peers: Iterable[PeerLike]) -> list[list[PeerLike]]:
    """Receivers grouped by rack: racks by their first member's join, members by join time.

    Peers without a rack form one group of their own.
    """
    racks: dict[str | None, list[PeerLike]] = {}
    for p in sorted(peers, key=lambda p: (p.first_seen, p.peer)):
        racks.setdefault(p.rack, []).append(p)
    return list(racks.values())


def build_plan(
    peers: Iterable[PeerLike], config: RelayConfig = DEFAULT_RELAY, *, expected: int | None = None
) -> RelayPlan:
    """Each non-seeder's source per stripe, over ``peers`` (all live). Linear in their number.

    Sources are seeders (stripe roots) or other non-seeders; with no seeder the
    roots have no source and fetch as in a plain swarm (their entry is absent).
    ``expected`` (the fleet size, when known) fixes the stripe count from the
    start, so the plan does not change shape as the first peers join.
    """
    peers = list(peers)
    seeders = sorted(p.peer for p in peers if p.seeder)
    groups = relay_order(p for p in peers if not p.seeder)
    receivers = sum(len(g) for g in groups)
    k = stripe_count(max(receivers, expected or 0), config)
    if k == 1:  # a chain: through the racks one after the other, one crossing each
        groups = [[p for group in groups for p in group]] if groups else []
    sources: dict[str, list[str | None]] = {p.peer: [None] * k for group in groups for p in group}
    load: dict[str, int] = dict.fromkeys(sources, 0)  # streams each receiver sends
    for stripe in range(k):
        origin = seeders[stripe % len(seeders)] if seeders else None
        exits: list[str] = []  # per rack: the member that feeds the next racks this stripe
        for r, group in enumerate(groups):
            order = [p.peer for p in _rotated(group, stripe, k)]
            feeder = origin if r == 0 else exits[(r - 1) // config.rack_fanout]
            sources[order[0]][stripe] = feeder
            if r + 1 < len(groups):  # the rack's entry also feeds the next racks:
                exits.append(order[0])  # one hop per rack, its slots reserved first
                load[order[0]] += config.rack_fanout
            for child, parent in _tree(order, load, k):
                sources[child][stripe] = parent
    return RelayPlan(
        stripes=k,
        sources={p: tuple(s) for p, s in sources.items() if None not in s},  # type: ignore[misc]
    )


def _rotated(group: Sequence[PeerLike], stripe: int, k: int) -> list[PeerLike]:
    """The rack's members, rotated by m/k per stripe: the first members of a
    breadth-first tree are its interior ones, so each member starts (and forwards
    in) a different stripe, and the trees stay shallow."""
    shift = (stripe * len(group)) // k
    return list(group[shift:]) + list(group[:shift])


def _tree(order: list[str], load: dict[str, int], k: int) -> list[tuple[str, str]]:
    """(child, parent) edges of one stripe's tree over ``order`` (its root first).

    Breadth-first: each member takes children while it sends fewer than k
    streams in all stripes together, so the tree is as shallow as a k-ary heap
    and nobody uploads more than about B. When every member placed so far is
    full, the least loaded of them takes the child (never a later member, so
    there are no cycles).
    """
    edges = []
    open_parents = deque([order[0]])
    for index, child in enumerate(order[1:], start=1):
        while open_parents and load[open_parents[0]] >= k:
            open_parents.popleft()
        parent = open_parents[0] if open_parents else min(order[:index], key=load.__getitem__)
        load[parent] += 1
        edges.append((child, parent))
        open_parents.append(child)
    return edges
