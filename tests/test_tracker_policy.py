"""The hand-out policy as pure functions: properties over generated swarms, no network."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.tracker.policy import (
    DEFAULT_INTERVALS,
    HandoutConfig,
    IntervalConfig,
    PeerView,
    announce_interval,
    is_complete,
    is_live,
    origin_clients,
    score,
    select_neighbours,
    swarm_age,
    swarm_complete,
)
from roost.tracker.relay import RelayConfig, build_plan

NOW = 1000.0
RACKS = [None, "r1", "r2", "r3"]


def pid(n: int) -> str:
    return f"{n:032x}"


@st.composite
def swarms(draw: st.DrawFn, max_peers: int = 40) -> list[PeerView]:
    """A swarm: unique peers, a shared piece count, some seeders, some dead, mixed racks."""
    pieces = draw(st.integers(1, 20))
    ids = draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=max_peers, unique=True))
    n_seeders = draw(st.integers(0, min(3, len(ids))))
    peers = []
    for i, n in enumerate(ids):
        seeder = i < n_seeders
        have = pieces if seeder else draw(st.integers(0, pieces))
        expires = draw(st.sampled_from([math.inf, NOW + 5, NOW - 1, NOW]))
        joined = draw(st.sampled_from([0.0, 1.0, 2.0]))
        rack = draw(st.sampled_from(RACKS))
        peers.append(PeerView(pid(n), rack, seeder, have, pieces, expires, joined))
    return peers


configs = st.builds(
    HandoutConfig,
    degree=st.integers(4, 12),
    rack_weight=st.integers(0, 4),
    remote_slots=st.integers(0, 2),
    random_slots=st.integers(0, 3),
    origin_fanout=st.integers(1, 4),
)


def handout(me: PeerView, peers: list[PeerView], config: HandoutConfig, seed: int = 0):
    return select_neighbours(me, peers, random.Random(seed), now=NOW, config=config)


@given(swarms(), configs, st.data())
def test_handout_is_bounded_live_and_never_self(
    peers: list[PeerView], config: HandoutConfig, data: st.DataObject
) -> None:
    me = data.draw(st.sampled_from(peers))
    chosen = handout(me, peers, config, seed=data.draw(st.integers(0, 99)))
    ids = [p.peer for p in chosen]
    assert len(chosen) <= config.degree
    assert len(set(ids)) == len(ids)
    assert me.peer not in ids
    assert all(is_live(p, NOW) for p in chosen)
    assert all(any(p is q for q in peers) for p in chosen)


@given(swarms(), configs, st.integers(0, 2**32), st.randoms(use_true_random=False))
def test_handout_is_deterministic_whatever_the_input_order(
    peers: list[PeerView], config: HandoutConfig, seed: int, shuffler: random.Random
) -> None:
    me = peers[-1]
    first = [p.peer for p in handout(me, peers, config, seed)]
    again = [p.peer for p in handout(me, peers, config, seed)]
    shuffled = list(peers)
    shuffler.shuffle(shuffled)
    assert first == again == [p.peer for p in handout(me, shuffled, config, seed)]


@given(swarms(), st.data())
def test_ranked_slots_prefer_data_then_rack(peers: list[PeerView], data: st.DataObject) -> None:
    """With no random or reserved slots, nothing left out outscores anything chosen."""
    config = HandoutConfig(degree=6, rack_weight=2, remote_slots=0, random_slots=0)
    me = data.draw(st.sampled_from([p for p in peers if not is_complete(p)] or [None]))
    if me is None:
        return
    chosen = [p for p in handout(me, peers, config) if not p.seeder]
    ids = {p.peer for p in chosen}
    left = [
        p
        for p in peers
        if is_live(p, NOW) and not p.seeder and p.peer != me.peer and p.peer not in ids
    ]
    if chosen and left:
        worst = min(score(me.rack, p, 2, need=False) for p in chosen)
        assert all(score(me.rack, p, 2, need=False) <= worst for p in left)


def test_same_rack_wins_among_equals_but_remote_slots_are_kept() -> None:
    me = PeerView(pid(0), "r1", pieces=10)
    local = [PeerView(pid(i), "r1", have=5, pieces=10) for i in range(1, 11)]
    remote = [PeerView(pid(i), "r2", have=5, pieces=10) for i in range(11, 21)]
    strict = HandoutConfig(degree=8, remote_slots=0, random_slots=0)
    assert {p.rack for p in handout(me, [me, *local, *remote], strict)} == {"r1"}
    mixed = HandoutConfig(degree=8, remote_slots=2, random_slots=0)
    racks = [p.rack for p in handout(me, [me, *local, *remote], mixed)]
    assert racks.count("r2") == 2 and racks.count("r1") == 6


def test_rack_weight_is_worth_two_quarters_of_progress() -> None:
    me = PeerView(pid(0), "r1", pieces=100)
    near = PeerView(pid(1), "r1", have=10, pieces=100)  # tier 1, +2 same rack
    far_better = PeerView(pid(2), "r2", have=80, pieces=100)  # tier 4
    far_equal = PeerView(pid(3), "r2", have=60, pieces=100)  # tier 3
    config = HandoutConfig(degree=1, remote_slots=0, random_slots=0, origin_fanout=1)
    assert handout(me, [me, near, far_better], config) == [far_better]
    picks = {handout(me, [me, near, far_equal], config, seed)[0].peer for seed in range(40)}
    assert picks == {near.peer, far_equal.peer}  # equals: the RNG decides


@given(swarms(max_peers=60), configs)
def test_each_origin_serves_a_bounded_stable_set(
    peers: list[PeerView], config: HandoutConfig
) -> None:
    live = [p for p in peers if is_live(p, NOW)]
    full_copy = any(not p.seeder and is_complete(p) for p in live)
    needy = [p for p in live if not p.seeder and not is_complete(p)]
    lists = {p.peer: {q.peer for q in handout(p, peers, config)} for p in live}
    for seeder in (p for p in live if p.seeder):
        holders = {peer for peer, got in lists.items() if seeder.peer in got}
        assert len(holders) <= config.origin_fanout
        assert all(not is_complete(p) for p in live if p.peer in holders)
        if full_copy:
            assert not holders
        else:
            assert len(holders) == min(config.origin_fanout, len(needy))
            assert holders == origin_clients(seeder.peer, live, config.origin_fanout)
            assert {p.peer for p in handout(seeder, peers, config)} == holders


@given(swarms(max_peers=30), st.integers(1, 4), st.integers(20_000, 30_000))
def test_a_newcomer_never_takes_an_origin_slot(
    peers: list[PeerView], fanout: int, newcomer: int
) -> None:
    """Origin slots are sticky: clients keep the origin while others join."""
    live = [p for p in peers if is_live(p, NOW)]
    for seeder in (p for p in live if p.seeder):
        before = origin_clients(seeder.peer, live, fanout)
        late = PeerView(pid(newcomer), pieces=live[0].pieces, first_seen=NOW)
        after = origin_clients(seeder.peer, [*live, late], fanout)
        if len(before) == fanout or any(not p.seeder and is_complete(p) for p in live):
            assert after == before
        else:
            assert after == before | {late.peer}


def test_origin_is_withdrawn_once_a_full_copy_exists() -> None:
    origin = PeerView(pid(1), seeder=True, have=10, pieces=10)
    peers = [origin] + [PeerView(pid(i), pieces=10) for i in range(2, 50)]
    config = HandoutConfig()
    got_origin = [p for p in peers[1:] if origin in handout(p, peers, config)]
    assert len(got_origin) == config.origin_fanout
    peers.append(PeerView(pid(99), have=10, pieces=10))  # one host finished
    assert not [p for p in peers[1:] if origin in handout(p, peers, config)]
    assert handout(origin, peers, config) == []


def test_complete_peers_are_pointed_at_those_that_need_data() -> None:
    done = PeerView(pid(1), "r1", have=10, pieces=10)
    others = [
        PeerView(pid(2), seeder=True, have=10, pieces=10),
        PeerView(pid(3), "r1", have=10, pieces=10),
        PeerView(pid(4), "r2", have=9, pieces=10),
        PeerView(pid(5), "r2", have=0, pieces=10),
    ]
    config = HandoutConfig(degree=2, remote_slots=0, random_slots=0, origin_fanout=1)
    assert [p.peer for p in handout(done, [done, *others], config)] == [pid(5), pid(4)]


def test_a_thousand_hosts_stay_sparse_and_connected() -> None:
    rng = random.Random(7)
    origin = PeerView(pid(0), seeder=True, have=64, pieces=64)
    peers = [origin] + [
        PeerView(pid(i), f"rack{i % 25}", have=rng.choice([0, 0, 3, 20, 40]), pieces=64)
        for i in range(1, 1001)
    ]
    config = HandoutConfig()
    edges: dict[str, set[str]] = {p.peer: set() for p in peers}
    for p in peers:
        got = handout(p, peers, config, seed=rng.randrange(1 << 30))
        assert len(got) <= config.degree
        for q in got:
            edges[p.peer].add(q.peer)
            edges[q.peer].add(p.peer)
    assert len(edges[origin.peer]) == config.origin_fanout
    seen, todo = {origin.peer}, [origin.peer]
    while todo:
        for q in edges[todo.pop()] - seen:
            seen.add(q)
            todo.append(q)
    assert len(seen) == len(peers)


# -- swarm completion and announce interval -----------------------------------------------


def test_swarm_complete_needs_every_live_peer_done_and_enough_completions() -> None:
    origin = PeerView(pid(0), seeder=True, have=4, pieces=4)
    done = PeerView(pid(1), have=4, pieces=4)
    busy = PeerView(pid(2), have=1, pieces=4)
    assert not swarm_complete([origin], completed=0, expected_peers=None)
    assert swarm_complete([origin, done], completed=1, expected_peers=None)
    assert not swarm_complete([origin, done, busy], completed=1, expected_peers=None)
    assert not swarm_complete([origin, done], completed=1, expected_peers=2)
    assert swarm_complete([origin, done], completed=2, expected_peers=2)  # one left already


@given(
    st.floats(0, 1e6),
    st.integers(0, 100_000),
    st.booleans(),
    st.builds(
        IntervalConfig,
        min_interval=st.integers(1, 5),
        incomplete_max=st.integers(5, 30),
        max_interval=st.integers(30, 600),
        ramp=st.floats(0, 1),
        max_announce_rate=st.floats(1, 10_000),
    ),
)
@settings(max_examples=300)
def test_interval_is_bounded_and_grows(
    age: float, n: int, complete: bool, config: IntervalConfig
) -> None:
    interval = announce_interval(age=age, live_peers=n, complete=complete, config=config)
    assert config.min_interval <= interval <= config.max_interval
    later = announce_interval(age=age + 60, live_peers=n, complete=complete, config=config)
    assert later >= interval
    bigger = announce_interval(age=age, live_peers=n * 2, complete=complete, config=config)
    assert bigger >= interval
    if complete:
        assert interval == config.max_interval


def test_interval_is_short_while_young_and_long_when_done() -> None:
    young = announce_interval(age=0, live_peers=10, complete=False)
    old = announce_interval(age=3600, live_peers=10, complete=False)
    done = announce_interval(age=5, live_peers=10, complete=True)
    assert young == DEFAULT_INTERVALS.min_interval
    assert old == DEFAULT_INTERVALS.incomplete_max
    assert done == DEFAULT_INTERVALS.max_interval
    crowd = announce_interval(age=0, live_peers=10_000, complete=False)
    assert crowd == math.ceil(10_000 / DEFAULT_INTERVALS.max_announce_rate)  # rate-bounded


def test_swarm_age_counts_from_the_oldest_live_peer() -> None:
    assert swarm_age([], NOW) == 0
    assert swarm_age([NOW - 30, NOW - 5], NOW) == 30


def test_config_refuses_a_mesh() -> None:
    for bad in ({"degree": 0}, {"degree": 1000}, {"random_slots": 9}, {"origin_fanout": 0}):
        try:
            HandoutConfig(**bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    assert HandoutConfig.for_degree(8) == HandoutConfig()


def test_interval_config_refuses_nonsense() -> None:
    for bad in ({"gather_poll": 0}, {"gather_timeout": -1}, {"gather_hold": -0.5}):
        with pytest.raises(ValueError):
            IntervalConfig(**bad)  # type: ignore[arg-type]
    assert IntervalConfig(gather_hold=0).gather_hold == 0  # 0: answer at once


@given(st.integers(2, 40), st.integers(1, 16), st.integers(4, 12), st.integers(0, 99))
def test_a_peer_is_handed_every_relay_source_of_its_plan(
    receivers: int, stripes: int, degree: int, seed: int
) -> None:
    """Even a plan with more stripes than the hand-out's degree: a source the peer is not
    told of is a stripe it cannot fetch as planned (with 16 stripes, half the fleet gave
    up half its stripes to the swarm and the origin sent 1.5 × the release)."""
    origin = PeerView(pid(0), None, True, 4, 4, math.inf, 0.0)
    fleet = [
        PeerView(pid(n), None, False, 0, 4, math.inf, float(n)) for n in range(1, receivers + 1)
    ]
    plan = build_plan([origin, *fleet], RelayConfig(stripes=stripes))
    config = HandoutConfig(degree=degree, random_slots=min(2, degree))
    for me in fleet:
        chosen = select_neighbours(
            me, [origin, *fleet], random.Random(seed), now=NOW, config=config, plan=plan
        )
        ids = [p.peer for p in chosen]
        assert set(plan.sources[me.peer]) <= set(ids)
        assert len(set(ids)) == len(ids) and me.peer not in ids
        assert len(ids) <= max(degree, len(set(plan.sources[me.peer])))
