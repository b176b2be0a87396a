"""The host-side release store, driven through its Python API (``roost.runtime.store``).

The command line over the same store is exercised in ``test_cli.py``; what
happens when a process dies half-way is in ``test_crash.py``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import roost.runtime.store as store_module
from conftest import SRC, pack_tree, write_tree
from roost.cli import main as roost_main
from roost.runtime.errors import IntegrityError, StoreError
from roost.runtime.manifest import Manifest
from roost.runtime.store import Staging, Store, install
from roost.runtime.tree import TreeSource, read_piece, verify_tree

PIECE = 16 * 1024


def make_release(root: Path, label: str, extra: bytes = b"") -> tuple[Path, Manifest]:
    """A small tree whose content (and so release id) depends on ``label``."""
    src = write_tree(
        root / f"src-{label}",
        {
            "version.txt": label.encode() + b"\n",
            "bin/run": (b"#!/bin/sh\necho " + label.encode() + b"\n", 0o755),
            "lib/data.bin": os.urandom(40_000) + extra,
            "lib/zero": b"",
            "link": ("->", "version.txt"),
            "libdir": ("->", "lib"),
            "empty/": None,
        },
    )
    return src, pack_tree(src, piece_size=PIECE)


def put(store: Store, src: Path, manifest: Manifest, name: str | None = None, **kw: object):
    return install(store, manifest, TreeSource(str(src), manifest), name=name, **kw)  # type: ignore[arg-type]


def current_target(store: Store) -> str | None:
    try:
        return os.readlink(store.current_link)
    except FileNotFoundError:
        return None


def assert_current(store: Store, name: str, manifest: Manifest) -> None:
    """``current`` is a relative symlink to ``releases/<name>``, a complete release."""
    target = os.readlink(store.current_link)
    assert target == f"releases/{name}"
    assert not os.path.isabs(target)
    assert os.path.realpath(store.current_link) == os.path.realpath(
        os.path.join(store.releases_dir, name)
    )
    assert verify_tree(store.current_link, manifest) == []


def listing(path: str) -> list[str]:
    return sorted(os.listdir(path))


def entry_stats(root: str, *, dir_mtimes: bool = True) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, mode) of everything below ``root``, symlinks not followed.

    Without ``dir_mtimes``, directories count as unchanged when only their
    mtime moved (a staging area that came and went touches its parent).
    """
    stats = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            keep_mtime = dir_mtimes or not stat.S_ISDIR(st.st_mode)
            stats[os.path.relpath(path, root)] = (
                st.st_ino,
                st.st_mtime_ns if keep_mtime else 0,
                st.st_mode,
            )
    return stats


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(str(tmp_path / "dest"), create=True)


@pytest.fixture
def releases(tmp_path: Path) -> dict[str, tuple[Path, Manifest]]:
    return {label: make_release(tmp_path, label) for label in ("A", "B", "C", "D", "E")}


# -- install ------------------------------------------------------------------------------


def test_install_materializes_the_release_without_touching_current(store, releases):
    src, manifest = releases["A"]
    result = put(store, src, manifest)
    assert result.downloaded and not result.activated
    assert result.release.name == manifest.short_id
    assert result.release.id == manifest.id
    assert result.release.files == len(manifest.files)
    assert result.release.bytes == manifest.total_size
    assert not os.path.lexists(store.current_link)
    assert verify_tree(os.path.join(store.releases_dir, manifest.short_id), manifest) == []
    assert listing(store._meta("staging")) == []
    with open(store.manifest_path(manifest.id), "rb") as f:
        assert f.read() == manifest.to_bytes()


def test_install_without_activate_leaves_current_where_it_was(store, releases):
    put(store, *releases["A"], name="a", activate=True)
    result = put(store, *releases["B"], name="b")
    assert not result.activated
    assert_current(store, "a", releases["A"][1])
    assert [r.name for r in store.releases()] == ["a", "b"]


