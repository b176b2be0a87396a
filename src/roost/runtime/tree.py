"""A release laid out as files: read its pieces, check it against its manifest.

The same functions serve the seeder (which reads pieces straight from the
operator's source tree), ``roost install --from`` and ``roost verify``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

from roost.runtime.errors import IntegrityError
from roost.runtime.manifest import Manifest

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def read_piece(root: str, manifest: Manifest, index: int) -> bytes:
    """Piece ``index`` as read from the files under ``root`` (not verified here)."""
    parts = []
    for span in manifest.piece_spans(index):
        path = os.path.join(root, span.file.path)
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as exc:
            raise IntegrityError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data = os.pread(fd, span.length, span.offset)
        finally:
            os.close(fd)
        if len(data) != span.length:
            raise IntegrityError(f"{path} is shorter than the manifest says (truncated?)")
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class TreeSource:
    """Pieces of a release read from a local tree; the stand-in for the network."""

    def __init__(self, root: str, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    def read_piece(self, index: int) -> bytes:
        return read_piece(self.root, self.manifest, index)


def verify_tree(root: str, manifest: Manifest, *, content: bool = True) -> list[str]:
    """Every difference between the tree at ``root`` and ``manifest``; empty if they match.

    Checks types, sizes, permission bits, symlink targets, empty directories and
    that nothing else is present; with ``content`` also every file's sha256.
    """
    problems: list[str] = []
    expected_dirs = {d.path: d for d in manifest.dirs}
    expected_files = {f.path: f for f in manifest.files}
    expected_links = {s.path: s for s in manifest.symlinks}
    parents = _implied_dirs(manifest)
    found: set[str] = set()
    for rel, st in _walk(root):
        found.add(rel)
        kind = stat.S_IFMT(st.st_mode)
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if rel in expected_files:
            entry = expected_files[rel]
            if kind != stat.S_IFREG:
                problems.append(f"{rel}: expected a regular file")
            elif st.st_size != entry.size:
                problems.append(f"{rel}: size {st.st_size}, expected {entry.size}")
            elif mode != entry.mode:
                problems.append(f"{rel}: mode {mode:o}, expected {entry.mode:o}")
            elif content and file_sha256(os.path.join(root, rel)) != entry.sha256:
                problems.append(f"{rel}: content differs (sha256 mismatch)")
        elif rel in expected_links:
            if kind != stat.S_IFLNK:
                problems.append(f"{rel}: expected a symlink")
            elif os.readlink(os.path.join(root, rel)) != expected_links[rel].target:
                problems.append(f"{rel}: symlink target differs")
        elif rel in expected_dirs:
            if kind != stat.S_IFDIR:
                problems.append(f"{rel}: expected an empty directory")
            elif mode != expected_dirs[rel].mode:
                problems.append(f"{rel}: mode {mode:o}, expected {expected_dirs[rel].mode:o}")
        elif rel in parents:
            if kind != stat.S_IFDIR:
                problems.append(f"{rel}: expected a directory")
        else:
            problems.append(f"{rel}: not in the manifest")
    for rel in sorted({*expected_files, *expected_links, *expected_dirs} - found):
        problems.append(f"{rel}: missing")
    return problems


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(1024 * 1024)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                return digest.hexdigest()
            digest.update(memoryview(buffer)[:n])


def _implied_dirs(manifest: Manifest) -> set[str]:
    parents = set()
    for entries in (manifest.files, manifest.symlinks, manifest.dirs):
        for entry in entries:
            parent = entry.path.rpartition("/")[0]
            while parent and parent not in parents:
                parents.add(parent)
                parent = parent.rpartition("/")[0]
    return parents


def _walk(root: str, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below ``root``, never following symlinks."""
    with os.scandir(os.path.join(root, prefix) if prefix else root) as it:
        entries = list(it)
    for entry in entries:
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, rel + "/")
