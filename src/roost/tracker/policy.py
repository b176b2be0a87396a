"""The neighbour hand-out policy: which peers each peer is told to talk to, and how often.

Theory of operation
-------------------
A datacenter swarm is not the internet: the tracker knows every member and can
steer. Each announce returns at most ``degree`` neighbours (8 by default), so
1,000 hosts form a sparse random-ish graph, never a full mesh. For a peer that
still needs data the list is built in four steps:

1. **Candidates** are the swarm's live peers (announced within their timeout),
   minus the announcer, minus every seeder that does not serve it (below).
2. **Origin first.** The seeders that serve the announcer are listed first:
   they are the only source of new data early on.
3. **Ranked slots** (the rest of ``degree - random_slots``) go to the best by
   ``score = progress tier + rack bonus``. The progress tier is 5 for a complete
   peer, 1-4 by quarters of pieces held, 0 for a peer holding nothing; the rack
   bonus (``rack_weight``, default 2) is added when the announcer has a rack label
   and the candidate has the same one, so a same-rack neighbour is worth two
   quarters of progress. Ties are broken by the injected RNG. When the announcer
   has a rack, at least ``remote_slots`` (2) ranked slots go to other racks when
   any exist, so no rack becomes an island.
4. **Random slots** (``random_slots``, default 2) are filled uniformly from the
   remaining candidates, whatever they hold: they keep the graph connected and
   spread load away from the few peers that rank best.

Bounding the origin: a seeder (origin) uploading the same piece to many peers
wastes the scarcest link in the swarm. So each seeder serves at most
``origin_fanout`` peers (4): the live, incomplete non-seeders that joined first
(``first_seen``), ties broken by a pseudo-random order derived from the
seeder's and the peers' ids (``origin_rank``). The choice is sticky: a peer
that joins later never displaces a client, so the origin keeps the same few
clients across announces and restarts, and a slot moves on only when its
client leaves, times out or completes. Once any non-seeder holds the complete
release, a full copy exists outside the origin and no seeder is handed out any
more: every further byte comes from peers.

A peer that is complete (or a seeder) needs nothing, but may upload: a complete
peer is given incomplete peers, those holding least first; a seeder is given
exactly the peers it serves. Seeders are never handed to complete peers.

The announce interval is short while a swarm is young and incomplete (peers
need fresh neighbours as data spreads), grows with the swarm's age, is long
once the swarm is complete, and is stretched for very large swarms so the
tracker's announce rate stays bounded. A peer not heard from for
``timeout_factor`` × its last interval is dropped (see ``is_live``).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from roost.tracker.relay import RelayPlan


class PeerLike(Protocol):
    """What the policy needs to know about a peer (``PeerView`` and the tracker's records)."""

    @property
    def peer(self) -> str: ...
    @property
    def rack(self) -> str | None: ...
    @property
    def seeder(self) -> bool: ...
    @property
    def have(self) -> int: ...
    @property
    def pieces(self) -> int: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def first_seen(self) -> float: ...


P = TypeVar("P", bound=PeerLike)


@dataclass(frozen=True)
class PeerView:
    """A peer as the policy sees it: plain data."""

    peer: str
    rack: str | None = None
    seeder: bool = False
    have: int = 0
    pieces: int = 0
    expires_at: float = math.inf
    first_seen: float = 0.0


@dataclass(frozen=True)
class HandoutConfig:
    """Knobs of the hand-out policy (see the module docstring for what each one does)."""

    degree: int = 8
    rack_weight: int = 2
    remote_slots: int = 2
    random_slots: int = 2
    origin_fanout: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.degree <= 64:
            raise ValueError("degree must be in [1, 64]: enough to spread, never a full mesh")
        if not 0 <= self.random_slots <= self.degree:
            raise ValueError("random_slots must be in [0, degree]")
        if not 0 <= self.remote_slots <= self.degree:
            raise ValueError("remote_slots must be in [0, degree]")
        if not 1 <= self.origin_fanout <= self.degree:
            raise ValueError("origin_fanout must be in [1, degree]")
        if self.rack_weight < 0:
            raise ValueError("rack_weight must be >= 0")

    @classmethod
    def for_degree(cls, degree: int) -> HandoutConfig:
        """The default proportions (a quarter random, a quarter remote, half to the origin)."""
        return cls(
            degree=degree,
            random_slots=degree // 4,
            remote_slots=degree // 4,
            origin_fanout=max(1, degree // 2),
        )


DEFAULT_HANDOUT = HandoutConfig()
COMPLETE_TIER = 5


# -- facts about peers --------------------------------------------------------------------


def is_live(p: PeerLike, now: float) -> bool:
    return now < p.expires_at


def is_complete(p: PeerLike) -> bool:
    return p.seeder or p.have >= p.pieces


def progress_tier(p: PeerLike) -> int:
    """5 when complete, 0 when holding nothing, else 1-4 by quarters of the pieces held."""
    if p.seeder or p.have >= p.pieces:  # is_complete, inlined: this runs for every candidate
        return COMPLETE_TIER
    if p.have == 0:
        return 0
    return 1 + (4 * p.have) // p.pieces


def full_copy_outside_seeders(peers: Iterable[PeerLike]) -> bool:
    return any(not p.seeder and is_complete(p) for p in peers)


_MIX = 0x9E3779B97F4A7C15F39CC0605CEDC835  # odd: multiplying by it permutes 128-bit values
_MASK = (1 << 128) - 1


def origin_rank(seeder: int, peer: int) -> int:
    """A stable pseudo-random order of peers, different per seeder, even for orderly ids.

    XOR with the seeder's id, then an odd multiplier (a bijection on 128 bits)
    that carries every low bit into the high bits that decide the order.
    """
    return ((seeder ^ peer) * _MIX) & _MASK


def _id(peer: str) -> int:
    return int(peer[:32], 16)


Needy = tuple[float, int, str]  # (first_seen, id as an integer, id)


def _needy(live: Iterable[PeerLike]) -> list[Needy]:
    """The peers a seeder may serve: incomplete non-seeders."""
    return [
        (p.first_seen, _id(p.peer), p.peer) for p in live if not p.seeder and not is_complete(p)
    ]


def _client_key(origin: int, needy: Needy) -> tuple[float, int]:
    """Earliest joiners first (sticky slots), then the seeder's own pseudo-random order."""
    return needy[0], origin_rank(origin, needy[1])


def origin_clients(seeder: str, live: Iterable[PeerLike], fanout: int) -> set[str]:
    """The ids of the (at most ``fanout``) peers a seeder serves; none once a full copy exists."""
    live = list(live)
    if full_copy_outside_seeders(live):
        return set()
    origin = _id(seeder)
    first = heapq.nsmallest(fanout, _needy(live), key=lambda n: _client_key(origin, n))
    return {peer for _, _, peer in first}


def _serves(seeder: str, me: PeerLike, needy: list[Needy], fanout: int) -> bool:
    """Is ``me`` (needy) among the ``fanout`` needy peers a seeder serves? Linear, no sort."""
    origin = _id(seeder)
    mine = _client_key(origin, (me.first_seen, _id(me.peer), me.peer))
    return sum(1 for n in needy if _client_key(origin, n) < mine) < fanout


# -- the hand-out -------------------------------------------------------------------------


def select_neighbours(
    me: PeerLike,
    peers: Iterable[P],
    rng: random.Random,
    *,
    now: float,
    config: HandoutConfig = DEFAULT_HANDOUT,
    plan: RelayPlan | None = None,
) -> list[P]:
    """At most ``config.degree`` live peers for ``me``: origin, ranked, random (module docstring).

    With a relay ``plan`` (see ``relay``), a peer's sources come first, every one of
    them even when a plan has more stripes than ``degree`` allows, and a seeder is
    handed exactly the peers that fetch a stripe from it.
    Deterministic for a given RNG state and set of peers, whatever their order.
    Linear in the swarm's size apart from one sort by id (what makes it order-free).
    """
    live = [p for p in peers if now < p.expires_at]
    live.sort(key=attrgetter("peer"))
    others = [p for p in live if p.peer != me.peer]
    if me.seeder:
        if plan is not None:
            children = plan.children(me.peer)
            return [p for p in others if p.peer in children]
        served = origin_clients(me.peer, live, config.origin_fanout)
        return [p for p in others if p.peer in served]
    if is_complete(me):
        candidates = [p for p in others if not is_complete(p)]
        return _fill([], candidates, me.rack, rng, config, need=True)
    candidates = [p for p in others if not p.seeder]
    served_by: list[P] = []
    # Without a plan the origin is withdrawn once a full copy exists elsewhere; with one
    # its few clients keep it, since a peer claiming to be complete may be lying.
    if plan is not None or not full_copy_outside_seeders(live):
        needy = _needy(candidates)
        served_by = [
            p for p in others if p.seeder and _serves(p.peer, me, needy, config.origin_fanout)
        ]
    sources = plan.sources.get(me.peer) if plan is not None else None
    if sources:
        # Relay sources first, all of them (a peer cannot fetch a stripe from a source
        # it was not told of); the origin's usual few clients keep it as well, so a
        # peer whose source fails still has a way to data nobody else holds yet.
        by_id = {p.peer: p for p in others}
        first = [by_id[s] for s in sources if s in by_id] + served_by
        first = list({p.peer: p for p in first}.values())
        candidates = [p for p in candidates if p.peer not in sources]
        return _fill(first[: max(config.degree, len(set(sources)))], candidates, me.rack, rng,
                     config, need=False)  # fmt: skip
    return _fill(served_by[: config.degree], candidates, me.rack, rng, config, need=False)


def score(me_rack: str | None, p: PeerLike, rack_weight: int, *, need: bool) -> int:
    """How much a candidate is worth: data it holds (or, for uploaders, data it lacks) + rack."""
    tier = COMPLETE_TIER - progress_tier(p) if need else progress_tier(p)
    same_rack = me_rack is not None and p.rack == me_rack
    return tier + (rack_weight if same_rack else 0)


def _fill(
    first: list[P],
    candidates: list[P],
    rack: str | None,
    rng: random.Random,
    config: HandoutConfig,
    *,
    need: bool,
) -> list[P]:
    """``first``, then ranked slots, then random slots, up to ``config.degree``."""
    buckets: dict[int, list[P]] = {}
    for p in candidates:
        buckets.setdefault(score(rack, p, config.rack_weight, need=need), []).append(p)
    ranked = [buckets[s] for s in sorted(buckets, reverse=True)]
    n_ranked = max(0, config.degree - config.random_slots - len(first))
    chosen = list(first)
    if rack is not None and config.remote_slots:
        remote = [[p for p in bucket if p.rack != rack] for bucket in ranked]
        chosen += pick_best(remote, min(config.remote_slots, n_ranked), rng)
    taken = {p.peer for p in chosen}
    rest = [[p for p in bucket if p.peer not in taken] for bucket in ranked]
    chosen += pick_best(rest, n_ranked - (len(chosen) - len(first)), rng)
    taken = {p.peer for p in chosen}
    leftover = [p for p in candidates if p.peer not in taken]
    return chosen + rng.sample(leftover, max(0, min(len(leftover), config.degree - len(chosen))))


def pick_best(buckets: list[list[P]], n: int, rng: random.Random) -> list[P]:
    """``n`` peers from buckets ordered best first; random among equals (within a bucket)."""
    chosen: list[P] = []
    for bucket in buckets:
        if len(chosen) >= n:
            break
        chosen += rng.sample(bucket, min(len(bucket), n - len(chosen)))
    return chosen


# -- swarm-level decisions ----------------------------------------------------------------


def swarm_complete(live: Iterable[PeerLike], completed: int, expected_peers: int | None) -> bool:
    """Done when every live non-seeder is complete and enough non-seeders have completed.

    ``completed`` counts distinct non-seeders that ever completed (they may have
    left since). At least one completion is required, so a swarm holding only its
    origin is never "complete"; with ``expected_peers`` that many are required.
    """
    if any(not p.seeder and not is_complete(p) for p in live):
        return False
    return completed >= max(1, expected_peers or 0)


@dataclass(frozen=True)
class IntervalConfig:
    """Bounds of the announce interval, in seconds."""

    min_interval: int = 2
    filling_interval: int = 1  # while fewer peers than expected have joined (plans change)
    gather_poll: float = 0.2  # seconds between announces while the tracker gathers the fleet
    gather_timeout: float = 3.0  # seconds a swarm waits for its expected peers, at most
    gather_hold: float = 1.0  # seconds an announce is held while gathering (answered at once
    # when the fleet is in), so every peer learns the plan together instead of at its next poll
    incomplete_max: int = 15
    max_interval: int = 60
    ramp: float = 0.1  # seconds of interval per second of swarm age, while incomplete
    max_announce_rate: float = 300.0  # announces per second a swarm may cost the tracker

    def __post_init__(self) -> None:
        if not 1 <= self.filling_interval <= self.min_interval:
            raise ValueError("need 1 <= filling_interval <= min_interval")
        if not 1 <= self.min_interval <= self.incomplete_max <= self.max_interval:
            raise ValueError("need 1 <= min_interval <= incomplete_max <= max_interval")
        if not 0 < self.gather_poll <= self.filling_interval or self.gather_timeout < 0:
            raise ValueError("need 0 < gather_poll <= filling_interval and gather_timeout >= 0")
        if self.gather_hold < 0:
            raise ValueError("gather_hold must be >= 0")
        if self.ramp < 0 or self.max_announce_rate <= 0:
            raise ValueError("ramp must be >= 0 and max_announce_rate > 0")


DEFAULT_INTERVALS = IntervalConfig()


def announce_interval(
    *,
    age: float,
    live_peers: int,
    complete: bool,
    filling: bool = False,
    config: IntervalConfig = DEFAULT_INTERVALS,
) -> int:
    """Seconds until a peer's next announce; in [filling_interval, max_interval].

    While the expected peers are still joining (``filling``), the relay plan
    changes with every arrival, so peers come back after ``filling_interval``.
    """
    if complete:
        return config.max_interval
    if filling:
        wanted = config.filling_interval
    else:
        wanted = min(config.incomplete_max, max(config.min_interval, int(age * config.ramp)))
    rate_floor = math.ceil(live_peers / config.max_announce_rate)
    return min(config.max_interval, max(wanted, rate_floor))


def gathering(
    receivers: int, expected: int | None, age: float, config: IntervalConfig = DEFAULT_INTERVALS
) -> bool:
    """Whether the tracker still waits for the fleet before handing out a relay plan.

    A plan made for the first few peers would send them the whole release from
    the origin, and again to the real stripe roots once everyone has joined: the
    origin's scarcest bytes spent twice. The last host to join bounds the finish
    anyway (it can only receive at its link's rate), so waiting for it costs
    little; ``gather_timeout`` caps the wait when some host never comes.
    """
    return bool(expected) and receivers < expected and age < config.gather_timeout  # type: ignore[operator]


def swarm_age(live: Iterable[float], now: float) -> float:
    """Seconds since the earliest ``first_seen`` among live peers (0 for an empty swarm)."""
    return max(0.0, now - min(live, default=now))
