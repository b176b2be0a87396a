"""Build a manifest from a directory tree (or one file).

Packing is bounded by sha256, not by Python. Every byte is hashed twice, for
its file and for its piece; the two hashes run on two threads at once (hashlib
releases the GIL on updates of 2 KiB or more) while the main thread reads ahead,
so reading costs no hashing time (see ``_Stream``). Contents flow through a
small ring of reusable buffers: memory is bounded by the manifest, never by
file sizes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import mmap
import operator
import os
import queue
import re
import stat
import threading
from collections.abc import Sequence
from typing import Callable, Optional

from roost.runtime.errors import ManifestError, RoostError
from roost.runtime.manifest import (
    DirEntry,
    FileEntry,
    Manifest,
    SymlinkEntry,
    auto_piece_size,
    check_piece_size,
    symlink_escape,
)

DEFAULT_EXCLUDES = (".git",)
# The ring of buffers (SLOTS * SLOT_SIZE bytes in all): one being read, the others
# queued for the two hash threads. Buffers of 1 to 8 MiB measured the same: hand-overs
# between threads cost nothing next to hashing 4 MiB, and 16 MiB in all stays small.
SLOT_SIZE = 4 * 1024 * 1024
SLOTS = 4

Progress = Callable[[int, int], None]  # (bytes read for hashing so far, total bytes)
Excluded = Optional[Callable[[str], object]]  # a compiled regex's match, or None
_entry_name = operator.attrgetter("name")


class _Scan:
    def __init__(self) -> None:
        self.files: list[tuple[str, str, int, int]] = []  # rel, abs, size, mode
        self.symlinks: list[SymlinkEntry] = []
        self.dirs: list[DirEntry] = []


def pack(
    src: str,
    *,
    piece_size: int | None = None,
    excludes: Sequence[str] = (),
    default_excludes: bool = True,
    allow_external_symlinks: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Describe the tree at ``src`` as a manifest, hashing every byte."""
    scan = _scan(
        src, _exclude_matcher([*(DEFAULT_EXCLUDES if default_excludes else ()), *excludes])
    )
    targets = {link.path: link.target for link in scan.symlinks}
    if not allow_external_symlinks:
        for link in scan.symlinks:
            reason = symlink_escape(link.path, targets)
            if reason:
                raise ManifestError(
                    f"symlink {link.path!r} -> {link.target!r} points outside the tree ({reason});"
                    " pass --allow-external-symlinks if that is intended"
                )
    scan.files.sort()
    total = sum(size for _, _, size, _ in scan.files)
    size = check_piece_size(piece_size) if piece_size is not None else auto_piece_size(total)
    files, pieces = _hash_files(scan.files, size, total, progress)
    return Manifest(
        piece_size=size,
        files=files,
        symlinks=scan.symlinks,
        dirs=scan.dirs,
        pieces=pieces,
        external_symlinks=allow_external_symlinks,
    )


def _exclude_matcher(globs: list[str]) -> Excluded:
    """One compiled regex for all globs: the same answers as fnmatchcase, one call per name."""
    if not globs:
        return None
    return re.compile("|".join(fnmatch.translate(glob) for glob in globs)).match


def _scan(src: str, excludes: Excluded) -> _Scan:
    try:
        st = os.stat(src)
    except OSError as exc:
        raise RoostError(f"cannot read {src}: {exc.strerror}") from None
    scan = _Scan()
    if stat.S_ISREG(st.st_mode):
        name = _utf8_name(os.path.basename(os.path.abspath(src)), src)
        scan.files.append((name, src, st.st_size, stat.S_IMODE(st.st_mode) & 0o777))
    elif stat.S_ISDIR(st.st_mode):
        _scan_dir(src, "", excludes, scan)
    else:
        raise RoostError(f"{src} is neither a directory nor a regular file")
    return scan


