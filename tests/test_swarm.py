"""End to end: a tracker, a seeder and peers as separate processes over loopback.

Each test builds a random release, runs a swarm (``python -m roost.runtime
seed`` / ``fetch --events``) and checks what matters to an operator: every host
that reports success holds the release byte for byte under ``current``, a host
that fails holds no partial release, and the swarm survives dead peers, a dead
origin, a restarted tracker, intruders and liars. Assertions are about outcomes,
never about how fast they came; the timeouts only stop a broken swarm from
hanging the suite.
"""

from __future__ import annotations

import asyncio
import filecmp
import functools
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from roost.runtime import peer as peer_module
from roost.runtime import picker
from roost.runtime import protocol as wire
from roost.runtime.announce import AnnounceResponse, fetch_status
from roost.runtime.manifest import Manifest
from roost.runtime.pack import pack
from roost.runtime.peer import Engine, EngineConfig, Pieces, Stats, keep_new_connection
from roost.runtime.store import Store
from roost.runtime.swarm import write_secret
from roost.runtime.tree import verify_tree
from swarm_helpers import (
    CountingProxy,
    MiB,
    Peer,
    Swarm,
    WireClient,
    cancel_all,
    child_env,
    complete_engine,
    free_port,
    lying_pieces,
    make_release,
    one_stripe_tracker,
    staged_pieces,
    wait_until,
)

# Leaves of the trees make_release builds, compared directly (not only through the manifest).
SAMPLES = ("blobs/blob-0.bin", "blobs/blob-1.bin", "lib/pkg3/mod1/f10.py", "bin/tool")


@pytest.fixture
def swarm(tmp_path: Path):
    s = Swarm(tmp_path)
    yield s
    s.close()  # SIGKILLs every child still running, even when the test failed


@pytest.fixture(scope="module")
def release_16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 16 MiB: a few MiB-sized files and a hundred small ones (shared, never written)."""
    root = tmp_path_factory.mktemp("release16") / "src"
    return make_release(root, big=[5 * MiB + 17, 4 * MiB - 3, 3 * MiB + 4099], small=120, seed=16)


def assert_installed(peer: Peer, manifest: Manifest, src: Path) -> None:
    """``peer``'s DEST/current is the release: by the manifest, and file by file vs the source."""
    current = peer.dest / "current"
    assert current.is_symlink(), f"{peer.name} has no current link"
    assert verify_tree(str(current), manifest, content=True) == []
    for rel in SAMPLES:
        assert filecmp.cmp(src / rel, current / rel, shallow=False), f"{peer.name}: {rel}"
    assert os.readlink(current / "bin" / "tool-link") == "tool"
    assert os.readlink(current / "libdir") == "lib/pkg0"
    assert (current / "var" / "empty").is_dir() and not os.listdir(current / "var" / "empty")
    assert stat.S_IMODE(os.stat(current / "bin" / "tool").st_mode) & 0o111 == 0o111
    assert (current / "zero-length").stat().st_size == 0


def assert_nothing_installed(peer: Peer) -> None:
    """No activated release and no release in the store: only staging leftovers, if anything."""
    assert not os.path.lexists(peer.dest / "current"), f"{peer.name} activated something"
    if peer.dest.exists():
        assert Store.open(str(peer.dest)).releases() == []


def test_eight_peers_fetch_a_64_mib_release_byte_for_byte(swarm: Swarm, tmp_path: Path) -> None:
    src = make_release(
        tmp_path / "src",
        big=[12 * MiB + 1, 17 * MiB - 7, 9 * MiB + 513, 14 * MiB, 6 * MiB + 3],
        small=300,
        seed=64,
    )
    manifest = swarm.release(src)
    assert manifest.total_size >= 64 * MiB
    assert len(manifest.files) > 300

    done = _eight_peers_install(swarm, manifest, src)

    assert all(stats["bad_pieces"] == 0 for stats in done)
    assert sum(stats["from_peers"] for stats in done) > 0, "nothing travelled peer to peer"
    assert sum(stats["uploaded"] for stats in done) > 0
    assert swarm.seeder is not None and swarm.seeder.running()


def test_pieces_over_the_inline_limit_are_stored_by_workers_byte_for_byte(
    swarm: Swarm, tmp_path: Path
) -> None:
    """Pieces larger than INLINE_WORK_LIMIT are verified and written on two worker
    threads, so two pieces of one new file can be stored at the same moment (each peer
    gets four stripes from four sources). Every peer still completes, byte for byte."""
    src = make_release(tmp_path / "src", big=[5 * MiB + 3, 7 * MiB], small=200, seed=15)
    manifest = swarm.release(src, piece_size=MiB)
    assert manifest.piece_size > peer_module.INLINE_WORK_LIMIT

    _eight_peers_install(swarm, manifest, src)


def _eight_peers_install(swarm: Swarm, manifest: Manifest, src: Path) -> list[dict]:
    """A tracker expecting 8 peers, the seeder, 8 peers: each installs ``src`` byte for
    byte, having downloaded exactly the release. Returns their final stats."""
    swarm.start_tracker(expected_peers=8)
    swarm.start_seeder()
    peers = [swarm.fetch(linger=2.0) for _ in range(8)]

    done = [swarm.finish(peer) for peer in peers]

    for peer, stats in zip(peers, done):
        assert_installed(peer, manifest, src)
        assert stats["downloaded"] == manifest.total_size
    return done


def test_peers_that_join_after_others_completed_still_complete(
    swarm: Swarm, release_16: Path
) -> None:
    manifest = swarm.release(release_16)
    swarm.start_tracker(expected_peers=6)
    swarm.start_seeder()
    early = [swarm.fetch(linger=60.0) for _ in range(3)]
    wait_until(lambda: all(p.completed for p in early), "the first peers to complete")
    assert all(p.running() for p in early), "early peers should still be lingering"

    late = [swarm.fetch(linger=1.0) for _ in range(3)]

    late_done = [swarm.finish(peer) for peer in late]
    for peer in early:  # they leave once the tracker says every expected host is done
        swarm.finish(peer)
    for peer in early + late:
        assert_installed(peer, manifest, release_16)
    for stats in late_done:
        # A full copy already existed outside the origin, so the tracker never handed
        # the origin to the late joiners: every byte came from the early peers.
        assert stats["from_origin"] == 0
        assert stats["from_peers"] == manifest.total_size


