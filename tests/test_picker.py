"""Piece picking: pure functions over plain data, so every rule is checked without a network."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from roost.runtime import picker
from roost.runtime.picker import (
    ENDGAME_MAX_DUPLICATES,
    origin_should_serve,
    pick_endgame,
    pick_pieces,
    pick_relay,
    pick_tail,
    stripe_allowed,
)


def pick(missing, has, requested, availability, count, seed=0):
    return pick_pieces(bytearray(missing), has, requested, availability, count, random.Random(seed))


# -- pick_pieces --------------------------------------------------------------------------


def test_rarest_pieces_come_first() -> None:
    availability = [5, 1, 4, 2, 3, 9]
    n = len(availability)
    assert pick([1] * n, [1] * n, [0] * n, availability, n) == [1, 3, 4, 2, 0, 5]
    assert pick([1] * n, [1] * n, [0] * n, availability, 2) == [1, 3]


def test_never_picks_held_unavailable_or_requested_pieces() -> None:
    missing = [0, 1, 1, 1, 1, 1]
    has = [1, 0, 1, 1, 1, 1]
    requested = [0, 0, 1, 0, 2, 0]
    availability = [1, 1, 1, 1, 1, 1]
    assert sorted(pick(missing, has, requested, availability, 10)) == [3, 5]


def test_nothing_to_pick() -> None:
    assert pick([1, 1], [1, 1], [0, 0], [1, 1], 0) == []
    assert pick([1, 1], [1, 1], [0, 0], [1, 1], -3) == []
    assert pick([0, 0], [1, 1], [0, 0], [1, 1], 5) == []
    assert pick([1, 1], [0, 0], [0, 0], [0, 0], 5) == []
    assert pick([], [], [], [], 5) == []


def test_ties_are_broken_at_random_but_reproducibly() -> None:
    n = 40
    args = ([1] * n, [1] * n, [0] * n, [3] * n, 10)
    assert pick(*args, seed=7) == pick(*args, seed=7)
    orders = {tuple(pick(*args, seed=seed)) for seed in range(20)}
    assert len(orders) > 1
    firsts = Counter(pick(*args, seed=seed)[0] for seed in range(2000))
    assert len(firsts) == n  # every tied piece gets to go first sometimes


def test_random_tie_breaks_stay_within_one_rarity_level() -> None:
    availability = [2, 1, 2, 1, 3, 1, 2]
    n = len(availability)
    for seed in range(50):
        chosen = pick([1] * n, [1] * n, [0] * n, availability, n, seed)
        assert sorted(chosen[:3]) == [1, 3, 5]
        assert sorted(chosen[3:6]) == [0, 2, 6]
        assert chosen[6] == 4


def test_inputs_are_not_modified() -> None:
    missing, has, requested, availability = [1, 1, 1], [1, 1, 1], [0, 1, 0], [2, 1, 3]
    copies = [list(missing), list(has), list(requested), list(availability)]
    pick(missing, has, requested, availability, 3)
    pick_endgame(bytearray(missing), has, requested, set(), availability, 3, random.Random(0))
    assert [missing, has, requested, availability] == copies


@st.composite
def piece_states(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], list[int], int]:
    n = draw(st.integers(0, 60))
    flags = st.lists(st.integers(0, 1), min_size=n, max_size=n)
    return (
        draw(flags),
        draw(flags),
        draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
        draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)),
        draw(st.integers(-1, 70)),
    )


@given(piece_states(), st.integers(0, 2**32))
def test_pick_pieces_properties(state, seed) -> None:
    missing, has, requested, availability, count = state
    chosen = pick(missing, has, requested, availability, count, seed)
    candidates = [i for i in range(len(missing)) if missing[i] and has[i] and requested[i] == 0]
    assert len(chosen) == len(set(chosen)) == min(max(count, 0), len(candidates))
    assert set(chosen) <= set(candidates)
    levels = [availability[i] for i in chosen]
    assert levels == sorted(levels)
    if chosen:  # nothing left out is rarer than something chosen
        left_out = set(candidates) - set(chosen)
        assert all(availability[i] >= levels[-1] for i in left_out)
    assert chosen == pick(missing, has, requested, availability, count, seed)


# -- pick_endgame -------------------------------------------------------------------------


def test_endgame_only_duplicates_pieces_in_flight_elsewhere() -> None:
    missing = [1, 1, 1, 1, 1, 0]
    has = [1, 1, 1, 1, 0, 1]
    requested = [0, 1, 1, ENDGAME_MAX_DUPLICATES, 1, 1]
    asked_here = {2}
    chosen = pick_endgame(
        bytearray(missing), has, requested, asked_here, [1] * 6, 10, random.Random(0)
    )
    # 0: not requested yet (pick_pieces' job); 2: already asked of this neighbour;
    # 3: at the duplicate bound; 4: this neighbour lacks it; 5: held already.
    assert chosen == [1]


def test_endgame_prefers_rare_pieces_and_respects_count() -> None:
    n = 6
    chosen = pick_endgame(
        bytearray([1] * n), [1] * n, [1] * n, set(), [4, 2, 6, 1, 3, 5], 3, random.Random(0)
    )
    assert chosen == [3, 1, 4]
    assert (
        pick_endgame(bytearray([1] * n), [1] * n, [1] * n, set(), [1] * n, 0, random.Random(0))
        == []
    )


@given(
    st.integers(1, 30),
    st.integers(1, 8),
    st.integers(1, 20),
    st.integers(0, 2**32),
)
def test_endgame_duplicates_are_bounded_and_never_reask_a_neighbour(
    pieces, neighbours, count, seed
) -> None:
    """Drive the picker the way the engine does: every neighbour holds everything, and each
    in turn gets fresh requests then endgame duplicates, until nobody can be given more."""
    rng = random.Random(seed)
    missing = [1] * pieces
    requested = [0] * pieces
    availability = [neighbours] * pieces
    asked: list[set[int]] = [set() for _ in range(neighbours)]
    has = [1] * pieces
    for _ in range(pieces * neighbours + 1):
        progress = False
        for who in range(neighbours):
            chosen = pick_pieces(bytearray(missing), has, requested, availability, count, rng)
            if not chosen:
                chosen = pick_endgame(
                    bytearray(missing), has, requested, asked[who], availability, count, rng
                )
            for index in chosen:
                assert index not in asked[who], "asked the same neighbour twice"
                asked[who].add(index)
                requested[index] += 1
                assert requested[index] <= ENDGAME_MAX_DUPLICATES
                progress = True
        if not progress:
            break
    assert all(requested), "every piece was requested"
    assert requested == [min(ENDGAME_MAX_DUPLICATES, neighbours)] * pieces


# -- the origin's refusals ----------------------------------------------------------------


def test_the_origin_serves_each_piece_once_then_refuses_each_requester_once() -> None:
    assert origin_should_serve(0, refused_this_requester=False)
    assert not origin_should_serve(1, refused_this_requester=False)
    assert not origin_should_serve(5, refused_this_requester=False)
    assert origin_should_serve(1, refused_this_requester=True)  # nobody stalls on a refusal
    assert origin_should_serve(0, refused_this_requester=True)


def test_endgame_only_for_the_last_few_pieces() -> None:
    from roost.runtime.picker import ENDGAME_MIN_PIECES, in_endgame

    assert in_endgame(ENDGAME_MIN_PIECES, 0)
    assert not in_endgame(ENDGAME_MIN_PIECES + 1, 0)
    assert in_endgame(16, 8)
    assert not in_endgame(17, 8)
    assert not in_endgame(128, 8)


# -- relay picking and stripes --------------------------------------------------------------


def test_pick_relay_asks_for_the_first_missing_pieces_of_its_stripes_in_order() -> None:
    missing = [1] * 12
    requested = [0] * 12
    missing[1] = 0  # held
    requested[5] = 1  # already asked of someone
    # stripes (k=4): this source relays stripes 1 and 2 -> pieces 1,2,5,6,9,10
    assert pick_relay(bytearray(missing), requested, (4, frozenset({1, 2})), 3) == [2, 6, 9]
    assert pick_relay(bytearray(missing), requested, (4, frozenset({1, 2})), 10) == [2, 6, 9, 10]
    assert pick_relay(bytearray(missing), requested, (4, frozenset({1, 2})), 0) == []


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 2)), max_size=80),
    st.integers(1, 6).flatmap(
        lambda k: st.tuples(st.just(k), st.frozensets(st.integers(0, k - 1), min_size=1))
    ),
    st.integers(0, 8),
)
def test_pick_relay_takes_the_first_unasked_missing_pieces_of_its_stripes(rows, stripes, count):
    """Whatever the state: exactly the first ``count`` pieces, in order, that are missing,
    not asked for and in the source's stripes (the definition, walked piece by piece)."""
    missing = bytearray(m for m, _ in rows)
    requested = [r for _, r in rows]
    expected = [
        i
        for i in range(len(rows))
        if missing[i] and not requested[i] and i % stripes[0] in stripes[1]
    ][:count]
    assert pick_relay(missing, requested, stripes, count) == expected


