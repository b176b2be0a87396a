"""Joining a swarm from one host: fetch a release into a store, or seed one from a tree.

The glue between the peer engine and the store: a fetch downloads into a
staging area, and once every piece is verified the release is checked,
published and (optionally) activated — then the host keeps serving it to the
others for the linger window.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from typing import BinaryIO

from roost.runtime.errors import RoostError
from roost.runtime.manifest import Manifest
from roost.runtime.peer import Engine, EngineConfig, Pieces, StalledError, Stats, StoppedError
from roost.runtime.store import Release, Store, check_keep, check_release_name

SECRET_BYTES = 32
# SIGTERM and Ctrl-C stop the engine the way the controller going away does: it closes
# its connections and tells the tracker it stopped, and the command ends as interrupted.
# (Raised at an arbitrary point instead, KeyboardInterrupt left coroutines half-run, and
# asyncio printed their tracebacks.)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def read_secret(path: str | None) -> bytes:
    """The swarm secret, from a file (hex text) or ``ROOST_SECRET``; never from argv."""
    text = None
    source = path or os.environ.get("ROOST_SECRET_FILE")
    if source:
        try:
            with open(source, encoding="ascii") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise RoostError(f"cannot read the swarm secret from {source}: {exc}") from None
    elif os.environ.get("ROOST_SECRET"):
        text = os.environ["ROOST_SECRET"]
    if text is None:
        raise RoostError("no swarm secret: pass --secret-file FILE or set ROOST_SECRET_FILE")
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise RoostError("the swarm secret must be hex text") from None
    if len(secret) < 16:
        raise RoostError("the swarm secret is too short (at least 16 bytes of hex)")
    return secret


def read_bootstrap(stream: BinaryIO) -> tuple[bytes, bytes]:
    """(secret, manifest bytes) as ``roost deploy`` sends them on a peer's stdin:
    one JSON line ``{"secret": hex, "manifest_bytes": n}``, then the manifest."""
    try:
        header = json.loads(stream.readline(4096))
        secret = bytes.fromhex(header["secret"])
        size = int(header["manifest_bytes"])
    except (ValueError, KeyError, TypeError):
        raise RoostError("malformed bootstrap on stdin") from None
    data = stream.read(size)
    if len(data) != size:
        raise RoostError("stdin closed before the manifest was complete")
    return secret, data


def write_secret(path: str) -> bytes:
    """Create a fresh random swarm secret in a file only its owner can read."""
    secret = os.urandom(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return secret


class EventLog:
    """Newline-delimited JSON events on stdout, for a controller that watches this host."""

    def __init__(self, enabled: bool, interval: float = 0.2) -> None:
        self.enabled = enabled
        self.interval = interval
        self._last = 0.0
        self._reported_complete = False

    def emit(self, event: str, **fields: object) -> None:
        if not self.enabled:
            return
        sys.stdout.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        sys.stdout.flush()

    def progress(self, engine: Engine) -> None:
        now = time.monotonic()
        have = engine.manifest.piece_count - engine.missing.count(1)
        if now - self._last < self.interval and have < engine.manifest.piece_count:
            return
        self._last = now
        self.emit(
            "progress", have=have, pieces=engine.manifest.piece_count, **_counts(engine.stats)
        )
        if engine.completed and not self._reported_complete:
            self._reported_complete = True
            self.emit("complete", already_installed=False, **_counts(engine.stats))


def _counts(stats: Stats) -> dict[str, int]:
    return {
        "downloaded": stats.downloaded,
        "from_origin": stats.from_origin,
        "from_peers": stats.from_peers,
        "uploaded": stats.uploaded,
        "bad_pieces": stats.bad_pieces,
    }


def fetch(
    manifest: Manifest,
    store: Store,
    config: EngineConfig,
    *,
    name: str | None = None,
    activate: bool = False,
    keep: int | None = None,
    events: EventLog | None = None,
    stop_on_eof: BinaryIO | None = None,
    serve_as_seeder: bool = False,
) -> tuple[Release, Stats]:
    """Download ``manifest``'s release from the swarm into ``store``; serve it for a while.

    With ``stop_on_eof``, the end of that stream (the controller closed our
    stdin, or its SSH connection died) stops the peer: an unfinished download
    is abandoned, a finished one stops lingering. With ``serve_as_seeder``, a
    host that holds the release becomes an origin for the others (announced
    as a seeder, sparing its upload like one) and serves until stopped.
    """
    events = events or EventLog(False)
    name = check_release_name(name or manifest.short_id)
    if keep is not None:
        check_keep(keep)
    with store.locked():  # also clears what interrupted runs left behind
        existing = store.find(manifest.id)
    if existing is not None and existing.name == name:
        pieces = Pieces(os.path.join(store.releases_dir, name), manifest, complete=True)
        config.seeder = serve_as_seeder
        with store.locked():
            _activate_and_prune(store, name, activate, keep)
        events.emit("complete", already_installed=True, **_counts(Stats()))
        stats = _run(Engine(manifest, pieces, config), events, stop_on_eof)
        return existing, stats
    staging = store.stage(manifest)
    published: list[Release] = []

    def publish() -> None:
        staging.finish()
        with store.locked():
            release = store.commit(staging, name)
            _activate_and_prune(store, name, activate, keep)
        published.append(release)
        config.seeder = serve_as_seeder

    pieces = Pieces(staging.root, manifest, complete=False, write=staging.write_verified_piece)
    engine = Engine(manifest, pieces, config, on_complete=publish, on_progress=events.progress)
    try:
        stats = _run(engine, events, stop_on_eof)
    finally:
        if not published:
            staging.abandon()
    return published[0], stats


def seed(manifest: Manifest, root: str, config: EngineConfig) -> Stats:
    """Serve a release straight from its source tree until interrupted."""
    if not os.path.isdir(root):
        raise RoostError(f"{root} is not a directory")
    config.seeder = True
    pieces = Pieces(root, manifest, complete=True)
    return _run(Engine(manifest, pieces, config), EventLog(False))


def _activate_and_prune(store: Store, name: str, activate: bool, keep: int | None) -> None:
    if activate:
        store.activate(name)
    if keep is not None:
        store.prune(keep)


def _run(engine: Engine, events: EventLog, stop_on_eof: BinaryIO | None = None) -> Stats:
    signalled: list[int] = []
    on_main_thread = threading.current_thread() is threading.main_thread()  # signals: only there

    async def main() -> Stats:
        loop = asyncio.get_running_loop()
        if stop_on_eof is not None:

            def watch() -> None:
                while stop_on_eof.read(65536):
                    pass
                loop.call_soon_threadsafe(engine.stop)

            threading.Thread(target=watch, name="roost-stdin", daemon=True).start()
        if on_main_thread:
            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, _stop_on_signal, engine, signalled, signum)
        return await engine.run()

    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        stats = asyncio.run(main())
    except StalledError as exc:
        events.emit("error", message=str(exc))
        raise RoostError(f"download stalled: {exc}") from None
    except StoppedError as exc:
        events.emit("error", message="interrupted" if signalled else str(exc))
        if signalled:
            raise KeyboardInterrupt from None
        raise RoostError(f"{exc}: the controller went away") from None
    finally:
        if on_main_thread:
            for signum, handler in handlers.items():  # the loop left them at their defaults
                signal.signal(signum, handler)
    events.emit("done", **_counts(stats))
    if signalled:
        raise KeyboardInterrupt
    return stats


def _stop_on_signal(engine: Engine, signalled: list[int], signum: int) -> None:
    if signalled:  # a second signal while shutting down: stop at once
        raise KeyboardInterrupt
    signalled.append(signum)
    engine.stop()
