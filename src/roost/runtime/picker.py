"""Which pieces to ask a neighbour for: pure functions over plain data.

The engine calls ``pick_pieces`` whenever a neighbour has room for more
requests. Pieces come rarest-first among our neighbours, with random
tie-breaks, so different peers fetch different pieces from the origin and can
trade them at once; a piece only the origin holds is by construction the
rarest, so requests to the origin go to pieces nobody else can serve.

When every piece we still need is already requested from someone and only
a few are left (the endgame, ``in_endgame``), ``pick_endgame`` lets an idle
neighbour duplicate requests for pieces in flight elsewhere, so the last
pieces never wait on one slow neighbour; the first copy to arrive wins and the
others are cancelled.

Under a relay plan, ``pick_relay`` asks each source for its stripes in order,
ahead of time, and ``pick_tail`` lets a complete neighbour send the last
pieces of a stripe whose source lags, from the other end.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

# (k, allowed): only pieces i with i % k in allowed (relay stripes); None: every piece.
Stripes = Optional[tuple[int, frozenset[int]]]

# How many neighbours may be asked for the same piece at once in the endgame.
ENDGAME_MAX_DUPLICATES = 2
# The endgame starts when at most max(this, 2 per neighbour) pieces are missing.
ENDGAME_MIN_PIECES = 4
# At most this many tail pieces (see pick_tail) in flight from one complete neighbour:
# the hosts that lag are usually the children of one lagging relay, and all ask the
# first neighbours to complete; spread thin, their tail comes from many uplinks at once.
TAIL_PER_HELPER = 2


def missing_pieces(missing: bytes | bytearray) -> Iterator[int]:
    """The indexes *i* with ``missing[i]`` set, found by the C-level ``find``: late in a
    download almost every piece is held, and stepping over them one by one in Python
    made every pick cost the whole release."""
    i = missing.find(1)
    while i >= 0:
        yield i
        i = missing.find(1, i + 1)


def pick_pieces(
    missing: bytes | bytearray,
    neighbour_has: Sequence[int],
    requested: Sequence[int],
    availability: Sequence[int],
    count: int,
    rng: random.Random,
    stripes: Stripes = None,
) -> list[int]:
    """Up to ``count`` pieces to request from one neighbour, rarest first.

    ``missing[i]`` is 1 while we still need piece *i*, ``neighbour_has[i]``
    when this neighbour holds it, ``requested[i]`` counts requests for it in
    flight to anyone, and ``availability[i]`` counts neighbours that hold it.
    ``stripes`` = (k, allowed): only pieces *i* with ``i % k`` in ``allowed``.
    """
    if count <= 0:
        return []
    candidates = [i for i in missing_pieces(missing) if neighbour_has[i] and not requested[i]]
    return _rarest(_in_stripes(candidates, stripes), availability, count, rng)


def pick_relay(
    missing: bytes | bytearray, requested: Sequence[int], stripes: Stripes, count: int
) -> list[int]:
    """Up to ``count`` pieces to ask of our relay source: the first missing ones of its
    stripes, in order, whether or not it holds them yet.

    The source receives its stripes in this same order and answers each request
    the moment it has verified the piece, so a piece moves down a relay tree
    without waiting for announcements or new requests at every hop.
    """
    if count <= 0:
        return []
    k, allowed = (1, frozenset({0})) if stripes is None else stripes
    chosen = []
    for stripe in sorted(allowed):
        # Walk this stripe's missing pieces only (a C-level slice and find): the first of
        # them are usually asked for already, and the engine asks after every piece.
        found = 0
        for j in missing_pieces(missing[stripe::k]):
            i = stripe + j * k
            if not requested[i]:
                chosen.append(i)
                found += 1
                if found == count:
                    break
    return sorted(chosen)[:count]


def stripe_allowed(index: int, stripes: Stripes) -> bool:
    return stripes is None or index % stripes[0] in stripes[1]


def _in_stripes(candidates: list[int], stripes: Stripes) -> list[int]:
    if stripes is None:
        return candidates
    return [i for i in candidates if stripe_allowed(i, stripes)]


def in_endgame(missing_count: int, neighbours: int) -> bool:
    """Whether so few pieces are left that racing duplicate requests is worth it.

    Everything still missing may be requested long before the end (requests
    in flight to many neighbours cover a large share of a small release);
    duplicating all of those would waste upload on copies. Only the last few
    pieces, about two per neighbour, are raced.
    """
    return missing_count <= max(ENDGAME_MIN_PIECES, 2 * neighbours)


def pick_endgame(
    missing: bytes | bytearray,
    neighbour_has: Sequence[int],
    requested: Sequence[int],
    asked_of_neighbour: set[int],
    availability: Sequence[int],
    count: int,
    rng: random.Random,
    stripes: Stripes = None,
) -> list[int]:
    """Pieces already in flight elsewhere that this neighbour could race for."""
    if count <= 0:
        return []
    candidates = [
        i
        for i in missing_pieces(missing)
        if neighbour_has[i]
        and 0 < requested[i] < ENDGAME_MAX_DUPLICATES
        and i not in asked_of_neighbour
    ]
    return _rarest(_in_stripes(candidates, stripes), availability, count, rng)


def pick_tail(
    missing: bytes | bytearray,
    neighbour_has: Sequence[int],
    requested: Sequence[int],
    asked_of_neighbour: set[int],
    count: int,
) -> list[int]:
    """Pieces a complete neighbour could send us while a relay source lags: the last
    missing ones first (nobody else asked for them yet, then those asked of one peer).

    A relay source sends its stripe in piece order, so taking the other end keeps the
    two from sending the same pieces, and a host whose stripe lags receives the rest
    over its whole downlink instead of one stream's share of it.
    """
    if count <= 0:
        return []
    fresh: list[int] = []
    raced: list[int] = []
    i = missing.rfind(1)
    while i >= 0 and len(fresh) < count:
        if neighbour_has[i] and i not in asked_of_neighbour:
            if not requested[i]:
                fresh.append(i)
            elif requested[i] < ENDGAME_MAX_DUPLICATES and len(raced) < count:
                raced.append(i)
        i = missing.rfind(1, 0, i)
    return (fresh + raced)[:count]


def _rarest(
    candidates: list[int], availability: Sequence[int], count: int, rng: random.Random
) -> list[int]:
    rng.shuffle(candidates)  # random order among equally rare pieces (sort is stable)
    candidates.sort(key=availability.__getitem__)
    return candidates[:count]


def origin_should_serve(uploads_of_piece: int, refused_this_requester: bool) -> bool:
    """Whether a seeder answers a request for a piece with data or with a Reject.

    The origin's upload is the swarm's scarcest resource: a piece it has
    already sent (or is sending) to one peer will soon be held by that peer
    and is better fetched from it, so the origin's bandwidth goes to pieces
    nobody has yet. It refuses such a piece only once per requester: a
    requester that asks again (because it cannot reach any holder) is served,
    so nobody can stall on a refusal.
    """
    return uploads_of_piece == 0 or refused_this_requester


# Under a relay plan, how many pieces past the lowest waiting one a seeder may send,
# and after how many seconds a piece still not sent stops holding the others back.
ORIGIN_LEAD = 16
ORIGIN_STALL = 2.0


def origin_may_send(
    piece: int,
    heads: Iterable[tuple[int, float]],
    now: float,
    lead: int = ORIGIN_LEAD,
    stall: float = ORIGIN_STALL,
) -> bool:
    """Whether a seeder under a relay plan may send ``piece`` now. ``heads`` holds
    (piece, since when) for the upload at the head of every neighbour's queue.

    Each relay child asks the origin for its stripe in order, and TCP shares the
    origin's link between them by chance: a stripe that falls behind stays
    behind, and the whole fleet waits for it at the end. Sending in piece order,
    no piece more than ``lead`` past the lowest one waiting, keeps the stripes
    level. The lowest waiting piece may always go, so uploads never deadlock,
    and a head stuck for ``stall`` seconds (a frozen child) is ignored, so it
    cannot hold the fleet back.
    """
    live = [p for p, since in heads if now - since < stall]
    return piece < min(live, default=piece) + lead
