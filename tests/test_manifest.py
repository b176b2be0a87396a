"""The release manifest: canonical round trips, strict parsing, path safety, piece layout."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from roost.runtime import manifest as manifest_module
from roost.runtime.errors import ManifestError
from roost.runtime.manifest import (
    AUTO_MAX_PIECE_SIZE,
    AUTO_MIN_PIECE_SIZE,
    AUTO_TARGET_PIECES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_PIECE_SIZE,
    MAX_PIECES,
    MAX_SYMLINK_HOPS,
    MAX_TOTAL_SIZE,
    MIN_PIECE_SIZE,
    DirEntry,
    FileEntry,
    Manifest,
    SymlinkEntry,
    auto_piece_size,
    check_piece_size,
    check_relative_path,
    symlink_escape,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def canon(obj: object) -> bytes:
    """``obj`` serialized exactly the way a valid manifest is, so only content checks fire."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8") + b"\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def real_manifest(
    contents: dict[str, bytes],
    *,
    symlinks: dict[str, str] | None = None,
    dirs: dict[str, int] | None = None,
    piece_size: int = MIN_PIECE_SIZE,
    external_symlinks: bool = False,
) -> Manifest:
    """A manifest whose hashes are those of ``contents`` (path -> bytes), computed here."""
    paths = sorted(contents)
    stream = b"".join(contents[p] for p in paths)
    return Manifest(
        piece_size=piece_size,
        files=[FileEntry(p, len(contents[p]), 0o644, sha(contents[p])) for p in paths],
        symlinks=[SymlinkEntry(p, t) for p, t in (symlinks or {}).items()],
        dirs=[DirEntry(p, m) for p, m in (dirs or {}).items()],
        pieces=[
            hashlib.sha256(stream[i : i + piece_size]).digest()
            for i in range(0, len(stream), piece_size)
        ],
        external_symlinks=external_symlinks,
    )


BASE = real_manifest(
    {
        "a/b.txt": b"hello\n",
        "big.bin": bytes(range(256)) * 100,  # 25,600 bytes: two pieces of 16 KiB
        "unicodé/ñame with space.txt": b"unicode",
    },
    symlinks={"link": "a/b.txt"},
    dirs={"empty": 0o755},
)


def base_obj() -> dict[str, Any]:
    """A fresh, mutable copy of a valid manifest's JSON object."""
    return copy.deepcopy(BASE.to_json())


def one_byte_obj() -> dict[str, Any]:
    """A valid manifest of one 1-byte file (total_size 1, so ``True == 1`` would slip by)."""
    return copy.deepcopy(real_manifest({"f": b"x"}).to_json())


def rejects(data: bytes | dict, pattern: str) -> str:
    """Assert that parsing fails with a message matching ``pattern``; return the message."""
    if isinstance(data, dict):
        data = canon(data)
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(data)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "\n" not in message
    return message


CANONICAL = "not in canonical form"

# -- round trips ---------------------------------------------------------------------------

NAME_CHARS = st.one_of(
    st.sampled_from(list("abcXYZ019 ._-éñ日本語🎉")),
    st.characters(codec="utf-8", exclude_characters="/\x00~"),
)
NAMES = st.text(NAME_CHARS, min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
MODES = st.integers(0, 0o777)
HEX = st.binary(min_size=32, max_size=32).map(bytes.hex)

LEAVES = st.one_of(
    st.tuples(st.just("file"), st.integers(0, 64 * KiB), MODES, HEX),
    st.tuples(st.just("link")),
    st.tuples(st.just("dir"), MODES),
)
# A directory is a non-empty dict of names to leaves or directories.
TREES = st.dictionaries(
    NAMES,
    st.recursive(LEAVES, lambda inner: st.dictionaries(NAMES, inner, min_size=1, max_size=4)),
    max_size=6,
)
PIECE_SIZES = st.integers(14, 28).map(lambda exp: 1 << exp)


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, tuple]]:
    for name, child in tree.items():
        if isinstance(child, dict):
            yield from flatten(child, prefix + name + "/")
        else:
            yield prefix + name, child


