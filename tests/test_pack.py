"""Packing a tree into a manifest, reading its pieces back, and the pack/inspect CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import pack_tree, run_roost, write_tree
from roost.runtime.errors import ManifestError, RoostError
from roost.runtime.manifest import (
    AUTO_MIN_PIECE_SIZE,
    MIN_PIECE_SIZE,
    DirEntry,
    FileEntry,
    Manifest,
    SymlinkEntry,
)
from roost.runtime.pack import pack
from roost.runtime.tree import read_piece

MiB = 1024 * 1024
# The packer reads and hashes in buffers of this size: files must straddle it.
CHUNK = 4 * MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_pieces(contents: dict[str, bytes], piece_size: int) -> list[bytes]:
    """The documented piece stream, computed independently of the packer."""
    stream = b"".join(contents[path] for path in sorted(contents))
    return [
        hashlib.sha256(stream[i : i + piece_size]).digest()
        for i in range(0, len(stream), piece_size)
    ]


def check_against(manifest: Manifest, contents: dict[str, bytes], root: Path | None) -> None:
    """``manifest`` describes exactly ``contents`` (path -> bytes), piece by piece."""
    assert [f.path for f in manifest.files] == sorted(contents)
    for entry in manifest.files:
        assert entry.size == len(contents[entry.path])
        assert entry.sha256 == sha(contents[entry.path])
    assert manifest.total_size == sum(len(data) for data in contents.values())
    assert list(manifest.pieces) == expected_pieces(contents, manifest.piece_size)
    if root is not None:
        read = [read_piece(str(root), manifest, i) for i in range(manifest.piece_count)]
        assert [hashlib.sha256(piece).digest() for piece in read] == list(manifest.pieces)
        assert b"".join(read) == b"".join(contents[p] for p in sorted(contents))


# -- what gets recorded --------------------------------------------------------------------


def test_sample_tree_is_described_exactly(sample_tree: Path):
    manifest = pack_tree(sample_tree, piece_size=MIN_PIECE_SIZE)
    contents = {
        str(p.relative_to(sample_tree)): p.read_bytes()
        for p in sample_tree.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    assert set(contents) == {
        "a/b/hello.txt",
        "run.sh",
        "spaces in name.txt",
        "unicodé/ñame.txt",
        "zero",
        "data.bin",
    }
    check_against(manifest, contents, sample_tree)
    assert manifest.symlinks == (
        SymlinkEntry("dirlink", "a"),
        SymlinkEntry("link", "a/b/hello.txt"),
    )
    empty_mode = stat.S_IMODE(os.stat(sample_tree / "empty").st_mode)
    assert manifest.dirs == (DirEntry("empty", empty_mode),)
    assert {f.path: f.mode for f in manifest.files}["run.sh"] == 0o755
    assert {f.path: f.mode for f in manifest.files}["zero"] == 0o644
    assert manifest.external_symlinks is False
    assert Manifest.from_bytes(manifest.to_bytes()).id == manifest.id


SPEC = {
    "b/two.txt": b"two",
    "a/one.txt": b"one",
    "c d/é.txt": b"unicode",
    "z.bin": bytes(range(256)) * 300,
    "empty/": None,
    "deep/er/": None,
    "link": ("->", "a/one.txt"),
    "exe": (b"#!/bin/sh\n", 0o755),
}


def test_same_tree_built_differently_has_the_same_id(tmp_path: Path):
    first = write_tree(tmp_path / "one", SPEC)
    second = write_tree(tmp_path / "elsewhere" / "two", dict(reversed(list(SPEC.items()))))
    os.utime(second / "a/one.txt", (1, 1))
    os.utime(second / "empty", (2, 2))
    a, b = pack_tree(first), pack_tree(second)
    assert a.to_bytes() == b.to_bytes()
    assert a.id == b.id
    # ... and a real difference shows.
    (second / "b/two.txt").write_bytes(b"TWO")
    assert pack_tree(second).id != a.id


def test_mode_change_changes_the_id(tmp_path: Path):
    root = write_tree(tmp_path / "t", {"f": b"x"})
    before = pack_tree(root).id
    (root / "f").chmod(0o755)
    assert pack_tree(root).id != before


def test_modes_keep_exec_bits_and_drop_special_bits(tmp_path: Path):
    root = write_tree(
        tmp_path / "t",
        {
            "plain": (b"x", 0o644),
            "exec": (b"x", 0o755),
            "private": (b"x", 0o600),
            "readonly": (b"x", 0o400),
            "setuid": (b"x", 0o4755),
            "setgid": (b"x", 0o2711),
            "sticky": (b"x", 0o1644),
            "emptydir/": None,
        },
    )
    (root / "emptydir").chmod(0o3777)
    assert stat.S_IMODE(os.stat(root / "setuid").st_mode) == 0o4755  # really set on disk
    manifest = pack_tree(root)
    modes = {f.path: f.mode for f in manifest.files}
    assert modes == {
        "plain": 0o644,
        "exec": 0o755,
        "private": 0o600,
        "readonly": 0o400,
        "setuid": 0o755,
        "setgid": 0o711,
        "sticky": 0o644,
    }
    assert manifest.dirs == (DirEntry("emptydir", 0o777),)


def test_empty_dirs_recorded_only_when_empty(tmp_path: Path):
    root = write_tree(
        tmp_path / "t",
        {
            "full/f": b"x",
            "e1/": None,
            "outer/inner/": None,
            "withlink/l": ("->", "../full/f"),
            "logs/a.log": b"log",
            "logs/old/b.log": b"log",
        },
    )
    (root / "e1").chmod(0o700)
    (root / "logs/old").chmod(0o750)
    (root / "outer/inner").chmod(0o711)
    manifest = pack_tree(root, excludes=["*.log"])
    # 'logs/old' lost its only content to the exclude; 'logs' still holds 'logs/old'.
    assert [(d.path, d.mode) for d in manifest.dirs] == [
        ("e1", 0o700),
        ("logs/old", 0o750),
        ("outer/inner", 0o711),
    ]
    assert [f.path for f in manifest.files] == ["full/f"]
    assert [s.path for s in manifest.symlinks] == ["withlink/l"]


def test_git_is_excluded_by_default(tmp_path: Path):
    root = write_tree(
        tmp_path / "t",
        {
            ".git/config": b"[core]",
            ".git/objects/x": b"obj",
            "sub/.git": b"gitdir: x",
            "src/.gitignore": b"*.o",
            "main.c": b"int main;",
        },
    )
    manifest = pack_tree(root)
    assert [f.path for f in manifest.files] == ["main.c", "src/.gitignore"]
    assert [d.path for d in manifest.dirs] == ["sub"]  # its only entry was .git
    everything = pack_tree(root, default_excludes=False)
    assert [f.path for f in everything.files] == [
        ".git/config",
        ".git/objects/x",
        "main.c",
        "src/.gitignore",
        "sub/.git",
    ]
    assert everything.dirs == ()


@pytest.mark.parametrize(
    ("excludes", "kept"),
    [
        (["*.pyc"], ["a/keep.py", "b/c/data", "notes.txt", "top.py"]),
        (["__pycache__"], ["a/keep.py", "b/c/data", "notes.txt", "top.py", "top.pyc"]),
        (["b/c"], ["a/__pycache__/x.pyc", "a/keep.py", "notes.txt", "top.py", "top.pyc"]),
        (["a/*"], ["b/c/data", "notes.txt", "top.py", "top.pyc"]),
        (["*/x.pyc", "notes.*"], ["a/keep.py", "b/c/data", "top.py", "top.pyc"]),
        (["b"], ["a/__pycache__/x.pyc", "a/keep.py", "notes.txt", "top.py", "top.pyc"]),
        (
            ["*.PY"],
            ["a/__pycache__/x.pyc", "a/keep.py", "b/c/data", "notes.txt", "top.py", "top.pyc"],
        ),
        (
            ["keep"],
            ["a/__pycache__/x.pyc", "a/keep.py", "b/c/data", "notes.txt", "top.py", "top.pyc"],
        ),
    ],
)
def test_excludes_match_names_and_relative_paths(tmp_path: Path, excludes, kept):
    root = write_tree(
        tmp_path / "t",
        {
            "top.py": b"1",
            "top.pyc": b"2",
            "notes.txt": b"3",
            "a/keep.py": b"4",
            "a/__pycache__/x.pyc": b"5",
            "b/c/data": b"6",
        },
    )
    assert [f.path for f in pack_tree(root, excludes=excludes).files] == kept


def test_single_file_as_src(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = os.urandom(50_000)
    path = tmp_path / "model weights.bin"
    path.write_bytes(data)
    path.chmod(0o4755)
    manifest = pack(str(path), piece_size=MIN_PIECE_SIZE)
    assert manifest.files == (FileEntry("model weights.bin", 50_000, 0o755, sha(data)),)
    assert manifest.symlinks == () and manifest.dirs == ()
    check_against(manifest, {"model weights.bin": data}, tmp_path)
    # The name is the file's, whatever path it was given by.
    monkeypatch.chdir(tmp_path)
    assert pack("model weights.bin", piece_size=MIN_PIECE_SIZE).id == manifest.id


def test_empty_directory_packs_to_an_empty_release(tmp_path: Path):
    (tmp_path / "t").mkdir()
    manifest = pack_tree(tmp_path / "t")
    assert (manifest.files, manifest.symlinks, manifest.dirs, manifest.pieces) == ((),) * 4
    assert manifest.piece_size == AUTO_MIN_PIECE_SIZE


def test_symlinks_are_recorded_not_followed(tmp_path: Path):
    root = write_tree(
        tmp_path / "t",
        {"real/f": b"data", "alias": ("->", "real"), "dangling": ("->", "nowhere/x")},
    )
    manifest = pack_tree(root)
    assert [f.path for f in manifest.files] == ["real/f"]
    assert {s.path: s.target for s in manifest.symlinks} == {
        "alias": "real",
        "dangling": "nowhere/x",
    }


# -- refusals ------------------------------------------------------------------------------


def test_missing_src(tmp_path: Path):
    with pytest.raises(RoostError, match=r"^cannot read .*nope: No such file or directory$"):
        pack(str(tmp_path / "nope"))


def test_fifo_inside_the_tree_is_named(tmp_path: Path):
    root = write_tree(tmp_path / "t", {"ok": b"x", "sub/other": b"y"})
    os.mkfifo(root / "sub" / "pipe")
    with pytest.raises(RoostError) as info:
        pack_tree(root)
    assert str(root / "sub" / "pipe") in str(info.value)
    assert "special file" in str(info.value)
    # Excluding it is the documented way out.
    assert [f.path for f in pack_tree(root, excludes=["pipe"]).files] == ["ok", "sub/other"]


def test_fifo_as_src(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(RoostError, match="neither a directory nor a regular file"):
        pack(str(tmp_path / "pipe"))


@pytest.mark.parametrize(
    "links",
    [
        {"etc": ("->", "/etc")},
        {"sub/up": ("->", "../../outside")},
        {"up": ("->", "."), "out": ("->", "up/..")},
    ],
    ids=["absolute", "dotdot", "chain"],
)
def test_external_symlink_refused_unless_allowed(tmp_path: Path, links):
    root = write_tree(tmp_path / "t", {"sub/f": b"x", **links})
    with pytest.raises(ManifestError) as info:
        pack_tree(root)
    assert "points outside the tree" in str(info.value)
    assert "--allow-external-symlinks" in str(info.value)
    manifest = pack_tree(root, allow_external_symlinks=True)
    assert manifest.external_symlinks is True
    assert {s.path: s.target for s in manifest.symlinks} == {p: t for p, (_, t) in links.items()}
    assert Manifest.from_bytes(manifest.to_bytes()).id == manifest.id


def make_non_utf8(path: bytes, kind: str) -> None:
    try:
        if kind == "file":
            with open(path, "wb") as f:
                f.write(b"x")
        elif kind == "dir":
            os.mkdir(path)
        else:
            os.symlink(b"target-\xff", path)
    except OSError as exc:  # a filesystem that enforces UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 name here: {exc}")


@pytest.mark.parametrize("kind", ["file", "dir", "link-target"])
def test_non_utf8_names_are_refused(tmp_path: Path, kind):
    root = write_tree(tmp_path / "t", {"ok": b"x"})
    name = b"link" if kind == "link-target" else b"bad-\xff-name"
    make_non_utf8(os.path.join(os.fsencode(root), name), kind)
    with pytest.raises(RoostError, match="not valid UTF-8"):
        pack_tree(root)


def test_non_utf8_single_file_src(tmp_path: Path):
    path = os.path.join(os.fsencode(tmp_path), b"bad-\xfe")
    make_non_utf8(path, "file")
    with pytest.raises(RoostError, match="not valid UTF-8"):
        pack(os.fsdecode(path))


@pytest.mark.parametrize("piece_size", [MIN_PIECE_SIZE, 64 * 1024, 8 * MiB])
def test_forced_piece_size_is_honoured(sample_tree: Path, piece_size):
    manifest = pack_tree(sample_tree, piece_size=piece_size)
    assert manifest.piece_size == piece_size
    assert manifest.piece_count == -(-manifest.total_size // piece_size)
    assert pack_tree(sample_tree).piece_size == AUTO_MIN_PIECE_SIZE  # the automatic choice


@pytest.mark.parametrize("piece_size", [0, 1000, MIN_PIECE_SIZE // 2, 3 * MIN_PIECE_SIZE, 1 << 30])
def test_invalid_piece_size_refused(sample_tree: Path, piece_size):
    with pytest.raises(ManifestError, match=rf"piece size must be a power of two.*{piece_size}$"):
        pack_tree(sample_tree, piece_size=piece_size)


def test_file_changing_size_while_packing_is_reported(tmp_path: Path):
    root = write_tree(tmp_path / "t", {"a": b"first", "b": b"second"})

    def grow(done: int, total: int) -> None:
        with open(root / "b", "ab") as f:
            f.write(b"more")

    with pytest.raises(RoostError, match=r"b changed size while it was being packed$"):
        pack_tree(root, progress=grow)

    (root / "b").write_bytes(b"second")

    def shrink(done: int, total: int) -> None:
        (root / "b").write_bytes(b"s")

    with pytest.raises(RoostError, match=r"b changed size while it was being packed$"):
        pack_tree(root, progress=shrink)


def test_progress_reaches_the_total(tmp_path: Path):
    root = write_tree(tmp_path / "t", {"a": os.urandom(CHUNK + 10), "b": b"", "c": b"xyz"})
    calls: list[tuple[int, int]] = []
    pack_tree(root, progress=lambda done, total: calls.append((done, total)))
    total = CHUNK + 13
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# -- hashing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "piece_size", [MIN_PIECE_SIZE, AUTO_MIN_PIECE_SIZE, 4 * MiB, 16 * MiB], ids=str
)
def test_large_files_and_multi_file_pieces_hash_correctly(tmp_path: Path, piece_size):
    big = os.urandom(2 * CHUNK + 12_345)  # crosses read chunks unevenly
    contents = {
        "0-small": b"a" * 100,
        "1-big": big,
        "2-chunk": big[:CHUNK],  # exactly one read chunk
        "2-chunk-1": big[1:CHUNK],  # one byte short of it
        "3-empty": b"",
        "4-tail": big[-70_001:],
        **{f"5-many/{i:03d}": bytes([i]) * (i * 97) for i in range(40)},
        # Small files that together overflow one buffer.
        **{f"6-batch/{i}": big[i * 1_500_000 : (i + 1) * 1_500_000] for i in range(4)},
        "7-last": b"end",
        "8.x": big[:20_000],  # sorts before "8/x" though a walk meets "8" first
        "8/x": big[20_000:45_000],
    }
    root = write_tree(tmp_path / "t", contents)
    manifest = pack_tree(root, piece_size=piece_size)
    check_against(manifest, contents, root)
    multi = [i for i in range(manifest.piece_count) if len(manifest.piece_spans(i)) > 1]
    assert multi, "some piece must span several files"


# Names chosen so that directory-walk order differs from path order ('a.b' < 'a/x' < 'a0').
TREE_PATHS = ["a b", "a-c", "a.b", "a/x", "a/y.z", "a/y/z", "a0", "b/é", "b/日本", "c"]
FILE_SIZES = st.one_of(st.just(0), st.integers(1, 40_000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.dictionaries(st.sampled_from(TREE_PATHS), FILE_SIZES),
    exp=st.integers(14, 16),
    seed=st.binary(min_size=8, max_size=8),
)
def test_pack_matches_an_independent_piece_stream(sizes, exp, seed):
    contents = {
        path: hashlib.shake_256(seed + path.encode()).digest(size) for path, size in sizes.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tree(Path(tmp) / "t", contents)
        manifest = pack_tree(root, piece_size=1 << exp)
        check_against(manifest, contents, root)


# -- the command line ----------------------------------------------------------------------


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("roost: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_pack_and_inspect(sample_tree: Path, tmp_path: Path):
    out = tmp_path / "release.manifest"
    result = run_roost("pack", str(sample_tree), "-o", str(out), "--piece-size", "64K", check=True)
    manifest = Manifest.from_bytes(out.read_bytes())
    assert manifest.id == pack_tree(sample_tree, piece_size=64 * 1024).id
    assert f"release {manifest.id}" in result.stdout.splitlines()
    assert f"packed {len(manifest.files)} files" in result.stdout
    assert str(out) in result.stdout

    human = run_roost("inspect", str(out), check=True).stdout.splitlines()
    assert human == [
        f"release     {manifest.id}",
        f"files       {len(manifest.files)}",
        f"symlinks    {len(manifest.symlinks)}",
        f"empty dirs  {len(manifest.dirs)}",
        f"bytes       {manifest.total_size} ({manifest.total_size / 1024:.1f} KiB)",
        f"pieces      {manifest.piece_count} of 64.0 KiB",
    ]
    assert (len(manifest.files), len(manifest.symlinks), len(manifest.dirs)) == (6, 2, 1)

    as_json = json.loads(run_roost("inspect", "--json", str(out), check=True).stdout)
    assert as_json == manifest.summary()
    assert as_json["pieces"] == manifest.piece_count and as_json["piece_size"] == 64 * 1024


def test_cli_pack_options_and_default_output(sample_tree: Path, tmp_path: Path):
    (sample_tree / ".git").mkdir()
    (sample_tree / ".git" / "HEAD").write_bytes(b"ref")
    work = tmp_path / "cwd"
    work.mkdir()
    run_roost(
        "pack",
        str(sample_tree),
        "-q",
        "--exclude",
        "*.bin",
        "--no-default-excludes",
        cwd=str(work),
        check=True,
    )
    manifest = Manifest.from_bytes((work / "src.manifest").read_bytes())
    paths = [f.path for f in manifest.files]
    assert ".git/HEAD" in paths and "data.bin" not in paths
    assert manifest.id == pack_tree(sample_tree, excludes=["*.bin"], default_excludes=False).id


def test_cli_pack_errors(tmp_path: Path):
    assert_one_line_error(
        run_roost("pack", str(tmp_path / "missing"), "-o", str(tmp_path / "m")),
        "cannot read",
        "missing",
    )
    assert not (tmp_path / "m").exists()
    root = write_tree(tmp_path / "t", {"f": b"x", "out": ("->", "../..")})
    assert_one_line_error(
        run_roost("pack", str(root), "-o", str(tmp_path / "m")),
        "points outside the tree",
        "--allow-external-symlinks",
    )
    run_roost("pack", str(root), "-o", str(tmp_path / "m"), "--allow-external-symlinks", check=True)
    assert Manifest.from_bytes((tmp_path / "m").read_bytes()).external_symlinks is True
    assert_one_line_error(
        run_roost("pack", str(root / "f"), "-o", str(tmp_path / "m2"), "--piece-size", "1000"),
        "piece size must be a power of two",
    )


def test_cli_inspect_errors(tmp_path: Path, sample_tree: Path):
    garbage = tmp_path / "garbage.manifest"
    garbage.write_bytes(b"\x00\xffnot json")
    assert_one_line_error(run_roost("inspect", str(garbage)), str(garbage), "not valid JSON")

    edited = tmp_path / "edited.manifest"
    obj = json.loads(pack_tree(sample_tree).to_bytes())
    edited.write_text(json.dumps(obj, indent=2, sort_keys=True))
    assert_one_line_error(run_roost("inspect", str(edited)), "not in canonical form")

    assert_one_line_error(
        run_roost("inspect", "--json", str(tmp_path / "absent")),
        "cannot read manifest",
        "absent",
    )