def test_tag_names_the_release_directory(store, releases):
    put(store, *releases["A"], name="v1.2.3+build_7", activate=True)
    assert listing(store.releases_dir) == ["v1.2.3+build_7"]
    assert store.get("v1.2.3+build_7").id == releases["A"][1].id
    assert_current(store, "v1.2.3+build_7", releases["A"][1])


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "-x", "x" * 129, "ü"])
def test_invalid_tag_is_refused_before_anything_is_written(store, releases, name):
    with pytest.raises(StoreError, match="invalid release name"):
        put(store, *releases["A"], name=name, activate=True)
    assert listing(store.releases_dir) == []
    assert listing(store._meta("staging")) == []
    assert not os.path.lexists(store.current_link)


def test_reinstalling_the_same_release_fetches_and_rewrites_nothing(store, releases):
    src, manifest = releases["A"]
    first = put(store, src, manifest, name="a", activate=True)
    before = entry_stats(store.releases_dir)
    with open(store._meta("meta", "a.json"), "rb") as f:
        meta_before = f.read()

    class NoSource:
        def read_piece(self, index: int) -> bytes:
            raise AssertionError("an installed release must not be fetched again")

    again = install(store, manifest, NoSource(), name="a", activate=True)
    assert not again.downloaded
    assert again.release == first.release
    assert entry_stats(store.releases_dir) == before
    with open(store._meta("meta", "a.json"), "rb") as f:
        assert f.read() == meta_before
    assert listing(store._meta("staging")) == []


def test_tag_used_by_another_release_is_an_error_and_changes_nothing(store, releases):
    put(store, *releases["A"], name="v1", activate=True)
    before = entry_stats(store.dest, dir_mtimes=False)
    with pytest.raises(StoreError, match="already used"):
        put(store, *releases["B"], name="v1", activate=True)
    assert entry_stats(store.dest, dir_mtimes=False) == before
    assert_current(store, "v1", releases["A"][1])


def test_two_tags_can_hold_the_same_release(store, releases):
    put(store, *releases["A"], name="one")
    result = put(store, *releases["A"], name="two")
    assert result.downloaded
    assert store.find(releases["A"][1].id) is not None
    assert listing(store.releases_dir) == ["one", "two"]


def test_piece_that_does_not_match_is_refused_and_staging_removed(store, releases):
    src, manifest = releases["A"]

    class Lying:
        def read_piece(self, index: int) -> bytes:
            data = read_piece(str(src), manifest, index)
            return data if index < 2 else b"\0" + data[1:]

    with pytest.raises(IntegrityError, match="piece 2"):
        install(store, manifest, Lying(), name="a", activate=True)
    assert listing(store.releases_dir) == []
    assert listing(store._meta("staging")) == []
    assert listing(store._meta("manifests")) == []
    assert not os.path.lexists(store.current_link)


def test_staging_removed_when_a_write_fails(store, releases, monkeypatch):
    src, manifest = releases["A"]

    def no_space(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "pwrite", no_space)
    with pytest.raises(OSError):
        put(store, src, manifest, name="a", activate=True)
    monkeypatch.undo()
    assert listing(store._meta("staging")) == []
    assert listing(store.releases_dir) == []


def test_staging_checks_pieces_and_completeness(store, releases):
    src, manifest = releases["A"]
    with store.locked():
        staging = store.stage(manifest)
    with staging:
        assert os.path.isdir(staging.root)
        good = read_piece(str(src), manifest, 0)
        with pytest.raises(IntegrityError):
            staging.write_piece(0, good[:-1] + bytes([good[-1] ^ 1]))
        assert staging.have[0] == 0
        staging.write_piece(0, good)
        assert staging.have[0] == 1
        with pytest.raises(IntegrityError, match="missing"):
            staging.finish()
        root = staging.root
    assert not os.path.exists(root)
    assert listing(store._meta("staging")) == []