@st.composite
def manifest_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments for a valid ``Manifest``: any shape, sizes, modes and piece size."""
    external = draw(st.booleans())
    piece_size = draw(PIECE_SIZES)
    files, symlinks, dirs = [], [], []
    for path, leaf in flatten(draw(TREES)):
        if leaf[0] == "file":
            files.append(FileEntry(path, leaf[1], leaf[2], leaf[3]))
        elif leaf[0] == "dir":
            dirs.append(DirEntry(path, leaf[1]))
        elif external:
            chars = st.characters(codec="utf-8", exclude_characters="\x00")
            target = draw(st.text(chars, min_size=1, max_size=30))
            symlinks.append(SymlinkEntry(path, target))
        else:
            # Climbing at most as many levels as the link is deep, then naming something
            # that no entry is called ('~' is never in a name): always inside the tree.
            ups = draw(st.integers(0, path.count("/")))
            target = "../" * ups + "~" + draw(NAMES)
            symlinks.append(SymlinkEntry(path, target))
    total = sum(f.size for f in files)
    count = math.ceil(total / piece_size)
    pieces = draw(st.lists(st.binary(min_size=32, max_size=32), min_size=count, max_size=count))
    return {
        "piece_size": piece_size,
        "files": files,
        "symlinks": symlinks,
        "dirs": dirs,
        "pieces": pieces,
        "external_symlinks": external,
    }


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=manifest_specs(), data=st.data())
def test_round_trip_is_byte_identical_and_order_independent(spec: dict, data: st.DataObject):
    manifest = Manifest(**spec)
    raw = manifest.to_bytes()
    # The canonical form is json.dumps' (to_bytes writes it out field by field).
    canonical = json.dumps(
        manifest.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert raw == canonical.encode("utf-8") + b"\n"
    assert manifest.id == sha(raw)
    assert manifest.total_size == sum(f.size for f in spec["files"])

    again = Manifest.from_bytes(raw)
    assert again.to_bytes() == raw
    assert again.id == manifest.id
    assert again == manifest and hash(again) == hash(manifest)
    assert again.files == tuple(sorted(spec["files"], key=lambda f: f.path))
    assert again.symlinks == tuple(sorted(spec["symlinks"], key=lambda s: s.path))
    assert again.dirs == tuple(sorted(spec["dirs"], key=lambda d: d.path))
    assert again.pieces == tuple(spec["pieces"])
    assert again.external_symlinks is spec["external_symlinks"]
    # Non-ASCII is written as UTF-8, never as \u escapes.
    assert json.loads(raw) == manifest.to_json()
    for entry in (*spec["files"], *spec["symlinks"], *spec["dirs"]):
        if not any(c in '"\\' or c < " " for c in entry.path):  # JSON must escape those
            assert b'"' + entry.path.encode("utf-8") + b'"' in raw

    shuffled = {
        key: data.draw(st.permutations(spec[key]), label=key)
        for key in ("files", "symlinks", "dirs")
    }
    assert Manifest(**{**spec, **shuffled}).to_bytes() == raw


def test_every_recorded_detail_changes_the_id():
    variants = [
        real_manifest({"f": b"x"}),
        real_manifest({"g": b"x"}),
        real_manifest({"f": b"y"}),
        real_manifest({"f": b"x"}, piece_size=2 * MIN_PIECE_SIZE),
        real_manifest({"f": b"x"}, symlinks={"l": "f"}),
        real_manifest({"f": b"x"}, symlinks={"l": "./f"}),
        real_manifest({"f": b"x"}, dirs={"e": 0o755}),
        real_manifest({"f": b"x"}, dirs={"e": 0o700}),
        real_manifest({"f": b"x"}, external_symlinks=True),
    ]
    mode_changed = Manifest(
        piece_size=MIN_PIECE_SIZE,
        files=[FileEntry("f", 1, 0o755, sha(b"x"))],
        pieces=[hashlib.sha256(b"x").digest()],
    )
    ids = [m.id for m in [*variants, mode_changed]]
    assert len(set(ids)) == len(ids)


def test_summary_and_properties():
    summary = BASE.summary()
    assert summary == {
        "id": BASE.id,
        "files": 3,
        "symlinks": 1,
        "empty_dirs": 1,
        "bytes": 6 + 25_600 + 7,
        "piece_size": MIN_PIECE_SIZE,
        "pieces": 2,
    }
    assert BASE.short_id == BASE.id[:12]
    assert BASE.short_id in repr(BASE)


def test_empty_release_round_trips():
    empty = Manifest(piece_size=AUTO_MIN_PIECE_SIZE, files=[], pieces=[])
    assert empty.total_size == 0 and empty.piece_count == 0
    assert Manifest.from_bytes(empty.to_bytes()).id == empty.id


# -- strict parsing ------------------------------------------------------------------------


def test_base_fixture_is_canonical():
    """The mutations below start from bytes that parse, so only the mutation can fail."""
    assert canon(base_obj()) == BASE.to_bytes()
    assert Manifest.from_bytes(canon(base_obj())).id == BASE.id
    assert Manifest.from_bytes(canon(one_byte_obj())).total_size == 1


@pytest.mark.parametrize(
    "dump",
    [
        pytest.param(lambda o: json.dumps(o, sort_keys=True, ensure_ascii=False), id="spaces"),
        pytest.param(
            lambda o: json.dumps(o, sort_keys=True, indent=1, ensure_ascii=False), id="indent"
        ),
        pytest.param(
            lambda o: json.dumps(
                dict(reversed(list(o.items()))), separators=(",", ":"), ensure_ascii=False
            ),
            id="unsorted-keys",
        ),
        pytest.param(
            lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=True),
            id="ascii-escapes",
        ),
    ],
)
def test_rejects_non_canonical_json(dump):
    data = dump(base_obj()).encode("utf-8") + b"\n"
    assert data != BASE.to_bytes()
    rejects(data, CANONICAL)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:-1], id="no-newline"),
        pytest.param(lambda b: b + b"\n", id="two-newlines"),
        pytest.param(lambda b: b[:-1] + b"\r\n", id="crlf"),
        pytest.param(lambda b: b" " + b, id="leading-space"),
        pytest.param(lambda b: b.replace(b"{", b'{"version":1,', 1), id="duplicate-key"),
        pytest.param(
            lambda b: b.replace(b'"version":1', b'"version":2,"version":1'), id="duplicate-key-2"
        ),
        pytest.param(lambda b: b.replace(b'"a/b.txt"', b'"a\\/b.txt"'), id="escaped-slash"),
        pytest.param(lambda b: b.replace(b'"a/b.txt"', b'"\\u0061/b.txt"'), id="u-escape"),
    ],
)
def test_rejects_bytes_that_do_not_reserialize_identically(mutate):
    data = mutate(BASE.to_bytes())
    assert data != BASE.to_bytes()
    rejects(data, CANONICAL)


def test_rejects_entries_out_of_order():
    obj = base_obj()
    obj["files"].reverse()
    rejects(obj, CANONICAL)


def test_rejects_every_truncation():
    data = BASE.to_bytes()
    for cut in range(len(data) - 1):  # everything short of the closing brace
        rejects(data[:cut], r"^manifest is not valid JSON \(")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(BASE.to_bytes().replace("é".encode(), b"\xff"), id="bad-byte"),
        pytest.param(BASE.to_bytes().replace("é".encode(), "é".encode()[:1]), id="cut-sequence"),
        pytest.param(BASE.to_bytes().replace("é".encode(), b"\xed\xa0\x80"), id="surrogate"),
    ],
)
def test_rejects_invalid_utf8(data):
    rejects(data, r"^manifest is not valid JSON \('utf-8' codec can't decode")


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"{", b"nul", b"{'a': 1}\n", b"\xef\xbb\xbf{}\n", b"[" * 100_000],
    ids=["empty", "newline", "brace", "bare-word", "single-quotes", "bom", "deep"],
)
def test_rejects_malformed_json(data):
    rejects(data, r"^manifest is not valid JSON \(.+\)$")


@pytest.mark.parametrize("value", [[], "x", 1, None, ["format"]])
def test_rejects_json_that_is_not_an_object(value):
    rejects(canon(value), "^manifest must be a JSON object$")


@pytest.mark.parametrize("value", ["roost-manifest-v2", "", None, 1])
def test_rejects_wrong_format(value):
    obj = base_obj()
    obj["format"] = value
    rejects(obj, rf"^not a roost manifest \(format is {re.escape(repr(value))}\)$")


def test_rejects_missing_format():
    obj = base_obj()
    del obj["format"]
    rejects(obj, r"^not a roost manifest \(format is None\)$")


@pytest.mark.parametrize("value", [0, 2, -1, True, 1.0, "1", None])
def test_rejects_wrong_version(value):
    obj = base_obj()
    obj["version"] = value
    rejects(obj, rf"^unsupported manifest version {re.escape(repr(value))} \(this roost reads")


@pytest.mark.parametrize("field", sorted(set(BASE.to_json()) - {"format", "version"}))
def test_rejects_missing_field(field):
    obj = base_obj()
    del obj[field]
    rejects(obj, rf"^manifest fields wrong: missing \['{field}'\], unknown \[\]$")


def test_rejects_unknown_field():
    obj = base_obj()
    obj["signature"] = "x"
    obj["comment"] = ""
    rejects(obj, r"^manifest fields wrong: missing \[\], unknown \['comment', 'signature'\]$")


@pytest.mark.parametrize(
    ("key", "fields"),
    [
        ("files", "['mode', 'path', 'sha256', 'size']"),
        ("symlinks", "['path', 'target']"),
        ("dirs", "['mode', 'path']"),
    ],
)
@pytest.mark.parametrize("damage", ["extra", "missing", "not-a-dict"])
def test_rejects_entries_with_wrong_fields(key, fields, damage):
    obj = base_obj()
    entry = obj[key][0]
    if damage == "extra":
        entry["mtime"] = 0
    elif damage == "missing":
        del entry["path"]
    else:
        obj[key][0] = [entry["path"]]
    rejects(obj, rf"^every entry of {key} must have exactly the fields {re.escape(fields)}$")


@pytest.mark.parametrize("key", ["files", "symlinks", "dirs"])
@pytest.mark.parametrize("value", [{}, "a", None, 0])
def test_rejects_entry_lists_of_wrong_type(key, value):
    obj = base_obj()
    obj[key] = value
    rejects(obj, rf"^{key} must be a list$")


@pytest.mark.parametrize("value", [True, False, 16384.0, "16384", None, [16384]])
def test_rejects_piece_size_of_wrong_type(value):
    obj = base_obj()
    obj["piece_size"] = value
    rejects(obj, rf"^piece size must be a power of two .* not {re.escape(repr(value))}$")


@pytest.mark.parametrize(
    "value",
    [
        0,
        -MIN_PIECE_SIZE,
        MIN_PIECE_SIZE // 2,
        MIN_PIECE_SIZE + 1,
        3 * MIN_PIECE_SIZE,
        100_000,
        2 * MAX_PIECE_SIZE,
        1 << 40,
    ],
)
def test_rejects_bad_piece_size(value):
    obj = base_obj()
    obj["piece_size"] = value
    rejects(
        obj, rf"^piece size must be a power of two between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE}"
    )


@pytest.mark.parametrize("value", [MIN_PIECE_SIZE, 1 << 20, MAX_PIECE_SIZE])
def test_accepts_piece_sizes_in_range(value):
    assert check_piece_size(value) == value


@pytest.mark.parametrize("value", [True, 1.0, "1", None, -1, 2])
def test_rejects_wrong_total_size(value):
    obj = one_byte_obj()
    obj["total_size"] = value
    rejects(obj, rf"^total_size says {re.escape(repr(value))} but the files add up to 1$")


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, -1, MAX_TOTAL_SIZE + 1])
def test_rejects_bad_file_size(value):
    obj = base_obj()
    obj["files"][0]["size"] = value
    rejects(obj, rf"^file 'a/b.txt': invalid size {re.escape(repr(value))}$")


@pytest.mark.parametrize("value", [True, 420.0, "420", None, -1, 0o1000, 0o4755, 0o2755, 0o1777])
@pytest.mark.parametrize("key", ["files", "dirs"])
def test_rejects_bad_mode(key, value):
    obj = base_obj()
    obj[key][0]["mode"] = value
    path = obj[key][0]["path"]
    rejects(
        obj, rf"^'{path}': mode must be permission bits 0..0o777, not {re.escape(repr(value))}$"
    )


@pytest.mark.parametrize("value", [0, 1, "false", None])
def test_rejects_external_symlinks_not_bool(value):
    obj = base_obj()
    obj["external_symlinks"] = value
    rejects(obj, "^external_symlinks must be true or false$")


BAD_DIGESTS = [
    "A" * 64, "a" * 63, "a" * 65, "g" * 64, " " + "a" * 63, "a" * 32 + " " + "a" * 31,
    "a" * 62 + "\n" + "a", "é" + "a" * 63, "ａ" * 64, 0, None, ["a" * 64],
]  # fmt: skip


@pytest.mark.parametrize("value", BAD_DIGESTS)
def test_rejects_bad_file_digest(value):
    obj = base_obj()
    obj["files"][0]["sha256"] = value
    rejects(obj, r"^file 'a/b.txt': sha256 must be 64 lowercase hex$")


def test_a_bad_digest_is_reported_with_its_own_file():
    obj = base_obj()
    last = obj["files"][-1]
    last["sha256"] = "a" * 63 + "G"
    rejects(obj, rf"^file {re.escape(repr(last['path']))}: sha256 must be 64 lowercase hex$")


def test_accepts_digests_of_digits_only():
    obj = base_obj()
    obj["files"][0]["sha256"] = "0123456789" * 6 + "0123"
    manifest = Manifest.from_bytes(canon(obj))
    assert manifest.files[0].sha256 == "0123456789" * 6 + "0123"


@pytest.mark.parametrize("value", BAD_DIGESTS)
def test_rejects_bad_piece_digest(value):
    obj = base_obj()
    obj["pieces"][1] = value
    rejects(obj, r"^pieces must be a list of 64-character lowercase hex sha256$")


def test_rejects_pieces_not_a_list():
    obj = base_obj()
    obj["pieces"] = "".join(obj["pieces"])
    rejects(obj, r"^pieces must be a list of 64-character lowercase hex sha256$")


@pytest.mark.parametrize(
    ("change", "count"), [(lambda p: p[:1], 1), (lambda p: [], 0), (lambda p: p + p[:1], 3)]
)
def test_rejects_piece_count_mismatch(change, count):
    obj = base_obj()
    obj["pieces"] = change(obj["pieces"])
    total = BASE.total_size
    rejects(
        obj,
        rf"^manifest has {count} piece hashes but its {total} bytes in pieces of"
        rf" {MIN_PIECE_SIZE} need 2$",
    )


def test_rejects_release_over_size_limit():
    obj = one_byte_obj()
    half = MAX_TOTAL_SIZE // 2 + 1
    obj["files"] = [
        {"path": name, "size": half, "mode": 0o644, "sha256": "0" * 64} for name in ("a", "b")
    ]
    obj["total_size"] = 2 * half
    rejects(obj, rf"^release of {2 * half} bytes exceeds the size limit$")


def test_rejects_too_many_pieces():
    size = MAX_PIECES * MIN_PIECE_SIZE + 1
    obj = one_byte_obj()
    obj["files"][0]["size"] = size
    obj["total_size"] = size
    rejects(obj, rf"^release needs {MAX_PIECES + 1} pieces; the limit is {MAX_PIECES}$")


def test_rejects_too_many_entries(monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_ENTRIES", 4)
    rejects(base_obj(), "^manifest lists 5 entries; the limit is 4$")
    monkeypatch.setattr(manifest_module, "MAX_ENTRIES", 2)
    rejects(base_obj(), "^manifest lists more than 2 files$")


def test_rejects_oversized_manifest(monkeypatch):
    data = BASE.to_bytes()
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", len(data) - 1)
    rejects(data, rf"^manifest is larger than {len(data) - 1} bytes$")
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", len(data))
    assert Manifest.from_bytes(data).id == BASE.id


def test_load_manifest_names_the_file(tmp_path):
    good = tmp_path / "good.manifest"
    good.write_bytes(BASE.to_bytes())
    assert manifest_module.load_manifest(str(good)).id == BASE.id
    bad = tmp_path / "bad.manifest"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(bad))}: manifest is not valid"):
        manifest_module.load_manifest(str(bad))
    with pytest.raises(ManifestError, match=r"^cannot read manifest .*missing"):
        manifest_module.load_manifest(str(tmp_path / "missing"))


# -- path safety ---------------------------------------------------------------------------

LONG_PATH = "/".join(["x" * 200] * 21)  # names are fine, the whole is 4,220 bytes


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "must be a non-empty string"),
        (None, "must be a non-empty string"),
        (5, "must be a non-empty string"),
        (b"a", "must be a non-empty string"),
        ("a\x00b", "contains a NUL byte"),
        ("\x00", "contains a NUL byte"),
        ("a/\ud800", "not valid UTF-8"),
        ("\udcff", "not valid UTF-8"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("/", "absolute paths are not allowed"),
        ("..", "'..' components"),
        ("../a", "'..' components"),
        ("a/../b", "'..' components"),
        ("a/..", "'..' components"),
        (".", "'..' components"),
        ("./a", "'..' components"),
        ("a/.", "'..' components"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("x" * (MAX_NAME_BYTES + 1), "a name is over 255 bytes"),
        ("d/" + "é" * 128, "a name is over 255 bytes"),  # 128 characters, 256 bytes
        (LONG_PATH, f"longer than {MAX_PATH_BYTES} bytes"),
    ],
)
def test_check_relative_path_rejects(path, reason):
    with pytest.raises(ManifestError, match=r"^invalid path .*" + re.escape(reason)):
        check_relative_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a b/c d.txt",
        "日本/ファイル",
        "...",
        ".hidden/..x",
        "a..b",
        "back\\slash",
        "x" * MAX_NAME_BYTES,
        "é" * 127,
        "/".join(["x" * MAX_NAME_BYTES] * 16),  # 4,095 bytes
    ],
)
def test_check_relative_path_accepts(path):
    assert check_relative_path(path) == path


_NAMES = st.sampled_from(["", ".", "..", "...", "a", ".x", "x.", "é" * 127, "é" * 128, "x" * 256])


@settings(max_examples=300)
@given(st.lists(_NAMES, min_size=1, max_size=6))
def test_check_relative_path_agrees_with_a_component_by_component_check(names):
    """The substring tests stand for the plain rule: every component non-empty, not '.'
    or '..', and at most 255 bytes (the path itself within the length limit)."""
    path = "/".join(names)
    clean = all(n not in ("", ".", "..") for n in names)
    short = all(len(n.encode()) <= MAX_NAME_BYTES for n in names)
    if path and clean and short:
        assert check_relative_path(path) == path
    else:
        with pytest.raises(ManifestError):
            check_relative_path(path)


def test_manifest_validates_every_kind_of_path():
    bad = "a/../b"
    for kwargs in (
        {"files": [FileEntry(bad, 0, 0o644, "0" * 64)]},
        {"files": [], "symlinks": [SymlinkEntry(bad, "x")]},
        {"files": [], "dirs": [DirEntry(bad, 0o755)]},
    ):
        with pytest.raises(ManifestError, match=r"^invalid path 'a/\.\./b'"):
            Manifest(piece_size=MIN_PIECE_SIZE, pieces=[], **kwargs)


def shape_obj(files=(), symlinks=(), dirs=(), external=False) -> dict[str, Any]:
    """A manifest object of empty files, symlinks and dirs (no pieces needed)."""
    obj = one_byte_obj()
    obj["files"] = [{"path": p, "size": 0, "mode": 0o644, "sha256": sha(b"")} for p in files]
    obj["symlinks"] = [{"path": p, "target": t} for p, t in symlinks]
    obj["dirs"] = [{"path": p, "mode": 0o755} for p in dirs]
    obj["pieces"] = []
    obj["total_size"] = 0
    obj["external_symlinks"] = external
    return obj


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"files": ["a", "a"]}, "^duplicate path 'a'$"),
        ({"files": ["a"], "symlinks": [("a", "b")]}, "^duplicate path 'a'$"),
        ({"files": ["a"], "dirs": ["a"]}, "^duplicate path 'a'$"),
        ({"symlinks": [("l", "x"), ("l", "y")]}, "^duplicate path 'l'$"),
        ({"files": ["a", "a/b"]}, "^path 'a/b' lies inside file 'a'$"),
        ({"files": ["a", "a/b/c/d"]}, "^path 'a/b/c/d' lies inside file 'a'$"),
        ({"files": ["d/f"], "symlinks": [("d", "x")]}, "^path 'd/f' lies inside symlink 'd'$"),
        ({"symlinks": [("d", "x"), ("d/l", "y")]}, "^path 'd/l' lies inside symlink 'd'$"),
        ({"files": ["e/f"], "dirs": ["e"]}, "^path 'e/f' lies inside empty directory 'e'$"),
        ({"dirs": ["e", "e/sub"]}, "^path 'e/sub' lies inside empty directory 'e'$"),
        ({"files": ["x/y/f"], "dirs": ["x/y"]}, "lies inside empty directory 'x/y'$"),
    ],
)
def test_rejects_bad_tree_shape(parts, message):
    rejects(shape_obj(**parts), message)


def test_accepts_siblings_with_shared_prefixes():
    obj = shape_obj(files=["a.txt", "a/b", "ab/c"], symlinks=[("a b", "a.txt")], dirs=["a/c"])
    obj["files"].sort(key=lambda e: e["path"])
    obj["symlinks"].sort(key=lambda e: e["path"])
    assert len(Manifest.from_bytes(canon(obj)).files) == 3


ESCAPES = [
    ({"l": "/etc/passwd"}, "l", "its target is an absolute path"),
    ({"l": "/"}, "l", "its target is an absolute path"),
    ({"l": ".."}, "l", "its target leads above the release root"),
    ({"l": "../x"}, "l", "its target leads above the release root"),
    ({"l": "a/../../x"}, "l", "its target leads above the release root"),
    ({"d/l": "../.."}, "d/l", "its target leads above the release root"),
    ({"d/e/l": "../../../etc"}, "d/e/l", "its target leads above the release root"),
    ({"up": ".", "out": "up/.."}, "out", "its target leads above the release root"),
    ({"d/up": "..", "d/out": "up/../x"}, "d/out", "leads above the release root"),
    ({"a": "b/c", "b/c": "..", "out": "a/.."}, "out", "leads above the release root"),
    ({"abs": "/srv", "via": "abs/x"}, "via", "leads through a symlink to an absolute path"),
    ({"d/abs": "/", "via": "d/abs"}, "via", "leads through a symlink to an absolute path"),
    ({"self": "self"}, "self", "loops"),
    ({"a": "b", "b": "a"}, "a", "loops"),
    ({"l": "l/x"}, "l", "loops"),
]


@pytest.mark.parametrize(("links", "path", "reason"), ESCAPES)
def test_symlink_escape_reasons(links, path, reason):
    found = symlink_escape(path, links)
    assert found is not None and reason in found


@pytest.mark.parametrize(("links", "path", "reason"), ESCAPES)
def test_manifest_refuses_escaping_symlinks_unless_allowed(links, path, reason):
    obj = shape_obj(symlinks=sorted(links.items()))
    message = rejects(obj, r"points outside the release: ")
    assert message.startswith("symlink ")
    allowed = Manifest.from_bytes(canon(shape_obj(symlinks=sorted(links.items()), external=True)))
    assert {s.path: s.target for s in allowed.symlinks} == links


@pytest.mark.parametrize(
    ("links", "path"),
    [
        ({"l": "x"}, "l"),
        ({"l": "."}, "l"),
        ({"l": "./a/./b/"}, "l"),
        ({"d/l": ".."}, "d/l"),
        ({"d/e/l": "../../f"}, "d/e/l"),
        ({"d/l": "../d/../d/x"}, "d/l"),
        ({"up": ".", "in": "up/up/up/x"}, "in"),
        ({"d/up": "..", "d/in": "up/d/up/x"}, "d/in"),
        ({"a": "b", "b": "c", "c": "d"}, "a"),
        ({"f/l": "..//.//x"}, "f/l"),
    ],
)
def test_symlinks_that_stay_inside(links, path):
    assert symlink_escape(path, links) is None
    Manifest.from_bytes(canon(shape_obj(symlinks=sorted(links.items()))))


def test_symlink_chain_length_limit():
    def chain(n: int) -> dict[str, str]:
        links = {f"l{i:03d}": f"l{i + 1:03d}" for i in range(n - 1)}
        links[f"l{n - 1:03d}"] = "end"
        return links

    assert symlink_escape("l000", chain(MAX_SYMLINK_HOPS)) is None
    assert "too many symlinks" in (symlink_escape("l000", chain(MAX_SYMLINK_HOPS + 2)) or "")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("", "invalid target ''"),
        (5, "invalid target 5"),
        (None, "invalid target None"),
        ("a\x00b", "invalid target"),
        ("x" * (MAX_PATH_BYTES + 1), "target is too long"),
        ("\ud800", "target is not UTF-8"),
    ],
)
def test_rejects_bad_symlink_target(target, reason):
    with pytest.raises(ManifestError, match=rf"^symlink 'l': {re.escape(reason)}"):
        Manifest(
            piece_size=MIN_PIECE_SIZE,
            files=[],
            symlinks=[SymlinkEntry("l", target)],
            pieces=[],
            external_symlinks=True,
        )


# A random small tree on disk (directories, a regular file, relative and absolute symlinks)
# compared with what the kernel and os.path.realpath make of it.
DIR_CHOICES = ["a", "b", "a/a", "a/b", "b/a", "a/a/b"]
LINK_NAMES = ["x", "y", "z"]
COMPONENTS = ["..", "..", ".", "a", "b", "x", "y", "z", "f", ""]


@st.composite
def link_trees(draw: st.DrawFn) -> tuple[set[str], set[str], dict[str, str]]:
    dirs: set[str] = set()
    for d in draw(st.sets(st.sampled_from(DIR_CHOICES))):
        parts = d.split("/")
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    places = ["", *sorted(d + "/" for d in dirs)]
    files = {p + "f" for p in draw(st.sets(st.sampled_from(places)))}
    links: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 6))):
        path = draw(st.sampled_from(places)) + draw(st.sampled_from(LINK_NAMES))
        parts = draw(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=6))
        links[path] = "/".join(parts) or "."  # a leading "" makes an absolute target
    return dirs, files, links


@settings(max_examples=200, deadline=None)
@given(link_trees())
@example(({"a"}, set(), {"up": ".", "out": "up/.."}))
@example(({"a"}, {"a/f"}, {"a/x": "../a/x/..", "x": "a/x"}))
@example(({"a", "a/b"}, set(), {"a/b/x": "../../a/b/y", "a/b/y": "../.."}))
def test_symlink_escape_is_sound_against_the_kernel(tree):
    """What is asserted, for every symlink of a random tree:

    - Soundness: if ``symlink_escape`` says the link stays inside, then
      ``os.path.realpath`` of it lies inside the root. realpath (non-strict) follows
      real symlinks and treats a missing component, or one that is a regular file,
      as a plain directory before ``..`` cancels it, exactly like the model; the
      kernel refuses such paths (ENOENT, ENOTDIR), which can only be safer. Loops
      and over-long chains are refused by the model, so they need no claim here.
    - Agreement with the kernel: when the kernel itself resolves the link
      (``os.path.exists``), it reaches the very inode realpath names.
    - Precision: an escape reported for a reason other than a loop is real (realpath
      lands outside the root), so the check does not refuse harmless trees. (Names
      outside the root are never 'root', so an escaped path cannot come back in.)
    """
    dirs, files, links = tree
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(os.path.join(tmp, "root"))
        os.mkdir(root)
        for d in sorted(dirs):
            os.mkdir(os.path.join(root, d))
        for f in files:
            with open(os.path.join(root, f), "wb"):
                pass
        for path, target in links.items():
            os.symlink(target, os.path.join(root, path))
        for path in links:
            reason = symlink_escape(path, links)
            here = os.path.join(root, path)
            resolved = os.path.realpath(here)
            inside = resolved == root or resolved.startswith(root + os.sep)
            if reason is None:
                assert inside, (path, links, resolved)
            elif "loops" not in reason:
                assert not inside, (path, links, reason, resolved)
            if os.path.exists(here):
                assert os.path.samefile(here, resolved)


# -- piece layout --------------------------------------------------------------------------


def layout_manifest(sizes: list[int], piece_size: int) -> Manifest:
    files = [FileEntry(f"f{i:03d}", size, 0o644, "0" * 64) for i, size in enumerate(sizes)]
    count = math.ceil(sum(sizes) / piece_size)
    return Manifest(piece_size=piece_size, files=files, pieces=[bytes(32)] * count)


SIZES = st.lists(st.one_of(st.just(0), st.integers(1, 3 * MIN_PIECE_SIZE + 7)), max_size=10)


@settings(max_examples=100, deadline=None)
@given(sizes=SIZES, piece_size=st.sampled_from([MIN_PIECE_SIZE, 2 * MIN_PIECE_SIZE, 1 << 20]))
@example(sizes=[0, 5, 0, MIN_PIECE_SIZE, 0], piece_size=MIN_PIECE_SIZE)
@example(sizes=[0, 0, 3 * MIN_PIECE_SIZE, 0, 0], piece_size=MIN_PIECE_SIZE)
@example(sizes=[MIN_PIECE_SIZE - 1, 1, 0, 1, MIN_PIECE_SIZE], piece_size=MIN_PIECE_SIZE)
@example(sizes=[0, 0, 0], piece_size=MIN_PIECE_SIZE)
def test_piece_spans_cover_every_byte_once_in_order(sizes, piece_size):
    manifest = layout_manifest(sizes, piece_size)
    total = sum(sizes)
    assert manifest.total_size == total
    assert manifest.piece_count == math.ceil(total / piece_size)
    lengths = [manifest.piece_length(i) for i in range(manifest.piece_count)]
    assert sum(lengths) == total
    assert all(n == piece_size for n in lengths[:-1])
    assert all(0 < n <= piece_size for n in lengths)

    covered: list[tuple[str, int, int]] = []  # (path, start, end) merged across pieces
    for index in range(manifest.piece_count):
        spans = manifest.piece_spans(index)
        assert sum(span.length for span in spans) == lengths[index]
        for span in spans:
            assert span.length > 0 and span.offset >= 0
            assert span.offset + span.length <= span.file.size
            if covered and covered[-1][0] == span.file.path and covered[-1][2] == span.offset:
                covered[-1] = (span.file.path, covered[-1][1], span.offset + span.length)
            else:
                covered.append((span.file.path, span.offset, span.offset + span.length))
    expected = [(f"f{i:03d}", 0, size) for i, size in enumerate(sizes) if size]
    assert covered == expected

    for bad in (-1, manifest.piece_count):
        with pytest.raises(IndexError):
            manifest.piece_spans(bad)


# -- automatic piece size ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (0, 256 * KiB),
        (1, 256 * KiB),
        (256 * MiB, 256 * KiB),
        (256 * MiB + 1, 512 * KiB),
        (1 * GiB, 1 * MiB),
        (1 * GiB + 1, 2 * MiB),
        (16 * GiB, 16 * MiB),
        (100 * GiB, 16 * MiB),
        (MAX_TOTAL_SIZE, 16 * MiB),
    ],
)
def test_auto_piece_size_documented_table(total, expected):
    assert auto_piece_size(total) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(0, MAX_TOTAL_SIZE), st.integers(0, MAX_TOTAL_SIZE))
def test_auto_piece_size_rule(a, b):
    size = auto_piece_size(a)
    assert check_piece_size(size) == size
    assert size & (size - 1) == 0
    assert AUTO_MIN_PIECE_SIZE <= size <= AUTO_MAX_PIECE_SIZE
    # The smallest allowed power of two giving at most 1,024 pieces, unless capped.
    if size < AUTO_MAX_PIECE_SIZE:
        assert math.ceil(a / size) <= AUTO_TARGET_PIECES
    if size > AUTO_MIN_PIECE_SIZE:
        assert math.ceil(a / (size // 2)) > AUTO_TARGET_PIECES
    low, high = sorted((a, b))
    assert auto_piece_size(low) <= auto_piece_size(high)
