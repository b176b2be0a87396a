"""The ``roost`` command line over the host-side store, run as a real process.

Covers the acceptance test of the release store (pack, install and activate a
tree with every kind of entry and a 200 MiB file, then compare it with the
source), the store commands, destination safety, hostile or broken input,
locking between processes, and the ergonomics of the command line itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import SRC, pack_tree, run_roost, write_tree
from roost import __version__
from roost.runtime.manifest import Manifest
from roost.runtime.store import Store, install
from roost.runtime.tree import TreeSource, verify_tree

MiB = 1024 * 1024
CHUNK = 4 * MiB


def canonical(obj: object) -> bytes:
    return (
        json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one ``roost: error: ...`` line and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("roost: error: "), result.stderr
    return lines[0]


def write_random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def describe_tree(root: str) -> dict[str, tuple]:
    """Every entry below ``root`` as (kind, permission bits, size or link target)."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", None, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                assert stat.S_ISREG(st.st_mode), path
                entries[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size)
    return entries


def snapshot(root: Path, *, skip: Path | None = None, dir_mtimes: bool = True) -> dict:
    """Everything below ``root`` (and ``root`` itself): type, mode, size, mtime, content hash.

    ``skip`` leaves one subtree out; without ``dir_mtimes`` a directory whose
    only change is its mtime counts as unchanged.
    """
    state: dict[str, tuple] = {}

    def record(path: str) -> None:
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        extra: object = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                extra = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        mtime = st.st_mtime_ns if dir_mtimes or not stat.S_ISDIR(st.st_mode) else 0
        state[os.path.relpath(path, root)] = (kind, st.st_mode, st.st_size, mtime, extra)

    record(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != str(skip)]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path != str(skip):
                record(path)
    return state


def releases_json(dest: Path) -> list[dict]:
    result = run_roost("releases", str(dest), "--json", check=True)
    return json.loads(result.stdout)


def make_tree(root: Path, label: str, size: int = 30_000) -> Path:
    return write_tree(
        root,
        {
            "version.txt": label.encode() + b"\n",
            "bin/run": (b"#!/bin/sh\necho " + label.encode() + b"\n", 0o755),
            "data.bin": os.urandom(size),
            "link": ("->", "version.txt"),
            "empty/": None,
        },
    )


def pack_cli(src: Path, out: Path, *extra: str) -> Manifest:
    run_roost("pack", str(src), "-o", str(out), "-q", *extra, check=True)
    return Manifest.from_bytes(out.read_bytes())


# -- the acceptance test --------------------------------------------------------------------

BIG_SIZE = 200 * MiB + 12_345  # not a multiple of any piece size