def test_pick_relay_ignores_what_the_source_holds() -> None:
    """Asking ahead: the source answers once it has the piece, so its bitfield is moot."""
    assert pick_relay(bytearray([1, 1, 1]), [0, 0, 0], (1, frozenset({0})), 2) == [0, 1]


def test_pick_tail_takes_the_last_missing_pieces_first_and_unasked_ones_before_others() -> None:
    """A relay source sends its stripe from the lowest missing piece up: a complete
    neighbour helping with the tail starts from the other end."""
    missing = bytearray([0, 1, 1, 1, 1, 1, 1, 1])
    has = [1] * 8
    requested = [0, 1, 1, 1, 1, 0, 0, 0]  # 1-4 asked of the source, ahead
    assert pick_tail(missing, has, requested, set(), 2) == [7, 6]
    assert pick_tail(missing, has, requested, set(), 5) == [7, 6, 5, 4, 3]
    assert pick_tail(missing, has, requested, {7}, 2) == [6, 5]  # not asked of it twice
    requested[7] = ENDGAME_MAX_DUPLICATES  # raced enough already
    assert pick_tail(missing, has, requested, set(), 9) == [6, 5, 4, 3, 2, 1]
    assert pick_tail(missing, [1] * 4 + [0] * 4, requested, set(), 9) == [3, 2, 1]
    assert pick_tail(missing, has, requested, set(), 0) == []