def _scan_dir(directory: str, prefix: str, excluded: Excluded, scan: _Scan) -> bool:
    """Add the entries below ``directory`` to ``scan``; return whether any were added."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=_entry_name)
    except OSError as exc:
        raise RoostError(f"cannot list {directory}: {exc.strerror}") from None
    added = False
    for entry in entries:
        name = entry.name
        rel = prefix + _utf8_name(name, entry.path)
        if excluded is not None and (excluded(name) or excluded(rel)):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                scan.files.append((rel, entry.path, st.st_size, st.st_mode & 0o777))
            elif kind == stat.S_IFLNK:
                target = _utf8_name(os.readlink(entry.path), entry.path)
                scan.symlinks.append(SymlinkEntry(rel, target))
            elif kind == stat.S_IFDIR:
                if not _scan_dir(entry.path, rel + "/", excluded, scan):
                    scan.dirs.append(DirEntry(rel, st.st_mode & 0o777))
            else:
                raise RoostError(
                    f"{entry.path} is a special file (socket, fifo or device); exclude it"
                )
        except OSError as exc:
            raise RoostError(f"cannot read {entry.path}: {exc.strerror}") from None
        added = True
    return added


def _utf8_name(name: str, where: str) -> str:
    """Names must be valid UTF-8 so the manifest reads the same on every host."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise RoostError(f"{where!r}: file name is not valid UTF-8") from None
    return name


