"""The tracker service over real HTTP on 127.0.0.1, with an injected clock (no sleeping)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from roost.runtime.announce import (
    AUTH_HEADER,
    AnnounceRequest,
    fetch_status,
    register_swarm,
    sign,
    sign_request,
    tracker_key,
)
from roost.runtime.errors import RoostError
from roost.tracker import RunningTracker, TrackerConfig, load_or_create_token, running_tracker
from roost.tracker.command import relay_config
from roost.tracker.policy import DEFAULT_INTERVALS, HandoutConfig, IntervalConfig
from roost.tracker.relay import RelayConfig

SWARM = "ab" * 32
OTHER_SWARM = "cd" * 32
SECRET = bytes(range(32))
KEY = tracker_key(SECRET, SWARM)
TOKEN = "t0ken"


class FakeClock:
    """Unix time that only moves when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pid(n: int) -> str:
    return f"{n:032x}"


def request(
    n: int, clock: FakeClock, *, have: int = 0, pieces: int = 10, **fields: Any
) -> AnnounceRequest:
    values: dict[str, Any] = {
        "swarm": SWARM,
        "peer": pid(n),
        "addr": f"10.0.0.{n}",
        "port": 7000 + n,
        "have": have,
        "pieces": pieces,
        "event": "update",
        "time": clock(),
        **fields,
    }
    return AnnounceRequest(**values)


Session = aiohttp.ClientSession
# For tests that announce one peer at a time while the tracker gathers the fleet: an
# answer held for the others (``gather_hold``) would only make them wait in real time.
NO_HOLD = TrackerConfig(intervals=IntervalConfig(gather_hold=0))


def tracker_test(
    body: Callable[[RunningTracker, Session, FakeClock], Awaitable[None]],
    db: Path,
    clock: FakeClock | None = None,
    config: TrackerConfig | None = None,
) -> None:
    """Run ``body`` against a fresh in-process tracker on 127.0.0.1:0."""
    clock = clock or FakeClock()

    async def main() -> None:
        tracker = running_tracker(
            db, admin_token=TOKEN, clock=clock, rng=random.Random(1), config=config
        )
        async with tracker as t, aiohttp.ClientSession() as session:
            await body(t, session, clock)

    asyncio.run(main())


async def register(
    t: RunningTracker,
    s: Session,
    swarm: str = SWARM,
    key: bytes = KEY,
    expected: int | None = None,
    token: str | None = TOKEN,
) -> tuple[int, Any]:
    payload: dict[str, Any] = {"swarm": swarm, "key": key.hex()}
    if expected is not None:
        payload["expected_peers"] = expected
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.post(f"{t.url}/v1/swarms", json=payload, headers=headers) as r:
        return r.status, await r.json()


async def announce(
    t: RunningTracker, s: Session, req: AnnounceRequest, key: bytes = KEY
) -> tuple[int, Any]:
    signed = sign_request(req, key)
    return await post_raw(t, s, signed.body, signed.signature)