def test_a_peer_killed_mid_transfer_leaves_no_partial_release(
    swarm: Swarm, release_16: Path
) -> None:
    manifest = swarm.release(release_16)
    swarm.start_tracker(expected_peers=3)
    swarm.start_seeder()
    # Rate limits keep everyone mid-transfer when the victim dies.
    others = [swarm.fetch("--download-rate", "4M") for _ in range(3)]
    victim = swarm.fetch("--download-rate", "2M", name="victim")
    quarter = manifest.piece_count // 4
    wait_until(lambda: victim.have >= quarter, "the victim to hold a quarter of the pieces")

    victim.kill(signal.SIGKILL)

    assert victim.wait() == -signal.SIGKILL
    assert not victim.completed
    assert_nothing_installed(victim)
    for peer in others:
        swarm.finish(peer)
        assert_installed(peer, manifest, release_16)

    # The store recovers from the kill: the same DEST fetches cleanly afterwards.
    again = swarm.fetch(name="victim")
    assert again.dest == victim.dest
    swarm.finish(again)
    assert_installed(again, manifest, release_16)


def test_sigterm_stops_a_fetch_cleanly_and_tells_the_tracker(
    swarm: Swarm, release_16: Path
) -> None:
    """SIGTERM (or Ctrl-C) stops the engine instead of raising at an arbitrary point, which
    left coroutines half-run for asyncio to print tracebacks about."""
    manifest = swarm.release(release_16)
    tracker = swarm.start_tracker(expected_peers=1)
    swarm.start_seeder()
    victim = swarm.fetch("--download-rate", "2M", name="victim")
    wait_until(lambda: victim.have > 0, "the victim to start receiving")
    assert len(tracker.status(manifest.id)["peers"]) == 2

    victim.kill(signal.SIGTERM)

    assert victim.wait() == 130
    stderr = victim.stderr()
    assert "interrupted" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert victim.named("error")[-1]["message"] == "interrupted"
    assert not victim.completed
    assert_nothing_installed(victim)
    assert len(tracker.status(manifest.id)["peers"]) == 1  # it told the tracker it stopped


def test_a_frozen_relay_peer_does_not_hold_back_the_others(swarm: Swarm, release_16: Path) -> None:
    """The first peer to join heads the relay chain. Frozen (SIGSTOP) mid-transfer, it
    neither answers nor closes: its child gives it up as a source after a few seconds
    without data and fetches that stripe from the swarm, and the others complete
    without it. (Here the socket buffers swallow what the origin still owed the
    frozen peer; the origin's rule for an upload stuck in a full connection is
    tested in test_picker.)"""
    manifest = swarm.release(release_16)
    tracker = swarm.start_tracker(expected_peers=4)
    swarm.start_seeder("--upload-rate", "4M")  # everyone is mid-transfer at the freeze
    head = swarm.fetch(name="head")
    wait_until(
        lambda: len(fetch_status(tracker.url)["swarms"][0]["peers"]) == 2, "the head to join"
    )
    others = [swarm.fetch() for _ in range(3)]
    wait_until(lambda: head.have >= 2, "the head of the chain to hold a few pieces")

    head.kill(signal.SIGSTOP)

    for peer in others:
        swarm.finish(peer)
        assert_installed(peer, manifest, release_16)
    assert not head.completed
    assert any("relay source of stripe 0 given up" in p.stderr() for p in others)


def test_the_origin_can_die_once_a_peer_holds_a_full_copy(swarm: Swarm, release_16: Path) -> None:
    manifest = swarm.release(release_16)
    swarm.start_tracker(expected_peers=5)
    swarm.start_seeder()
    first = swarm.fetch(linger=60.0, name="first")
    # Joined after the first (so the relay plan puts them behind it, not in front of it),
    # and slow enough (16 s for the release) that they are mid-transfer when the origin
    # dies, even on a loaded CI machine.
    wait_until(lambda: first.have > 0, "the first peer to start receiving")
    slow = [swarm.fetch("--download-rate", "1M", linger=2.0) for _ in range(4)]
    wait_until(lambda: first.completed, "the first peer to complete")

    assert swarm.seeder is not None
    swarm.seeder.kill(signal.SIGKILL)
    swarm.seeder.wait()
    unfinished = [p for p in slow if not p.completed]
    assert unfinished, "precondition: the origin died mid-swarm"

    for peer in [*slow, first]:
        swarm.finish(peer)
        assert_installed(peer, manifest, release_16)
    for peer in unfinished:  # what they missed when the origin died came from peers
        assert peer.done()["from_peers"] > 0


