"""The relay plan (tracker side): pure functions, checked on fleets of any size, no network."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.tracker.policy import PeerView
from roost.tracker.relay import (
    CHAIN_BELOW,
    DEFAULT_STRIPES,
    RelayConfig,
    RelayPlan,
    build_plan,
    stripe_count,
)

ORIGIN = "f" * 32


def fleet(n: int, racks: int = 0, *, start: int = 0) -> list[PeerView]:
    """The origin and ``n`` receivers joining in order (rack i % racks when racked)."""
    peers = [PeerView(ORIGIN, seeder=True)]
    for i in range(start, start + n):
        rack = f"rack{i % racks}" if racks else None
        peers.append(PeerView(f"{i:032x}", rack=rack, first_seen=float(i)))
    return peers


def depth(plan: RelayPlan, peer: str, stripe: int) -> int:
    """Hops from the origin; fails on a cycle."""
    hops = 0
    while peer != ORIGIN:
        peer = plan.sources[peer][stripe]
        hops += 1
        assert hops <= len(plan.sources), "the plan has a cycle"
    return hops


def uploads(plan: RelayPlan) -> Counter[str]:
    """Stripe streams each peer sends (its children summed over stripes)."""
    return Counter(s for sources in plan.sources.values() for s in sources)


def test_small_swarms_are_a_chain_larger_ones_striped_trees() -> None:
    assert stripe_count(CHAIN_BELOW - 1) == 1
    assert stripe_count(CHAIN_BELOW) == DEFAULT_STRIPES
    assert stripe_count(3, RelayConfig(stripes=2)) == 2
    chain = build_plan(fleet(5))
    assert chain.stripes == 1
    order = [f"{i:032x}" for i in range(5)]
    assert [chain.sources[p][0] for p in order] == [ORIGIN, *order[:-1]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.sampled_from([0, 1, 2, 3, 4, 8]), st.integers(0, 8))
def test_every_receiver_gets_every_stripe_from_a_live_source_without_cycles(
    n: int, stripes: int, racks: int
) -> None:
    peers = fleet(n, racks)
    plan = build_plan(peers, RelayConfig(stripes=stripes))
    ids = {p.peer for p in peers}
    assert set(plan.sources) == ids - {ORIGIN}
    for peer, sources in plan.sources.items():
        assert len(sources) == plan.stripes
        assert all(s in ids and s != peer for s in sources)
        for stripe in range(plan.stripes):
            depth(plan, peer, stripe)


@settings(max_examples=40, deadline=None)
@given(st.integers(CHAIN_BELOW, 2000))
def test_upload_is_balanced_and_the_origin_sends_each_stripe_once(n: int) -> None:
    plan = build_plan(fleet(n))
    load = uploads(plan)
    k = plan.stripes
    assert load.pop(ORIGIN) == k  # one stream per stripe: S bytes in all
    # Each stream is about B/k: no receiver is asked to upload more than B.
    assert max(load.values()) <= k
    # The trees are shallow: log_k of the fleet, plus one.
    worst = max(depth(plan, p, s) for p in plan.sources for s in range(k))
    assert worst <= 2 + n.bit_length() // max(1, (k - 1).bit_length())


def test_each_rack_receives_each_stripe_once_over_its_uplink() -> None:
    peers = fleet(16, racks=4)
    plan = build_plan(peers)
    rack = {p.peer: p.rack for p in peers}
    crossing = Counter(
        rack[child]
        for child, sources in plan.sources.items()
        for source in sources
        if rack[source] != rack[child]
    )
    assert crossing == {f"rack{r}": plan.stripes for r in range(4)}
    assert max(uploads(plan).values()) <= plan.stripes + 1  # a rack's exit feeds one more


def test_rack_fanout_makes_deep_rack_chains_shallow() -> None:
    peers = fleet(2000, racks=100)
    chained = build_plan(peers)
    tree = build_plan(peers, RelayConfig(rack_fanout=4))

    def worst(plan: RelayPlan) -> int:
        return max(depth(plan, p, s) for p in plan.sources for s in range(plan.stripes))

    assert worst(tree) < worst(chained) // 4


def test_expected_fleet_size_fixes_the_stripe_count_from_the_first_peer() -> None:
    assert build_plan(fleet(1)).stripes == 1
    assert build_plan(fleet(1), expected=16).stripes == DEFAULT_STRIPES


def test_plan_does_not_depend_on_the_order_peers_are_listed() -> None:
    peers = fleet(40, racks=3)
    assert build_plan(peers).sources == build_plan(list(reversed(peers))).sources


def test_without_a_seeder_roots_are_left_to_the_swarm() -> None:
    receivers = fleet(10)[1:]
    plan = build_plan(receivers)
    assert len(plan.sources) < len(receivers)  # the roots have no source for some stripe
    for sources in plan.sources.values():
        assert ORIGIN not in sources


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        RelayConfig(stripes=17)
    with pytest.raises(ValueError):
        RelayConfig(rack_fanout=0)


def test_a_chain_crosses_each_rack_boundary_once() -> None:
    peers = fleet(6, racks=3)  # fewer than CHAIN_BELOW receivers: one chain
    plan = build_plan(peers)
    rack = {p.peer: p.rack for p in peers}
    assert plan.stripes == 1
    assert max(uploads(plan).values()) == 1
    crossings = sum(rack[c] != rack.get(s[0]) for c, s in plan.sources.items())
    assert crossings == 3  # into each rack once (the first from the origin)
