"""The tracker as a service: the decisions (``Tracker``), the HTTP API, and ways to run it.

``Tracker`` holds the logic of each endpoint as plain methods over bytes and
records (no HTTP inside), raising ``Refused(status, message)``; the aiohttp
handlers only move bytes and turn ``Refused`` into JSON errors. Time comes from
an injected clock and randomness from an injected ``random.Random``, so tests
reach timeouts and replay windows exactly, without sleeping.

Run it with ``roost tracker`` (``run_tracker``), or in-process with
``async with running_tracker(db_path) as t: ... t.url ...``. See ``docs/tracker.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import random
import secrets
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from roost.runtime.announce import (
    AUTH_HEADER,
    MAX_CLOCK_SKEW,
    MAX_REQUEST_BYTES,
    AnnounceRequest,
    AnnounceResponse,
    MalformedMessage,
    Neighbour,
    check_int,
    check_key_hex,
    check_swarm_id,
    parse_request,
    verify,
)
from roost.runtime.errors import RoostError
from roost.tracker import DEFAULT_HOST
from roost.tracker.db import KeyConflict, PeerRecord, SwarmRecord, TrackerStore
from roost.tracker.policy import (
    DEFAULT_HANDOUT,
    DEFAULT_INTERVALS,
    HandoutConfig,
    IntervalConfig,
    announce_interval,
    gathering,
    is_complete,
    select_neighbours,
    swarm_age,
    swarm_complete,
)
from roost.tracker.relay import DEFAULT_RELAY, RelayConfig, RelayPlan, build_plan

log = logging.getLogger("roost.tracker")

Clock = Callable[[], float]


@dataclass(frozen=True)
class TrackerConfig:
    """Tunables of one tracker; the defaults suit a datacenter fleet."""

    handout: HandoutConfig = DEFAULT_HANDOUT
    intervals: IntervalConfig = DEFAULT_INTERVALS
    relay: RelayConfig | None = DEFAULT_RELAY  # None: no relay plan, a plain swarm
    timeout_factor: float = 3.0  # a peer silent for this many of its intervals is dropped
    max_clock_skew: float = MAX_CLOCK_SKEW
    sweep_every: float = 30.0  # seconds between background sweeps of dead peers


class Refused(Exception):
    """A request the tracker turns down, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Tracker:
    """The tracker's decisions, independent of HTTP. One owner: the event loop's thread."""

    def __init__(
        self,
        store: TrackerStore,
        admin_token: str,
        *,
        config: TrackerConfig | None = None,
        clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not admin_token:
            raise ValueError("the tracker needs an admin token")
        self.store = store
        self.config = config or TrackerConfig()
        self.clock = clock
        self.rng = rng or random.Random()
        self._admin_token = admin_token.encode()
        self._plans: dict[str, tuple[int, RelayPlan]] = {}  # swarm -> (membership key, plan)
        self._fleet_in: dict[str, asyncio.Event] = {}  # swarm -> set when gathering ends

    # -- admin --

    def check_admin(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        supplied = token.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied, self._admin_token):
            raise Refused(401, "this needs 'Authorization: Bearer <admin token>'")

    def register(self, body: bytes) -> tuple[bool, dict[str, Any]]:
        """Register a swarm's tracker key; (created, answer). Same key again is a no-op."""
        try:
            obj = json.loads(body.decode("utf-8"))
            if not isinstance(obj, dict):
                raise MalformedMessage("registration must be a JSON object")
            swarm = check_swarm_id(obj.get("swarm"))
            key = check_key_hex(obj.get("key"))
            expected = obj.get("expected_peers")
            if expected is not None:
                check_int(expected, "expected_peers", 0, 10_000_000)
        except (UnicodeDecodeError, ValueError, MalformedMessage) as exc:
            raise Refused(400, f"bad registration: {exc}") from None
        try:
            created = self.store.register(swarm, key, expected, self.clock())
        except KeyConflict:
            raise Refused(409, f"swarm {swarm} is registered with a different key") from None
        log.info("swarm %s %s", swarm[:12], "registered" if created else "re-registered")
        return created, {"swarm": swarm, "created": created, "expected_peers": expected}

    def forget(self, swarm: str) -> None:
        if not self.store.forget(_swarm_id_or_400(swarm)):
            raise Refused(404, f"unknown swarm {swarm}")
        self._plans.pop(swarm, None)
        self._fleet_in.pop(swarm, None)

    # -- announce --

    def announce(self, body: bytes, signature: str | None) -> AnnounceResponse:
        """Validate, authenticate and apply one announce; answer with neighbours."""
        try:
            req = parse_request(body)
        except MalformedMessage as exc:
            raise Refused(400, str(exc)) from None
        swarm = self.store.swarm(req.swarm)
        if swarm is None:
            raise Refused(404, f"unknown swarm {req.swarm}: register it first")
        if not signature or not verify(swarm.key, body, signature):
            raise Refused(403, f"missing or wrong {AUTH_HEADER} signature")
        now = self.clock()
        self._check_fresh(swarm, req, now)
        if req.event == "stopped":
            if not req.seeder and req.pieces and req.have == req.pieces:
                # It may have completed while we were down and never told us before leaving.
                self.store.record_completion(swarm, req.peer, now)
            self.store.remove_peer(swarm, req.peer, req.time)
            live = swarm.live_peers(now)
            return _response(swarm, live, [], *self._pace(swarm, live, now))
        return self._update(swarm, req, now)

    def _check_fresh(self, swarm: SwarmRecord, req: AnnounceRequest, now: float) -> None:
        """Replay protection: near our clock, and never older than the peer's last message."""
        skew = req.time - now
        if abs(skew) > self.config.max_clock_skew:
            raise Refused(
                403,
                f"announce time is {skew:+.0f} s from the tracker's clock"
                f" (limit ±{self.config.max_clock_skew:.0f} s): check the clocks (NTP)",
            )
        known = swarm.peers.get(req.peer)
        if known is not None and req.time < known.announced_at:
            raise Refused(403, "announce older than this peer's previous one (replayed?)")
        stopped = swarm.tombstones.get(req.peer)
        if stopped is not None and req.time <= stopped:
            raise Refused(403, "announce older than this peer's 'stopped' (replayed?)")

    async def announce_held(self, body: bytes, signature: str | None) -> AnnounceResponse:
        """``announce``, but while the fleet gathers the answer waits for it to be in.

        Held at most ``gather_hold`` seconds (real time), and answered the moment
        the last expected peer joins: every peer learns the plan together instead
        of up to ``gather_poll`` later at its next announce, which a peer never
        makes up (its sources serve their other children at the same pace).
        """
        response = self.announce(body, signature)
        hold = self.config.intervals.gather_hold
        if response.retry_after is None or hold <= 0:
            return response
        req = parse_request(body)  # valid: ``announce`` accepted it
        fleet_in = self._fleet_in.setdefault(req.swarm, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(fleet_in.wait(), hold)
        swarm = self.store.swarm(req.swarm)
        now = self.clock()
        record = swarm.peers.get(req.peer) if swarm is not None else None
        if swarm is None or record is None or now >= record.expires_at:
            return response  # forgotten or gone meanwhile: the first answer stands
        # The peer's next announce is due ``interval`` after this answer, not after its
        # request: count its liveness from now, or a long hold makes it expire early.
        others = [p for p in swarm.live_peers(now) if p.peer != record.peer]
        return self._renew(swarm, record, others, now)

    def _update(self, swarm: SwarmRecord, req: AnnounceRequest, now: float) -> AnnounceResponse:
        old = swarm.peers.get(req.peer)
        returning = old is not None and now < old.expires_at  # a timed-out peer joins anew
        record = _record(req, now, first_seen=old.first_seen if returning else now)
        if not record.seeder and is_complete(record):
            self.store.record_completion(swarm, record.peer, now)
        others = [p for p in swarm.live_peers(now) if p.peer != req.peer]
        return self._renew(swarm, record, others, now)

    def _renew(
        self, swarm: SwarmRecord, record: PeerRecord, others: list[PeerRecord], now: float
    ) -> AnnounceResponse:
        """Pace the swarm, keep ``record``'s peer alive until its next announce is overdue,
        store it, and answer it; ``others`` are the other live peers."""
        live = [*others, record]
        complete, interval = self._pace(swarm, live, now)
        live[-1] = record = record.replace(expires_at=now + self.config.timeout_factor * interval)
        self.store.put_peer(swarm, record)
        return self._answer(swarm, record, live, complete, interval, now)

    def _answer(
        self,
        swarm: SwarmRecord,
        record: PeerRecord,
        live: list[PeerRecord],
        complete: bool,
        interval: int,
        now: float,
    ) -> AnnounceResponse:
        """What ``record``'s peer is told: wait for the fleet, or its neighbours and plan."""
        if self._gathering(swarm, live, now):
            return _response(
                swarm, live, [], complete, interval, retry_after=self.config.intervals.gather_poll
            )
        fleet_in = self._fleet_in.pop(swarm.swarm, None)
        if fleet_in is not None:
            fleet_in.set()  # release the announces held while gathering
        plan = self._plan(swarm, live)
        chosen = select_neighbours(
            record, live, self.rng, now=now, config=self.config.handout, plan=plan
        )
        if plan is None:
            return _response(swarm, live, chosen, complete, interval)
        sources = plan.sources.get(record.peer, ())
        return _response(swarm, live, chosen, complete, interval, sources, plan.stripes)

    def _gathering(self, swarm: SwarmRecord, live: list[PeerRecord], now: float) -> bool:
        if self.config.relay is None:
            return False
        receivers = [p.first_seen for p in live if not p.seeder]
        return gathering(
            len(receivers),
            swarm.expected_peers,
            swarm_age(receivers, now),
            self.config.intervals,
        )

    def _plan(self, swarm: SwarmRecord, live: list[PeerRecord]) -> RelayPlan | None:
        """The swarm's relay plan, rebuilt only when its membership changed."""
        if self.config.relay is None:
            return None
        key = hash(tuple(sorted((p.peer, p.rack, p.first_seen, p.seeder) for p in live)))
        cached = self._plans.get(swarm.swarm)
        if cached is None or cached[0] != key:
            plan = build_plan(live, self.config.relay, expected=swarm.expected_peers)
            cached = self._plans[swarm.swarm] = (key, plan)
        return cached[1]

    def _pace(self, swarm: SwarmRecord, live: list[PeerRecord], now: float) -> tuple[bool, int]:
        """(swarm complete?, announce interval) for the swarm as it stands."""
        complete = self._complete(swarm, live)
        expected = swarm.expected_peers
        interval = announce_interval(
            age=swarm_age((p.first_seen for p in live), now),
            live_peers=len(live),
            complete=complete,
            filling=bool(expected) and sum(not p.seeder for p in live) < expected,
            config=self.config.intervals,
        )
        return complete, interval

    def _complete(self, swarm: SwarmRecord, live: list[PeerRecord]) -> bool:
        return swarm_complete(live, len(swarm.completions), swarm.expected_peers)

    # -- status and housekeeping --

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {"time": now, "swarms": [self._swarm_status(s, now) for s in self.store.swarms()]}

    def swarm_status(self, swarm_id: str) -> dict[str, Any]:
        swarm = self.store.swarm(_swarm_id_or_400(swarm_id))
        if swarm is None:
            raise Refused(404, f"unknown swarm {swarm_id}")
        return self._swarm_status(swarm, self.clock())

    def _swarm_status(self, swarm: SwarmRecord, now: float) -> dict[str, Any]:
        live = sorted(swarm.live_peers(now), key=lambda p: p.peer)
        return {
            "swarm": swarm.swarm,
            "registered_at": swarm.created_at,
            "expected_peers": swarm.expected_peers,
            "swarm_complete": self._complete(swarm, live),
            "stats": _stats(swarm, live),
            "peers": [_peer_status(p, swarm.completions.get(p.peer)) for p in live],
            "completed": dict(sorted(swarm.completions.items())),
        }

    def sweep(self) -> int:
        """Forget peers past their timeout (hand-outs already ignore them); returns how many."""
        now = self.clock()
        return self.store.sweep(now, tombstone_before=now - self.config.max_clock_skew)


def _swarm_id_or_400(swarm: str) -> str:
    try:
        return check_swarm_id(swarm)
    except MalformedMessage as exc:
        raise Refused(400, str(exc)) from None


def _record(req: AnnounceRequest, now: float, *, first_seen: float) -> PeerRecord:
    return PeerRecord(
        peer=req.peer,
        addr=req.addr,
        port=req.port,
        rack=req.rack,
        seeder=req.seeder,
        have=req.have,
        pieces=req.pieces,
        uploaded=req.uploaded,
        downloaded=req.downloaded,
        downloaded_from_origin=req.downloaded_from_origin,
        first_seen=first_seen,
        last_seen=now,
        expires_at=math.inf,
        announced_at=req.time,
    )


def _response(
    swarm: SwarmRecord,
    live: list[PeerRecord],
    chosen: list[PeerRecord],
    complete: bool,
    interval: int,
    sources: tuple[str, ...] = (),
    stripes: int = 0,
    retry_after: float | None = None,
) -> AnnounceResponse:
    return AnnounceResponse(
        peers=tuple(_neighbour(p) for p in chosen),
        interval=interval,
        swarm_complete=complete,
        stats=_stats(swarm, live),
        sources=sources,
        stripes=stripes,
        retry_after=retry_after,
    )


def _neighbour(p: PeerRecord) -> Neighbour:
    return Neighbour(
        peer=p.peer, addr=p.addr, port=p.port, seeder=p.seeder, have=p.have, rack=p.rack
    )


def _stats(swarm: SwarmRecord, live: list[PeerRecord]) -> dict[str, int]:
    stats = {
        "peers": len(live),
        "seeders": sum(p.seeder for p in live),
        "complete": len(swarm.completions),
    }
    if swarm.expected_peers is not None:
        stats["expected"] = swarm.expected_peers
    return stats


def _peer_status(p: PeerRecord, completed_at: float | None) -> dict[str, Any]:
    return {
        "peer": p.peer,
        "addr": p.addr,
        "port": p.port,
        "rack": p.rack,
        "seeder": p.seeder,
        "have": p.have,
        "pieces": p.pieces,
        "progress": p.have / p.pieces if p.pieces else 1.0,
        "uploaded": p.uploaded,
        "downloaded": p.downloaded,
        "downloaded_from_origin": p.downloaded_from_origin,
        "first_seen": p.first_seen,
        "last_seen": p.last_seen,
        "completed_at": completed_at,
    }


# -- HTTP ---------------------------------------------------------------------------------

TRACKER = web.AppKey("tracker", Tracker)


def make_app(tracker: Tracker) -> web.Application:
    """The aiohttp application for a tracker (the caller owns the tracker's store)."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_json_errors])
    app[TRACKER] = tracker
    app.router.add_post("/v1/swarms", _register)
    app.router.add_post("/v1/announce", _announce)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/v1/swarms/{swarm}", _swarm)
    app.router.add_delete("/v1/swarms/{swarm}", _forget)
    app.cleanup_ctx.append(_sweeper)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Every error leaves as ``{"error": message}`` with its status."""
    try:
        return await handler(request)
    except Refused as exc:
        return _error(exc.status, exc.message)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body larger than {MAX_REQUEST_BYTES} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise Refused(413, f"request body larger than {MAX_REQUEST_BYTES} bytes")
    return await request.read()


async def _register(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    tracker.check_admin(request.headers.get("Authorization"))
    created, answer = tracker.register(await _body(request))
    return web.json_response(answer, status=201 if created else 200)


async def _announce(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    response = await tracker.announce_held(await _body(request), request.headers.get(AUTH_HEADER))
    return web.Response(body=response.to_bytes(), content_type="application/json")


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRACKER].status())


async def _swarm(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRACKER].swarm_status(request.match_info["swarm"]))


async def _forget(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    tracker.check_admin(request.headers.get("Authorization"))
    tracker.forget(request.match_info["swarm"])
    return web.json_response({"forgotten": request.match_info["swarm"]})


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Background sweep of dead peers; lazy filtering already hides them in between."""
    tracker = app[TRACKER]

    async def loop() -> None:
        while True:
            await asyncio.sleep(tracker.config.sweep_every)
            removed = tracker.sweep()
            if removed:
                log.info("dropped %d silent peers", removed)

    task = asyncio.ensure_future(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- running it ---------------------------------------------------------------------------


@dataclass
class RunningTracker:
    """A tracker serving in this process: where it listens and how to administer it."""

    url: str
    admin_token: str
    tracker: Tracker = field(repr=False)


@contextlib.asynccontextmanager
async def running_tracker(
    db_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    admin_token: str | None = None,
    config: TrackerConfig | None = None,
    clock: Clock = time.time,
    rng: random.Random | None = None,
) -> AsyncIterator[RunningTracker]:
    """Serve a tracker on this event loop until the block exits; port 0 picks a free port."""
    token = admin_token or secrets.token_hex(32)
    store = TrackerStore.open(db_path)
    try:
        tracker = Tracker(store, token, config=config, clock=clock, rng=rng)
        runner = web.AppRunner(make_app(tracker), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_port = runner.addresses[0][1]
            yield RunningTracker(f"http://{_url_host(host)}:{bound_port}", token, tracker)
        finally:
            await runner.cleanup()
    finally:
        store.close()


def run_tracker(
    host: str,
    port: int,
    db_path: str | os.PathLike[str],
    *,
    admin_token: str,
    config: TrackerConfig | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve a tracker until interrupted (SIGINT/SIGTERM): the body of ``roost tracker``."""
    store = TrackerStore.open(db_path)
    try:
        app = make_app(Tracker(store, admin_token, config=config))
        url = f"http://{_url_host(host)}:{port}"
        web.run_app(app, host=host, port=port, print=lambda *_: say(f"tracker at {url}"))
    finally:
        store.close()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def load_or_create_token(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The admin token in ``path``, created (mode 0600) if missing; (token, created)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path), False
    token = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def _read_token(path: str | os.PathLike[str]) -> str:
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RoostError(f"{os.fspath(path)} is readable by others: chmod 600 it")
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise RoostError(f"{os.fspath(path)} is empty: delete it to generate a new token")
    return token
