"""The tracker's state: swarms, keys, peers and completions, in one SQLite file.

Reads are served from an in-memory mirror loaded at start; every change is
written through to SQLite before the announce is answered. The mirror exists
because each announce looks at the whole swarm (the hand-out ranks all live
peers): re-reading 1,000 rows per announce would cost milliseconds, a dict
costs microseconds.

The database calls stay synchronous, on the event loop's thread: each one is a
single-row write on a local file in WAL mode with ``synchronous=NORMAL`` (no
fsync per commit), tens of microseconds, less than handing it to a thread would
cost, and it keeps one owner for both the mirror and the connection. A power
loss may forget the last announces; peers re-announce within one interval.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from dataclasses import dataclass, field

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS swarms (
    id TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    expected_peers INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    swarm TEXT NOT NULL REFERENCES swarms(id) ON DELETE CASCADE,
    peer TEXT NOT NULL,
    addr TEXT NOT NULL,
    port INTEGER NOT NULL,
    rack TEXT,
    seeder INTEGER NOT NULL,
    have INTEGER NOT NULL,
    pieces INTEGER NOT NULL,
    uploaded INTEGER NOT NULL,
    downloaded INTEGER NOT NULL,
    downloaded_from_origin INTEGER,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    expires_at REAL NOT NULL,
    announced_at REAL NOT NULL,
    PRIMARY KEY (swarm, peer)
);
CREATE TABLE IF NOT EXISTS completions (
    swarm TEXT NOT NULL REFERENCES swarms(id) ON DELETE CASCADE,
    peer TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (swarm, peer)
);
"""

PEER_COLUMNS = (
    "peer",
    "addr",
    "port",
    "rack",
    "seeder",
    "have",
    "pieces",
    "uploaded",
    "downloaded",
    "downloaded_from_origin",
    "first_seen",
    "last_seen",
    "expires_at",
    "announced_at",
)


class StateError(Exception):
    """A database the tracker cannot use (newer schema, not a tracker database)."""


class KeyConflict(Exception):
    """A swarm registered again with a different key."""


@dataclass(frozen=True)
class PeerRecord:
    """One peer of one swarm, as last announced. ``announced_at`` is the peer's clock."""

    peer: str
    addr: str
    port: int
    rack: str | None
    seeder: bool
    have: int
    pieces: int
    uploaded: int
    downloaded: int
    downloaded_from_origin: int | None
    first_seen: float
    last_seen: float
    expires_at: float
    announced_at: float

    def replace(self, **changes: object) -> PeerRecord:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class SwarmRecord:
    """A registered swarm with its peers. ``tombstones`` (memory only) block stale replays."""

    swarm: str
    key: bytes
    expected_peers: int | None
    created_at: float
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    completions: dict[str, float] = field(default_factory=dict)
    tombstones: dict[str, float] = field(default_factory=dict)

    def live_peers(self, now: float) -> list[PeerRecord]:
        return [p for p in self.peers.values() if now < p.expires_at]


class TrackerStore:
    """Swarms and peers, served from memory and written through to SQLite."""

    def __init__(self, conn: sqlite3.Connection, swarms: dict[str, SwarmRecord]) -> None:
        self._conn = conn
        self._swarms = swarms

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TrackerStore:
        """Open (or create) the database and load every swarm into memory."""
        conn = sqlite3.connect(os.fspath(path), isolation_level=None)
        try:
            _prepare(conn)
            return cls(conn, _load(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StateError(f"{os.fspath(path)}: not a usable tracker database ({exc})") from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    # -- reads (memory) --

    def swarm(self, swarm: str) -> SwarmRecord | None:
        return self._swarms.get(swarm)

    def swarms(self) -> list[SwarmRecord]:
        return [self._swarms[k] for k in sorted(self._swarms)]

    # -- writes (memory + SQLite) --

    def register(self, swarm: str, key: bytes, expected_peers: int | None, now: float) -> bool:
        """Add a swarm; True if new. Same key again updates ``expected_peers``."""
        known = self._swarms.get(swarm)
        if known is not None and known.key != key:
            raise KeyConflict(swarm)
        if known is not None:
            self._conn.execute(
                "UPDATE swarms SET expected_peers = ? WHERE id = ?", (expected_peers, swarm)
            )
            known.expected_peers = expected_peers
            return False
        self._conn.execute(
            "INSERT INTO swarms (id, key, expected_peers, created_at) VALUES (?, ?, ?, ?)",
            (swarm, key, expected_peers, now),
        )
        self._swarms[swarm] = SwarmRecord(swarm, key, expected_peers, now)
        return True

    def forget(self, swarm: str) -> bool:
        """Drop a swarm with its peers and completions; True if it existed."""
        if self._swarms.pop(swarm, None) is None:
            return False
        self._conn.execute("DELETE FROM swarms WHERE id = ?", (swarm,))
        return True

    def put_peer(self, swarm: SwarmRecord, record: PeerRecord) -> None:
        names = ", ".join(PEER_COLUMNS)
        marks = ", ".join("?" * (len(PEER_COLUMNS) + 1))
        values = [getattr(record, c) for c in PEER_COLUMNS]
        self._conn.execute(
            f"INSERT OR REPLACE INTO peers (swarm, {names}) VALUES ({marks})",
            [swarm.swarm, *values],
        )
        swarm.peers[record.peer] = record
        swarm.tombstones.pop(record.peer, None)

    def remove_peer(self, swarm: SwarmRecord, peer: str, announced_at: float) -> None:
        """Forget a peer that said "stopped"; remember its time so replays cannot revive it."""
        self._conn.execute("DELETE FROM peers WHERE swarm = ? AND peer = ?", (swarm.swarm, peer))
        swarm.peers.pop(peer, None)
        swarm.tombstones[peer] = announced_at

    def record_completion(self, swarm: SwarmRecord, peer: str, at: float) -> None:
        if peer in swarm.completions:
            return
        self._conn.execute(
            "INSERT OR IGNORE INTO completions (swarm, peer, at) VALUES (?, ?, ?)",
            (swarm.swarm, peer, at),
        )
        swarm.completions[peer] = at

    def sweep(self, now: float, tombstone_before: float) -> int:
        """Delete peers whose timeout has passed and old tombstones; returns peers removed."""
        removed = 0
        for swarm in self._swarms.values():
            dead = [p for p, rec in swarm.peers.items() if rec.expires_at <= now]
            for peer in dead:
                del swarm.peers[peer]
            removed += len(dead)
            for peer in [p for p, t in swarm.tombstones.items() if t < tombstone_before]:
                del swarm.tombstones[peer]
        if removed:
            self._conn.execute("DELETE FROM peers WHERE expires_at <= ?", (now,))
        return removed


def _prepare(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StateError(f"database schema {version} is newer than this tracker ({SCHEMA_VERSION})")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def _load(conn: sqlite3.Connection) -> dict[str, SwarmRecord]:
    swarms = {
        row[0]: SwarmRecord(row[0], bytes(row[1]), row[2], row[3])
        for row in conn.execute("SELECT id, key, expected_peers, created_at FROM swarms")
    }
    names = ", ".join(PEER_COLUMNS)
    for swarm, *values in conn.execute(f"SELECT swarm, {names} FROM peers"):
        record = PeerRecord(**dict(zip(PEER_COLUMNS, values)))
        swarms[swarm].peers[record.peer] = record.replace(seeder=bool(record.seeder))
    for swarm, peer, at in conn.execute("SELECT swarm, peer, at FROM completions"):
        swarms[swarm].completions[peer] = at
    return swarms
