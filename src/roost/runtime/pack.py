"""Build a manifest from a directory tree (or one file).

Packing is bounded by sha256, not by Python: file contents stream through one
reusable buffer (memory stays bounded by the manifest, never by file sizes),
and each buffer is hashed twice at once, for its file on this thread and for
its piece on a helper thread (hashlib releases the GIL on large updates).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

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
READ_CHUNK = 4 * 1024 * 1024
# Below this many bytes, handing a chunk to the helper thread costs more than it saves.
PARALLEL_MIN = 256 * 1024

Progress = Callable[[int, int], None]  # (bytes hashed so far, total bytes)


@dataclass
class _Scan:
    files: list[tuple[str, str, int, int]] = field(default_factory=list)  # rel, abs, size, mode
    symlinks: list[SymlinkEntry] = field(default_factory=list)
    dirs: list[DirEntry] = field(default_factory=list)


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
    scan = _scan(src, [*(DEFAULT_EXCLUDES if default_excludes else ()), *excludes])
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


def _scan(src: str, excludes: list[str]) -> _Scan:
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


def _scan_dir(directory: str, prefix: str, excludes: list[str], scan: _Scan) -> bool:
    """Add the entries below ``directory`` to ``scan``; return whether any were added."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise RoostError(f"cannot list {directory}: {exc.strerror}") from None
    added = False
    for entry in entries:
        rel = prefix + _utf8_name(entry.name, entry.path)
        if any(fnmatch.fnmatchcase(entry.name, g) or fnmatch.fnmatchcase(rel, g) for g in excludes):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = _utf8_name(os.readlink(entry.path), entry.path)
                scan.symlinks.append(SymlinkEntry(rel, target))
            elif stat.S_ISREG(st.st_mode):
                scan.files.append((rel, entry.path, st.st_size, stat.S_IMODE(st.st_mode) & 0o777))
            elif stat.S_ISDIR(st.st_mode):
                if not _scan_dir(entry.path, rel + "/", excludes, scan):
                    scan.dirs.append(DirEntry(rel, stat.S_IMODE(st.st_mode) & 0o777))
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


def _hash_files(
    files: list[tuple[str, str, int, int]], piece_size: int, total: int, progress: Progress | None
) -> tuple[list[FileEntry], list[bytes]]:
    pieces = _PieceHasher(piece_size)
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    entries = []
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="roost-hash") as helper:
        for rel, path, size, mode in files:
            file_hash = hashlib.sha256()
            seen = 0
            try:
                with open(path, "rb", buffering=0) as f:
                    while True:
                        n = f.readinto(buffer)
                        if not n:
                            break
                        chunk = view[:n]
                        seen += n
                        if seen > size:
                            break
                        if n >= PARALLEL_MIN:
                            job = helper.submit(pieces.update, chunk)
                            file_hash.update(chunk)
                            job.result()
                        else:
                            pieces.update(chunk)
                            file_hash.update(chunk)
                        done += n
                        if progress is not None:
                            progress(done, total)
            except OSError as exc:
                raise RoostError(f"cannot read {path}: {exc.strerror}") from None
            if seen != size:
                raise RoostError(f"{path} changed size while it was being packed")
            entries.append(FileEntry(rel, size, mode, file_hash.hexdigest()))
    return entries, pieces.finish()
