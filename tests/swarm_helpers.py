"""Helpers for end-to-end swarm tests: releases, a tracker, a seeder and peers as real processes.

Everything listens on 127.0.0.1. Every child process is registered with a
``Swarm`` whose ``close`` (called by the test fixture's finalizer) SIGKILLs
whatever is still running, so a failing test never leaves processes behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from roost.runtime import announce
from roost.runtime import protocol as wire
from roost.runtime.manifest import Manifest
from roost.runtime.pack import pack
from roost.runtime.peer import Engine, EngineConfig, Pieces, Stats
from roost.runtime.store import Store
from roost.runtime.swarm import write_secret

SRC = Path(__file__).resolve().parents[1] / "src"
MiB = 1 << 20
WAIT = 120.0  # generous bound on any single wait: only there so a broken swarm cannot hang


# Child processes get a HOME of their own: each records its pid under ~/.cache/roost/run,
# and those the tests kill on purpose would leave their records in the real one.
CHILD_HOME = tempfile.mkdtemp(prefix="roost-tests-home-")
atexit.register(shutil.rmtree, CHILD_HOME, True)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1", "HOME": CHILD_HOME}


def free_port() -> int:
    """A port that was free a moment ago (the kernel does not hand it out again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


# -- releases -------------------------------------------------------------------------------


def make_release(
    root: Path,
    *,
    big: list[int],
    small: int,
    small_max: int = 48 * 1024,
    seed: int = 0,
) -> Path:
    """A random release: ``big`` files of the given sizes and ``small`` small files in subdirs,
    plus an executable, a symlink, a symlink to a directory and an empty directory."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i, size in enumerate(big):
        (root / "blobs").mkdir(exist_ok=True)
        (root / "blobs" / f"blob-{i}.bin").write_bytes(rng.randbytes(size))
    for i in range(small):
        sub = root / "lib" / f"pkg{i % 7}" / f"mod{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.py").write_bytes(rng.randbytes(rng.randrange(0, small_max)))
    tool = root / "bin" / "tool"
    tool.parent.mkdir(exist_ok=True)
    tool.write_bytes(b"#!/bin/sh\necho roost\n" + rng.randbytes(1000))
    tool.chmod(0o755)
    (root / "bin" / "tool-link").symlink_to("tool")
    (root / "libdir").symlink_to("lib/pkg0")
    (root / "var" / "empty").mkdir(parents=True)
    (root / "zero-length").write_bytes(b"")
    return root


def corrupt_copy(src: Path, dst: Path) -> None:
    """The same tree shape and sizes as ``src``, every regular file's bytes replaced."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            target = dst / rel / name
            if path.is_symlink():
                target.symlink_to(os.readlink(path))
            elif path.is_file():
                size = path.stat().st_size
                target.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()) if size else b"")
                target.chmod(path.stat().st_mode & 0o777)


def staged_pieces(store: Store, manifest: Manifest) -> Pieces:
    """Pieces for an engine to fetch into: a fresh staging area of ``store``."""
    staging = store.stage(manifest)
    return Pieces(staging.root, manifest, complete=False, write=staging.write_verified_piece)


def complete_engine(src: Path, manifest: Manifest, secret: bytes, **options: Any) -> Engine:
    """An engine serving the whole tree at ``src`` (a seeder with ``seeder=True``)."""
    config = EngineConfig(secret=secret, linger=600.0, **options)
    return Engine(manifest, Pieces(str(src), manifest, complete=True), config)