async def post_raw(
    t: RunningTracker, s: Session, body: bytes, signature: str | None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[AUTH_HEADER] = signature
    async with s.post(f"{t.url}/v1/announce", data=body, headers=headers) as r:
        return r.status, await r.json()


async def ok(t: RunningTracker, s: Session, req: AnnounceRequest) -> dict[str, Any]:
    status, answer = await announce(t, s, req)
    assert status == 200, answer
    return answer


def ids(answer: dict[str, Any]) -> set[str]:
    return {p["peer"] for p in answer["peers"]}


async def status_of(t: RunningTracker, s: Session, swarm: str = SWARM) -> tuple[int, Any]:
    async with s.get(f"{t.url}/v1/swarms/{swarm}") as r:
        return r.status, await r.json()


# -- registration -------------------------------------------------------------------------


def test_registration_needs_the_admin_token(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        assert (await register(t, s, token=None))[0] == 401
        assert (await register(t, s, token="wrong"))[0] == 401
        assert (await register(t, s))[0] == 201
        assert (await register(t, s, expected=3))[0] == 200  # same key: idempotent
        status, answer = await register(t, s, key=b"\x01" * 32)
        assert status == 409 and "different key" in answer["error"]
        status, answer = await register(t, s, swarm="xyz")
        assert status == 400 and "swarm" in answer["error"]
        assert (await register(t, s, key=b"short"))[0] == 400
        _, swarm = await status_of(t, s)
        assert swarm["expected_peers"] == 3

    tracker_test(body, tmp_path / "t.db")


def test_tracker_binds_localhost_and_answers_errors_as_json(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        assert t.url.startswith("http://127.0.0.1:")
        async with s.get(f"{t.url}/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()

    tracker_test(body, tmp_path / "t.db")


# -- announce -----------------------------------------------------------------------------


def test_announce_hands_out_bounded_neighbours(tmp_path: Path) -> None:
    """The plain-swarm hand-out (no relay plan): a bounded origin fan-out."""
    config = TrackerConfig(
        handout=HandoutConfig(degree=4, random_slots=1, origin_fanout=2), relay=None
    )

    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        first = await ok(t, s, request(1, clock, have=10, seeder=True, event="started"))
        assert first["peers"] == [] and first["swarm_complete"] is False
        for n in range(2, 12):
            answer = await ok(t, s, request(n, clock, event="started", rack="r1"))
            assert pid(n) not in ids(answer)
            assert len(answer["peers"]) <= 4
        assert answer["stats"] == {"peers": 11, "seeders": 1, "complete": 0}
        assert answer["interval"] == DEFAULT_INTERVALS.min_interval
        neighbour = answer["peers"][0]
        assert set(neighbour) == {"peer", "addr", "port", "seeder", "have", "rack"}
        n = int(neighbour["peer"], 16)
        assert (neighbour["addr"], neighbour["port"]) == (f"10.0.0.{n}", 7000 + n)
        # the origin is handed to exactly origin_fanout peers, and it is told who they are
        got_origin = [n for n in range(2, 12) if pid(1) in ids(await ok(t, s, request(n, clock)))]
        assert len(got_origin) == 2
        origin = await ok(t, s, request(1, clock, have=10, seeder=True))
        assert ids(origin) == {pid(n) for n in got_origin}

    tracker_test(body, tmp_path / "t.db", config=config)


def test_stopped_removes_the_peer(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        await ok(t, s, request(1, clock))
        await ok(t, s, request(2, clock))
        answer = await ok(t, s, request(1, clock, event="stopped"))
        assert answer["peers"] == [] and answer["stats"]["peers"] == 1
        assert ids(await ok(t, s, request(2, clock))) == set()
        _, swarm = await status_of(t, s)
        assert [p["peer"] for p in swarm["peers"]] == [pid(2)]

    tracker_test(body, tmp_path / "t.db")


def test_bad_requests_get_the_right_status(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        good = sign_request(request(1, clock), KEY)
        # unknown swarm
        stranger = request(1, clock, swarm=OTHER_SWARM)
        assert (await announce(t, s, stranger, tracker_key(SECRET, OTHER_SWARM)))[0] == 404
        # authentication
        assert (await post_raw(t, s, good.body, None))[0] == 403
        assert (await post_raw(t, s, good.body, "00" * 32))[0] == 403
        assert (await post_raw(t, s, good.body, "é"))[0] == 403
        wrong_secret = tracker_key(b"\xff" * 32, SWARM)
        assert (await announce(t, s, request(1, clock), wrong_secret))[0] == 403
        tampered = good.body.replace(b'"have":0', b'"have":9')
        assert (await post_raw(t, s, tampered, good.signature))[0] == 403
        # malformed, even when correctly signed
        for raw, words in [
            (b"{not json", "JSON"),
            (b"[1, 2]", "object"),
            (json.dumps({"swarm": SWARM}).encode(), "missing"),
            (good.body.replace(b'"have":0', b'"have":11'), "have"),
            (good.body.replace(b'"port":7001', b'"port":"7001"'), "port"),
            (good.body.replace(b'"event":"update"', b'"event":"paused"'), "event"),
        ]:
            status, answer = await post_raw(t, s, raw, sign(KEY, raw))
            assert status == 400, raw
            assert words in answer["error"]
        # oversized: with a length, and chunked without one
        huge = b'{"pad":"' + b"x" * 20_000 + b'"}'
        assert (await post_raw(t, s, huge, sign(KEY, huge)))[0] == 413

        async def chunks() -> Any:
            for _ in range(20):
                yield b"x" * 1000

        async with s.post(f"{t.url}/v1/announce", data=chunks()) as r:
            assert r.status == 413
        # the good one still works
        assert (await post_raw(t, s, good.body, good.signature))[0] == 200

    tracker_test(body, tmp_path / "t.db")


def test_replays_are_refused(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        old = sign_request(request(1, clock, have=1), KEY)
        assert (await post_raw(t, s, old.body, old.signature))[0] == 200
        # too far from the tracker's clock, either way
        for skew in (301, -301):
            status, answer = await announce(t, s, request(2, clock, time=clock() + skew))
            assert status == 403 and "clock" in answer["error"]
        assert (await announce(t, s, request(2, clock, time=clock() + 299)))[0] == 200
        # older than the peer's last message: cannot roll it back
        clock.advance(10)
        await ok(t, s, request(1, clock, have=5))
        status, answer = await post_raw(t, s, old.body, old.signature)
        assert status == 403 and "replayed" in answer["error"]
        # nor revive it after it stopped
        clock.advance(10)
        latest = sign_request(request(1, clock, have=6), KEY)
        assert (await post_raw(t, s, latest.body, latest.signature))[0] == 200
        await ok(t, s, request(1, clock, event="stopped"))
        assert (await post_raw(t, s, latest.body, latest.signature))[0] == 403
        # outside the window, the skew check alone refuses it
        clock.advance(400)
        assert (await post_raw(t, s, latest.body, latest.signature))[0] == 403

    tracker_test(body, tmp_path / "t.db")


def test_silent_peers_time_out(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        interval = (await ok(t, s, request(1, clock)))["interval"]
        assert pid(1) in ids(await ok(t, s, request(2, clock)))
        clock.advance(3 * interval - 0.5)
        assert pid(1) in ids(await ok(t, s, request(2, clock)))  # still within its timeout
        clock.advance(1)
        assert pid(1) not in ids(await ok(t, s, request(2, clock)))
        _, swarm = await status_of(t, s)
        assert [p["peer"] for p in swarm["peers"]] == [pid(2)]
        assert t.tracker.sweep() == 1
        assert pid(1) not in t.tracker.store.swarm(SWARM).peers  # type: ignore[union-attr]
        # it comes back by announcing again
        await ok(t, s, request(1, clock))
        assert pid(1) in ids(await ok(t, s, request(2, clock)))

    tracker_test(body, tmp_path / "t.db")


def test_a_peer_back_from_a_timeout_joins_anew(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        interval = (await ok(t, s, request(1, clock)))["interval"]
        clock.advance(3 * interval + 1)
        await ok(t, s, request(1, clock))  # before any sweep
        _, swarm = await status_of(t, s)
        assert swarm["peers"][0]["first_seen"] == clock()  # no old seniority (origin slots)

    tracker_test(body, tmp_path / "t.db")


def test_swarm_complete_waits_for_every_live_and_expected_peer(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=3)
        await ok(t, s, request(1, clock, have=10, seeder=True))
        await ok(t, s, request(2, clock, have=3))
        await ok(t, s, request(3, clock, have=0))
        answer = await ok(t, s, request(2, clock, have=10, event="completed"))
        assert not answer["swarm_complete"]  # 3 still downloading
        await ok(t, s, request(2, clock, have=10, event="stopped"))  # done and gone: counts
        answer = await ok(t, s, request(3, clock, have=10, event="completed"))
        assert not answer["swarm_complete"] and answer["stats"]["complete"] == 2
        incomplete_interval = answer["interval"]
        answer = await ok(t, s, request(4, clock, have=10, event="completed"))
        assert answer["swarm_complete"]
        assert answer["stats"] == {"peers": 3, "seeders": 1, "complete": 3, "expected": 3}
        assert answer["interval"] == DEFAULT_INTERVALS.max_interval > incomplete_interval
        # a newcomer that is not done makes the swarm incomplete again
        assert not (await ok(t, s, request(5, clock, have=1)))["swarm_complete"]

    tracker_test(body, tmp_path / "t.db", config=NO_HOLD)


def test_a_complete_peer_that_only_says_stopped_still_counts(tmp_path: Path) -> None:
    """A peer that completed while the tracker was down and left before reaching it."""

    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=2)
        await ok(t, s, request(1, clock, have=10, seeder=True))
        await ok(t, s, request(2, clock, have=2))
        await ok(t, s, request(2, clock, have=10, event="stopped"))
        await ok(t, s, request(3, clock, have=4, event="stopped"))  # incomplete: no count
        answer = await ok(t, s, request(4, clock, have=10, event="completed"))
        assert answer["stats"]["complete"] == 2
        assert answer["swarm_complete"]

    tracker_test(body, tmp_path / "t.db", config=NO_HOLD)


def test_swarm_with_only_its_origin_is_not_complete(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        assert not (await ok(t, s, request(1, clock, have=10, seeder=True)))["swarm_complete"]
        assert (await ok(t, s, request(2, clock, have=10)))["swarm_complete"]

    tracker_test(body, tmp_path / "t.db")


def test_status_shows_swarms_and_peers_but_never_keys(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        other_key = tracker_key(SECRET, OTHER_SWARM)
        await register(t, s)
        await register(t, s, swarm=OTHER_SWARM, key=other_key)
        await ok(t, s, request(1, clock, have=4, rack="r7", uploaded=5, downloaded=9))
        clock.advance(2)
        await ok(t, s, request(2, clock, have=10, event="completed", downloaded_from_origin=3))
        async with s.get(f"{t.url}/v1/status") as r:
            assert r.status == 200
            text = await r.text()
        assert KEY.hex() not in text and other_key.hex() not in text
        everything = json.loads(text)
        assert [sw["swarm"] for sw in everything["swarms"]] == [SWARM, OTHER_SWARM]
        status, swarm = await status_of(t, s)
        assert status == 200 and swarm == everything["swarms"][0]
        first, second = swarm["peers"]
        assert first["peer"] == pid(1) and first["rack"] == "r7" and first["addr"] == "10.0.0.1"
        assert (first["have"], first["pieces"], first["progress"]) == (4, 10, 0.4)
        assert (first["uploaded"], first["downloaded"], first["seeder"]) == (5, 9, False)
        assert first["last_seen"] == clock() - 2 and first["completed_at"] is None
        assert second["completed_at"] == clock() and second["downloaded_from_origin"] == 3
        assert swarm["completed"] == {pid(2): clock()}
        assert "key" not in swarm
        assert (await status_of(t, s, "ef" * 32))[0] == 404
        assert (await status_of(t, s, "not-an-id"))[0] == 400

    tracker_test(body, tmp_path / "t.db")


def test_forgetting_a_swarm_needs_the_admin_token(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s)
        async with s.delete(f"{t.url}/v1/swarms/{SWARM}") as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with s.delete(f"{t.url}/v1/swarms/{SWARM}", headers=auth) as r:
            assert r.status == 200
        assert (await announce(t, s, request(1, clock)))[0] == 404
        assert (await register(t, s, key=b"\x02" * 32))[0] == 201  # a fresh start

    tracker_test(body, tmp_path / "t.db")


# -- persistence --------------------------------------------------------------------------


def test_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    clock = FakeClock()
    interval: list[int] = []

    async def before(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=5)
        await ok(t, s, request(1, clock, have=10, seeder=True, rack="r1"))
        interval.append((await ok(t, s, request(2, clock, have=10, event="completed")))["interval"])

    async def after(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        assert (await register(t, s, expected=5))[0] == 200  # swarm and key were kept
        assert (await register(t, s, key=b"\x03" * 32))[0] == 409
        clock.advance(1)
        answer = await ok(t, s, request(3, clock))
        assert pid(2) in ids(answer)  # old peers are still known...
        assert answer["stats"] == {"peers": 3, "seeders": 1, "complete": 1, "expected": 5}
        _, swarm = await status_of(t, s)
        assert [p["peer"] for p in swarm["peers"]] == [pid(1), pid(2), pid(3)]
        assert swarm["peers"][0]["rack"] == "r1" and swarm["peers"][0]["seeder"] is True
        # ...replays of their old messages are still refused...
        assert (await announce(t, s, request(2, clock, time=clock() - 5)))[0] == 403
        # ...and they are dropped once their timeout passes without a new announce
        clock.advance(3 * interval[0])
        answer = await ok(t, s, request(3, clock))
        assert ids(answer) == set() and answer["stats"]["peers"] == 1
        assert answer["stats"]["complete"] == 1  # the completion itself is remembered

    # Hand-outs start at once (no waiting for the 5 expected peers): this is about state.
    config = TrackerConfig(intervals=IntervalConfig(gather_timeout=0))
    tracker_test(before, db, clock, config=config)
    tracker_test(after, db, clock, config=config)


def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    from roost.tracker.db import StateError, TrackerStore

    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable tracker database"):
        TrackerStore.open(bad)


# -- admin token file ---------------------------------------------------------------------


def test_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "tracker.token"
    token, created = load_or_create_token(path)
    assert created and len(token) == 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_token(path) == (token, False)
    os.chmod(path, 0o644)
    with pytest.raises(RoostError, match="readable by others"):
        load_or_create_token(path)


# -- the command ---------------------------------------------------------------------------

RUN_COMMAND = """
import argparse, sys
from roost.tracker.command import add_tracker_command
parser = argparse.ArgumentParser(prog="roost")
add_tracker_command(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_tracker_command_serves_until_terminated(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = tmp_path / "state.db"
    child = subprocess.Popen(
        [sys.executable, "-u", "-c", RUN_COMMAND, "tracker", "--port", str(port), "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    try:
        assert child.stdout is not None
        assert "admin token" in child.stdout.readline()
        assert f"tracker at http://127.0.0.1:{port}" in child.stdout.readline()
        token = (tmp_path / "state.db.token").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        assert register_swarm(url, token, SWARM, KEY)["created"] is True
        assert fetch_status(url)["swarms"][0]["swarm"] == SWARM
    finally:
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=60)
    assert child.returncode == 0


@pytest.mark.parametrize("stripes", ["0", "17", "many", "-1"])
def test_tracker_command_refuses_a_bad_stripe_count_before_writing_anything(
    tmp_path: Path, stripes: str
) -> None:
    db = tmp_path / "state.db"
    done = subprocess.run(
        [sys.executable, "-m", "roost", "tracker", "--db", str(db), "--stripes", stripes],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    assert done.returncode != 0
    assert "--stripes" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no token, no database


def test_stripes_option_maps_to_relay_configs() -> None:
    assert relay_config("off") is None
    assert relay_config("auto") == RelayConfig()
    assert relay_config("1") == RelayConfig(stripes=1)


# -- relay plans ------------------------------------------------------------------------------


def test_the_tracker_gathers_the_expected_fleet_then_hands_out_a_relay_plan(
    tmp_path: Path,
) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=3)
        await ok(t, s, request(1, clock, have=10, seeder=True))
        first = await ok(t, s, request(2, clock, event="started"))
        # Waiting for the others: nothing to talk to yet, and come back soon.
        assert first["peers"] == [] and "sources" not in first
        assert 0 < first["retry_after"] < 1
        await ok(t, s, request(3, clock, event="started"))
        last = await ok(t, s, request(4, clock, event="started"))
        assert "retry_after" not in last
        # Three receivers: a pipelined chain origin -> 2 -> 3 -> 4 (join order).
        answers = {n: await ok(t, s, request(n, clock)) for n in (2, 3, 4)}
        plans = {n: answer["sources"] for n, answer in answers.items()}
        assert plans == {2: [pid(1)], 3: [pid(2)], 4: [pid(3)]}
        assert all(answer["stripes"] == 1 for answer in answers.values())
        for n, sources in plans.items():  # a peer's sources are among its neighbours
            assert set(sources) <= ids(await ok(t, s, request(n, clock)))
        origin = await ok(t, s, request(1, clock, have=10, seeder=True))
        assert pid(2) in ids(origin)  # the origin is told about its relay child
        assert origin["stripes"] == 1 and "sources" not in origin  # and that there is a plan

    tracker_test(body, tmp_path / "t.db", config=NO_HOLD)


def test_gathering_gives_up_on_peers_that_never_come(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=10)
        await ok(t, s, request(1, clock, have=10, seeder=True))
        answer = await ok(t, s, request(2, clock))
        waited = 0.0
        while "sources" not in answer:  # both keep announcing while the tracker waits
            assert answer["peers"] == [] and waited <= DEFAULT_INTERVALS.gather_timeout
            clock.advance(answer["retry_after"])
            waited += answer["retry_after"]
            await ok(t, s, request(1, clock, have=10, seeder=True))
            answer = await ok(t, s, request(2, clock))
        assert waited >= DEFAULT_INTERVALS.gather_timeout
        assert set(answer["sources"]) == {pid(1)} and pid(1) in ids(answer)  # every stripe

    # Answers are not held here: the fake clock, not real time, ends the gathering.
    tracker_test(body, tmp_path / "t.db", config=NO_HOLD)


def test_announces_held_while_gathering_are_answered_when_the_last_peer_joins(
    tmp_path: Path,
) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=2)
        seeder = asyncio.create_task(ok(t, s, request(1, clock, have=10, seeder=True)))
        first = asyncio.create_task(ok(t, s, request(2, clock, event="started")))
        await asyncio.sleep(0.3)
        assert not first.done() and not seeder.done()  # held: the fleet is not in yet
        last = await ok(t, s, request(3, clock, event="started"))
        # Released by that arrival, not by the 30 s hold running out:
        held = await asyncio.wait_for(asyncio.gather(seeder, first), 5)
        answers = {1: held[0], 2: held[1], 3: last}
        assert all("retry_after" not in a for a in answers.values())
        assert answers[2]["sources"] == [pid(1)] and answers[3]["sources"] == [pid(2)]
        assert answers[1]["stripes"] == 1 and pid(2) in ids(answers[1])

    # A long hold, so that only the last peer's arrival can have released the others.
    hold = TrackerConfig(intervals=IntervalConfig(gather_hold=30))
    tracker_test(body, tmp_path / "t.db", config=hold)


def test_a_held_peer_counts_as_alive_from_its_answer_not_its_request(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=2)
        first = asyncio.create_task(ok(t, s, request(2, clock, event="started")))
        await asyncio.sleep(0.2)
        clock.advance(2.5)  # a long hold: longer than the 1 s interval at its request
        await ok(t, s, request(3, clock, event="started"))
        answer = await asyncio.wait_for(first, 5)
        # Its next announce is due an interval after the answer; until then it is alive.
        clock.advance(3 * answer["interval"] - 0.5)
        later = await ok(t, s, request(3, clock))
        assert later["stats"]["peers"] == 2 and pid(2) in ids(later)

    tracker_test(
        body, tmp_path / "t.db", config=TrackerConfig(intervals=IntervalConfig(gather_hold=30))
    )


def test_a_held_announce_is_answered_after_the_hold_if_the_fleet_is_still_missing(
    tmp_path: Path,
) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=5)
        answer = await ok(t, s, request(2, clock, event="started"))
        assert answer["peers"] == [] and 0 < answer["retry_after"] < 1

    hold = TrackerConfig(intervals=IntervalConfig(gather_hold=0.2))
    tracker_test(body, tmp_path / "t.db", config=hold)


def test_a_tracker_without_relay_plans_hands_out_no_sources(tmp_path: Path) -> None:
    async def body(t: RunningTracker, s: Session, clock: FakeClock) -> None:
        await register(t, s, expected=2)
        await ok(t, s, request(1, clock, have=10, seeder=True))
        answer = await ok(t, s, request(2, clock))
        assert "sources" not in answer and "retry_after" not in answer
        assert "stripes" not in answer
        assert pid(1) in ids(answer)

    tracker_test(body, tmp_path / "t.db", config=TrackerConfig(relay=None))