def test_pack_install_activate_reproduces_the_tree_exactly(tmp_path):
    src = write_tree(
        tmp_path / "src",
        {
            "a/b/hello.txt": b"hello\n",
            "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
            "bin/tool": (os.urandom(3000), 0o700),
            "group-exec": (b"#!/bin/sh\n", 0o750),
            "secret.key": (b"k3y", 0o600),
            "readonly.txt": (b"do not edit\n", 0o444),
            "dir with spaces/file with spaces.txt": b"spaces",
            " leading and trailing ": b"odd name",
            "unicodé/ñame.txt": "unicode ✓\n".encode(),
            "日本語/ファイル.txt": "こんにちは\n".encode(),
            "emoji 🚀/🚀.txt": b"rocket",
            "zero": b"",
            "nested/deeper/zero-too": b"",
            "link-to-file": ("->", "a/b/hello.txt"),
            "link-to-dir": ("->", "日本語"),
            "a/b/up-link": ("->", "../../run.sh"),
            "dangling": ("->", "not-there"),
            "empty/": None,
            "deep/empty/dir/": None,
            "private-empty/": None,
            "sealed-empty/": None,
        },
    )
    write_random_file(src / "models" / "model weights.bin", BIG_SIZE)
    (src / "models" / "model weights.bin").chmod(0o644)
    (src / "private-empty").chmod(0o700)
    (src / "sealed-empty").chmod(0o555)
    # The manifest records the modes of files and of empty directories; directories
    # with content are created 0755 on install, so the source uses that mode too.
    for dirpath, dirnames, _ in os.walk(src):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.listdir(path) and not os.path.islink(path):
                os.chmod(path, 0o755)

    manifest_file = tmp_path / "release.manifest"
    packed = run_roost("pack", str(src), "-o", str(manifest_file), check=True)
    manifest = Manifest.from_bytes(manifest_file.read_bytes())
    assert f"release {manifest.id}" in packed.stdout
    assert manifest.total_size > BIG_SIZE

    dest = tmp_path / "dest"
    install_args = ["--from", str(src), "--dest", str(dest), "--activate"]
    result = run_roost("install", str(manifest_file), *install_args, check=True)
    assert f"installed release {manifest.short_id}" in result.stdout
    assert "activated" in result.stdout
    assert os.readlink(dest / "current") == f"releases/{manifest.short_id}"

    installed = os.path.realpath(dest / "current")
    expected, got = describe_tree(str(src)), describe_tree(installed)
    assert got == expected
    assert expected["models/model weights.bin"] == ("file", 0o644, BIG_SIZE)
    assert expected["sealed-empty"] == ("dir", 0o555, None)
    assert expected["link-to-dir"] == ("symlink", None, "日本語")
    for rel, (kind, _, _) in expected.items():
        if kind == "file":
            assert same_bytes(os.path.join(src, rel), os.path.join(installed, rel)), rel

    verified = run_roost("verify", str(dest / "current"), str(manifest_file), check=True)
    assert f"matches release {manifest.id}" in verified.stdout
    assert os.listdir(dest / ".roost" / "staging") == []

    # And verify is not a rubber stamp: one flipped byte is reported.
    victim = os.path.join(installed, "日本語/ファイル.txt")
    data = bytearray(Path(victim).read_bytes())
    data[0] ^= 1
    Path(victim).write_bytes(bytes(data))
    broken = run_roost("verify", str(dest / "current"), str(manifest_file))
    assert broken.returncode == 1
    assert "日本語/ファイル.txt: content differs" in broken.stdout
    assert "does NOT match" in broken.stderr


# -- store commands -------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Three small releases: label -> (source tree, manifest file)."""
    out = {}
    for label in ("v1", "v2", "v3"):
        src = make_tree(tmp_path / f"src-{label}", label)
        pack_cli(src, tmp_path / f"{label}.manifest")
        out[label] = (src, tmp_path / f"{label}.manifest")
    return out


def cli_install(dest: Path, release: tuple[Path, Path], *extra: str, check: bool = True):
    src, manifest_file = release
    return run_roost(
        "install", str(manifest_file), "--from", str(src), "--dest", str(dest), *extra, check=check
    )


def test_install_without_activate_then_activate(tmp_path, three):
    dest = tmp_path / "dest"
    result = cli_install(dest, three["v1"], "--tag", "v1")
    assert "installed release" in result.stdout and "activated" not in result.stdout
    assert not os.path.lexists(dest / "current")
    assert [r["name"] for r in releases_json(dest)] == ["v1"]
    assert (dest / "releases" / "v1").is_dir()

    cli_install(dest, three["v2"], "--tag", "v2", "--activate")
    cli_install(dest, three["v3"], "--tag", "v3")
    assert os.readlink(dest / "current") == "releases/v2"

    result = run_roost("activate", str(dest), "v1", check=True)
    assert result.stdout.strip() == f"activated: {dest / 'current'} -> releases/v1"
    assert os.readlink(dest / "current") == "releases/v1"