class _PieceHasher:
    """Cuts the concatenated file stream into pieces and hashes each one."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self.digests: list[bytes] = []
        self._hash = hashlib.sha256()
        self._filled = 0

    def update(self, data: memoryview) -> None:
        while data:
            take = data[: self.piece_size - self._filled]
            self._hash.update(take)
            self._filled += len(take)
            data = data[len(take) :]
            if self._filled == self.piece_size:
                self.digests.append(self._hash.digest())
                self._hash = hashlib.sha256()
                self._filled = 0

    def finish(self) -> list[bytes]:
        if self._filled:
            self.digests.append(self._hash.digest())
            self._filled = 0
        return self.digests


class _SizeChanged(Exception):
    pass


# A job for the file thread: (buffer, length, file index or -1, last chunk of the file);
# -1 marks a batch of small files, already hashed on the main thread.
_Job = tuple[int, int, int, bool]


class _Stream:
    """The concatenated contents of the files, flowing through a ring of buffers.

    The main thread reads into a buffer and hands it to both hash threads at once:
    the file thread hashes it for its file, the piece thread for its pieces. When
    both are done with it, the buffer is read into again. So reading overlaps
    hashing, the two hashes overlap each other (neither waits for the other, only
    for the reader), and memory stays at SLOTS buffers whatever the file sizes.

    Small files (under one buffer) take a shortcut: they are read whole, one after
    the other, into the current buffer, and hashed by the main thread right away (a
    hand-over per file would cost more than hashing a few KiB); the filled buffer
    then goes to the piece thread as one batch.

    Files are read(), not mmap()ed, although that would save the copy: a file
    truncated while mapped kills the process with SIGBUS instead of raising an error.
    """

    def __init__(self, piece_size: int, total: int, progress: Progress | None) -> None:
        # Page-aligned buffers (an anonymous mmap): the kernel copies file data into a
        # bytearray's buffer, 16 bytes off a page boundary, a good third slower.
        ring = memoryview(mmap.mmap(-1, SLOTS * SLOT_SIZE))
        self.views = [ring[i * SLOT_SIZE : (i + 1) * SLOT_SIZE] for i in range(SLOTS)]
        # Each thread hands back the buffers it is done with, in the order it got them.
        self.files_done: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.pieces_done: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(1, SLOTS):
            self.files_done.put(slot)
            self.pieces_done.put(slot)
        self.slot = 0  # the buffer the main thread fills
        self.pos = 0  # how much of it holds small files not yet handed over
        self.to_files: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.to_pieces: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.digests: dict[int, str] = {}  # file index -> sha256, for large files
        self.pieces = _PieceHasher(piece_size)
        self.error: BaseException | None = None
        self.total = total
        self.done = 0
        self.progress = progress
        self.threads = [
            threading.Thread(target=self._file_worker, name="roost-hash-files", daemon=True),
            threading.Thread(target=self._piece_worker, name="roost-hash-pieces", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def small(self, fd: int, size: int) -> str:
        """Read a file smaller than a buffer; return its sha256 (hex)."""
        if self.pos + size + 1 > SLOT_SIZE:
            self._hand_over()
        start = self.pos
        # One byte more than expected, so that a file that grew is noticed.
        data = self.views[self.slot][start : start + size + 1]
        got = os.readv(fd, [data])
        if got != size and _read_file(fd, data, size, got) != size:
            raise _SizeChanged
        self.pos += size
        if size:
            self._advance(size)
        return hashlib.sha256(data[:size]).hexdigest()

    def large(self, fd: int, size: int, index: int) -> None:
        """Read a file buffer by buffer; its sha256 lands in ``digests[index]``."""
        if self.pos:
            self._hand_over()
        seen = 0
        while True:
            want = size - seen
            view = self.views[self.slot][: min(SLOT_SIZE, want + 1)]
            n = _read_file(fd, view, want)
            seen += n
            last = n < len(view)  # the file ended inside this buffer
            if seen > size or (last and seen < size):
                raise _SizeChanged
            self._send(self.slot, n, index, last)
            self.slot = self._next_free()
            if n:
                self._advance(n)
            if last:
                return

    def close(self) -> None:
        """Hash what is left, stop the threads, and re-raise anything they hit."""
        if self.pos:
            self._hand_over()
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.to_files.put(None)
        self.to_pieces.put(None)
        for thread in self.threads:
            thread.join()

    def _hand_over(self) -> None:
        self._send(self.slot, self.pos, -1, False)
        self.slot, self.pos = self._next_free(), 0

    def _send(self, slot: int, length: int, index: int, last: bool) -> None:
        self.to_pieces.put((slot, length))
        self.to_files.put((slot, length, index, last))

    def _next_free(self) -> int:
        """The oldest buffer in flight, once both threads are done with it."""
        slot = self.files_done.get()
        self.pieces_done.get()
        return slot

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _file_worker(self) -> None:
        file_hash = hashlib.sha256()
        while True:
            job = self.to_files.get()
            if job is None:
                return
            slot, length, index, last = job
            if index >= 0 and self.error is None:
                try:
                    file_hash.update(self.views[slot][:length])
                    if last:
                        self.digests[index] = file_hash.hexdigest()
                        file_hash = hashlib.sha256()
                except BaseException as exc:  # re-raised by close()
                    self.error = exc
            self.files_done.put(slot)

    def _piece_worker(self) -> None:
        while True:
            job = self.to_pieces.get()
            if job is None:
                return
            slot, length = job
            if self.error is None:
                try:
                    self.pieces.update(self.views[slot][:length])
                except BaseException as exc:  # re-raised by close()
                    self.error = exc
            self.pieces_done.put(slot)


def _read_file(fd: int, view: memoryview, size: int, got: int = 0) -> int:
    """Read on into ``view`` until it is full, the file ends or ``size`` bytes are in.

    A short read that lands exactly on ``size`` is taken as the end of the file: that
    saves the extra read() per file that would only confirm it.
    """
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if not n:
            break
        got += n
        if got == size:
            break
    return got


def _hash_files(
    files: list[tuple[str, str, int, int]], piece_size: int, total: int, progress: Progress | None
) -> tuple[list[FileEntry], list[bytes]]:
    stream = _Stream(piece_size, total, progress)
    digests: list[str | None] = []
    try:
        for index, (_, path, size, _) in enumerate(files):
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    if size < SLOT_SIZE:
                        digests.append(stream.small(fd, size))
                    else:
                        digests.append(None)
                        stream.large(fd, size, index)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise RoostError(f"cannot read {path}: {exc.strerror}") from None
            except _SizeChanged:
                raise RoostError(f"{path} changed size while it was being packed") from None
    except BaseException:
        stream.stop()
        raise
    stream.close()
    entries = [
        FileEntry(rel, size, mode, stream.digests[index] if digest is None else digest)
        for index, ((rel, _, size, mode), digest) in enumerate(zip(files, digests))
    ]
    return entries, stream.pieces.finish()
