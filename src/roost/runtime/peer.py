"""The peer engine: exchange a release's pieces with neighbours until every host holds it.

One asyncio task per connection direction moves bytes; everything else is a
method on ``Engine`` that runs on the event loop, so the engine's state (what
we hold, what is requested from whom, who holds what) has exactly one owner.
The wire protocol is ``protocol.PeerConnection`` (sans-I/O); which pieces to
request is ``picker`` (pure). Sockets are used through the loop's ``sock_*``
calls rather than transports, because ``loop.sock_sendfile`` sends an upload
with ``os.sendfile`` (zero-copy) while the same socket keeps being read.

Every piece is hashed before it counts as held, before it is written, and
before it is offered; a neighbour that sends a bad piece is disconnected and
banned for the rest of this swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import heapq
import itertools
import logging
import os
import random
import socket
import sys
import termios
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from roost.runtime import announce, picker
from roost.runtime import protocol as wire
from roost.runtime.manifest import Manifest
from roost.runtime.ratelimit import TokenBucket
from roost.runtime.record import Record

log = logging.getLogger("roost.peer")

RECV_CHUNK = 1 << 20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0
KEEPALIVE_INTERVAL = 15.0
RETRY_BASE = 0.5
RETRY_CAP = 30.0
REJECT_PAUSE = 1.0  # seconds before re-asking a neighbour that rejected a request
# A relay source (see _set_plan) that we cannot reach this long after it was named, or
# that sends no block data this long while we wait on it, is given up for its stripes.
SOURCE_GRACE = 3.0
SOURCE_PATIENCE = 5.0
RELAY_CHECK_EVERY = 0.5
# Under a plan a host first dials only its relay sources, and the rest of the swarm once
# block data arrives, or this long after the plan came: at start-up the whole fleet shares
# the CPU, and a dozen handshakes per host ahead of the first piece delayed the plan.
MESH_DELAY = 1.0
# Verifying and writing (into the page cache) a piece this small takes less time inline
# than handing it to a worker thread and back (two thread switches under the GIL);
# larger ones go to workers, and so do a seeder's reads of its source tree.
INLINE_WORK_LIMIT = 256 << 10
# With a relay plan, Haves are sent in batches at most this often: with a piece arriving
# every few tens of milliseconds, announcing each at once to every neighbour costs more
# than it is worth (relay children ask ahead of time and do not wait for them).
HAVE_DELAY = 0.2
CHILDREN_FIRST = 1.0  # at most this long an upload waits for a relay child's (_upload_turn)
# A whole 256 KiB piece, the usual size: waking once per piece instead of every 64 KiB
# took 5 % less CPU on the testbed (12 pairs: 26.1 against 27.6 CPU-s; T_last 14.03
# against 14.25 s). The pieces are forwarded once verified anyway, so waking earlier
# gained nothing.
LOW_WATER_CAP = 256 << 10
_SO_RCVLOWAT = getattr(socket, "SO_RCVLOWAT", None) if sys.platform == "linux" else None
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", None)
# Received pieces waiting to be verified and written may hold this much memory before
# no new requests go out: a peer's memory stays bounded whatever the release size.
PENDING_LIMIT = 16 << 20
MAX_BATCHED_MESSAGES = 256  # small messages coalesced into one send


class EngineConfig:
    """How an engine runs. ``congestion``: the TCP congestion control of its peer
    connections (None: the host's default); ``peers``: addresses to dial without a tracker."""

    def __init__(
        self,
        secret: bytes,
        *,
        peer_id: bytes | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        advertise_host: str | None = None,
        tracker: str | None = None,
        rack: str | None = None,
        seeder: bool = False,
        linger: float = 30.0,
        stall_timeout: float = 300.0,
        max_connections: int = 32,
        in_flight_bytes: int = 4 << 20,
        upload_rate: float | None = None,
        download_rate: float | None = None,
        congestion: str | None = None,
        peers: list[tuple[str, int]] | None = None,
    ) -> None:
        self.secret = secret
        self.peer_id = os.urandom(16) if peer_id is None else peer_id
        self.listen_host, self.listen_port = listen_host, listen_port
        self.advertise_host, self.tracker, self.rack = advertise_host, tracker, rack
        self.seeder, self.linger, self.stall_timeout = seeder, linger, stall_timeout
        self.max_connections, self.in_flight_bytes = max_connections, in_flight_bytes
        self.upload_rate, self.download_rate = upload_rate, download_rate
        self.congestion = congestion
        self.peers = [] if peers is None else peers


class Stats:
    """What an engine has moved so far (``completed``: when it held every piece)."""

    def __init__(self, started: float = 0.0) -> None:
        self.downloaded = self.from_origin = self.from_peers = self.uploaded = 0
        self.bad_pieces = self.banned = 0
        self.started = started
        self.completed: float | None = None


class Pieces:
    """Where a release's pieces live on this host: a tree that is complete or being filled.

    ``write`` is only called with pieces whose hash was checked. A seeder's tree
    (``complete``) is the operator's source directory: each piece is checked
    against the manifest the first time it is served, so a tree that changed
    after packing is caught, not spread. Files are opened relative to a
    directory descriptor of the root, so uploads go on undisturbed when a
    finished staging directory is renamed into ``releases/``.
    """

    def __init__(
        self,
        root: str,
        manifest: Manifest,
        *,
        complete: bool,
        write: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.manifest = manifest
        self.have = bytearray([1 if complete else 0]) * manifest.piece_count
        self.checked = bytearray(manifest.piece_count) if complete else None
        self._write = write

    @property
    def complete(self) -> bool:
        return all(self.have)

    def store(self, index: int, data: bytes) -> None:
        """Blocking: write a verified piece."""
        if self._write is None:
            raise RuntimeError("this piece store is read-only")
        self._write(index, data)

    def check_source(self, index: int) -> bool:
        """Blocking: does the on-disk piece still match the manifest? (seeders only)."""
        try:
            data = self.read(index, 0, self.manifest.piece_length(index))
        except OSError:  # a missing, unreadable or truncated file
            return False
        return _verify(data, self.manifest.pieces[index])

    def read(self, index: int, offset: int, length: int) -> bytes:
        """Blocking: ``length`` bytes at ``offset`` of a piece, read from its files (each
        opened for this read alone, so no descriptor is shared with another upload)."""
        parts = []
        for path, start, size in self.spans(index, offset, length):
            with self.open(path) as f:
                data = os.pread(f.fileno(), size, start)
            if len(data) != size:
                raise OSError(f"{path} is shorter than the release says")
            parts.append(data)
        return b"".join(parts)

    def open(self, path: str) -> Any:
        """A file of the release, by its path in the manifest, for reading."""
        fd = os.open(path, _READ_FLAGS, dir_fd=self.root_fd)
        return os.fdopen(fd, "rb")

    def close(self) -> None:
        os.close(self.root_fd)

    def spans(self, index: int, offset: int, length: int) -> list[tuple[str, int, int]]:
        """(path in the release, file offset, length) runs covering ``length`` bytes at
        ``offset`` of a piece."""
        runs = []
        position = 0
        for span in self.manifest.piece_spans(index):
            start = max(offset, position)
            end = min(offset + length, position + span.length)
            if start < end:
                runs.append((span.file.path, span.offset + start - position, end - start))
            position += span.length
        return runs


class _Download:
    """One piece being received from one neighbour, block by block."""

    def __init__(self, index: int, length: int) -> None:
        self.index = index
        self.length = length
        self.buffer: bytearray | None = None  # made on the first partial block
        self.outstanding: set[tuple[int, int]] = set()
        self.rejected = False  # a block was refused: dropped once the others are answered

    def add(self, offset: int, data: bytearray) -> None:
        if offset == 0 and len(data) == self.length:
            self.buffer = data  # the whole piece in one block: no copy
            return
        if self.buffer is None:
            self.buffer = bytearray(self.length)
        self.buffer[offset : offset + len(data)] = data


class Neighbour:
    """One authenticated connection to another peer."""

    def __init__(
        self, engine: Engine, sock: socket.socket, conn: Any, address: str, *, dialled_by_us: bool
    ) -> None:
        self.engine = engine
        self.sock = sock
        self.conn = conn
        self.address = address
        self.dialled_by_us = dialled_by_us
        self.peer_id: bytes = conn.remote_peer_id
        self.has = bytearray(engine.manifest.piece_count)
        self.downloads: dict[int, _Download] = {}
        self.in_flight = 0
        self.outbox = Outbox()
        self.uploads_cancelled: set[tuple[int, int, int]] = set()
        self.refused: set[int] = set()  # pieces a seeder told this neighbour to get elsewhere
        self.answers: dict[int, bool] = {}  # a seeder's last serve-or-refuse, per piece
        self.requests_queued = 0  # Requests in the outbox, not yet in the protocol's ledger
        self.short_of_slots = False  # _refill held back: refill again as answers come in
        self.last_heard = engine.clock()
        self.last_data = engine.clock()  # block data last arrived (relay source health)
        self.low_water = 1  # the socket's SO_RCVLOWAT
        self.queued = 0  # bytes waiting below it when last looked at (_note_queued_data)
        self.sending: tuple[int, float] | None = None  # (piece, since) of our head upload
        self.relay_child = False  # it asked us ahead for a piece: we are its relay source
        self.relay_rejects: set[int] = set()  # pieces this relay source refused once
        self.closed = False

    @property
    def is_origin(self) -> bool:
        return self.peer_id in self.engine.seeder_ids


class Engine:
    def __init__(
        self,
        manifest: Manifest,
        pieces: Pieces,
        config: EngineConfig,
        *,
        on_complete: Callable[[], None] | None = None,
        on_progress: Callable[[Engine], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.manifest = manifest
        self.pieces = pieces
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_complete = on_complete
        self.on_progress = on_progress
        self.swarm_id = bytes.fromhex(manifest.id)
        self.stats = Stats(started=time.time())
        count = manifest.piece_count
        self.missing = bytearray(0 if h else 1 for h in pieces.have)
        self.requested = [0] * count
        self.availability = [0] * count
        self.uploads = [0] * count  # times we answered a request for each piece (seeders)
        self.neighbours: dict[bytes, Neighbour] = {}
        self.banned: set[bytes] = set()
        self.seeder_ids: set[bytes] = set()
        self.rack_of: dict[bytes, str | None] = {}  # as the tracker lists each peer
        self.dialing: set[tuple[str, int]] = set()
        self.retry_at: dict[tuple[str, int], tuple[float, int]] = {}
        self.known: dict[tuple[str, int], bytes | None] = {a: None for a in config.peers}
        self.dialled: dict[tuple[str, int], bytes] = {}  # who answered at a dialled address
        self._closing = False  # set by _shutdown: no new dials
        self.port = 0
        self.swarm_complete = False
        self._tasks: set[asyncio.Task] = set()
        self._progress: asyncio.Event | None = None  # made in run(): 3.9 binds it to a loop
        self._stop_requested = False
        self._pending = 0  # bytes of received pieces still being verified or written
        self._held_back: set[Neighbour] = set()  # refills skipped while _pending was full
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="roost-io")
        self._source_checks: dict[int, asyncio.Future] = {}
        self._upload_limit = TokenBucket(config.upload_rate) if config.upload_rate else None
        self._download_limit = TokenBucket(config.download_rate) if config.download_rate else None
        self._last_progress = self.clock()
        # The relay plan (see _set_plan): stripe -> the peer that forwards it to us.
        self.stripes = 1
        self.sources: dict[int, bytes] = {}
        self.failed_sources: set[int] = set()  # stripes fetched as in a plain swarm instead
        self.swarm_stripes: picker.Stripes = None  # see _update_stripes
        self._relayed_by: dict[bytes, frozenset[int]] = {}  # source -> its stripes for us
        self._plan_at = self.clock()
        self._parked: dict[int, list[tuple[Neighbour, _Upload]]] = {}  # asked before we had it
        self._haves: list[int] = []  # pieces verified since the last Have batch
        # The tracker is still gathering the fleet (see announce ``retry_after``): ask
        # nobody for anything until it has planned, or the plan would start too late.
        # Before its first answer a plan may be coming too: peers that already have
        # theirs connect meanwhile, and pieces asked of the origin now would be sent
        # twice or cancelled. (No tracker, or none reachable: a plain swarm.)
        self._gathering = bool(config.tracker)
        self._had_data = False  # any block received yet (see MESH_DELAY)
        self._mesh_waiting = False  # peers left undialled for now (see MESH_DELAY)
        self.ordered_uploads = False  # a seeder, told by the tracker that there is a plan
        self._upload_done: asyncio.Event | None = None  # an upload ended (made in run())
        self._failure: BaseException | None = None
        self._finishing = False
        self.completed = pieces.complete

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> Stats:
        """Exchange pieces until we hold the release (seeders: until stopped), then linger."""
        self._progress = asyncio.Event()
        self._upload_done = asyncio.Event()
        listener = socket.create_server((self.config.listen_host, self.config.listen_port))
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop(listener))
        self._spawn(self._tracker_loop())
        self._spawn(self._keepalive_loop())
        self._spawn(self._relay_watch_loop())
        self._dial_known()
        try:
            if not self.completed:
                await self._wait_complete()
            if not self.config.seeder:
                await self._linger()
            else:
                while not self._stop_requested:  # a seeder serves until stopped
                    await asyncio.sleep(0.2)
        finally:
            await self._shutdown(listener)
        return self.stats

    def stop(self) -> None:
        """Stop soon: end the linger (or a seeder's service), or give up an unfinished fetch.

        Call it on the engine's loop (``loop.call_soon_threadsafe(engine.stop)``).
        """
        self._stop_requested = True
        if self._progress is not None:
            self._progress.set()

    async def _wait_complete(self) -> None:
        while not self.completed:
            if self._failure is not None:
                raise self._failure
            if self._stop_requested:
                raise StoppedError("stopped before the release was complete")
            self._progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=1.0)
            if self.clock() - self._last_progress > self.config.stall_timeout:
                raise StalledError(
                    f"no progress for {self.config.stall_timeout:.0f} s"
                    f" ({self.missing.count(1)} of {self.manifest.piece_count} pieces missing)"
                )

    async def _linger(self) -> None:
        deadline = self.clock() + self.config.linger
        while self.clock() < deadline and not self.swarm_complete and not self._stop_requested:
            await asyncio.sleep(min(0.2, max(0.0, deadline - self.clock())))

    async def _shutdown(self, listener: socket.socket) -> None:
        self._closing = True
        listener.close()
        for neighbour in list(self.neighbours.values()):
            self._close(neighbour, "shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.config.tracker:
            with contextlib.suppress(announce.TrackerError):
                await asyncio.get_running_loop().run_in_executor(
                    None, self._announce_blocking, "stopped"
                )
        self.pieces.close()
        self._workers.shutdown(wait=True)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        """A background task that fails (not one that is cancelled) fails the whole run."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
            self._progress.set()

    # -- tracker ----------------------------------------------------------------------

    def _announce_blocking(self, event: str) -> announce.AnnounceResponse:
        request = announce.AnnounceRequest(
            swarm=self.manifest.id,
            peer=self.config.peer_id.hex(),
            addr=self.config.advertise_host or self.config.listen_host,
            port=self.port,
            rack=self.config.rack,
            seeder=self.config.seeder,
            have=self.manifest.piece_count - self.missing.count(1),
            pieces=self.manifest.piece_count,
            uploaded=self.stats.uploaded,
            downloaded=self.stats.downloaded,
            downloaded_from_origin=self.stats.from_origin,
            event=event,
            time=time.time(),
        )
        key = announce.tracker_key(self.config.secret, self.manifest.id)
        return announce.announce(self.config.tracker, announce.sign_request(request, key))

    async def _tracker_loop(self) -> None:
        if not self.config.tracker:
            return
        loop = asyncio.get_running_loop()
        attempt = 0
        event = "completed" if self.completed else "started"
        reported_complete = self.completed
        while True:
            try:
                response = await loop.run_in_executor(None, self._announce_blocking, event)
            except announce.TrackerError as exc:
                delay = announce.backoff_delay(attempt, self.rng)
                attempt += 1
                log.info("tracker unavailable (%s); retrying in %.1f s", exc, delay)
                if self._gathering:  # no plan is coming: fetch from the peers we know
                    self._gathering = False
                    self._refill_all()
                await self._sleep_or_complete(delay, reported_complete)
                if self.completed and not reported_complete:
                    event, reported_complete = "completed", True
                continue
            attempt = 0
            self.swarm_complete = response.swarm_complete
            self.known = {address: None for address in self.config.peers}
            for peer in response.peers:  # only the latest hand-out is dialled
                peer_id = bytes.fromhex(peer.peer)
                if peer.seeder:
                    self.seeder_ids.add(peer_id)
                self.rack_of[peer_id] = peer.rack
                if peer_id != self.config.peer_id:
                    self.known[(peer.addr, peer.port)] = peer_id
            gathering, self._gathering = self._gathering, response.retry_after is not None
            self._set_plan(response.sources)
            self._dial_known()
            self.ordered_uploads = self.config.seeder and response.stripes > 0
            if gathering and not self._gathering:
                self._refill_all()  # the tracker has planned: start asking
            event = "update"
            interval = response.retry_after or announce.jittered(response.interval, self.rng)
            await self._sleep_or_complete(interval, reported_complete)
            if self.completed and not reported_complete:
                event, reported_complete = "completed", True

    async def _sleep_or_complete(self, delay: float, reported_complete: bool) -> None:
        """Sleep until the next announce, but announce completion at once."""
        deadline = self.clock() + delay
        while self.clock() < deadline:
            if self.completed and not reported_complete:
                return
            await asyncio.sleep(min(0.1, deadline - self.clock()))

    # -- connections ------------------------------------------------------------------

    def _dial_known(self) -> None:
        now = self.clock()
        connected = {n.peer_id for n in self.neighbours.values()}
        sources_only = self._dial_sources_only()
        self._mesh_waiting = False
        for address, peer_id in self.known.items():
            if sources_only and peer_id not in self.sources.values():
                self._mesh_waiting = True
                continue
            if len(self.neighbours) + len(self.dialing) >= self.config.max_connections:
                return
            peer_id = peer_id or self.dialled.get(address)  # static --peer entries have no id
            if peer_id is not None and (peer_id in connected or peer_id in self.banned):
                continue
            if address in self.dialing or self.retry_at.get(address, (0.0, 0))[0] > now:
                continue
            if self.completed and peer_id in self.seeder_ids:
                continue  # complete peers have nothing to fetch from the origin
            self.dialing.add(address)
            self._spawn(self._dial(address))

    def _dial_sources_only(self) -> bool:
        """Under a new plan, until block data arrives: dial relay sources, nobody else."""
        new_plan = self.clock() - self._plan_at < MESH_DELAY
        return bool(self.sources) and not self._had_data and new_plan

    async def _dial(self, address: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        sock.setblocking(False)
        useful = False
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
            useful = await self._serve(
                sock, wire.Role.INITIATOR, f"{address[0]}:{address[1]}", address
            )
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            log.debug("cannot connect to %s:%s (%s)", *address, exc)
        finally:
            self.dialing.discard(address)
        if self._closing:
            return
        # Failed, refused or over: dial again later, backing off unless the session moved
        # data. Without a tracker nothing else would ever dial a static --peer again;
        # _dial_known skips it meanwhile if it is connected (it dialled us) or banned.
        _, failures = (0.0, 0) if useful else self.retry_at.get(address, (0.0, 0))
        delay = min(RETRY_CAP, RETRY_BASE * 2**failures) * (0.5 + self.rng.random())
        self.retry_at[address] = (self.clock() + delay, failures + 1)
        self._spawn(self._redial_later(delay))

    async def _redial_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._dial_known()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, address = await loop.sock_accept(listener)
            sock.setblocking(False)
            if len(self.neighbours) >= self.config.max_connections:
                sock.close()
                continue
            self._spawn(self._serve(sock, wire.Role.RESPONDER, f"{address[0]}:{address[1]}"))

    async def _serve(
        self,
        sock: socket.socket,
        role: Any,
        address: str,
        dialled: tuple[str, int] | None = None,
    ) -> bool:
        """Handshake, then run one connection until it closes; did it move any block data?"""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.congestion is not None:
            self._set_congestion(sock, self.config.congestion)
        conn = wire.PeerConnection.for_manifest(
            self.manifest, role=role, peer_id=self.config.peer_id, secret=self.config.secret
        )
        loop = asyncio.get_running_loop()
        buffer = bytearray(RECV_CHUNK)
        try:
            await loop.sock_sendall(sock, conn.initiate())
            pending = await asyncio.wait_for(self._handshake(sock, conn, buffer), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, wire.ProtocolError) as exc:
            log.info("handshake with %s failed: %s", address, exc)
            sock.close()
            return False
        peer_id = conn.remote_peer_id
        if dialled is not None:
            self.dialled[dialled] = peer_id
        if peer_id in self.banned or peer_id == self.config.peer_id:
            sock.close()
            return False
        existing = self.neighbours.get(peer_id)
        if existing is not None:
            if not keep_new_connection(
                self.config.peer_id, peer_id, existing.dialled_by_us, dialled is not None
            ):
                sock.close()
                return False
            self._close(existing, "replaced by a newer connection")
        neighbour = Neighbour(self, sock, conn, address, dialled_by_us=dialled is not None)
        self.neighbours[peer_id] = neighbour
        held = (i for i, has in enumerate(self.pieces.have) if has)
        neighbour.outbox.put_nowait(wire.Bitfield.from_pieces(held, self.manifest.piece_count))
        writer = self._spawn(self._write_loop(neighbour))
        try:
            for event in pending:
                self._handle(neighbour, event)
            await self._read_loop(neighbour, buffer)
        except wire.ProtocolError as exc:
            log.warning("closing %s: protocol error: %s", address, exc)
        except (OSError, asyncio.TimeoutError) as exc:  # not an OSError before Python 3.11
            log.info("connection to %s lost: %s", address, exc)
        finally:
            writer.cancel()
            self._close(neighbour, "connection ended")
            try:
                await asyncio.wait([writer])
            finally:
                # Closed only now that neither loop waits on it: closing a socket that
                # asyncio still watches leaves its fd registered, and the next socket
                # given that fd number would never be woken (see _close).
                sock.close()
        return bool(conn.block_bytes_received or conn.block_bytes_sent)

    def _set_congestion(self, sock: socket.socket, name: str) -> None:
        """Use congestion control ``name`` if this host has it; else say so once, go on."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, name.encode())
        except (OSError, TypeError) as exc:  # not loaded, not allowed, or not Linux
            log.warning("congestion control %r unavailable (%s); using the host's", name, exc)
            self.config.congestion = None

    async def _handshake(self, sock: socket.socket, conn: Any, buffer: bytearray) -> list[Any]:
        """Run the mutual authentication; return events that arrived right behind it."""
        loop = asyncio.get_running_loop()
        while not conn.authenticated:
            event = conn.next_event()
            if event is wire.NEED_DATA:
                n = await loop.sock_recv_into(sock, buffer)
                conn.receive_data(memoryview(buffer)[:n])
            elif isinstance(event, wire.Hello):
                await loop.sock_sendall(sock, conn.send_auth())
            elif isinstance(event, wire.ConnectionClosed):
                raise OSError("connection closed during the handshake")
        events = []
        while True:
            event = conn.next_event()
            if event is wire.NEED_DATA:
                return events
            events.append(event)

    async def _read_loop(self, neighbour: Neighbour, buffer: bytearray) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(buffer)
        conn = neighbour.conn
        while not neighbour.closed:
            payload = conn.payload_buffer()
            # Inside a block, receive straight into its buffer (no copy through ours) and
            # let the kernel wake us only once a good part of it is there.
            _set_low_water(neighbour, 1 if payload is None else len(payload))
            target = buffer if payload is None else payload
            n = await loop.sock_recv_into(neighbour.sock, target)
            neighbour.last_heard = self.clock()
            neighbour.queued = 0
            if neighbour.closed:
                return  # we closed it (_close): what is left of the stream does not matter
            if payload is not None and n:
                neighbour.last_data = neighbour.last_heard
                conn.payload_received(n)
            else:
                conn.receive_data(view[:n])
            if n and self._download_limit is not None:
                await self._download_limit.consume(n)
            while True:
                event = conn.next_event()
                if event is wire.NEED_DATA:
                    break
                if isinstance(event, wire.ConnectionClosed):
                    return
                self._handle(neighbour, event)
            if neighbour.short_of_slots:  # answers (some never become events) freed slots
                self._refill(neighbour)

    async def _write_loop(self, neighbour: Neighbour) -> None:
        loop = asyncio.get_running_loop()
        outbox = neighbour.outbox
        try:
            item = await outbox.get()
            while True:
                if isinstance(item, _Upload):
                    neighbour.sending = (item.piece, self.clock())
                    try:
                        item = await self._upload_turn(neighbour, item)
                        await self._send_upload(neighbour, item)
                    finally:
                        neighbour.sending = None
                        if self._upload_done is not None:
                            self._upload_done.set()
                    item = await outbox.get()
                    continue
                # Small messages queued together (Have, Request, Cancel...) leave in one
                # send: a piece's Have goes to every neighbour, so this saves many syscalls.
                frames = []
                while not isinstance(item, _Upload):
                    frames.append(neighbour.conn.send(item))
                    if isinstance(item, wire.Request):
                        neighbour.requests_queued -= 1
                    if outbox.empty() or len(frames) >= MAX_BATCHED_MESSAGES:
                        item = None
                        break
                    item = outbox.get_nowait()
                await loop.sock_sendall(neighbour.sock, b"".join(frames))
                if item is None:
                    item = await outbox.get()
        except (OSError, wire.ProtocolError, wire.LocalProtocolError) as exc:
            log.info("sending to %s failed: %s", neighbour.address, exc)
            self._close(neighbour, "send failed")

    async def _upload_turn(self, neighbour: Neighbour, upload: _Upload) -> _Upload:
        """The upload to send to ``neighbour`` next: a seeder under a relay plan sends in
        piece order (``picker.origin_may_send``), so it may wait, and it may take a lower
        piece queued meanwhile instead (the one it held goes back in the queue).

        A neighbour's requests need not come in piece order (those made before its plan
        came stay valid for its own stripe), and one waiting for its turn at the head of
        its queue held up everything behind it: whole stripes stalled. A cancelled upload
        does not wait at all: it only leaves as a Reject.

        A relay source sends to its children (the plan) before anyone else (a lagging
        host's tail, a stripe fetched from the swarm): the first hosts to complete, whom
        laggards ask for the tail, are stripe roots still feeding their own children.
        Others wait while a child has an upload queued, for at most ``CHILDREN_FIRST``
        (and not for a child whose upload has not left for ``ORIGIN_STALL``: frozen).
        """
        while self.ordered_uploads and _key(upload) not in neighbour.uploads_cancelled:
            lower = neighbour.outbox.exchange(upload)
            if lower is not upload:
                upload = lower
                neighbour.sending = (upload.piece, self.clock())
            heads = [n.sending for n in self.neighbours.values() if n.sending is not None]
            if picker.origin_may_send(upload.piece, heads, self.clock()):
                break
            await self._an_upload_ends(picker.ORIGIN_STALL / 4)  # a head may stall meanwhile
        if neighbour.relay_child or _key(upload) in neighbour.uploads_cancelled:
            return upload
        now = self.clock()
        until = now + CHILDREN_FIRST
        while now < until and any(
            n.relay_child
            and n.outbox.uploads_waiting()
            and (n.sending is None or now - n.sending[1] < picker.ORIGIN_STALL)
            for n in self.neighbours.values()
        ):
            await self._an_upload_ends(CHILDREN_FIRST / 10)
            now = self.clock()
        return upload

    async def _an_upload_ends(self, timeout: float) -> None:
        """Wait until an upload ends (or one is queued or cancelled), at most ``timeout``."""
        assert self._upload_done is not None
        self._upload_done.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._upload_done.wait(), timeout)

    async def _send_upload(self, neighbour: Neighbour, upload: _Upload) -> None:
        key = _key(upload)
        loop = asyncio.get_running_loop()
        if key in neighbour.uploads_cancelled:  # every request gets one answer: a Reject here
            neighbour.uploads_cancelled.discard(key)
            await loop.sock_sendall(neighbour.sock, neighbour.conn.send(wire.Reject(*key)))
            return
        if self.pieces.checked is not None and not self.pieces.checked[upload.piece]:
            # Shielded: the check is shared by every upload of this piece, and this upload
            # being cancelled (its requester left) must not cancel it for the others.
            ok = await asyncio.shield(self._check_source(upload.piece))
            if not ok:
                log.error("source data of piece %d no longer matches the manifest", upload.piece)
                await loop.sock_sendall(neighbour.sock, neighbour.conn.send(wire.Reject(*key)))
                return
            self.pieces.checked[upload.piece] = 1
        if self._upload_limit is not None:
            await self._upload_limit.consume(upload.length)
        header = neighbour.conn.send_block_header(*key)
        if upload.data is not None:
            await _send_more(loop, neighbour.sock, header)
            await loop.sock_sendall(neighbour.sock, upload.data)
        else:
            await self._send_from_files(loop, neighbour.sock, header, key)
        neighbour.conn.payload_written(upload.length)
        self.stats.uploaded += upload.length

    async def _send_from_files(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        header: bytes,
        key: tuple[int, int, int],
    ) -> None:
        runs = self.pieces.spans(*key)
        if len(runs) == 1:  # one file: zero-copy, the header held back to leave with it
            await _send_more(loop, sock, header)
            path, offset, length = runs[0]
            # Each upload opens its own file: a file object shared between uploads
            # could be closed (and its descriptor reused) under one that is waiting.
            with self.pieces.open(path) as f:
                sent = await loop.sock_sendfile(sock, f, offset, length)
            if sent != length:
                raise OSError(f"{path} is shorter than the release says")
        else:  # many small files: one read each and a single send beat a sendfile each
            await loop.sock_sendall(sock, header + self.pieces.read(*key))

    def _check_source(self, index: int) -> asyncio.Future:
        """Start (once) checking a seeder's on-disk piece; requests queue behind uploads,
        so a check on a worker runs while earlier uploads are still being sent."""
        check = self._source_checks.get(index)
        if check is None:  # a disk read (maybe cold, maybe remote): never on the loop
            loop = asyncio.get_running_loop()
            check = loop.run_in_executor(self._workers, self.pieces.check_source, index)
            self._source_checks[index] = check
        return check

    async def _blocking(self, size: int, work: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work on ``size`` bytes: inline when small, else on a worker."""
        if size <= INLINE_WORK_LIMIT:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._workers, work, *args)

    async def _keepalive_loop(self) -> None:
        """Keep quiet connections alive, and drop those the other side stopped answering
        (it sends a KeepAlive at least every KEEPALIVE_INTERVAL)."""
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL)
            now = self.clock()
            for neighbour in list(self.neighbours.values()):
                _note_queued_data(neighbour, now)
                if now - neighbour.last_heard > IDLE_TIMEOUT:
                    self._close(neighbour, f"nothing heard for {IDLE_TIMEOUT:.0f} s")
                elif neighbour.outbox.empty():
                    neighbour.outbox.put_nowait(wire.KeepAlive())

    def _close(self, neighbour: Neighbour, reason: str) -> None:
        if neighbour.closed:
            return
        neighbour.closed = True
        log.debug("closing %s: %s", neighbour.address, reason)
        if self.neighbours.get(neighbour.peer_id) is neighbour:
            del self.neighbours[neighbour.peer_id]
        for index, has in enumerate(neighbour.has):
            if has:
                self.availability[index] -= 1
        for index in neighbour.downloads:
            self.requested[index] -= 1
        neighbour.downloads.clear()
        with contextlib.suppress(OSError):
            # Shut down, don't close: this wakes the read and write loops (EOF, EPIPE), and
            # _serve closes the socket once they have let go of it.
            neighbour.sock.shutdown(socket.SHUT_RDWR)
        self._refill_all()
        self._dial_known()
        if neighbour.peer_id in self.sources.values():
            self._check_sources()  # a relay source left: fail over now, not at the next check

    # -- protocol events --------------------------------------------------------------

    def _handle(self, neighbour: Neighbour, event: Any) -> None:
        if isinstance(event, wire.Block):
            self._on_block(neighbour, event)
        elif isinstance(event, wire.Have):
            self._mark_has(neighbour, event.pieces)
            if any(self._worth_asking(i) for i in event.pieces) or self._may_help_with_the_tail(
                neighbour
            ):
                self._refill(neighbour)
        elif isinstance(event, wire.Bitfield):
            self._mark_has(neighbour, event.pieces())
            self._refill(neighbour)
        elif isinstance(event, wire.Request):
            upload = _Upload(event.piece, event.offset, event.length)
            if self.pieces.have[event.piece]:
                if self._serve_as_origin(neighbour, event):
                    if self.pieces.checked is not None and not self.pieces.checked[event.piece]:
                        self._check_source(event.piece)
                    neighbour.outbox.put_nowait(upload)
                    if self.ordered_uploads and self._upload_done is not None:
                        self._upload_done.set()  # a lower piece may go before one waiting
                else:
                    neighbour.outbox.put_nowait(wire.Reject(*_key(upload)))
            elif not self.config.seeder:
                # Asked ahead by a peer we relay to: answered the moment we hold the piece.
                self._parked.setdefault(event.piece, []).append((neighbour, upload))
                neighbour.relay_child = True
            else:
                neighbour.outbox.put_nowait(wire.Reject(*_key(upload)))
        elif isinstance(event, wire.Cancel):
            upload = _Upload(event.piece, event.offset, event.length)
            request = wire.Request(event.piece, event.offset, event.length)
            if request in neighbour.conn.their_requests:  # not answered yet: answer with Reject
                neighbour.uploads_cancelled.add(_key(upload))
                if self._upload_done is not None:
                    self._upload_done.set()  # it may be waiting for its turn (_upload_turn)
                parked = self._parked.get(event.piece, [])
                if (neighbour, upload) in parked:  # queued now, it leaves as that Reject
                    parked.remove((neighbour, upload))
                    neighbour.outbox.put_nowait(upload)
        elif isinstance(event, wire.Reject):
            self._on_reject(neighbour, event)
        elif isinstance(event, wire.Goodbye):
            log.debug("%s said goodbye: %s", neighbour.address, event.reason)

    def _serve_as_origin(self, neighbour: Neighbour, request: Any) -> bool:
        """Seeders spend their upload on pieces nobody holds yet (see picker).

        A piece over MAX_BLOCK is asked for in several blocks, first block first: the
        answer given to its first block holds for the others. Decided block by block,
        the second block of every such piece was refused (the piece counted as sent
        already), and the piece asked for again: the origin sent half of it twice.
        """
        if not self.config.seeder:
            return True
        index = request.piece
        if request.offset and index in neighbour.answers:
            return neighbour.answers[index]
        neighbour.answers[index] = serve = self._serve_or_refuse(neighbour, index)
        return serve

    def _serve_or_refuse(self, neighbour: Neighbour, index: int) -> bool:
        refused = index in neighbour.refused
        if picker.origin_should_serve(self.uploads[index], refused):
            self.uploads[index] += 1
            return True
        neighbour.refused.add(index)
        return False

    def _worth_asking(self, index: int) -> bool:
        """Whether a neighbour's new piece may change what we ask it for: most Haves
        name pieces we hold, have asked for, or get from a relay source (asked for
        ahead, whatever the source announces), and refilling on those costs a pick
        over every missing piece for nothing."""
        return (
            self.missing[index]
            and self.requested[index] < picker.ENDGAME_MAX_DUPLICATES
            and (not self.requested[index] or self._in_endgame())
            and picker.stripe_allowed(index, self.swarm_stripes)
        )

    def _in_endgame(self) -> bool:
        return picker.in_endgame(self.missing.count(1), len(self.neighbours))

    def _mark_has(self, neighbour: Neighbour, indexes: Iterable[int]) -> None:
        for index in indexes:
            if not neighbour.has[index]:
                neighbour.has[index] = 1
                self.availability[index] += 1

    def _on_reject(self, neighbour: Neighbour, reject: Any) -> None:
        index = reject.piece
        download = neighbour.downloads.get(index)
        if download is None:
            return
        download.rejected = True
        self._answered_after_reject(neighbour, download, (reject.offset, reject.length))

    def _answered_after_reject(
        self, neighbour: Neighbour, download: _Download, block: tuple[int, int]
    ) -> None:
        """A block of a piece refused in part was answered: the piece is dropped once
        all its blocks are (asking for a block again before its answer is a protocol
        error)."""
        download.outstanding.discard(block)
        if download.outstanding:
            return
        index = download.index
        del neighbour.downloads[index]
        self.requested[index] -= 1
        neighbour.in_flight -= download.length
        stripe = index % self.stripes
        if stripe in self._relay_stripes(neighbour):
            # An origin refuses a piece it already sent once per requester; a second
            # refusal means this source will not serve the stripe: fetch it elsewhere.
            if index in neighbour.relay_rejects:
                self._fail_source(stripe, "it refused a piece twice")
            neighbour.relay_rejects.add(index)
        if neighbour.has[index]:
            neighbour.has[index] = 0  # ask others first; this one again after a pause
            self.availability[index] -= 1
            asyncio.get_running_loop().call_later(
                REJECT_PAUSE, self._restore_after_reject, neighbour, index
            )
        self._refill_all()

    def _restore_after_reject(self, neighbour: Neighbour, index: int) -> None:
        if not neighbour.closed and self.missing[index]:
            self._mark_has(neighbour, [index])
            self._refill(neighbour)

    def _on_block(self, neighbour: Neighbour, block: Any) -> None:
        if not self._had_data:  # data flows: now the rest of the swarm (see MESH_DELAY)
            self._had_data = True
            if self._mesh_waiting:
                self._dial_known()
        download = neighbour.downloads.get(block.piece)
        key = (block.offset, len(block.data))
        if download is None or key not in download.outstanding:
            return  # a block we cancelled, arriving late
        if download.rejected:  # another block of this piece was refused (_on_reject)
            self._answered_after_reject(neighbour, download, key)
            return
        download.add(block.offset, block.data)
        download.outstanding.discard(key)
        if download.outstanding:
            return
        del neighbour.downloads[block.piece]
        neighbour.last_data = self.clock()
        neighbour.in_flight -= download.length
        self._pending += download.length
        self._spawn(self._complete_piece(neighbour, download))
        self._refill(neighbour)  # keep the link busy while the piece is checked and written

    async def _complete_piece(self, neighbour: Neighbour, download: _Download) -> None:
        try:
            await self._verify_and_store(neighbour, download)
        finally:
            self._pending -= download.length
        held_back, self._held_back = self._held_back, set()
        for waiting in held_back:  # room in the pipeline again
            self._refill(waiting)

    async def _verify_and_store(self, neighbour: Neighbour, download: _Download) -> None:
        index = download.index
        data = download.buffer
        assert data is not None
        ok = await self._blocking(len(data), _verify, data, self.manifest.pieces[index])
        self.requested[index] -= 1
        if not ok:
            self.stats.bad_pieces += 1
            if neighbour.peer_id not in self.banned:  # several bad pieces may be in flight
                self.stats.banned += 1
                self.banned.add(neighbour.peer_id)
            log.warning("piece %d from %s failed verification: banned", index, neighbour.address)
            self._close(neighbour, "sent a corrupt piece")
            return
        if not self.missing[index]:
            return  # an endgame duplicate that lost the race
        self.missing[index] = 0
        await self._blocking(len(data), self.pieces.store, index, data)
        self.pieces.have[index] = 1
        view = memoryview(data)
        for waiting, upload in self._parked.pop(index, ()):
            if not waiting.closed:  # relayed from memory: no reading back what was just written
                part = view[upload.offset : upload.offset + upload.length]
                waiting.outbox.put_nowait(_Upload(upload.piece, upload.offset, upload.length, part))
        length = len(data)
        self.stats.downloaded += length
        if neighbour.is_origin:
            self.stats.from_origin += length
        else:
            self.stats.from_peers += length
        self._last_progress = self.clock()
        for other in list(self.neighbours.values()):
            if self._cancel_download(other, index):
                self._refill(other)
        # Relayed stripes need no Haves (children ask ahead): batch them. In a plain
        # swarm they steer everyone's picking, so they leave at once.
        if not self._haves:
            delay = HAVE_DELAY if self.sources else 0.0
            asyncio.get_running_loop().call_later(delay, self._send_haves)
        self._haves.append(index)
        if self.pieces.complete:
            # Lagging neighbours ask complete ones for the tail: tell them at once.
            self._send_haves()
            if not self._finishing:
                await self._finish()
        elif self._in_endgame():
            self._refill_all()  # idle neighbours may now race for the last pieces
        if self.on_progress is not None:
            self.on_progress(self)
        self._progress.set()

    def _send_haves(self) -> None:
        if not self._haves:
            return  # sent early (we completed) before the batch was due
        have, self._haves = wire.Have(tuple(self._haves)), []
        for neighbour in list(self.neighbours.values()):
            neighbour.outbox.put_nowait(have)

    async def _finish(self) -> None:
        """Every piece is verified and written: publish the release (once)."""
        self._finishing = True
        if self.on_complete is not None:
            await asyncio.get_running_loop().run_in_executor(self._workers, self.on_complete)
        self.completed = True
        self.stats.completed = time.time()
        for neighbour in list(self.neighbours.values()):
            if neighbour.is_origin:
                self._close(neighbour, "complete")

    # -- requesting -------------------------------------------------------------------

    def _refill_all(self) -> None:
        for neighbour in list(self.neighbours.values()):
            self._refill(neighbour)

    def _refill(self, neighbour: Neighbour) -> None:
        """Keep enough requests in flight to this neighbour to fill the link."""
        if self.completed or neighbour.closed or self._gathering:
            return
        if self._pending >= max(PENDING_LIMIT, 2 * self.manifest.piece_size):
            # Disk or hashing is behind: received pieces wait, and no more are asked for
            # until they drain (then _complete_piece refills the neighbours held back).
            self._held_back.add(neighbour)
            return
        target = max(self.config.in_flight_bytes, 2 * self.manifest.piece_size)
        room = target - neighbour.in_flight
        if room <= 0:
            return
        count = max(1, room // self.manifest.piece_size)
        # At most MAX_INBOUND_REQUESTS unanswered requests (cancelled ones included) per
        # direction, or the protocol refuses to send the next one and the connection ends.
        blocks = -(-self.manifest.piece_size // wire.MAX_BLOCK)  # requests per piece
        slots = (neighbour.conn.request_slots - neighbour.requests_queued) // blocks
        neighbour.short_of_slots = slots < count
        count = min(count, slots)
        if count <= 0:
            return
        relay = self._relay_stripes(neighbour)
        chosen = []
        if relay:
            stripes = (self.stripes, relay)
            chosen = picker.pick_relay(self.missing, self.requested, stripes, count)
        swarm = self.swarm_stripes
        if len(chosen) < count and (swarm is None or swarm[1]):
            chosen += picker.pick_pieces(
                self.missing,
                neighbour.has,
                self.requested,
                self.availability,
                count - len(chosen),
                self.rng,
                swarm,
            )
        if not chosen and self._in_endgame():
            chosen = picker.pick_endgame(
                self.missing,
                neighbour.has,
                self.requested,
                set(neighbour.downloads),
                self.availability,
                count,
                self.rng,
                swarm,
            )
        if not chosen and self._may_help_with_the_tail(neighbour):
            in_tail = sum(1 for i in neighbour.downloads if i % self.stripes not in relay)
            chosen = picker.pick_tail(
                self.missing,
                neighbour.has,
                self.requested,
                set(neighbour.downloads),
                min(count, picker.TAIL_PER_HELPER - in_tail),
            )
        cancelled = {r.piece for r in neighbour.conn.our_cancelled_requests}
        for index in chosen:
            if index not in cancelled:  # its earlier request is still being answered
                self._request(neighbour, index)

    def _may_help_with_the_tail(self, neighbour: Neighbour) -> bool:
        """Whether to ask ``neighbour`` for pieces of relayed stripes (``picker.pick_tail``).

        Late in a deploy most hosts are complete and their uplinks idle, while a host
        whose relay source lags (its own source lagged, or it feeds slow children)
        still receives that stripe at one stream's share of its downlink. A complete
        neighbour, not a seeder, can send it the rest. Seeders are left alone: under a
        plan the origin's upload is the fleet's, and it refuses pieces it already sent.
        In a rack, only neighbours of the same rack help: the plan crosses each rack's
        uplink once per byte, and the tail must not add to that.
        """
        return (
            bool(self.sources)
            and not neighbour.is_origin
            and (
                self.config.rack is None or self.rack_of.get(neighbour.peer_id) == self.config.rack
            )
            and neighbour.has.find(0) < 0
        )

    def _cancel_download(self, neighbour: Neighbour, index: int) -> bool:
        """Withdraw our request for a piece from a neighbour, if there is one."""
        download = neighbour.downloads.pop(index, None)
        if download is None:
            return False
        self.requested[index] -= 1
        neighbour.in_flight -= download.length
        for offset, size in download.outstanding:
            neighbour.outbox.put_nowait(wire.Cancel(index, offset, size))
        return True

    # -- relaying -----------------------------------------------------------------------

    def _set_plan(self, sources: tuple[str, ...]) -> None:
        """Adopt the tracker's relay plan: stripe ``s`` (pieces ``i % k == s``) comes from
        ``sources[s]``, asked for in order and ahead of time; other neighbours serve only
        stripes whose source failed. No plan (an empty tuple): a plain swarm."""
        plan = {s: bytes.fromhex(peer) for s, peer in enumerate(sources)}
        stripes = max(1, len(sources))
        if plan == self.sources and stripes == self.stripes:
            return
        kept = {
            s
            for s in self.failed_sources
            if stripes == self.stripes and plan.get(s) == self.sources.get(s)
        }
        self.stripes, self.sources, self.failed_sources = stripes, plan, kept
        self._plan_at = self.clock()
        self._update_stripes()
        swarm = self.swarm_stripes
        for neighbour in list(self.neighbours.values()):
            relay = self._relay_stripes(neighbour)
            for index in list(neighbour.downloads):
                stripe = index % self.stripes
                if stripe not in relay and not picker.stripe_allowed(index, swarm):
                    self._cancel_download(neighbour, index)  # asked of the wrong peer now
        self._refill_all()

    def _relay_stripes(self, neighbour: Neighbour) -> frozenset[int]:
        """The stripes this neighbour relays to us (none without a plan)."""
        return self._relayed_by.get(neighbour.peer_id, frozenset())

    def _update_stripes(self) -> None:
        """Set who serves which stripes, as every Have and refill consults it; the two
        events that change it (a plan, a failed source) call this.

        ``_relayed_by``: each live relay source's stripes. ``swarm_stripes``: the
        stripes also fetched from whoever holds them: all without a plan, else only
        those whose relay source failed.

        A stripe that merely lags is left to its source. Opening every stripe to
        the swarm once one was complete (to let a lagging subtree catch up) made
        the default benchmark slower (T_last 16.4 s against 15.2 s, medians of 3
        side by side): the plan already keeps every uplink ~94 % busy, so the
        extra requests only took upload from relay children.
        """
        relayed: dict[bytes, set[int]] = {}
        for stripe, peer in self.sources.items():
            if stripe not in self.failed_sources:
                relayed.setdefault(peer, set()).add(stripe)
        self._relayed_by = {peer: frozenset(stripes) for peer, stripes in relayed.items()}
        self.swarm_stripes = (
            (self.stripes, frozenset(self.failed_sources)) if self.sources else None
        )

    def _fail_source(self, stripe: int, reason: str) -> None:
        if stripe in self.failed_sources or stripe not in self.sources:
            return
        self.failed_sources.add(stripe)
        self._update_stripes()
        log.warning(
            "relay source of stripe %d given up (%s): fetching it from the swarm", stripe, reason
        )
        source = self.neighbours.get(self.sources[stripe])
        if source is not None:
            for index in [i for i in source.downloads if i % self.stripes == stripe]:
                self._cancel_download(source, index)
        self._refill_all()

    def _check_sources(self) -> None:
        """Give up relay sources that are unreachable or have stopped sending."""
        if self.completed:
            return
        now = self.clock()
        for stripe, peer in list(self.sources.items()):
            neighbour = self.neighbours.get(peer)
            if neighbour is None:
                if peer in self.banned or now - self._plan_at > SOURCE_GRACE:
                    self._fail_source(stripe, "not connected")
                continue
            waiting = any(i % self.stripes == stripe for i in neighbour.downloads)
            _note_queued_data(neighbour, now)
            quiet = now - max(neighbour.last_data, self._plan_at)
            if waiting and quiet > SOURCE_PATIENCE:
                self._fail_source(stripe, f"no data for {quiet:.0f} s")

    async def _relay_watch_loop(self) -> None:
        while True:
            await asyncio.sleep(RELAY_CHECK_EVERY)
            self._check_sources()
            if self._mesh_waiting and not self._dial_sources_only():  # MESH_DELAY passed
                self._dial_known()

    def _request(self, neighbour: Neighbour, index: int) -> None:
        length = self.manifest.piece_length(index)
        download = _Download(index, length)
        for offset in range(0, length, wire.MAX_BLOCK):
            size = min(wire.MAX_BLOCK, length - offset)
            download.outstanding.add((offset, size))
            neighbour.outbox.put_nowait(wire.Request(index, offset, size))
            neighbour.requests_queued += 1
        neighbour.downloads[index] = download
        neighbour.in_flight += length
        self.requested[index] += 1


class _Upload(Record):
    """A block to send; ``data``: its bytes, when the piece was just received and is
    relayed at once from memory."""

    __slots__ = ("piece", "offset", "length", "data")
    uncompared = ("data",)

    def __init__(
        self, piece: int, offset: int, length: int, data: memoryview | None = None
    ) -> None:
        self.piece, self.offset, self.length, self.data = piece, offset, length, data


class Outbox(asyncio.Queue):
    """What is waiting to be sent on one connection: messages in the order queued, ahead
    of every upload, and uploads lowest piece first (a seeder under a plan sends in piece
    order, see ``Engine._upload_turn``; for everyone else the order is free)."""

    def _init(self, maxsize: int) -> None:
        self._queue = _OutboxItems()

    def _put(self, item: Any) -> None:
        self._queue.add(item)

    def _get(self) -> Any:
        return self._queue.take()

    def exchange(self, upload: _Upload) -> _Upload:
        """``upload``, or a queued upload of a lower piece, ``upload`` queued in its place."""
        return self._queue.exchange(upload)

    def uploads_waiting(self) -> bool:
        return bool(self._queue.uploads)


class _OutboxItems:
    """The container behind ``Outbox`` (what ``asyncio.Queue`` keeps as ``_queue``)."""

    def __init__(self) -> None:
        self.messages: deque[Any] = deque()
        self.uploads: list[tuple[int, int, int, _Upload]] = []  # a heap, by piece and offset
        self._arrival = itertools.count()

    def __len__(self) -> int:
        return len(self.messages) + len(self.uploads)

    def __iter__(self) -> Iterator[Any]:
        yield from self.messages
        yield from (entry[-1] for entry in sorted(self.uploads))

    def add(self, item: Any) -> None:
        if isinstance(item, _Upload):
            heapq.heappush(self.uploads, self._entry(item))
        else:
            self.messages.append(item)

    def take(self) -> Any:
        return self.messages.popleft() if self.messages else heapq.heappop(self.uploads)[-1]

    def exchange(self, upload: _Upload) -> _Upload:
        if self.uploads and self.uploads[0][:2] < (upload.piece, upload.offset):
            return heapq.heapreplace(self.uploads, self._entry(upload))[-1]
        return upload

    def _entry(self, upload: _Upload) -> tuple[int, int, int, _Upload]:
        return (upload.piece, upload.offset, next(self._arrival), upload)


class StoppedError(Exception):
    """The engine was told to stop (its controller went away) before it was complete."""


class StalledError(Exception):
    """No piece arrived for too long: no source holds what we miss, or none is reachable."""


async def _send_more(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    """Send ``data`` with MSG_MORE (Linux), so it shares a segment with what follows."""
    if _MSG_MORE:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            sent = sock.send(data, _MSG_MORE)
            data = data[sent:]
    if data:
        await loop.sock_sendall(sock, data)


def _set_low_water(neighbour: Neighbour, wanted: int) -> None:
    """Have the socket reported readable only once ``wanted`` bytes (at most
    LOW_WATER_CAP) are waiting: a shaped link delivers a few segments at a time, and
    waking for each costs more than the data. Only bytes already due (the rest of a
    block) are ever waited for, so nothing can stall on it."""
    wanted = min(wanted, LOW_WATER_CAP)
    if wanted != neighbour.low_water and _SO_RCVLOWAT is not None:
        neighbour.low_water = wanted
        with contextlib.suppress(OSError):
            neighbour.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, wanted)


def _note_queued_data(neighbour: Neighbour, now: float) -> None:
    """Count block data waiting below the socket's low-water mark as data heard.

    With the mark at a whole piece, a slow link (a WAN, or a source throttled to
    50 KB/s) delivers for seconds before the read loop wakes; the bytes in the
    socket's receive queue show it is not stalled.
    """
    if neighbour.low_water <= 1 or neighbour.closed:
        return  # nothing held back: every byte wakes the read loop
    size = bytearray(4)
    try:
        fcntl.ioctl(neighbour.sock.fileno(), termios.FIONREAD, size)
    except OSError:
        return
    queued = int.from_bytes(size, sys.byteorder)
    if queued > neighbour.queued:
        neighbour.last_heard = neighbour.last_data = now
    neighbour.queued = queued


def keep_new_connection(
    our_id: bytes, their_id: bytes, existing_dialled_by_us: bool, new_dialled_by_us: bool
) -> bool:
    """Of two connections to one peer, whether to keep the new one (and close the other).

    Both ends must choose the same connection, or each closes the one the other
    kept and neither is left (peers told of each other at once, as a relay plan
    does, dial each other at once). Dialled in opposite directions: the one
    dialled by the smaller peer id. In the same direction: the newer, since a
    peer dials again only once it has dropped the old connection.
    """
    if existing_dialled_by_us == new_dialled_by_us:
        return True
    return new_dialled_by_us == (our_id < their_id)


def _key(upload: _Upload) -> tuple[int, int, int]:
    return (upload.piece, upload.offset, upload.length)


def _verify(data: bytes, digest: bytes) -> bool:
    return hashlib.sha256(data).digest() == digest
