"""The release manifest: the canonical, hash-identified description of a release.

A manifest lists every regular file (path, size, mode, sha256), every symlink
(target) and every empty directory of a release, sorted by path. The contents
of the regular files, concatenated in that order, form one byte stream cut into
fixed-size pieces; each piece has its own sha256. Peers exchange pieces, so a
host can verify every piece the moment it arrives.

The serialized form is canonical JSON (sorted keys, no insignificant
whitespace, UTF-8), and the release id is the sha256 of those bytes. Parsing is
strict: a manifest that does not re-serialize to exactly the bytes it was read
from is rejected, so one release has exactly one id. Constructing a
``Manifest`` validates everything a host relies on for safety (relative, clean,
unique paths; nothing nested under a file or symlink; symlinks that stay inside
the tree; sane sizes and counts), so code holding a ``Manifest`` never has to
re-check. See ``docs/manifest.md``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable
from json.encoder import encode_basestring as _json_string  # json.dumps' own, non-ASCII kept
from typing import Any, NamedTuple

from roost.runtime.errors import ManifestError

FORMAT = "roost-manifest"
VERSION = 1

KiB = 1024
MiB = 1024 * KiB

# Forced piece sizes must lie in this range (powers of two).
MIN_PIECE_SIZE = 16 * KiB
MAX_PIECE_SIZE = 256 * MiB
# The automatic rule: about this many pieces, clamped to this range.
AUTO_TARGET_PIECES = 1024
AUTO_MIN_PIECE_SIZE = 256 * KiB
AUTO_MAX_PIECE_SIZE = 16 * MiB

# Limits that turn absurd or hostile manifests into clear errors.
MAX_ENTRIES = 5_000_000
MAX_TOTAL_SIZE = 1 << 50  # 1 PiB
MAX_PIECES = 1 << 22
MAX_MANIFEST_BYTES = 1 << 30
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_SYMLINK_HOPS = 40
MODE_MASK = 0o777

_TOP_LEVEL_KEYS = frozenset(
    {"format", "version", "piece_size", "total_size", "external_symlinks"}
    | {"files", "symlinks", "dirs", "pieces"}
)


# Plain named tuples: every host builds one per file at start-up, thousands at a time,
# in a third of the time frozen dataclasses took.
class FileEntry(NamedTuple):
    path: str
    size: int
    mode: int
    sha256: str


class SymlinkEntry(NamedTuple):
    path: str
    target: str


class DirEntry(NamedTuple):
    """An empty directory (directories with content are implied by their entries)."""

    path: str
    mode: int


class Span(NamedTuple):
    """A run of bytes of one file that belongs to a piece."""

    file: FileEntry
    offset: int
    length: int


def auto_piece_size(total_size: int) -> int:
    """The piece size for a release of ``total_size`` bytes.

    About ``AUTO_TARGET_PIECES`` pieces keep per-piece overhead (messages,
    bitfields, manifest size) small, while pieces no smaller than 256 KiB keep
    disk and network operations large; capping at 16 MiB keeps the time one
    piece takes to cross one hop short, so forwarding starts early.
    """
    size = AUTO_MIN_PIECE_SIZE
    while size * AUTO_TARGET_PIECES < total_size and size < AUTO_MAX_PIECE_SIZE:
        size *= 2
    return size


def check_piece_size(piece_size: int) -> int:
    if (
        not _is_int(piece_size)
        or piece_size < MIN_PIECE_SIZE
        or piece_size > MAX_PIECE_SIZE
        or piece_size & (piece_size - 1)
    ):
        raise ManifestError(
            f"piece size must be a power of two between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE}"
            f" bytes, not {piece_size!r}"
        )
    return piece_size


def check_relative_path(path: object) -> str:
    """Return ``path`` if it is a clean relative path inside a release, else raise."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"invalid path {_show(path)}: must be a non-empty string")
    if "\x00" in path:
        raise ManifestError(f"invalid path {_show(path)}: contains a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"invalid path {_show(path)}: not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ManifestError(f"invalid path {_show(path)}: longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise ManifestError(f"invalid path {_show(path)}: absolute paths are not allowed")
    wrapped = f"/{path}/"  # substring tests instead of a split: manifests list many paths
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        raise ManifestError(
            f"invalid path {_show(path)}: empty, '.' and '..' components are not allowed"
        )
    if len(encoded) > MAX_NAME_BYTES and any(
        len(name.encode("utf-8")) > MAX_NAME_BYTES for name in path.split("/")
    ):
        raise ManifestError(f"invalid path {_show(path)}: a name is over 255 bytes")
    return path


def symlink_escape(path: str, symlinks: dict[str, str]) -> str | None:
    """Why the symlink at ``path`` resolves outside the tree, or None if it stays inside.

    Resolution follows the other symlinks of the release the way the kernel
    would, so a chain such as ``up -> .`` plus ``out -> up/..`` is caught even
    though each link looks harmless on its own.
    """
    location = path.split("/")[:-1]
    pending = list(reversed(symlinks[path].split("/")))
    if symlinks[path].startswith("/"):
        return "its target is an absolute path"
    hops = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if not location:
                return "its target leads above the release root"
            location.pop()
            continue
        location.append(name)
        target = symlinks.get("/".join(location))
        if target is None:
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            return "its target loops or chains through too many symlinks"
        if target.startswith("/"):
            return "its target leads through a symlink to an absolute path"
        location.pop()
        pending.extend(reversed(target.split("/")))
    return None


class Manifest:
    """A validated release manifest. Immutable; construct it only with valid data."""

    __slots__ = (
        "_bytes",
        "_id",
        "_starts",
        "dirs",
        "external_symlinks",
        "files",
        "piece_size",
        "pieces",
        "symlinks",
        "total_size",
    )

    def __init__(
        self,
        *,
        piece_size: int,
        files: Iterable[FileEntry],
        symlinks: Iterable[SymlinkEntry] = (),
        dirs: Iterable[DirEntry] = (),
        pieces: Iterable[bytes],
        external_symlinks: bool = False,
    ) -> None:
        self.piece_size = check_piece_size(piece_size)
        self.files = tuple(sorted(files, key=_path_of))
        self.symlinks = tuple(sorted(symlinks, key=_path_of))
        self.dirs = tuple(sorted(dirs, key=_path_of))
        self.pieces = tuple(pieces)
        self.external_symlinks = external_symlinks
        self.total_size = 0
        self._starts: list[int] = []
        self._id: str | None = None
        self._bytes: bytes | None = None
        self._validate()

    # -- validation -----------------------------------------------------------------

    def _validate(self) -> None:
        if not isinstance(self.external_symlinks, bool):
            raise ManifestError("external_symlinks must be true or false")
        count = len(self.files) + len(self.symlinks) + len(self.dirs)
        if count > MAX_ENTRIES:
            raise ManifestError(f"manifest lists {count} entries; the limit is {MAX_ENTRIES}")
        starts = self._starts
        total = 0
        for path, size, mode, _ in self.files:  # every host runs this at start: kept lean
            check_relative_path(path)
            if not _is_int(size) or not 0 <= size <= MAX_TOTAL_SIZE:
                raise ManifestError(f"file {_show(path)}: invalid size {size!r}")
            _check_mode(path, mode)
            starts.append(total)
            total += size
        self.total_size = total
        if _decode_digests([entry.sha256 for entry in self.files]) is None:
            bad = next(e for e in self.files if _decode_digests([e.sha256]) is None)
            raise ManifestError(f"file {_show(bad.path)}: sha256 must be 64 lowercase hex")
        if self.total_size > MAX_TOTAL_SIZE:
            raise ManifestError(f"release of {self.total_size} bytes exceeds the size limit")
        for link in self.symlinks:
            check_relative_path(link.path)
            target = link.target
            if not isinstance(target, str) or not target or "\x00" in target:
                raise ManifestError(f"symlink {_show(link.path)}: invalid target {_show(target)}")
            if len(target.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
                raise ManifestError(f"symlink {_show(link.path)}: target is too long")
            try:
                target.encode("utf-8")
            except UnicodeEncodeError:
                raise ManifestError(f"symlink {_show(link.path)}: target is not UTF-8") from None
        for directory in self.dirs:
            check_relative_path(directory.path)
            _check_mode(directory.path, directory.mode)
        self._check_tree_shape()
        expected = math.ceil(self.total_size / self.piece_size)
        if expected > MAX_PIECES:
            raise ManifestError(f"release needs {expected} pieces; the limit is {MAX_PIECES}")
        if len(self.pieces) != expected:
            raise ManifestError(
                f"manifest has {len(self.pieces)} piece hashes but its {self.total_size} bytes"
                f" in pieces of {self.piece_size} need {expected}"
            )
        for digest in self.pieces:
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise ManifestError("every piece hash must be a 32-byte sha256 digest")

    def _check_tree_shape(self) -> None:
        """Unique paths; nothing below a file, symlink or empty dir; symlinks stay inside."""
        kinds: dict[str, str] = {}
        for kind, entries in (
            ("file", self.files),
            ("symlink", self.symlinks),
            ("empty directory", self.dirs),
        ):
            for entry in entries:
                if entry.path in kinds:
                    raise ManifestError(f"duplicate path {_show(entry.path)}")
                kinds[entry.path] = kind
        seen_parents: set[str] = set()
        for path in kinds:
            parent = path.rpartition("/")[0]
            while parent and parent not in seen_parents:
                blocker = kinds.get(parent)
                if blocker is not None:
                    raise ManifestError(f"path {_show(path)} lies inside {blocker} {_show(parent)}")
                seen_parents.add(parent)
                parent = parent.rpartition("/")[0]
        if not self.external_symlinks:
            targets = {link.path: link.target for link in self.symlinks}
            for link in self.symlinks:
                reason = symlink_escape(link.path, targets)
                if reason:
                    raise ManifestError(
                        f"symlink {_show(link.path)} -> {_show(link.target)} points outside"
                        f" the release: {reason}"
                    )

    # -- identity and serialization ---------------------------------------------------

    @property
    def id(self) -> str:
        """The release id: sha256 of the canonical serialization, in hex."""
        if self._id is None:
            self._id = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._id

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def piece_count(self) -> int:
        return len(self.pieces)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "piece_size": self.piece_size,
            "total_size": self.total_size,
            "external_symlinks": self.external_symlinks,
            "files": [
                {"path": f.path, "size": f.size, "mode": f.mode, "sha256": f.sha256}
                for f in self.files
            ],
            "symlinks": [{"path": s.path, "target": s.target} for s in self.symlinks],
            "dirs": [{"path": d.path, "mode": d.mode} for d in self.dirs],
            "pieces": [p.hex() for p in self.pieces],
        }

    def to_bytes(self) -> bytes:
        """The canonical serialization: the same release gives the same bytes anywhere.

        That is ``json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
        ensure_ascii=False)`` in UTF-8 plus a newline, written out here field by
        field with json's own string escaping: every host re-serializes its
        manifest at start to check it is canonical, and this takes a third of the
        time (the tests check both give the same bytes).
        """
        if self._bytes is None:  # the manifest is immutable: serialize once
            quote = _json_string
            files = ",".join([
                f'{{"mode":{f.mode:d},"path":{quote(f.path)},"sha256":"{f.sha256}","size":{f.size:d}}}'
                for f in self.files
            ])  # fmt: skip
            symlinks = ",".join(
                [f'{{"path":{quote(s.path)},"target":{quote(s.target)}}}' for s in self.symlinks]
            )
            dirs = ",".join([f'{{"mode":{d.mode:d},"path":{quote(d.path)}}}' for d in self.dirs])
            pieces = ",".join([f'"{p.hex()}"' for p in self.pieces])
            text = (
                f'{{"dirs":[{dirs}],'
                f'"external_symlinks":{"true" if self.external_symlinks else "false"},'
                f'"files":[{files}],"format":{quote(FORMAT)},'
                f'"piece_size":{self.piece_size:d},"pieces":[{pieces}],'
                f'"symlinks":[{symlinks}],"total_size":{self.total_size:d},"version":{VERSION:d}}}\n'
            )
            self._bytes = text.encode("utf-8")
        return self._bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate a serialized manifest; raise ManifestError if anything is off."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest is not valid JSON ({_first_line(exc)})") from None
        manifest = cls._from_json(obj)
        if manifest.to_bytes() != data:
            raise ManifestError(
                "manifest is not in canonical form (edited by hand, or truncated?);"
                " re-create it with 'roost pack'"
            )
        return manifest

    @classmethod
    def _from_json(cls, obj: object) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        if obj.get("format") != FORMAT:
            raise ManifestError(f"not a roost manifest (format is {_show(obj.get('format'))})")
        if not _is_int(obj.get("version")) or obj.get("version") != VERSION:
            raise ManifestError(
                f"unsupported manifest version {_show(obj.get('version'))}"
                f" (this roost reads version {VERSION})"
            )
        if set(obj) != _TOP_LEVEL_KEYS:
            missing = sorted(_TOP_LEVEL_KEYS - set(obj))
            extra = sorted(set(obj) - _TOP_LEVEL_KEYS)
            raise ManifestError(f"manifest fields wrong: missing {missing}, unknown {extra}")
        files = [
            FileEntry(e["path"], e["size"], e["mode"], e["sha256"])
            for e in _records(obj, "files", {"path", "size", "mode", "sha256"})
        ]
        symlinks = [
            SymlinkEntry(e["path"], e["target"])
            for e in _records(obj, "symlinks", {"path", "target"})
        ]
        dirs = [DirEntry(e["path"], e["mode"]) for e in _records(obj, "dirs", {"path", "mode"})]
        pieces = obj["pieces"]
        digests = _decode_digests(pieces) if isinstance(pieces, list) else None
        if digests is None:
            raise ManifestError("pieces must be a list of 64-character lowercase hex sha256")
        manifest = cls(
            piece_size=obj["piece_size"],
            files=files,
            symlinks=symlinks,
            dirs=dirs,
            pieces=[digests[i : i + 32] for i in range(0, len(digests), 32)],
            external_symlinks=obj["external_symlinks"],
        )
        if not _is_int(obj["total_size"]) or obj["total_size"] != manifest.total_size:
            raise ManifestError(
                f"total_size says {obj['total_size']!r} but the files add up to"
                f" {manifest.total_size}"
            )
        return manifest

    # -- piece layout -----------------------------------------------------------------

    def piece_length(self, index: int) -> int:
        start = index * self.piece_size
        return min(self.piece_size, self.total_size - start)

    def piece_spans(self, index: int) -> list[Span]:
        """The file ranges that piece ``index`` covers, in stream order."""
        if not 0 <= index < len(self.pieces):
            raise IndexError(f"piece {index} out of range")
        position = index * self.piece_size
        end = position + self.piece_length(index)
        spans = []
        i = bisect.bisect_right(self._starts, position) - 1
        while position < end:
            entry, start = self.files[i], self._starts[i]
            length = min(end, start + entry.size) - position
            if length > 0:
                spans.append(Span(entry, position - start, length))
                position += length
            i += 1
        return spans

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "files": len(self.files),
            "symlinks": len(self.symlinks),
            "empty_dirs": len(self.dirs),
            "bytes": self.total_size,
            "piece_size": self.piece_size,
            "pieces": self.piece_count,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<Manifest {self.short_id} files={len(self.files)} bytes={self.total_size}>"


def load_manifest(path: str) -> Manifest:
    """Read and validate a manifest file, with errors that name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        return Manifest.from_bytes(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None


def _path_of(entry: FileEntry | SymlinkEntry | DirEntry) -> str:
    path = entry.path
    return path if isinstance(path, str) else ""


def _records(obj: dict, key: str, fields: set[str]) -> list[dict]:
    records = obj[key]
    if not isinstance(records, list):
        raise ManifestError(f"{key} must be a list")
    if len(records) > MAX_ENTRIES:
        raise ManifestError(f"manifest lists more than {MAX_ENTRIES} {key}")
    for record in records:
        if not isinstance(record, dict) or record.keys() != fields:
            raise ManifestError(
                f"every entry of {key} must have exactly the fields {sorted(fields)}"
            )
    return records


def _check_mode(path: str, mode: object) -> None:
    if not _is_int(mode) or not 0 <= mode <= MODE_MASK:
        raise ManifestError(f"{_show(path)}: mode must be permission bits 0..0o777, not {mode!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_digests(values: list) -> bytes | None:
    """The digests, concatenated, if every value is a sha256 in 64 lowercase hex
    digits; else None.

    Checked all at once: ``bytes.fromhex`` rejects any character but hex digits
    and ASCII whitespace, whitespace would leave fewer than 32 bytes per value,
    and lowercase text equals its ``lower()``.
    """
    if not all(isinstance(value, str) and len(value) == 64 for value in values):
        return None
    joined = "".join(values)
    try:
        decoded = bytes.fromhex(joined)
    except ValueError:
        return None
    if len(decoded) != 32 * len(values) or joined != joined.lower():
        return None
    return decoded


def _show(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
