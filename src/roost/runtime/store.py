"""The host-side release store: staging, verified materialization, atomic activation.

Layout of a destination DEST (see ``docs/store.md``)::

    DEST/current               -> releases/<name>   (the active release; a symlink)
    DEST/releases/<name>/      one directory per installed release
    DEST/.roost/store.json     marker: this directory is a roost store
    DEST/.roost/lock           flock: one mutating roost process at a time
    DEST/.roost/staging/       incoming releases, one directory + lock file each
    DEST/.roost/meta/<name>.json   release id, install time, size
    DEST/.roost/manifests/<id>     the manifest of every installed release
    DEST/.roost/history.json   names activated, oldest first (for rollback)
    DEST/.roost/trash/         releases being deleted

Safety rests on three rules. Incoming data only ever lands in a private
staging directory, piece by verified piece, and reaches ``releases/`` by one
``rename`` once complete and checked. ``current`` only ever changes by renaming
a fully-formed symlink over it, so it always names a complete release. Every
step that can be interrupted leaves leftovers that ``recover`` (run under the
lock before every change) recognises and removes.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Callable, Protocol

from roost.runtime.errors import IntegrityError, StoreError
from roost.runtime.manifest import FileEntry, Manifest
from roost.runtime.record import Record
from roost.runtime.tree import verify_tree

STORE_FORMAT = "roost-store"
STORE_VERSION = 1
LOCK_TIMEOUT = 120.0
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

_WRITE_FLAGS = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class PieceSource(Protocol):
    def read_piece(self, index: int) -> bytes: ...


class Release(Record):
    """A release the store holds (its metadata file, ``meta/NAME.json``)."""

    __slots__ = ("name", "id", "installed_at", "files", "bytes")

    def __init__(self, name: str, id: str, installed_at: float, files: int, bytes: int) -> None:
        self.name, self.id, self.installed_at, self.files, self.bytes = (
            name, id, installed_at, files, bytes
        )  # fmt: skip

    def to_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self._fields}


def check_release_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid release name {name!r}: use 1-128 letters, digits, '.', '_', '+' or '-',"
            " starting with a letter or digit"
        )
    return name


def check_keep(keep: int) -> int:
    if keep < 1:
        raise StoreError("--keep must be at least 1")
    return keep


class Store:
    """One destination directory holding releases and the ``current`` link."""

    def __init__(self, dest: str) -> None:
        self.dest = os.path.abspath(dest)
        self.meta_dir = os.path.join(self.dest, ".roost")
        self.releases_dir = os.path.join(self.dest, "releases")
        self.current_link = os.path.join(self.dest, "current")

    def _meta(self, *parts: str) -> str:
        return os.path.join(self.meta_dir, *parts)

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, dest: str, *, create: bool = False, force: bool = False) -> Store:
        """Open the store at ``dest``; with ``create``, make one there if there is none.

        An existing directory that is not a store is only taken over with
        ``force``, which deletes what it holds.
        """
        store = cls(dest)
        marker = store._meta("store.json")
        if os.path.isfile(marker):
            store._check_marker(marker)
            return store
        if not create:
            raise StoreError(f"{store.dest} is not a roost store")
        if os.path.lexists(store.dest) and not os.path.isdir(store.dest):
            raise StoreError(f"{store.dest} exists and is not a directory")
        os.makedirs(store.dest, exist_ok=True)
        leftovers = [n for n in os.listdir(store.dest) if not store._is_init_leftover(n)]
        if leftovers and os.path.isfile(marker):
            # Another roost process made the store meanwhile (it writes the marker
            # before anything else appears), e.g. two first installs at once.
            store._check_marker(marker)
            return store
        if leftovers and not force:
            raise StoreError(
                f"{store.dest} exists, is not empty and is not a roost store; refusing to touch"
                " it (--force deletes its contents and makes it a store)"
            )
        for name in leftovers:
            _remove_path(os.path.join(store.dest, name))
        for sub in ("staging", "meta", "manifests", "trash"):
            os.makedirs(store._meta(sub), exist_ok=True)
        os.makedirs(store.releases_dir, exist_ok=True)
        _write_atomic(marker, json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}))
        return store

    def _is_init_leftover(self, name: str) -> bool:
        """An interrupted ``open(create=True)``: only roost's own, still unmarked, layout."""
        if name == "releases":
            path = self.releases_dir
            return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
        if name != ".roost" or os.path.islink(self.meta_dir) or not os.path.isdir(self.meta_dir):
            return False
        for entry in os.listdir(self.meta_dir):
            path = self._meta(entry)
            if entry.startswith("store.json."):
                continue
            if entry not in ("staging", "meta", "manifests", "trash") or os.listdir(path):
                return False
        return True

    def _check_marker(self, marker: str) -> None:
        try:
            with open(marker, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            raise StoreError(f"{self.dest}: unreadable store marker {marker}") from None
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.dest}: {marker} is not a roost store marker")
        if info.get("version") != STORE_VERSION:
            raise StoreError(
                f"{self.dest}: store version {info.get('version')!r} is not supported"
                f" (this roost uses version {STORE_VERSION})"
            )

    # -- locking and recovery ---------------------------------------------------------

    @contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the store's lock; then clean up anything an interrupted run left."""
        fd = os.open(self._meta("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while not _try_flock(fd):
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{self.dest} is locked by another roost process (waited {timeout:.0f} s)"
                    )
                time.sleep(0.05)
            self._recover()
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _recover(self) -> None:
        """Remove what interrupted runs left behind. Call only under the lock."""
        staging = self._meta("staging")
        for entry in os.listdir(staging):
            if entry.endswith(".lock"):
                _remove_dead_staging(os.path.join(staging, entry))
            elif entry.endswith(".newborn"):  # killed before its lock file got its name
                _remove_unlocked(os.path.join(staging, entry))
        trash = self._meta("trash")
        for entry in os.listdir(trash):
            _remove_path(os.path.join(trash, entry))
        for entry in os.listdir(self.dest):
            if entry.startswith(".current-") and entry.endswith(".tmp"):
                os.unlink(os.path.join(self.dest, entry))
        names = set(os.listdir(self.releases_dir))
        for entry in os.listdir(self._meta("meta")):
            if (entry.endswith(".json") and entry[: -len(".json")] not in names) or entry.endswith(
                ".tmp"
            ):
                os.unlink(self._meta("meta", entry))
        live_ids = {r.id for r in self.releases()}
        for entry in os.listdir(self._meta("manifests")):
            if entry not in live_ids:  # also the .tmp of an interrupted write
                os.unlink(self._meta("manifests", entry))
        for entry in os.listdir(self.meta_dir):
            if entry.startswith("history.json.") and entry.endswith(".tmp"):
                os.unlink(self._meta(entry))
        current = self.current_name()
        history = self._history()
        if current is not None and (not history or history[-1] != current):
            self._write_history([*history, current])

    # -- queries ----------------------------------------------------------------------

    def current_name(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StoreError(f"{self.current_link} is not a symlink") from None
            raise
        return os.path.basename(target.rstrip("/"))

    def previous_name(self) -> str | None:
        """The release that ``rollback`` would return to."""
        history = [n for n in self._history() if self._has_release(n)]
        return history[-2] if len(history) >= 2 else None

    def releases(self) -> list[Release]:
        """Installed releases, oldest first."""
        found = []
        for name in os.listdir(self.releases_dir):
            release = self._read_meta(name)
            if release is not None:
                found.append(release)
        return sorted(found, key=lambda r: (r.installed_at, r.name))

    def get(self, name: str) -> Release:
        release = self._read_meta(check_release_name(name))
        if release is None:
            raise StoreError(f"no release named {name!r} in {self.dest}")
        return release

    def find(self, release_id: str) -> Release | None:
        return next((r for r in self.releases() if r.id == release_id), None)

    def manifest_path(self, release_id: str) -> str:
        return self._meta("manifests", release_id)

    def _has_release(self, name: str) -> bool:
        return os.path.isdir(os.path.join(self.releases_dir, name)) and os.path.isfile(
            self._meta("meta", name + ".json")
        )

    def _read_meta(self, name: str) -> Release | None:
        if not os.path.isdir(os.path.join(self.releases_dir, name)):
            return None
        try:
            with open(self._meta("meta", name + ".json"), encoding="utf-8") as f:
                return Release(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    # -- changes ----------------------------------------------------------------------

    def stage(self, manifest: Manifest) -> Staging:
        """A private staging directory to fill with ``manifest``'s verified pieces.

        Needs no store lock: the staging area is held by its own lock file.
        """
        return Staging(self, manifest)

    def commit(self, staging: Staging, name: str) -> Release:
        """Move a finished staging directory into ``releases/<name>``. Call under the lock."""
        check_release_name(name)
        manifest = staging.manifest
        existing = self._read_meta(name)
        if existing is not None:
            if existing.id != manifest.id:
                raise StoreError(
                    f"release name {name!r} is already used by release {existing.id[:12]};"
                    " choose another tag"
                )
            staging.abandon()
            return existing
        if os.path.lexists(os.path.join(self.releases_dir, name)):
            _remove_path(os.path.join(self.releases_dir, name))
        _write_atomic(self.manifest_path(manifest.id), manifest.to_bytes())
        release = Release(name, manifest.id, time.time(), len(manifest.files), manifest.total_size)
        _write_atomic(self._meta("meta", name + ".json"), json.dumps(release.to_json()))
        _sync_filesystem(self.dest)
        os.rename(staging.root, os.path.join(self.releases_dir, name))
        _fsync_dir(self.releases_dir)
        staging.close()
        return release

    def activate(self, name: str) -> None:
        """Point ``current`` at release ``name`` atomically. Call under the lock."""
        self.get(name)
        self._point_current_at(name)
        history = self._history()
        if not history or history[-1] != name:
            self._write_history([*history, name])

    def rollback(self) -> str:
        """Activate the release that was active before the current one. Call under the lock."""
        history = [n for n in self._history() if self._has_release(n)]
        if len(history) < 2:
            raise StoreError(f"{self.dest} has no previous release to roll back to")
        target = history[-2]
        self._point_current_at(target)
        self._write_history(history[:-1])
        return target

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest releases, never the current or previous one."""
        check_keep(keep)
        protected = {self.current_name(), self.previous_name()}
        releases = self.releases()
        doomed = [r for r in releases[: max(0, len(releases) - keep)] if r.name not in protected]
        for release in doomed:
            trash = self._meta("trash", f"{release.name}.{os.urandom(4).hex()}")
            os.rename(os.path.join(self.releases_dir, release.name), trash)
            os.unlink(self._meta("meta", release.name + ".json"))
            _remove_path(trash)
        live_ids = {r.id for r in self.releases()}
        for release_id in os.listdir(self._meta("manifests")):
            if release_id not in live_ids:
                os.unlink(self._meta("manifests", release_id))
        return [r.name for r in doomed]

    def _point_current_at(self, name: str) -> None:
        tmp = os.path.join(self.dest, f".current-{os.urandom(6).hex()}.tmp")
        os.symlink(os.path.join("releases", name), tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.dest)

    def _history(self) -> list[str]:
        try:
            with open(self._meta("history.json"), encoding="utf-8") as f:
                history = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            raise StoreError(f"{self.dest}: unreadable activation history") from None
        if not isinstance(history, list) or not all(isinstance(n, str) for n in history):
            raise StoreError(f"{self.dest}: malformed activation history")
        return history

    def _write_history(self, history: list[str]) -> None:
        _write_atomic(self._meta("history.json"), json.dumps(history[-1000:]))


class Staging:
    """A release being assembled from verified pieces in the store's staging area.

    The directory is held by an flock on its lock file for as long as this
    object lives, so ``recover`` can tell a live staging area from the remains
    of a killed process (whose lock the kernel released).
    """

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.manifest = manifest
        token = f"{manifest.short_id}.{os.urandom(6).hex()}"
        base = store._meta("staging", token)
        self._lock_path = base + ".lock"
        # The lock file appears under its final name already locked (created under a
        # temporary name, locked, then renamed), so ``recover`` never mistakes a
        # staging area being born for a dead one.
        newborn = base + ".newborn"
        self._lock_fd: int | None = os.open(
            newborn, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.rename(newborn, self._lock_path)
        self.root = base
        self.have = bytearray(manifest.piece_count)
        self._created: set[str] = set()  # files written to at least once
        self._made = {""}  # directories created so far ("" is the root)
        # Pieces are written from two threads at once (the peer's workers): two pieces
        # of one new file must not both create it, nor two files their directory.
        self._creating = threading.Lock()
        try:
            self._prepare()
        except BaseException:
            self.abandon()
            raise

    def _prepare(self) -> None:
        """Create the root; each file and directory appears when first written into.

        Creating the tree up front delayed the first request by the time it
        took (36 ms for 4,172 files on tmpfs, 1.6 s on a cold ext4; ~10 ms for
        the directories alone), for no benefit: a file is created on its first
        write instead, already with its final permission bits.
        """
        os.mkdir(self.root, 0o755)
        os.chmod(self.root, 0o755)

    def _make_parents(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent in self._made:
            return
        self._make_parents(parent)
        os.mkdir(self._path(parent), 0o755)
        os.chmod(self._path(parent), 0o755)
        self._made.add(parent)

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    @property
    def complete(self) -> bool:
        return all(self.have)

    def write_piece(self, index: int, data: bytes | memoryview) -> None:
        """Verify piece ``index`` against the manifest, then write it into place."""
        if hashlib.sha256(data).digest() != self.manifest.pieces[index]:
            raise IntegrityError(f"piece {index} does not match its sha256 in the manifest")
        self.write_verified_piece(index, data)

    def write_verified_piece(self, index: int, data: bytes | memoryview) -> None:
        """Write a piece whose hash the caller has already checked."""
        view = memoryview(data)
        for span in self.manifest.piece_spans(index):
            fd = self._open_for_writing(span.file)
            try:
                chunk = view[: span.length]
                while chunk:
                    written = os.pwrite(fd, chunk, span.offset + span.length - len(chunk))
                    chunk = chunk[written:]
            finally:
                os.close(fd)
            view = view[span.length :]
        self.have[index] = 1

    def _open_for_writing(self, entry: FileEntry) -> int:
        """A descriptor to write into ``entry``'s file, creating the file on first use.

        A new file gets its final permission bits at once (plus the owner's write
        bit until ``finish``), so finishing touches only read-only files.
        """
        path = self._path(entry.path)
        if entry.path in self._created:
            return os.open(path, _WRITE_FLAGS)
        with self._creating:
            if entry.path in self._created:  # created by the other thread meanwhile
                return os.open(path, _WRITE_FLAGS)
            self._make_parents(entry.path)
            fd = os.open(path, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, entry.mode | stat.S_IWUSR)
            except BaseException:
                os.close(fd)
                raise
            self._created.add(entry.path)  # only once it exists with its mode
            return fd

    def finish(self) -> None:
        """Create empty files, settle modes, create symlinks and empty directories, check."""
        missing = self.have.count(0)
        if missing:
            raise IntegrityError(f"{missing} pieces of release {self.manifest.short_id} missing")
        for entry in self.manifest.files:
            if not entry.size:  # no piece covers an empty file
                os.close(self._open_for_writing(entry))
            if not entry.mode & stat.S_IWUSR:
                os.chmod(self._path(entry.path), entry.mode)
        for link in self.manifest.symlinks:
            self._make_parents(link.path)
            os.symlink(link.target, self._path(link.path))
        for directory in self.manifest.dirs:
            self._make_parents(directory.path)
            os.mkdir(self._path(directory.path))
            os.chmod(self._path(directory.path), directory.mode)
        problems = verify_tree(self.root, self.manifest, content=False)
        if problems:
            raise IntegrityError(f"staged release does not match its manifest: {problems[0]}")

    def abandon(self) -> None:
        """Throw the staging area away."""
        if self._lock_fd is not None:
            _remove_path(self.root)
            self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abandon()


class InstallResult(Record):
    __slots__ = ("release", "downloaded", "activated", "pruned")

    def __init__(
        self, release: Release, downloaded: bool, activated: bool, pruned: list[str]
    ) -> None:
        self.release, self.downloaded, self.activated, self.pruned = (
            release, downloaded, activated, pruned
        )  # fmt: skip


def install(
    store: Store,
    manifest: Manifest,
    source: PieceSource,
    *,
    name: str | None = None,
    activate: bool = False,
    keep: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InstallResult:
    """Fetch, verify and materialize a release, then optionally activate it and prune.

    A release the store already holds under ``name`` is not fetched again.
    """
    name = check_release_name(name or manifest.short_id)
    if keep is not None:
        check_keep(keep)
    with ExitStack() as cleanup:
        with store.locked():  # also clears what interrupted runs left behind
            release = store._read_meta(name)
            if release is not None and release.id != manifest.id:
                raise StoreError(
                    f"release name {name!r} is already used by release {release.id[:12]};"
                    " choose another tag"
                )
            if release is None:
                staging = cleanup.enter_context(store.stage(manifest))
        if release is None:
            fill_from(staging, source, progress)
            staging.finish()
        with store.locked():
            downloaded = release is None
            if downloaded:
                release = store.commit(staging, name)
            if activate:
                store.activate(release.name)
            pruned = store.prune(keep) if keep is not None else []
    return InstallResult(release, downloaded, activate, pruned)


def fill_from(
    staging: Staging, source: PieceSource, progress: Callable[[int, int], None] | None = None
) -> None:
    """Copy every piece from ``source`` into ``staging``, verifying each one."""
    manifest = staging.manifest
    done = 0
    for index in range(manifest.piece_count):
        staging.write_piece(index, source.read_piece(index))
        done += manifest.piece_length(index)
        if progress is not None:
            progress(done, manifest.total_size)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_dead_staging(lock_path: str) -> None:
    """Delete a staging area whose owner is gone (its lock file is no longer held)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _try_flock(fd):
            _remove_path(lock_path[: -len(".lock")])
            os.unlink(lock_path)
    finally:
        os.close(fd)


def _remove_unlocked(path: str, min_age: float = 60.0) -> None:
    """Delete a file nobody holds an flock on (and that is not being born right now)."""
    try:
        if time.time() - os.lstat(path).st_mtime < min_age:
            return
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _try_flock(fd):
            os.unlink(path)
    finally:
        os.close(fd)


def _remove_path(path: str) -> None:
    """Delete a file, symlink or tree, including read-only directories inside it."""
    if os.path.islink(path) or not os.path.isdir(path):
        with suppress(FileNotFoundError):
            os.unlink(path)
        return

    def make_writable_and_retry(func: Callable, failed: str, _exc: object) -> None:
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    import shutil  # here: it imports the compression modules, 3 ms of every host's start

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _write_atomic(path: str, data: str | bytes) -> None:
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(path: str) -> None:
    """Flush the data of the filesystem holding ``path`` before a release is published."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs = _syncfs()
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """libc's syncfs (only this filesystem, not every disk), looked up on first use.

    The process's own symbols (``CDLL(None)``) include the C library already
    loaded, so there is no ``find_library``, which runs ``ldconfig`` in a
    subprocess and used to cost every peer's start-up tens of milliseconds.
    """
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