@given(
    st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 3)), max_size=64),
    st.sets(st.integers(0, 63)),
    st.integers(0, 70),
)
def test_pick_tail_properties(rows, asked, count) -> None:
    missing = bytearray(int(m) for m, _, _ in rows)
    has = [int(h) for _, h, _ in rows]
    requested = [r for _, _, r in rows]
    chosen = pick_tail(missing, has, requested, asked, count)
    allowed = [
        i
        for i in range(len(rows))
        if missing[i] and has[i] and i not in asked and requested[i] < ENDGAME_MAX_DUPLICATES
    ]
    assert len(chosen) == min(count, len(allowed)) and set(chosen) <= set(allowed)
    fresh = [i for i in chosen if not requested[i]]
    assert chosen[: len(fresh)] == fresh == sorted(fresh, reverse=True)


@given(
    st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=64),
    st.integers(1, 8),
    st.sets(st.integers(0, 7)),
)
def test_stripe_filters_only_ever_narrow_the_choice(rows, k, allowed) -> None:
    missing = [int(m) for m, _, _ in rows]
    has = [int(h) for _, h, _ in rows]
    requested = [int(r) for _, _, r in rows]
    availability = [1] * len(rows)
    stripes = (k, frozenset(a for a in allowed if a < k))
    everything = pick(missing, has, requested, availability, len(rows))
    narrowed = pick_pieces(
        bytearray(missing), has, requested, availability, len(rows), random.Random(0), stripes
    )
    assert set(narrowed) == {i for i in everything if i % k in stripes[1]}
    relay = pick_relay(bytearray(missing), requested, stripes, len(rows))
    assert relay == sorted(relay)
    assert all(missing[i] and not requested[i] and i % k in stripes[1] for i in relay)
    assert stripe_allowed(3, None) and not stripe_allowed(3, (2, frozenset({0})))


def test_an_origin_under_a_plan_sends_in_piece_order_within_its_lead() -> None:
    now = 100.0
    heads = [(40, now), (44, now), (70, now)]
    assert picker.origin_may_send(40, heads, now, lead=16)  # the lowest always may go
    assert picker.origin_may_send(44, heads, now, lead=16)
    assert not picker.origin_may_send(70, heads, now, lead=16)  # stripe too far ahead
    assert picker.origin_may_send(70, [(70, now)], now, lead=16)  # alone: no one to wait for


def test_a_stuck_upload_does_not_hold_the_origin_back() -> None:
    now = 100.0
    stuck = (3, now - picker.ORIGIN_STALL - 0.1)  # a frozen child's head upload
    assert not picker.origin_may_send(70, [stuck, (70, now)], now - 1.0, lead=16)
    assert picker.origin_may_send(70, [stuck, (70, now)], now, lead=16)


@given(st.lists(st.integers(0, 500), min_size=1, max_size=20), st.integers(1, 32))
def test_some_waiting_upload_may_always_go(pieces: list[int], lead: int) -> None:
    heads = [(p, 0.0) for p in pieces]
    assert any(picker.origin_may_send(p, heads, 0.0, lead=lead) for p in pieces)