def test_default_release_name_is_the_short_id(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--activate")
    short = Manifest.from_bytes(three["v1"][1].read_bytes()).short_id
    assert os.listdir(dest / "releases") == [short]
    assert os.readlink(dest / "current") == f"releases/{short}"


def test_reinstall_reports_already_installed_and_rewrites_nothing(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    release_dir = dest / "releases" / "v1"
    before = snapshot(release_dir)
    inodes = {p: os.lstat(p).st_ino for p in release_dir.rglob("*")}
    meta = (dest / ".roost" / "meta" / "v1.json").read_bytes()
    again = cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    assert "already installed" in again.stdout
    assert snapshot(release_dir) == before
    assert {p: os.lstat(p).st_ino for p in release_dir.rglob("*")} == inodes
    assert (dest / ".roost" / "meta" / "v1.json").read_bytes() == meta


def test_tag_of_another_release_is_refused_and_nothing_changes(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--tag", "prod", "--activate")
    before = snapshot(tmp_path, dir_mtimes=False)
    line = one_error_line(
        cli_install(dest, three["v2"], "--tag", "prod", "--activate", check=False)
    )
    assert "'prod' is already used" in line
    assert snapshot(tmp_path, dir_mtimes=False) == before


def test_releases_marks_current_and_previous(tmp_path, three):
    dest = tmp_path / "dest"
    for label in ("v1", "v2", "v3"):
        cli_install(dest, three[label], "--tag", label, "--activate")
    rows = releases_json(dest)
    assert [r["name"] for r in rows] == ["v1", "v2", "v3"]
    assert [(r["current"], r["previous"]) for r in rows] == [
        (False, False),
        (False, True),
        (True, False),
    ]
    ids = {label: Manifest.from_bytes(three[label][1].read_bytes()).id for label in three}
    for row in rows:
        assert row["id"] == ids[row["name"]]
        assert row["bytes"] == Manifest.from_bytes(three[row["name"]][1].read_bytes()).total_size
        assert row["files"] == 3

    human = run_roost("releases", str(dest), check=True).stdout.splitlines()
    assert len(human) == 3
    marks = {line[2:].split()[0]: line[0] for line in human}
    assert marks == {"v1": " ", "v2": "-", "v3": "*"}
    assert ids["v3"][:12] in human[2]

    empty = tmp_path / "empty-store"
    empty.mkdir()
    Store.open(str(empty), create=True)
    assert run_roost("releases", str(empty), check=True).stdout.startswith("no releases")
    assert releases_json(empty) == []


def test_rollback_walks_back_then_refuses(tmp_path, three):
    dest = tmp_path / "dest"
    for label in ("v1", "v2", "v3"):
        cli_install(dest, three[label], "--tag", label, "--activate")
    first = run_roost("rollback", str(dest), check=True)
    assert first.stdout.strip() == "rolled back: current -> releases/v2"
    assert os.readlink(dest / "current") == "releases/v2"
    run_roost("rollback", str(dest), check=True)
    assert os.readlink(dest / "current") == "releases/v1"
    line = one_error_line(run_roost("rollback", str(dest)))
    assert "no previous release" in line
    assert os.readlink(dest / "current") == "releases/v1"
    assert [r["name"] for r in releases_json(dest)] == ["v1", "v2", "v3"]


def test_rollback_with_nothing_to_go_back_to(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--tag", "v1")
    assert "no previous release" in one_error_line(run_roost("rollback", str(dest)))
    assert not os.path.lexists(dest / "current")


def test_prune_keeps_current_previous_and_newest(tmp_path):
    dest = tmp_path / "dest"
    store = Store.open(str(dest), create=True)
    manifests = {}
    for label in ("r1", "r2", "r3", "r4", "r5"):
        src = make_tree(tmp_path / f"src-{label}", label, size=1000)
        manifests[label] = pack_tree(src)
        install(store, manifests[label], TreeSource(str(src), manifests[label]), name=label)
    run_roost("activate", str(dest), "r2", check=True)
    run_roost("activate", str(dest), "r1", check=True)  # current and previous: the oldest two

    result = run_roost("prune", str(dest), "--keep", "2", check=True)
    assert result.stdout.strip() == "pruned: r3"
    assert sorted(os.listdir(dest / "releases")) == ["r1", "r2", "r4", "r5"]
    assert sorted(os.listdir(dest / ".roost" / "manifests")) == sorted(
        manifests[x].id for x in ("r1", "r2", "r4", "r5")
    )
    assert sorted(os.listdir(dest / ".roost" / "meta")) == [
        "r1.json",
        "r2.json",
        "r4.json",
        "r5.json",
    ]
    assert os.readlink(dest / "current") == "releases/r1"

    result = run_roost("activate", str(dest), "r5", "--keep", "1", check=True)
    assert "pruned: r2, r4" in result.stdout
    assert [r["name"] for r in releases_json(dest)] == ["r1", "r5"]
    assert sorted(os.listdir(dest / ".roost" / "manifests")) == sorted(
        manifests[x].id for x in ("r1", "r5")
    )
    assert os.listdir(dest / ".roost" / "trash") == []
    assert run_roost("prune", str(dest), "--keep", "1", check=True).stdout == ""
    assert verify_tree(str(dest / "current"), manifests["r5"]) == []


def test_keep_below_one_is_refused_before_any_change(tmp_path, three):
    dest = tmp_path / "dest"
    line = one_error_line(cli_install(dest, three["v1"], "--activate", "--keep", "0", check=False))
    assert "--keep" in line
    assert not os.path.lexists(dest)
    cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    cli_install(dest, three["v2"], "--tag", "v2")
    assert "--keep" in one_error_line(run_roost("activate", str(dest), "v2", "--keep", "0"))
    assert os.readlink(dest / "current") == "releases/v1"
    assert "--keep" in one_error_line(run_roost("prune", str(dest), "--keep", "-1"))
    assert sorted(os.listdir(dest / "releases")) == ["v1", "v2"]


def test_activate_unknown_or_invalid_name(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    assert "no release named 'v9'" in one_error_line(run_roost("activate", str(dest), "v9"))
    assert "invalid release name" in one_error_line(run_roost("activate", str(dest), "../v1"))
    bad_tag = cli_install(dest, three["v2"], "--tag", "a/b", "--activate", check=False)
    assert "invalid release name" in one_error_line(bad_tag)
    assert os.readlink(dest / "current") == "releases/v1"
    assert os.listdir(dest / "releases") == ["v1"]


# -- destination safety ---------------------------------------------------------------------


def test_non_empty_foreign_directory_is_refused_and_left_untouched(tmp_path, three):
    dest = write_tree(tmp_path / "dest", {"precious.txt": b"mine", "sub/keep.me": b"also mine"})
    before = snapshot(tmp_path)
    line = one_error_line(cli_install(dest, three["v1"], "--activate", check=False))
    assert "not empty" in line and "not a roost store" in line and "--force" in line
    assert snapshot(tmp_path) == before
    for command in (["activate", str(dest), "v1"], ["rollback", str(dest)]):
        assert "not a roost store" in one_error_line(run_roost(*command))
    assert "not a roost store" in one_error_line(run_roost("prune", str(dest), "--keep", "1"))
    assert snapshot(tmp_path) == before


def test_force_takes_over_a_foreign_directory(tmp_path, three):
    dest = write_tree(tmp_path / "dest", {"precious.txt": b"mine", "sub/keep.me": b"also mine"})
    (dest / "sub").chmod(0o500)
    cli_install(dest, three["v1"], "--tag", "v1", "--activate", "--force")
    assert sorted(os.listdir(dest)) == [".roost", "current", "releases"]
    assert os.readlink(dest / "current") == "releases/v1"
    assert [r["name"] for r in releases_json(dest)] == ["v1"]


def test_force_on_an_existing_store_deletes_nothing(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    cli_install(dest, three["v2"], "--tag", "v2", "--activate", "--force")
    assert sorted(os.listdir(dest / "releases")) == ["v1", "v2"]


def test_destination_that_is_a_file_is_an_error(tmp_path, three):
    dest = tmp_path / "dest"
    dest.write_bytes(b"not a directory")
    before = snapshot(tmp_path)
    for extra in ((), ("--force",)):
        line = one_error_line(cli_install(dest, three["v1"], "--activate", *extra, check=False))
        assert "not a directory" in line
    assert snapshot(tmp_path) == before


def test_empty_directory_is_adopted_silently(tmp_path, three):
    dest = tmp_path / "dest"
    dest.mkdir()
    result = cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    assert result.stderr == ""
    assert os.readlink(dest / "current") == "releases/v1"


def test_missing_destination_is_created(tmp_path, three):
    dest = tmp_path / "some" / "new" / "dest"
    cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    assert os.readlink(dest / "current") == "releases/v1"


# -- bad input: nothing is lost ---------------------------------------------------------------

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def _sorted(obj: dict) -> dict:
    for key in ("files", "symlinks", "dirs"):
        obj[key].sort(key=lambda e: e["path"] if isinstance(e["path"], str) else "")
    return obj


def _file(obj: dict, path: str) -> dict:
    return next(f for f in obj["files"] if f["path"] == path)


def _flip(hexdigest: str) -> str:
    return ("1" if hexdigest[0] == "0" else "0") + hexdigest[1:]


def _resize(obj: dict, path: str, size: int, piece_size: int | None = None) -> bytes:
    """A manifest whose ``path`` claims ``size`` bytes, with a consistent piece list."""
    _file(obj, path)["size"] = size
    obj["total_size"] = sum(f["size"] for f in obj["files"])
    if piece_size is not None:
        obj["piece_size"] = piece_size
    count = -(-obj["total_size"] // obj["piece_size"])
    obj["pieces"] = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(min(count, 70000))]
    return canonical(obj)


def _with_symlinks(obj: dict, *links: tuple[str, str]) -> bytes:
    obj["symlinks"] += [{"path": p, "target": t} for p, t in links]
    return canonical(_sorted(obj))


def _with_file(obj: dict, path: str) -> bytes:
    obj["files"].append({"path": path, "size": 0, "mode": 0o644, "sha256": EMPTY_SHA})
    return canonical(_sorted(obj))


# Each case: (manifest bytes from the valid manifest's JSON and bytes, substring of the error).
# The work directory is tmp_path; src/ is the source tree, dest/ the store (four levels of
# '..' from a staging directory reach tmp_path).
MANIFEST_CASES = {
    "dotdot": (lambda o, b: _with_file(o, "../../../../evil.txt"), "'..'"),
    "dotdot-inside": (lambda o, b: _with_file(o, "a/../../../../../evil.txt"), "'..'"),
    "absolute": (lambda o, b: _with_file(o, "/tmp/roost-test-evil.txt"), "absolute"),
    "duplicate-file": (lambda o, b: _with_file(o, "zero"), "duplicate"),
    "file-and-dir": (
        lambda o, b: canonical(_sorted({**o, "dirs": [*o["dirs"], {"path": "zero", "mode": 493}]})),
        "duplicate",
    ),
    "under-symlink": (lambda o, b: _with_file(o, "dirlink/evil.txt"), "inside symlink"),
    "under-file": (lambda o, b: _with_file(o, "zero/evil.txt"), "inside file"),
    "escaping-symlink": (lambda o, b: _with_symlinks(o, ("esc", "../../../..")), "outside"),
    "absolute-symlink": (lambda o, b: _with_symlinks(o, ("esc", "/etc")), "outside"),
    "chained-escape": (
        lambda o, b: _with_symlinks(o, ("up", "."), ("out", "up/..")),
        "outside",
    ),
    "huge-file": (lambda o, b: _resize(o, "data.bin", 1 << 60), "size"),
    "negative-size": (lambda o, b: _resize(o, "data.bin", -1), "size"),
    "too-many-pieces-for-limit": (lambda o, b: _resize(o, "data.bin", 1 << 49), "limit"),
    "total-size-lies": (lambda o, b: canonical({**o, "total_size": o["total_size"] + 1}), "total"),
    "extra-piece": (
        lambda o, b: canonical({**o, "pieces": [*o["pieces"], o["pieces"][0]]}),
        "piece",
    ),
    "missing-piece": (lambda o, b: canonical({**o, "pieces": o["pieces"][:-1]}), "piece"),
    "bad-piece-size": (lambda o, b: canonical({**o, "piece_size": 20000}), "piece size"),
    "setuid-mode": (
        lambda o, b: canonical({**o, "files": [{**f, "mode": 0o4755} for f in o["files"]]}),
        "mode",
    ),
    # Valid as a manifest, impossible on disk (or at least in the source): 16 TiB + 1 byte.
    "file-too-large-to-create": (
        lambda o, b: _resize(o, "data.bin", (1 << 44) + 1, piece_size=1 << 28),
        "",
    ),
    "wrong-first-piece-hash": (
        lambda o, b: canonical({**o, "pieces": [_flip(o["pieces"][0]), *o["pieces"][1:]]}),
        "piece 0",
    ),
    "wrong-last-piece-hash": (
        lambda o, b: canonical({**o, "pieces": [*o["pieces"][:-1], _flip(o["pieces"][-1])]}),
        "does not match",
    ),
    "truncated": (lambda o, b: b[: len(b) // 2], "JSON"),
    "no-final-newline": (lambda o, b: b[:-1], "canonical"),
    "not-canonical": (lambda o, b: json.dumps(o, indent=1).encode(), "canonical"),
    "empty-file": (lambda o, b: b"", "JSON"),
    "binary-junk": (lambda o, b: b"\x00\xff\xfe roost \x80", "JSON"),
    "json-array": (lambda o, b: b"[]\n", "object"),
    "deeply-nested": (lambda o, b: b"[" * 200_000, "JSON"),
    "wrong-format": (lambda o, b: canonical({**o, "format": "tarball"}), "not a roost manifest"),
    "wrong-version": (lambda o, b: canonical({**o, "version": 2}), "version"),
    "unknown-field": (lambda o, b: canonical({**o, "signature": "x"}), "unknown"),
    "missing-field": (
        lambda o, b: canonical({k: v for k, v in o.items() if k != "dirs"}),
        "missing",
    ),
}


def _truncate(src: Path) -> None:
    os.truncate(src / "data.bin", 1000)


def _remove(src: Path) -> None:
    (src / "run.sh").unlink()


def _corrupt(src: Path) -> None:
    data = bytearray((src / "data.bin").read_bytes())
    data[len(data) // 2] ^= 0x55
    (src / "data.bin").write_bytes(bytes(data))


def _symlink_file(src: Path) -> None:
    target = src.parent / "elsewhere.txt"
    target.write_bytes((src / "spaces in name.txt").read_bytes())
    (src / "spaces in name.txt").unlink()
    (src / "spaces in name.txt").symlink_to(target)


SOURCE_CASES = {
    "source-file-truncated": (_truncate, "shorter"),
    "source-file-missing": (_remove, "cannot read"),
    "source-file-corrupted": (_corrupt, "does not match"),
    "source-file-is-symlink": (_symlink_file, "cannot read"),
}


@pytest.fixture
def hostile_setup(tmp_path: Path, sample_tree: Path):
    """A store with an activated release 'prev', and the valid manifest of sample_tree."""
    dest = tmp_path / "dest"
    store = Store.open(str(dest), create=True)
    prev_src = make_tree(tmp_path / "prev-src", "prev")
    prev = pack_tree(prev_src)
    install(store, prev, TreeSource(str(prev_src), prev), name="prev", activate=True)
    manifest = pack_tree(sample_tree, piece_size=16 * 1024)
    assert manifest.piece_count > 10
    return dest, sample_tree, manifest


def _assert_nothing_lost(tmp_path: Path, dest: Path, run) -> str:
    outside_before = snapshot(tmp_path, skip=dest)
    dest_before = snapshot(dest, dir_mtimes=False)
    line = one_error_line(run())
    assert snapshot(tmp_path, skip=dest) == outside_before
    assert snapshot(dest, dir_mtimes=False) == dest_before
    # Spelled out, though the snapshot already implies it:
    assert os.readlink(dest / "current") == "releases/prev"
    assert os.listdir(dest / "releases") == ["prev"]
    assert os.listdir(dest / ".roost" / "staging") == []
    assert os.listdir(dest / ".roost" / "trash") == []
    assert not (tmp_path / "evil.txt").exists()
    return line


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_hostile_or_broken_manifest_changes_nothing(tmp_path, hostile_setup, case):
    dest, src, manifest = hostile_setup
    mutate, expected = MANIFEST_CASES[case]
    data = mutate(copy.deepcopy(manifest.to_json()), manifest.to_bytes())
    assert data != manifest.to_bytes()
    bad = tmp_path / "bad.manifest"
    bad.write_bytes(data)
    line = _assert_nothing_lost(
        tmp_path,
        dest,
        lambda: run_roost(
            "install", str(bad), "--from", str(src), "--dest", str(dest), "--activate", "-q"
        ),
    )
    assert expected in line


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_damaged_source_tree_changes_nothing(tmp_path, hostile_setup, case):
    dest, src, manifest = hostile_setup
    damage, expected = SOURCE_CASES[case]
    good = tmp_path / "good.manifest"
    good.write_bytes(manifest.to_bytes())
    damage(src)
    line = _assert_nothing_lost(
        tmp_path,
        dest,
        lambda: run_roost(
            "install", str(good), "--from", str(src), "--dest", str(dest), "--activate"
        ),
    )
    assert expected in line


def test_missing_manifest_or_source_changes_nothing(tmp_path, hostile_setup):
    dest, src, manifest = hostile_setup
    good = tmp_path / "good.manifest"
    good.write_bytes(manifest.to_bytes())
    missing = tmp_path / "missing"
    line = _assert_nothing_lost(
        tmp_path,
        dest,
        lambda: run_roost("install", str(missing), "--from", str(src), "--dest", str(dest)),
    )
    assert "cannot read manifest" in line
    line = _assert_nothing_lost(
        tmp_path,
        dest,
        lambda: run_roost("install", str(good), "--from", str(missing), "--dest", str(dest)),
    )
    assert "is not a directory" in line


# -- locking between processes ------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from roost.runtime.store import Store
    dest = sys.argv[1]
    with Store(dest).locked():
        print("held", flush=True)
        time.sleep(1.0)
        seen = os.readlink(os.path.join(dest, "current"))
        with open(sys.argv[2], "w") as f:
            f.write(seen)
    """
)


def test_mutating_command_waits_for_the_lock(tmp_path, three):
    dest = tmp_path / "dest"
    cli_install(dest, three["v1"], "--tag", "v1", "--activate")
    cli_install(dest, three["v2"], "--tag", "v2")
    seen = tmp_path / "seen-by-holder"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(dest), str(seen)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = run_roost("activate", str(dest), "v2", check=True)
    finally:
        holder.kill()
        holder.wait()
    # The holder still saw v1 at the end of its hold: activate waited for the lock.
    assert seen.read_text() == "releases/v1"
    assert "activated" in result.stdout
    assert os.readlink(dest / "current") == "releases/v2"


def _concurrent(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "roost", *c],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in commands
    ]
    results = []
    for proc, command in zip(procs, commands):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def test_two_installs_at_once_both_succeed(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    manifests = {}
    commands = []
    for label in ("one", "two", "three"):
        src = make_tree(tmp_path / f"src-{label}", label, size=12 * MiB)
        manifests[label] = pack_cli(src, tmp_path / f"{label}.manifest", "--piece-size", "16K")
        commands.append(
            [
                *("install", str(tmp_path / f"{label}.manifest"), "--from", str(src)),
                *("--dest", str(dest), "--tag", label, "--activate", "-q"),
            ]
        )
    results = _concurrent(commands)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    assert sorted(os.listdir(dest / "releases")) == ["one", "three", "two"]
    for label, manifest in manifests.items():
        assert verify_tree(str(dest / "releases" / label), manifest) == []
    assert os.readlink(dest / "current") in {f"releases/{x}" for x in manifests}
    assert os.listdir(dest / ".roost" / "staging") == []


def test_same_release_installed_twice_at_once(tmp_path):
    dest = tmp_path / "dest"
    src = make_tree(tmp_path / "src", "same", size=12 * MiB)
    manifest = pack_cli(src, tmp_path / "same.manifest", "--piece-size", "16K")
    command = ["install", str(tmp_path / "same.manifest"), "--from", str(src)]
    command += ["--dest", str(dest), "--tag", "same", "--activate", "-q"]
    results = _concurrent([command, command])
    for result in results:
        assert result.returncode == 0, result.stderr
    assert os.listdir(dest / "releases") == ["same"]
    assert verify_tree(str(dest / "current"), manifest) == []
    assert os.listdir(dest / ".roost" / "staging") == []
    assert os.listdir(dest / ".roost" / "manifests") == [manifest.id]


# -- ergonomics -----------------------------------------------------------------------------------


def test_version():
    result = run_roost("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"roost {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["install"],
        ["install", "m.manifest"],  # --from and --dest are required
        ["activate", "/tmp/somewhere"],
        ["prune", "/tmp/somewhere"],  # --keep is required
        ["releases"],
        ["pack", "x", "--piece-size", "lots"],
    ],
)
def test_usage_errors_exit_2_with_usage(args):
    result = run_roost(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: roost")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["activate", "{dest}", "v1"],
        ["rollback", "{dest}"],
        ["releases", "{dest}"],
        ["releases", "{dest}", "--json"],
        ["prune", "{dest}", "--keep", "2"],
    ],
)
def test_commands_on_a_missing_destination_fail_in_one_line(tmp_path, args):
    dest = tmp_path / "nowhere"
    result = run_roost(*(a.format(dest=dest) for a in args))
    assert result.returncode == 1
    assert f"{dest} is not a roost store" in one_error_line(result)
    assert result.stdout == ""
    assert not dest.exists()


def test_peers_default_to_cubic_and_system_keeps_the_hosts_congestion_control(tmp_path):
    from roost.runtime.cli import build_parser, engine_config

    parser, _ = build_parser()
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32)
    base = ["fetch", "m", "--dest", "d", "--peer", "127.0.0.1:1", "--secret-file", str(secret)]
    assert engine_config(parser.parse_args(base)).congestion == "cubic"
    system = parser.parse_args([*base, "--congestion", "system"])
    assert engine_config(system).congestion is None
    assert engine_config(parser.parse_args([*base, "--congestion", "reno"])).congestion == "reno"