def test_pieces_written_from_two_threads_at_once_all_land(store, tmp_path):
    """The peer writes pieces over 256 KiB on two worker threads: two pieces of one new
    file (or of two new files in one new directory) may be written at the same moment,
    and each must find the file created once, not fail on the other's creation."""
    src = write_tree(
        tmp_path / "wide",
        {f"d{d}/f{f}": os.urandom(3 * PIECE // 2) for d in range(30) for f in range(3)},
    )
    manifest = pack_tree(src, piece_size=PIECE)
    pieces = [read_piece(str(src), manifest, i) for i in range(manifest.piece_count)]

    def write(staging: Staging, indexes: range, failures: list[BaseException]) -> None:
        for i in indexes:
            try:
                staging.write_verified_piece(i, pieces[i])
            except BaseException as exc:  # reported by the assert below
                failures.append(exc)

    for _ in range(3):
        with store.locked():
            staging = store.stage(manifest)
        failures: list[BaseException] = []
        threads = [
            threading.Thread(
                target=write, args=(staging, range(start, manifest.piece_count, 2), failures)
            )
            for start in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        staging.finish()
        assert verify_tree(staging.root, manifest) == []
        staging.abandon()


def test_progress_reports_every_byte(store, releases):
    src, manifest = releases["A"]
    seen: list[tuple[int, int]] = []
    put(store, src, manifest, progress=lambda done, total: seen.append((done, total)))
    assert len(seen) == manifest.piece_count
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (manifest.total_size, manifest.total_size)


# -- activation, rollback, listing, pruning ---------------------------------------------


def test_activate_and_rollback_walk_the_history(store, releases):
    for label in "ABC":
        put(store, *releases[label], name=label.lower())
    for label in "abc":
        with store.locked():
            store.activate(label)
        assert store.current_name() == label
    assert store.previous_name() == "b"
    with store.locked():
        assert store.rollback() == "b"
    assert_current(store, "b", releases["B"][1])
    assert store.previous_name() == "a"
    with store.locked():
        assert store.rollback() == "a"
    assert_current(store, "a", releases["A"][1])
    assert store.previous_name() is None
    with store.locked(), pytest.raises(StoreError, match="no previous release"):
        store.rollback()
    assert_current(store, "a", releases["A"][1])
    assert [r.name for r in store.releases()] == ["a", "b", "c"]  # rollback deletes nothing


def test_rollback_with_nothing_active_or_no_previous_is_an_error(store, releases):
    with store.locked(), pytest.raises(StoreError, match="no previous release"):
        store.rollback()
    put(store, *releases["A"], name="a", activate=True)
    with store.locked(), pytest.raises(StoreError, match="no previous release"):
        store.rollback()
    assert_current(store, "a", releases["A"][1])


def test_reactivating_the_current_release_does_not_grow_the_history(store, releases):
    put(store, *releases["A"], name="a", activate=True)
    put(store, *releases["B"], name="b", activate=True)
    for _ in range(3):
        with store.locked():
            store.activate("b")
    assert store.previous_name() == "a"


def test_activating_an_unknown_release_is_an_error(store, releases):
    put(store, *releases["A"], name="a", activate=True)
    with store.locked(), pytest.raises(StoreError, match="no release named"):
        store.activate("nope")
    assert_current(store, "a", releases["A"][1])


def test_prune_removes_the_oldest_but_never_current_or_previous(store, releases):
    for label in "ABCDE":
        put(store, *releases[label], name=label.lower())
    with store.locked():
        store.activate("b")
        store.activate("a")  # current = the oldest, previous = the second oldest
        assert store.prune(2) == ["c"]
    assert [r.name for r in store.releases()] == ["a", "b", "d", "e"]
    assert listing(store._meta("manifests")) == sorted(releases[x][1].id for x in "ABDE")
    assert listing(store._meta("meta")) == ["a.json", "b.json", "d.json", "e.json"]
    assert listing(store._meta("trash")) == []
    assert_current(store, "a", releases["A"][1])
    with store.locked():
        store.activate("e")
        assert store.prune(1) == ["b", "d"]
    assert [r.name for r in store.releases()] == ["a", "e"]
    assert listing(store._meta("manifests")) == sorted(releases[x][1].id for x in "AE")
    with store.locked():
        assert store.rollback() == "a"


def test_prune_keep_must_be_positive_and_is_checked_before_any_change(store, releases):
    with pytest.raises(StoreError, match="--keep"):
        put(store, *releases["A"], name="a", activate=True, keep=0)
    assert listing(store.releases_dir) == []
    assert not os.path.lexists(store.current_link)
    put(store, *releases["A"], name="a", activate=True)
    with store.locked(), pytest.raises(StoreError, match="--keep"):
        store.prune(0)
    assert listing(store.releases_dir) == ["a"]


def test_install_with_keep_prunes_after_activating(store, releases):
    for label in "ABC":
        put(store, *releases[label], name=label.lower(), activate=True)
    result = put(store, *releases["D"], name="d", activate=True, keep=2)
    assert result.pruned == ["a", "b"]
    assert [r.name for r in store.releases()] == ["c", "d"]
    assert_current(store, "d", releases["D"][1])


# -- opening a destination ----------------------------------------------------------------


def test_open_without_create_requires_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a roost store"):
        Store.open(str(tmp_path / "plain"))
    with pytest.raises(StoreError, match="not a roost store"):
        Store.open(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
    assert list((tmp_path / "plain").iterdir()) == []


def test_store_of_another_version_or_format_is_refused(tmp_path):
    dest = tmp_path / "dest"
    Store.open(str(dest), create=True)
    marker = dest / ".roost" / "store.json"
    marker.write_text(json.dumps({"format": "roost-store", "version": 99}))
    with pytest.raises(StoreError, match="version"):
        Store.open(str(dest), create=True)
    marker.write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        Store.open(str(dest))


def test_store_made_by_another_process_meanwhile_is_opened(tmp_path, releases, monkeypatch):
    """Two first installs at once: the marker appears after one of them looked for it."""
    other = Store.open(str(tmp_path / "dest"), create=True)
    put(other, *releases["A"], name="a", activate=True)
    real_isfile = os.path.isfile
    hidden: list[str] = []

    def marker_not_there_yet(path: str) -> bool:
        if path.endswith("store.json") and not hidden:
            hidden.append(path)
            return False
        return real_isfile(path)

    monkeypatch.setattr(store_module.os.path, "isfile", marker_not_there_yet)
    store = Store.open(str(tmp_path / "dest"), create=True)
    monkeypatch.undo()
    assert hidden == [os.path.join(store.meta_dir, "store.json")]
    assert [r.name for r in store.releases()] == ["a"]
    assert_current(store, "a", releases["A"][1])


def test_interrupted_creation_is_adopted_but_foreign_content_is_not(tmp_path):
    dest = tmp_path / "dest"
    Store.open(str(dest), create=True)
    marker = dest / ".roost" / "store.json"
    marker.rename(dest / ".roost" / "store.json.1234abcd.tmp")  # died before the marker
    store = Store.open(str(dest), create=True)
    assert marker.is_file()
    assert store.releases() == []
    marker.unlink()
    (dest / ".roost" / "meta" / "someone.json").write_text("{}")
    with pytest.raises(StoreError, match="not empty"):
        Store.open(str(dest), create=True)
    assert (dest / ".roost" / "meta" / "someone.json").read_text() == "{}"


# -- locking ------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from roost.runtime.store import Store
    with Store(sys.argv[1]).locked():
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def hold_lock(dest: str, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, dest, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


def test_locked_store_times_out_with_a_clear_error(store, releases, monkeypatch, capsys):
    put(store, *releases["A"], name="a", activate=True)
    put(store, *releases["B"], name="b")
    holder = hold_lock(store.dest, 60)
    try:
        busy = "locked by another roost process"
        with pytest.raises(StoreError, match=busy), store.locked(timeout=0.2):
            pass
        real_locked = Store.locked
        monkeypatch.setattr(Store, "locked", lambda self, timeout=0.2: real_locked(self, timeout))
        with pytest.raises(StoreError, match="locked"):
            put(store, *releases["C"], name="c", activate=True)
        assert roost_main(["activate", store.dest, "b"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("roost: error: ") and "locked" in err
        assert len(err.splitlines()) == 1
        assert_current(store, "a", releases["A"][1])
        assert listing(store.releases_dir) == ["a", "b"]
    finally:
        holder.kill()
        holder.wait()
    assert roost_main(["activate", store.dest, "b"]) == 0
    assert_current(store, "b", releases["B"][1])


def test_a_live_staging_area_survives_recovery(store, releases):
    src, manifest = releases["A"]
    with store.locked():
        staging = store.stage(manifest)
    with staging:
        with store.locked():  # runs recovery; the staging lock is still held
            pass
        assert os.path.isdir(staging.root)
        for index in range(manifest.piece_count):
            staging.write_piece(index, read_piece(str(src), manifest, index))
        staging.finish()
        with store.locked():
            release = store.commit(staging, "a")
    assert release.name == "a"
    assert verify_tree(os.path.join(store.releases_dir, "a"), manifest) == []
    assert listing(store._meta("staging")) == []


# -- verify_tree and reading pieces ------------------------------------------------------


def _change(kind: str, root: Path) -> str:
    if kind == "content":
        data = bytearray((root / "lib/data.bin").read_bytes())
        data[1234] ^= 0xFF
        (root / "lib/data.bin").write_bytes(bytes(data))
        return "lib/data.bin"
    if kind == "size":
        with open(root / "version.txt", "ab") as f:
            f.write(b"!")
        return "version.txt"
    if kind == "mode":
        (root / "bin/run").chmod(0o644)
        return "bin/run"
    if kind == "extra":
        (root / "lib/extra").write_bytes(b"")
        return "lib/extra"
    if kind == "missing":
        (root / "lib/zero").unlink()
        return "lib/zero"
    if kind == "link-target":
        (root / "link").unlink()
        (root / "link").symlink_to("bin/run")
        return "link"
    if kind == "link-replaced":
        (root / "libdir").unlink()
        (root / "libdir").mkdir()
        return "libdir"
    if kind == "empty-dir-mode":
        (root / "empty").chmod(0o700)
        return "empty"
    if kind == "empty-dir-removed":
        (root / "empty").rmdir()
        return "empty"
    if kind == "file-became-dir":
        (root / "lib/zero").unlink()
        (root / "lib/zero").mkdir()
        return "lib/zero"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "content",
        "size",
        "mode",
        "extra",
        "missing",
        "link-target",
        "link-replaced",
        "empty-dir-mode",
        "empty-dir-removed",
        "file-became-dir",
    ],
)
def test_verify_tree_reports_each_kind_of_difference(tmp_path, kind):
    src, manifest = make_release(tmp_path, "A")
    assert verify_tree(str(src), manifest) == []
    path = _change(kind, src)
    problems = verify_tree(str(src), manifest)
    assert problems, kind
    assert any(p.startswith(path + ":") for p in problems), problems


def test_shallow_verify_skips_content_only(tmp_path):
    src, manifest = make_release(tmp_path, "A")
    _change("content", src)
    assert verify_tree(str(src), manifest, content=False) == []
    assert verify_tree(str(src), manifest) != []


def test_reading_pieces_from_a_damaged_tree_fails_clearly(tmp_path):
    src, manifest = make_release(tmp_path, "A")
    last = manifest.piece_count - 1
    os.truncate(src / "version.txt", 1)
    with pytest.raises(IntegrityError, match="shorter"):
        read_piece(str(src), manifest, last)
    (src / "version.txt").unlink()
    (src / "version.txt").symlink_to("bin/run")  # never followed
    with pytest.raises(IntegrityError, match="cannot read"):
        read_piece(str(src), manifest, last)