def one_stripe_tracker(
    racks: dict[Engine, str | None], origin: Engine, source: Engine
) -> web.Application:
    """A stand-in tracker: every announce is answered with the engines of ``racks`` (in
    their racks) as neighbours, ``origin`` the seeder, and a one-stripe plan whose source
    is ``source``."""

    async def answer(_: web.Request) -> web.Response:
        listed = tuple(
            announce.Neighbour(e.config.peer_id.hex(), "127.0.0.1", e.port, e is origin, 0, r)
            for e, r in racks.items()
        )
        response = announce.AnnounceResponse(
            peers=listed,
            interval=60,
            swarm_complete=False,
            stats={},
            sources=(source.config.peer_id.hex(),),
            stripes=1,
        )
        return web.Response(body=response.to_bytes(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/announce", answer)
    return app


async def cancel_all(*tasks: asyncio.Future) -> None:
    """Cancel engines' runs (or any tasks) and wait until they have wound down."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def lying_pieces(src: Path, dst: Path, manifest: Manifest) -> Pieces:
    """A seeder's view of a corrupt copy of ``src`` (made at ``dst``) that serves every
    piece without checking it against the manifest: a peer that lies."""
    corrupt_copy(src, dst)
    pieces = Pieces(str(dst), manifest, complete=True)
    assert pieces.checked is not None
    pieces.checked[:] = b"\x01" * manifest.piece_count  # serve without checking
    return pieces


# -- processes ------------------------------------------------------------------------------


class Child:
    """A child process whose stdout may carry JSON events (read on a thread)."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = WAIT) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit:\n{self.stderr()}") from None
        self._reader.join(timeout=10)
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    @property
    def completed(self) -> bool:
        return bool(self.named("complete"))

    @property
    def have(self) -> int:
        progress = self.named("progress")
        return progress[-1]["have"] if progress else 0


class Peer(Child):
    """``python -m roost.runtime fetch ... --events`` into its own DEST."""

    def __init__(self, name: str, command: list[str], log_path: Path, dest: Path) -> None:
        super().__init__(name, command, log_path)
        self.dest = dest

    def done(self) -> dict[str, Any]:
        (event,) = self.named("done")
        return event


class TrackerProcess:
    """The tracker service in a child process on a fixed port, with its state in SQLite."""

    def __init__(self, workdir: Path, port: int | None = None, *, relay: bool = True) -> None:
        self.workdir = workdir
        self.relay = relay  # False: no relay plan, a plain swarm
        self.port = port or free_port()
        self.db = workdir / "tracker.sqlite"
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: Child | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.child is None or not self.child.running()
        code = (
            "import sys\n"
            "from roost.tracker.service import TrackerConfig, run_tracker\n"
            "config = TrackerConfig() if sys.argv[4] == 'relay' else TrackerConfig(relay=None)\n"
            "run_tracker('127.0.0.1', int(sys.argv[1]), sys.argv[2], admin_token=sys.argv[3],"
            " config=config, say=lambda s: print(s, flush=True))\n"
        )
        self.starts += 1
        if self.child is not None:
            self.child.close()
        self.child = Child(
            "tracker",
            [
                sys.executable,
                "-c",
                code,
                str(self.port),
                str(self.db),
                self.token,
                "relay" if self.relay else "swarm",
            ],
            self.workdir / f"tracker-{self.starts}.log",
        )
        wait_until(self.up, "the tracker to answer")

    def up(self) -> bool:
        if self.child is None:
            return False
        if not self.child.running():
            raise AssertionError(f"the tracker exited:\n{self.child.stderr()}")
        try:
            announce.fetch_status(self.url, timeout=2.0)
        except announce.TrackerError:
            return False
        return True

    def stop(self, sig: int = signal.SIGKILL) -> None:
        assert self.child is not None
        self.child.kill(sig)
        self.child.wait()

    def status(self, swarm: str) -> dict[str, Any]:
        return announce.fetch_status(self.url, swarm, timeout=5.0)

    def close(self) -> None:
        if self.child is not None:
            self.child.close()


class EngineThread:
    """An in-process ``Engine`` running on its own event loop in a thread (for odd peers)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.stats: Stats | None = None
        self.error: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._started.wait(WAIT)
        wait_until(lambda: engine.port != 0 or not self._thread.is_alive(), "the engine to listen")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.engine.run())
        self._started.set()
        try:
            self.stats = self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            self.stats = self.engine.stats
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.engine.port}"

    def stop(self) -> Stats:
        if self._thread.is_alive() and self._task is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the in-process engine did not stop"
        if self.error is not None:
            raise self.error
        return self.engine.stats


class CountingProxy:
    """A TCP relay in front of ``target`` that counts the connections made through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.connections += 1
                self._sockets.append(downstream)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._sockets.append(upstream)
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


class WireClient:
    """A bare peer speaking the wire protocol (sans-I/O ``PeerConnection``) to poke one engine.

    ``pause`` seconds pass before each handshake message, so the engine has to wait on
    its socket for them.
    """

    def __init__(self, manifest: Manifest, secret: bytes, *, pause: float = 0.0) -> None:
        self.conn = wire.PeerConnection.for_manifest(
            manifest, role=wire.Role.INITIATOR, peer_id=os.urandom(16), secret=secret
        )
        self.pause = pause
        self.piece_count = manifest.piece_count
        self.sock = socket.socket()  # made now: its fd number is taken before connect()
        self.sock.setblocking(False)

    async def connect(self, port: int) -> list[Any]:
        """Connect and authenticate; the events that came right behind the handshake."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", port))
        await asyncio.sleep(self.pause)
        await loop.sock_sendall(self.sock, self.conn.initiate())
        events: list[Any] = []
        sent_bitfield = False
        while not (self.conn.authenticated and events):
            if self.conn.authenticated and not sent_bitfield:
                await self.send(wire.Bitfield.from_pieces([], self.piece_count))  # holds nothing
                sent_bitfield = True
            event = await self.next_event()
            if isinstance(event, wire.Hello):
                await asyncio.sleep(self.pause)
                await loop.sock_sendall(self.sock, self.conn.send_auth())
            elif isinstance(event, wire.ConnectionClosed):
                raise AssertionError("the peer closed the connection during the handshake")
            elif not isinstance(event, wire.Auth):
                events.append(event)
        return events

    async def send(self, message: Any) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, self.conn.send(message))

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 20)
            self.conn.receive_data(data)

    def close(self) -> None:
        self.sock.close()


class Swarm:
    """One release, its secret and manifest, a tracker, a seeder and any number of peers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        self.tracker: TrackerProcess | None = None
        self.seeder: Child | None = None
        self.seeder_port = 0
        self.threads: list[EngineThread] = []
        self.manifest: Manifest | None = None
        self.src: Path | None = None
        self.manifest_path = workdir / "release.manifest"
        self.secret_path = workdir / "swarm.secret"
        self.secret = b""
        self._peers = 0

    # setup

    def release(self, src: Path, piece_size: int | None = None) -> Manifest:
        self.src = src
        self.manifest = pack(str(src), piece_size=piece_size)
        self.manifest_path.write_bytes(self.manifest.to_bytes())
        self.secret = write_secret(str(self.secret_path))
        return self.manifest

    def start_tracker(
        self, expected_peers: int | None = None, *, relay: bool = True
    ) -> TrackerProcess:
        assert self.manifest is not None
        self.tracker = TrackerProcess(self.workdir, relay=relay)
        self.tracker.start()
        key = announce.tracker_key(self.secret, self.manifest.id)
        announce.register_swarm(
            self.tracker.url,
            self.tracker.token,
            self.manifest.id,
            key,
            expected_peers=expected_peers,
        )
        return self.tracker

    def start_seeder(self, *extra: str, tracker: bool = True, port: int | None = None) -> Child:
        assert self.src is not None
        self.seeder_port = port or free_port()
        command = [
            sys.executable,
            "-m",
            "roost.runtime",
            "seed",
            str(self.manifest_path),
            str(self.src),
            "--secret-file",
            str(self.secret_path),
            "--listen",
            f"127.0.0.1:{self.seeder_port}",
            *(["--tracker", self.tracker.url] if tracker and self.tracker else []),
            *extra,
        ]
        self.seeder = self._add(Child("seeder", command, self.workdir / "seeder.log"))
        if tracker and self.tracker:
            wait_until(self._seeder_announced, "the seeder to announce itself")
        else:
            wait_until(self._seeder_listening, "the seeder to listen")
        return self.seeder

    def _seeder_announced(self) -> bool:
        assert self.tracker is not None and self.manifest is not None and self.seeder is not None
        if not self.seeder.running():
            raise AssertionError(f"the seeder exited:\n{self.seeder.stderr()}")
        return any(p["seeder"] for p in self.tracker.status(self.manifest.id)["peers"])

    def _seeder_listening(self) -> bool:
        assert self.seeder is not None
        if not self.seeder.running():
            raise AssertionError(f"the seeder exited:\n{self.seeder.stderr()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.seeder_port)) == 0

    def fetch(
        self,
        *extra: str,
        name: str | None = None,
        linger: float = 1.0,
        stall_timeout: float = 60.0,
        tracker: bool = True,
        secret_path: Path | None = None,
    ) -> Peer:
        """Start one ``fetch --activate --events`` peer process."""
        self._peers += 1
        name = name or f"host-{self._peers}"
        dest = self.workdir / "hosts" / name
        command = [
            sys.executable,
            "-m",
            "roost.runtime",
            "fetch",
            str(self.manifest_path),
            "--dest",
            str(dest),
            "--secret-file",
            str(secret_path or self.secret_path),
            "--activate",
            "--events",
            "--linger",
            str(linger),
            "--stall-timeout",
            str(stall_timeout),
            *(["--tracker", self.tracker.url] if tracker and self.tracker else []),
            *extra,
        ]
        return self._add(Peer(name, command, self.workdir / f"{name}.log", dest))

    def start_engine(self, pieces: Pieces, config: EngineConfig, **kwargs: Any) -> EngineThread:
        """An in-process engine in this swarm (see ``EngineThread``)."""
        assert self.manifest is not None
        thread = EngineThread(Engine(self.manifest, pieces, config, **kwargs))
        self.threads.append(thread)
        return thread

    def _add(self, child: Any) -> Any:
        self.children.append(child)
        return child

    # checks

    def finish(self, peer: Peer, timeout: float = WAIT) -> dict[str, Any]:
        """Wait for a peer to exit successfully; its final ``done`` event."""
        code = peer.wait(timeout)
        assert code == 0, f"{peer.name} exited with {code}:\n{peer.stderr()}"
        assert peer.completed, f"{peer.name} exited without completing:\n{peer.stderr()}"
        return peer.done()

    def close(self) -> None:
        for thread in self.threads:
            with contextlib.suppress(BaseException):
                thread.stop()
        for child in self.children:
            child.close()
        if self.tracker is not None:
            self.tracker.close()