def test_a_static_peer_that_restarts_is_dialled_again(swarm: Swarm, release_16: Path) -> None:
    """Without a tracker nothing hands a peer its neighbours again: a ``--peer`` whose
    connection ends (here the origin restarts) must be redialled by the peer itself."""
    manifest = swarm.release(release_16)
    seeder = swarm.start_seeder(tracker=False)
    port = swarm.seeder_port
    peer = swarm.fetch(
        "--peer", f"127.0.0.1:{port}", "--download-rate", "2M", tracker=False, stall_timeout=30
    )
    wait_until(lambda: peer.have >= manifest.piece_count // 4, "a quarter of the pieces")

    seeder.kill(signal.SIGKILL)
    seeder.wait()
    assert not peer.completed, "precondition: the origin restarted mid-transfer"
    swarm.start_seeder(tracker=False, port=port)

    swarm.finish(peer)
    assert_installed(peer, manifest, release_16)


def test_the_smallest_pieces_keep_requests_within_the_protocol_limit(
    swarm: Swarm, tmp_path: Path
) -> None:
    """16 KiB pieces: 4 MiB in flight would be 256 requests, the protocol's limit, before any
    cancelled ones; going over it used to end the connection (and, without a tracker, the
    fetch). One connection per peer, kept to the end."""
    src = make_release(tmp_path / "src", big=[3 * MiB, MiB + 7], small=30, seed=6)
    manifest = swarm.release(src, piece_size=16 * 1024)
    assert manifest.piece_count > 300
    swarm.start_seeder(tracker=False)
    proxy = CountingProxy(("127.0.0.1", swarm.seeder_port))
    try:
        peers = [swarm.fetch("--peer", proxy.address, tracker=False) for _ in range(2)]
        for peer in peers:
            swarm.finish(peer)
            assert_installed(peer, manifest, src)
    finally:
        proxy.close()
    assert proxy.connections == len(peers)


def test_a_peer_without_the_secret_is_refused(
    swarm: Swarm, release_16: Path, tmp_path: Path
) -> None:
    manifest = swarm.release(release_16)
    swarm.start_tracker(expected_peers=1)
    swarm.start_seeder()
    wrong = tmp_path / "wrong.secret"
    write_secret(str(wrong))
    intruder = swarm.fetch(
        "--peer",
        f"127.0.0.1:{swarm.seeder_port}",
        name="intruder",
        tracker=False,
        secret_path=wrong,
        stall_timeout=3.0,
    )

    assert intruder.wait() == 1
    lines = intruder.stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("roost-runtime: error: download stalled: no progress for 3 s")
    assert f"{manifest.piece_count} of {manifest.piece_count} pieces missing" in lines[0]
    assert all(e["have"] == 0 for e in intruder.named("progress"))
    assert not intruder.completed
    assert [e["event"] for e in intruder.events] == ["error"]
    assert_nothing_installed(intruder)

    assert swarm.seeder is not None and swarm.seeder.running()
    honest = swarm.fetch()
    swarm.finish(honest)
    assert_installed(honest, manifest, release_16)


def test_a_peer_serving_corrupt_blocks_is_banned(
    swarm: Swarm, release_16: Path, tmp_path: Path
) -> None:
    manifest = swarm.release(release_16)
    # A plain swarm: honest peers pick sources themselves, so they do ask the liar.
    # (With a relay plan they would ask only their planned sources; see the relay test.)
    swarm.start_tracker(expected_peers=3, relay=False)
    swarm.start_seeder()
    liar_pieces = lying_pieces(release_16, tmp_path / "corrupt", manifest)
    liar = swarm.start_engine(
        liar_pieces, EngineConfig(secret=swarm.secret, linger=600.0, stall_timeout=600.0)
    )
    proxy = CountingProxy(("127.0.0.1", liar.engine.port))  # counts who dials the liar
    try:
        honest = [swarm.fetch("--peer", proxy.address) for _ in range(3)]
        done = [swarm.finish(peer) for peer in honest]
    finally:
        proxy.close()
    liar_stats = liar.stop()

    for peer in honest:
        assert_installed(peer, manifest, release_16)
    assert liar_stats.uploaded > 0, "the liar was never asked for anything"
    assert sum(stats["bad_pieces"] for stats in done) > 0
    banned = [p for p in honest if "failed verification: banned" in p.stderr()]
    assert banned, "no honest peer reported banning the liar"
    for peer, stats in zip(honest, done):
        assert (peer in banned) == (stats["bad_pieces"] > 0)
    # Banned for good: each honest peer dialled the liar once, and never again after the ban.
    assert proxy.connections == len(honest)


def test_a_peer_that_banned_a_liar_still_accepts_honest_peers(tmp_path: Path) -> None:
    """Regression: the engine used to close a banned neighbour's socket while asyncio still
    waited to read it, so the next socket given the same fd number never woke up and its
    handshake timed out. Here an honest peer connects right after the ban (its socket is made
    beforehand, so the accepted one is the next fd the downloader allocates)."""
    # One piece: the downloader's read loop is idle, waiting on the socket, when it bans.
    src = make_release(tmp_path / "src", big=[64 * 1024], small=10, small_max=4096, seed=5)
    manifest = pack(str(src))
    assert manifest.piece_count == 1
    secret = os.urandom(32)
    store = Store.open(str(tmp_path / "dest"), create=True)

    async def scenario() -> None:
        liar_pieces = lying_pieces(src, tmp_path / "corrupt", manifest)
        liar = Engine(manifest, liar_pieces, EngineConfig(secret=secret, linger=600.0))
        liar_run = asyncio.ensure_future(liar.run())
        while not liar.port:
            await asyncio.sleep(0.01)
        staging = store.stage(manifest)
        pieces = Pieces(staging.root, manifest, complete=False, write=staging.write_verified_piece)
        config = EngineConfig(
            secret=secret, peers=[("127.0.0.1", liar.port)], linger=0.0, stall_timeout=600.0
        )
        downloader = Engine(manifest, pieces, config)
        download = asyncio.ensure_future(downloader.run())
        # Slow to speak, so the downloader has to wait on its socket for the handshake.
        client = WireClient(manifest, secret, pause=0.2)
        try:
            await asyncio.wait_for(_until(lambda: downloader.stats.banned > 0), 60)
            events = await asyncio.wait_for(client.connect(downloader.port), 60)
            assert isinstance(events[0], wire.Bitfield)
            assert events[0].pieces() == []  # it still holds nothing: it accepted no bad data
            assert downloader.stats.banned == 1
            assert downloader.stats.bad_pieces >= 1
        finally:
            client.close()
            await cancel_all(download, liar_run)
            staging.abandon()

    asyncio.run(scenario())


@pytest.mark.skipif(
    not hasattr(socket, "TCP_CONGESTION"), reason="choosing congestion control needs Linux"
)
def test_peer_connections_use_the_chosen_congestion_control_or_the_hosts(tmp_path: Path) -> None:
    src = make_release(tmp_path / "src", big=[2 << 20], small=5, seed=6)
    manifest = pack(str(src))
    secret = os.urandom(32)
    store = Store.open(str(tmp_path / "dest"), create=True)

    async def scenario() -> None:
        seeder_config = EngineConfig(secret=secret, linger=600.0, seeder=True, congestion="reno")
        seeder = Engine(manifest, Pieces(str(src), manifest, complete=True), seeder_config)
        seeder_run = asyncio.ensure_future(seeder.run())
        await _until(lambda: seeder.port != 0)
        staging = store.stage(manifest)
        pieces = Pieces(staging.root, manifest, complete=False, write=staging.write_verified_piece)
        config = EngineConfig(
            secret=secret,
            peers=[("127.0.0.1", seeder.port)],
            linger=0.0,
            download_rate=1 << 20,  # ~2 s: long enough to look at the connection
            congestion="no-such-algorithm",
        )
        downloader = Engine(manifest, pieces, config)
        download = asyncio.ensure_future(downloader.run())
        try:
            await asyncio.wait_for(_until(lambda: bool(seeder.neighbours)), 60)
            (neighbour,) = seeder.neighbours.values()
            name = neighbour.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            assert name.rstrip(b"\0") == b"reno"
            stats = await asyncio.wait_for(download, 60)  # an unknown name is no failure
            assert stats.completed is not None and config.congestion is None
            staging.finish()
        finally:
            await cancel_all(download, seeder_run)
            staging.abandon()

    asyncio.run(scenario())


def test_peers_that_dial_each_other_at_once_keep_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peers told of each other together (a relay plan names a source and its child) dial
    each other at once. Each used to keep whichever handshake finished first and close the
    other, so often each closed the one the other kept and neither was left until a redial
    (here never: the back-off is made endless)."""
    monkeypatch.setattr(peer_module, "RETRY_BASE", 3600.0)
    src = make_release(tmp_path / "src", big=[64 * 1024], small=3, seed=7)
    manifest = pack(str(src))
    secret = os.urandom(32)

    def engine(port: int, other: int) -> Engine:
        config = EngineConfig(
            secret=secret, listen_port=port, peers=[("127.0.0.1", other)], linger=600.0
        )
        return Engine(manifest, Pieces(str(src), manifest, complete=True), config)

    def one_shared_connection(a: Engine, b: Engine) -> bool:
        if len(a.neighbours) != 1 or len(b.neighbours) != 1:
            return False
        (ours,), (theirs,) = a.neighbours.values(), b.neighbours.values()
        return ours.sock.getsockname() == theirs.sock.getpeername()

    async def scenario() -> None:
        port_a, port_b = free_port(), free_port()
        a, b = engine(port_a, port_b), engine(port_b, port_a)
        runs = [asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())]
        try:
            await asyncio.wait_for(_until(lambda: one_shared_connection(a, b)), 20)
        finally:
            await cancel_all(*runs)

    for _ in range(5):  # a race: lost in most rounds before the fix
        asyncio.run(scenario())


def test_both_ends_of_a_doubled_connection_keep_the_same_one() -> None:
    low, high = b"\x01" * 20, b"\x02" * 20

    def kept(me: bytes, them: bytes, dialers: tuple[bytes, bytes]) -> bytes:
        """Who dialled the connection ``me`` keeps, the two finishing their handshakes
        in this order (each connection named by the peer that dialled it)."""
        existing, new = dialers
        return new if keep_new_connection(me, them, existing == me, new == me) else existing

    for at_low in ((low, high), (high, low)):
        for at_high in ((low, high), (high, low)):
            assert kept(low, high, at_low) == kept(high, low, at_high) == low
    # A peer dials again only once it has dropped its old connection: the new one wins.
    assert keep_new_connection(low, high, True, True)
    assert keep_new_connection(high, low, False, False)


def test_a_peer_asks_nobody_for_pieces_before_the_trackers_first_answer(tmp_path: Path) -> None:
    """Until the tracker has answered, a plan may be coming (while the fleet gathers, the
    tracker holds announces), and peers that already have theirs connect meanwhile: pieces
    asked of them now would be sent twice or cancelled. With no tracker to reach, the
    peers it knows are enough."""
    src = make_release(tmp_path / "src", big=[1 << 20], small=5, seed=9)
    manifest = pack(str(src))
    secret = os.urandom(32)
    store = Store.open(str(tmp_path / "dest"), create=True)
    answer_now = asyncio.Event()

    async def held_announce(_: web.Request) -> web.Response:
        await answer_now.wait()
        answer = AnnounceResponse(peers=(), interval=60, swarm_complete=False, stats={})
        return web.Response(body=answer.to_bytes(), content_type="application/json")

    async def fetch(seeder: Engine, tracker: str) -> tuple[Engine, asyncio.Future]:
        pieces = staged_pieces(store, manifest)
        config = EngineConfig(
            secret=secret, tracker=tracker, peers=[("127.0.0.1", seeder.port)], linger=0.0
        )
        engine = Engine(manifest, pieces, config)
        return engine, asyncio.ensure_future(engine.run())

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/v1/announce", held_announce)
        seeder_config = EngineConfig(secret=secret, linger=600.0, seeder=True)
        seeder = Engine(manifest, Pieces(str(src), manifest, complete=True), seeder_config)
        seeder_run = asyncio.ensure_future(seeder.run())
        runs = [seeder_run]
        try:
            await _until(lambda: seeder.port != 0)
            async with TestServer(app, host="127.0.0.1") as tracker:
                waiting, run = await fetch(seeder, f"http://127.0.0.1:{tracker.port}")
                runs.append(run)

                def knows_all() -> bool:  # the seeder's Bitfield has come
                    full = manifest.piece_count
                    return any(n.has.count(1) == full for n in waiting.neighbours.values())

                await asyncio.wait_for(_until(knows_all), 30)
                assert not any(n.downloads for n in waiting.neighbours.values())
                assert seeder.stats.uploaded == 0
                answer_now.set()
                assert (await asyncio.wait_for(run, 60)).completed is not None
            # A tracker that cannot be reached: the peer fetches from the peers it knows.
            _, run = await fetch(seeder, f"http://127.0.0.1:{free_port()}")
            runs.append(run)
            assert (await asyncio.wait_for(run, 60)).completed is not None
        finally:
            await cancel_all(*runs)

    asyncio.run(scenario())


def test_under_a_new_plan_a_host_dials_its_relay_sources_before_the_rest(
    tmp_path: Path,
) -> None:
    """At start-up the whole fleet shares the CPU, and a dozen handshakes per host ahead of
    the first piece delayed the plan: a host under a new plan dials its relay sources only,
    and the rest of the swarm once block data arrives, or MESH_DELAY after the plan came."""
    src = make_release(tmp_path / "src", big=[1 << 20], small=2, seed=14)
    manifest = pack(str(src))
    pieces = staged_pieces(Store.open(str(tmp_path / "dest"), create=True), manifest)
    source, first, second = (
        (("10.0.0.1", 7000), os.urandom(16)),
        *(((f"10.0.0.{i}", 7000), os.urandom(16)) for i in (2, 3)),
    )

    def fresh_engine(now: list[float]) -> tuple[Engine, list[tuple[str, int]]]:
        engine = Engine(manifest, pieces, EngineConfig(secret=b"s" * 32), clock=lambda: now[0])
        dialled: list[tuple[str, int]] = []

        async def dial(address: tuple[str, int]) -> None:  # stays "dialling"
            dialled.append(address)

        engine._dial = dial  # type: ignore[method-assign]
        engine.known = dict((source, first, second))
        engine._set_plan((source[1].hex(),))
        return engine, dialled

    async def scenario() -> None:
        everyone = [source[0], first[0], second[0]]
        now = [100.0]
        engine, dialled = fresh_engine(now)
        engine._dial_known()
        await asyncio.sleep(0)
        assert dialled == [source[0]]
        engine._on_block(types.SimpleNamespace(downloads={}), wire.Block(0, 0, b"x"))
        await asyncio.sleep(0)
        assert dialled == everyone  # data flows: now the others
        # No data yet, but the plan is MESH_DELAY old: the others too.
        engine, dialled = fresh_engine(now)
        engine._dial_known()
        now[0] += peer_module.MESH_DELAY
        engine._dial_known()
        await asyncio.sleep(0)
        assert dialled == everyone

    asyncio.run(scenario())


def test_an_outbox_sends_messages_first_and_uploads_lowest_piece_first() -> None:
    async def main() -> None:
        outbox = peer_module.Outbox()
        upload = peer_module._Upload
        for item in (upload(9, 0, 1), wire.Have((1,)), upload(4, 0, 1), wire.KeepAlive()):
            outbox.put_nowait(item)
        assert outbox.exchange(upload(7, 0, 1)) == upload(4, 0, 1)  # 7 queued in its place
        assert outbox.exchange(upload(1, 0, 1)) == upload(1, 0, 1)  # nothing lower queued
        assert outbox.qsize() == 4
        taken = [outbox.get_nowait() for _ in range(4)]
        assert taken == [wire.Have((1,)), wire.KeepAlive(), upload(7, 0, 1), upload(9, 0, 1)]
        assert outbox.empty()

    asyncio.run(main())


def test_a_relay_source_sends_to_its_children_before_anyone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first hosts to complete, whom lagging hosts ask for the tail, are stripe roots
    still feeding their own relay children: an upload to anyone else waits while a child
    has one queued (at most ``CHILDREN_FIRST``); a child's never waits."""
    monkeypatch.setattr(peer_module, "CHILDREN_FIRST", 0.5)
    src = make_release(tmp_path / "src", big=[1 << 20], small=2, seed=5)
    manifest = pack(str(src), piece_size=256 << 10)
    upload = peer_module._Upload

    async def main() -> None:
        config = EngineConfig(secret=os.urandom(32))
        engine = Engine(manifest, Pieces(str(src), manifest, complete=True), config)
        engine._upload_done = asyncio.Event()

        def neighbour(name: bytes) -> peer_module.Neighbour:
            conn = types.SimpleNamespace(remote_peer_id=name * 16)
            made = peer_module.Neighbour(engine, None, conn, name.decode(), dialled_by_us=False)  # type: ignore[arg-type]
            engine.neighbours[made.peer_id] = made
            return made

        child, other = neighbour(b"c"), neighbour(b"o")
        child.relay_child = True
        child.outbox.put_nowait(upload(0, 0, 1))
        turn = asyncio.ensure_future(engine._upload_turn(other, upload(3, 0, 1)))
        await asyncio.sleep(0.2)
        assert not turn.done()  # the child's upload goes first
        assert await asyncio.wait_for(engine._upload_turn(child, upload(1, 0, 1)), 0.1)
        child.outbox.get_nowait()  # the child's queue drained: the other may go
        engine._upload_done.set()
        assert await asyncio.wait_for(turn, 0.2) == upload(3, 0, 1)

        child.outbox.put_nowait(upload(2, 0, 1))  # a child whose queue never drains
        started = time.monotonic()
        await asyncio.wait_for(engine._upload_turn(other, upload(3, 0, 1)), 5)
        assert time.monotonic() - started >= 0.4  # held back, but not for ever

        child.sending = (1, engine.clock() - picker.ORIGIN_STALL)  # a frozen child
        await asyncio.wait_for(engine._upload_turn(other, upload(3, 0, 1)), 0.1)

    asyncio.run(main())


def test_an_origin_sending_in_order_is_not_held_up_by_a_request_out_of_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a peer that asked the origin for pieces before its relay plan came
    keeps those of its own stripe, far ahead of the origin's piece order, and cancels the
    others. Waiting for its turn at the head of that peer's queue, such a request held up
    the in-order requests behind it, and the stripe stalled for the whole fleet (the peer
    was that stripe's root). Now a lower piece queued meanwhile goes first, and a
    cancelled request does not wait at all."""
    # Only the lowest piece waiting and the next may go, and a head never counts as stuck.
    ordered = functools.partial(picker.origin_may_send, lead=2, stall=3600.0)
    monkeypatch.setattr(picker, "origin_may_send", ordered)
    src = make_release(tmp_path / "src", big=[20 << 20], small=3, seed=8)
    manifest = pack(str(src), piece_size=8 << 20)
    assert manifest.piece_count == 3
    secret = os.urandom(32)

    def key(piece: int) -> tuple[int, int, int]:
        return piece, 0, manifest.piece_length(piece)

    async def scenario() -> None:
        config = EngineConfig(secret=secret, seeder=True, linger=600.0)
        seeder = Engine(manifest, Pieces(str(src), manifest, complete=True), config)
        seeder_run = asyncio.ensure_future(seeder.run())
        await _until(lambda: seeder.port != 0)
        seeder.ordered_uploads = True  # as the tracker's answer sets it under a plan
        # A peer that asks for piece 0 and never reads it: that upload stays at the head.
        stuck, client = WireClient(manifest, secret), WireClient(manifest, secret)
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await stuck.connect(seeder.port)
            await stuck.send(wire.Request(*key(0)))
            await _until(lambda: any(n.sending for n in seeder.neighbours.values()))
            await client.connect(seeder.port)
            ours = next(n for n in seeder.neighbours.values() if not n.sending)
            await client.send(wire.Request(*key(2)))  # too far ahead of piece 0: it waits
            await _until(lambda: ours.sending is not None and ours.sending[0] == 2)
            await client.send(wire.Request(*key(1)))
            answer = await asyncio.wait_for(client.next_event(), 30)
            assert isinstance(answer, wire.Block) and answer.piece == 1
            await _until(lambda: ours.sending is not None and ours.sending[0] == 2)
            await client.send(wire.Cancel(*key(2)))
            await asyncio.wait_for(_until(lambda: ours.sending is None), 30)  # left as a Reject
        finally:
            stuck.close()
            client.close()
            await cancel_all(seeder_run)

    asyncio.run(scenario())


@pytest.mark.parametrize("helper_racks", [("r1",), ("r2",), ("r1", "r1")])
def test_a_lagging_relay_stripe_is_finished_by_complete_neighbours(
    tmp_path: Path, helper_racks: tuple[str, ...]
) -> None:
    """Late in a deploy most hosts are complete and their uplinks idle, while a host whose
    relay source lags still gets that stripe at the source's pace. Complete neighbours
    (not the origin) send it the rest, starting from the last piece, so that the source,
    which sends in piece order, and the helpers do not send the same pieces; a few pieces
    from each helper at a time, so that all of them share the work. Only neighbours of
    the host's own rack, whose uplink the plan crosses once per byte."""
    src = make_release(tmp_path / "src", big=[6 << 20], small=4, seed=12)
    manifest = pack(str(src), piece_size=256 << 10)
    secret = os.urandom(32)
    origin = complete_engine(src, manifest, secret, seeder=True)
    # a slow relay: the release would take 6 s
    source = complete_engine(src, manifest, secret, upload_rate=1 << 20)
    helpers = [complete_engine(src, manifest, secret) for _ in helper_racks]
    racks: dict[Engine, str | None] = {
        origin: "r1",
        source: "r1",
        **dict(zip(helpers, helper_racks)),
    }

    async def scenario() -> Stats:
        runs = [asyncio.ensure_future(e.run()) for e in racks]
        try:
            await _until(lambda: all(e.port for e in racks))
            app = one_stripe_tracker(racks, origin, source)
            async with TestServer(app, host="127.0.0.1") as tracker:
                pieces = staged_pieces(Store.open(str(tmp_path / "dest"), create=True), manifest)
                url = f"http://127.0.0.1:{tracker.port}"
                config = EngineConfig(secret=secret, tracker=url, rack="r1", linger=0.0)
                fetcher = Engine(manifest, pieces, config)
                runs.append(asyncio.ensure_future(fetcher.run()))
                return await asyncio.wait_for(runs[-1], 60)
        finally:
            await cancel_all(*runs)

    stats = asyncio.run(scenario())
    assert stats.completed is not None and stats.downloaded == manifest.total_size
    assert origin.stats.uploaded == 0  # the origin's upload is left to the plan
    total = manifest.total_size
    helped = [h.stats.uploaded for h in helpers]
    if helper_racks == ("r2",):  # across racks: the source alone
        assert helped == [0]
        assert source.stats.uploaded == total
        return
    assert sum(helped) > total / 2, "the helpers did not take the tail"
    assert min(helped) > total / (4 * len(helpers)), f"one helper did most: {helped}"
    assert source.stats.uploaded > 0, "the relay source sent nothing"
    sent = source.stats.uploaded + sum(helped)
    assert sent <= total + 8 * manifest.piece_size  # few pieces sent twice


def test_a_host_that_completes_tells_its_neighbours_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a plan Haves leave in batches (children ask ahead and need none), but a
    complete host is what a lagging neighbour asks for the tail: its last Haves leave
    the moment it completes, not when the batch is due."""
    monkeypatch.setattr(peer_module, "HAVE_DELAY", 30.0)
    src = make_release(tmp_path / "src", big=[2 << 20], small=4, seed=21)
    manifest = pack(str(src), piece_size=256 << 10)
    secret = os.urandom(32)
    # 2 s: the mesh is up before the end
    origin = complete_engine(src, manifest, secret, seeder=True, upload_rate=1 << 20)
    observer = complete_engine(src, manifest, secret)

    async def scenario() -> float:
        runs = [asyncio.ensure_future(e.run()) for e in (origin, observer)]
        try:
            await _until(lambda: origin.port and observer.port)
            app = one_stripe_tracker({origin: None, observer: None}, origin, origin)
            async with TestServer(app, host="127.0.0.1") as tracker:
                pieces = staged_pieces(Store.open(str(tmp_path / "dest"), create=True), manifest)
                url = f"http://127.0.0.1:{tracker.port}"
                config = EngineConfig(secret=secret, tracker=url, linger=600.0)
                fetcher = Engine(manifest, pieces, config)
                runs.append(asyncio.ensure_future(fetcher.run()))
                await asyncio.wait_for(_until(lambda: fetcher.completed), 30)

                def observer_sees_it_complete() -> bool:
                    seen = observer.neighbours.get(fetcher.config.peer_id)
                    return seen is not None and seen.has.find(0) < 0

                await asyncio.wait_for(_until(observer_sees_it_complete), 10)
                assert fetcher.stats.completed is not None
                return time.time() - fetcher.stats.completed
        finally:
            await cancel_all(*runs)

    assert asyncio.run(scenario()) < 5.0  # the batch was due 30 s after its first piece


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_a_source_file_changed_after_packing_is_refused_not_spread(
    swarm: Swarm, tmp_path: Path
) -> None:
    """The seeder checks each piece against the manifest before serving it: the pieces of a
    source file truncated after packing are refused, and every other piece is still served."""
    src = make_release(tmp_path / "src", big=[3 * MiB, 3 * MiB], small=20, seed=3)
    manifest = swarm.release(src)
    truncated = src / "blobs" / "blob-1.bin"
    keep = MiB + 12345
    os.truncate(truncated, keep)
    spoiled = {
        index
        for index in range(manifest.piece_count)
        for span in manifest.piece_spans(index)
        if span.file.path == "blobs/blob-1.bin" and span.offset + span.length > keep
    }
    assert 0 < len(spoiled) < manifest.piece_count
    swarm.start_tracker(expected_peers=1)
    seeder = swarm.start_seeder()
    peer = swarm.fetch(stall_timeout=4.0)

    assert peer.wait() == 1
    (error,) = peer.named("error")
    missing = f"{len(spoiled)} of {manifest.piece_count} pieces missing"
    assert missing in error["message"], error
    assert_nothing_installed(peer)
    assert seeder.running()
    assert "source data of piece" in seeder.stderr()


def test_a_requester_leaving_does_not_spoil_a_source_check_for_others(tmp_path: Path) -> None:
    """Regression: requesters waiting for the same piece share one check of the source data;
    when the first of them left, cancelling its upload cancelled the shared check, and the
    piece could never be served again (each later upload of it ended its connection's writer)."""
    src = make_release(tmp_path / "src", big=[MiB], small=5, seed=4)
    manifest = pack(str(src))
    secret = os.urandom(32)
    started, release = threading.Event(), threading.Event()

    class SlowDisk(Pieces):
        def check_source(self, index: int) -> bool:
            started.set()
            release.wait(60)
            return super().check_source(index)

    async def scenario() -> None:
        seeder = Engine(
            manifest, SlowDisk(str(src), manifest, complete=True), EngineConfig(secret=secret)
        )
        serving = asyncio.ensure_future(seeder.run())
        first, second = WireClient(manifest, secret), WireClient(manifest, secret)
        try:
            await _until(lambda: seeder.port != 0)
            length = manifest.piece_length(0)
            await first.connect(seeder.port)
            await first.send(wire.Request(0, 0, length))
            await asyncio.wait_for(asyncio.to_thread(started.wait, 60), 60)
            # The first requester's upload now waits for the check: it leaves.
            (neighbour,) = seeder.neighbours.values()
            await asyncio.wait_for(_until(neighbour.outbox.empty), 60)
            first.close()
            await asyncio.wait_for(_until(lambda: not seeder.neighbours), 60)
            release.set()

            await second.connect(seeder.port)
            await second.send(wire.Request(0, 0, length))
            event = await asyncio.wait_for(second.next_event(), 60)
            assert isinstance(event, wire.Block), event
            assert hashlib.sha256(event.data).digest() == manifest.pieces[0]
        finally:
            release.set()
            first.close()
            second.close()
            await cancel_all(serving)

    asyncio.run(scenario())


def test_peers_ride_out_a_tracker_restart(swarm: Swarm, release_16: Path) -> None:
    manifest = swarm.release(release_16)
    tracker = swarm.start_tracker(expected_peers=4)
    swarm.start_seeder()
    peers = [swarm.fetch("--download-rate", "2M", linger=60.0) for _ in range(4)]
    wait_until(lambda: all(p.have > 0 for p in peers), "every peer to hold a piece")

    tracker.stop(signal.SIGKILL)
    before = sum(p.have for p in peers)
    wait_until(
        lambda: sum(p.have for p in peers) >= before + 8,
        "the swarm to keep exchanging without its tracker",
    )
    assert not any(p.completed for p in peers), "precondition: the tracker came back mid-swarm"
    restarted = time.time()
    tracker.start()  # same port, same SQLite file

    for peer in peers:
        swarm.finish(peer)
        assert_installed(peer, manifest, release_16)
    status = tracker.status(manifest.id)
    # Every completion was announced to the restarted tracker: the peers came back to it.
    assert len(status["completed"]) == 4
    assert all(at >= restarted for at in status["completed"].values())
    assert status["swarm_complete"]


def run_deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "roost", "deploy", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_local_deploy_to_four_hosts(tmp_path: Path) -> None:
    src = make_release(tmp_path / "src", big=[3 * MiB + 5, 2 * MiB], small=40, seed=8)
    base = tmp_path / "fleet"

    result = run_deploy(str(src), "--local", "4", "--dest", str(base), "--linger", "1")

    assert result.returncode == 0, result.stdout + result.stderr
    manifest = Manifest.from_bytes(next((base / ".roost-deploy").glob("*.manifest")).read_bytes())
    for i in range(1, 5):
        assert verify_tree(str(base / f"host-{i}" / "current"), manifest, content=True) == []
    assert not (base / "host-5").exists()


def test_local_deploy_json_events(tmp_path: Path) -> None:
    src = make_release(tmp_path / "src", big=[2 * MiB + 1], small=20, seed=9)
    base = tmp_path / "fleet"

    result = run_deploy(str(src), "--local", "4", "--dest", str(base), "--linger", "1", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(isinstance(e, dict) and "event" in e for e in events)
    (start,) = [e for e in events if e["event"] == "start"]
    assert start["hosts"] == ["host-1", "host-2", "host-3", "host-4"]
    assert events[-1]["event"] == "finish"
    assert events[-1]["ok"] == 4 and events[-1]["failed"] == 0
    manifest = Manifest.from_bytes(next((base / ".roost-deploy").glob("*.manifest")).read_bytes())
    assert start["release"] == manifest.id
    for i in range(1, 5):
        assert verify_tree(str(base / f"host-{i}" / "current"), manifest, content=True) == []


def test_a_lying_relay_source_is_banned_and_its_stripe_fetched_elsewhere(
    swarm: Swarm, release_16: Path, tmp_path: Path
) -> None:
    """The liar announces itself complete before anyone else joins, so the tracker's
    relay plan makes it the head of the chain: honest peers ask it first, find its
    pieces corrupt, ban it and fall back to the swarm for what it was to relay."""
    manifest = swarm.release(release_16)
    tracker = swarm.start_tracker(expected_peers=4)
    swarm.start_seeder()
    liar_pieces = lying_pieces(release_16, tmp_path / "corrupt", manifest)
    liar = swarm.start_engine(
        liar_pieces,
        EngineConfig(secret=swarm.secret, tracker=tracker.url, linger=600.0, stall_timeout=600.0),
    )
    wait_until(
        lambda: len(fetch_status(tracker.url)["swarms"][0]["peers"]) == 2, "the liar to join"
    )
    honest = [swarm.fetch() for _ in range(3)]
    done = [swarm.finish(peer) for peer in honest]
    liar_stats = liar.stop()

    for peer in honest:
        assert_installed(peer, manifest, release_16)
    assert liar_stats.uploaded > 0, "no relay source asked the liar"
    assert sum(stats["bad_pieces"] for stats in done) > 0
    assert any("relay source of stripe" in p.stderr() for p in honest)


def test_a_slow_relay_source_is_not_mistaken_for_a_stalled_one(tmp_path: Path) -> None:
    """A read loop wakes only once a whole piece is waiting (SO_RCVLOWAT), so from a
    source sending a piece in more than SOURCE_PATIENCE it hears nothing for that long:
    the bytes waiting in the socket show the source is alive, and it keeps its stripe."""
    src = make_release(tmp_path / "src", big=[1 << 20], small=2, seed=22)
    manifest = pack(str(src), piece_size=256 << 10)
    piece = Pieces(str(src), manifest, complete=True).read(0, 0, manifest.piece_length(0))
    secret = os.urandom(32)
    pieces = staged_pieces(Store.open(str(tmp_path / "dest"), create=True), manifest)
    chunk = 16 << 10
    pause = (peer_module.SOURCE_PATIENCE + 1.0) / (len(piece) // chunk)

    async def scenario() -> None:
        engine = Engine(manifest, pieces, EngineConfig(secret=secret, linger=600.0))
        run = asyncio.ensure_future(engine.run())
        source = WireClient(manifest, secret)
        loop = asyncio.get_running_loop()
        try:
            await _until(lambda: engine.port != 0)
            await source.connect(engine.port)
            await _until(lambda: len(engine.neighbours) == 1)
            engine._set_plan((source.conn.peer_id.hex(),))  # as the tracker's answer does
            while True:
                event = await asyncio.wait_for(source.next_event(), 30)
                if isinstance(event, wire.Request) and event.piece == 0:
                    break
            await loop.sock_sendall(
                source.sock, source.conn.send_block_header(event.piece, event.offset, event.length)
            )
            for offset in range(0, len(piece), chunk):  # ~40 KB/s: over SOURCE_PATIENCE
                await asyncio.sleep(pause)
                await loop.sock_sendall(source.sock, piece[offset : offset + chunk])
            source.conn.payload_written(len(piece))
            assert not engine.failed_sources, "a slow source was given up as stalled"
            await asyncio.wait_for(_until(lambda: engine.pieces.have[0]), 30)
            assert not engine.failed_sources
        finally:
            source.close()
            await cancel_all(run)

    asyncio.run(scenario())


def test_a_seeder_answers_every_block_of_a_piece_as_it_answered_the_first(
    tmp_path: Path,
) -> None:
    """Pieces over MAX_BLOCK (16 MiB) are asked for in several blocks. A seeder refuses a
    piece it has already sent; decided block by block, it served the first block of
    every such piece and refused the second as already sent, so each was asked for and
    sent again. Now the answer to a piece's first block holds for all its blocks."""
    src = make_release(tmp_path / "src", big=[40 * MiB], small=3, seed=23)
    manifest = pack(str(src), piece_size=32 * MiB)
    assert manifest.piece_length(0) > wire.MAX_BLOCK
    secret = os.urandom(32)
    pieces = staged_pieces(Store.open(str(tmp_path / "dest"), create=True), manifest)

    async def scenario() -> None:
        seeder_config = EngineConfig(secret=secret, linger=600.0, seeder=True)
        seeder = Engine(manifest, Pieces(str(src), manifest, complete=True), seeder_config)
        seeder_run = asyncio.ensure_future(seeder.run())
        runs = [seeder_run]
        try:
            await _until(lambda: seeder.port != 0)
            config = EngineConfig(secret=secret, peers=[("127.0.0.1", seeder.port)], linger=0.0)
            fetcher = Engine(manifest, pieces, config)
            runs.append(asyncio.ensure_future(fetcher.run()))
            stats = await asyncio.wait_for(runs[-1], 120)
            assert stats.completed is not None
            assert stats.downloaded == manifest.total_size
            assert seeder.stats.uploaded == manifest.total_size  # every byte sent once
        finally:
            await cancel_all(*runs)

    asyncio.run(scenario())


def test_a_piece_refused_block_by_block_is_dropped_once_every_block_is_answered(
    tmp_path: Path,
) -> None:
    """A piece over MAX_BLOCK is asked for in several blocks, and asking for a block again
    before its answer has come is a protocol error (the connection would end). So a
    piece one of whose blocks is refused is dropped, free to be asked for again, only
    once every one of its blocks has been answered, by a Reject or by data."""
    src = make_release(tmp_path / "src", big=[40 * MiB], small=3, seed=24)
    manifest = pack(str(src), piece_size=32 * MiB)
    length = manifest.piece_length(0)
    blocks = [(0, wire.MAX_BLOCK), (wire.MAX_BLOCK, length - wire.MAX_BLOCK)]
    pieces = staged_pieces(Store.open(str(tmp_path / "dest"), create=True), manifest)
    engine = Engine(manifest, pieces, EngineConfig(secret=b"s" * 32))

    def asked() -> types.SimpleNamespace:
        neighbour = types.SimpleNamespace(
            downloads={}, in_flight=length, relay_rejects=set(), peer_id=b"p" * 16,
            has=bytearray(manifest.piece_count),
        )  # fmt: skip
        download = peer_module._Download(0, length)
        download.outstanding = set(blocks)
        neighbour.downloads[0] = download
        engine.requested[0] = 1
        return neighbour

    for second_answer in (
        wire.Reject(0, *blocks[1]),
        wire.Block(0, blocks[1][0], b"d" * blocks[1][1]),
    ):
        neighbour = asked()
        engine._on_reject(neighbour, wire.Reject(0, *blocks[0]))
        assert 0 in neighbour.downloads and engine.requested[0] == 1, "dropped too early"
        engine._handle(neighbour, second_answer)
        assert 0 not in neighbour.downloads
        assert engine.requested[0] == 0 and neighbour.in_flight == 0
        assert engine.missing[0] == 1 and not engine.pieces.have[0]
