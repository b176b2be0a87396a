"""Crash safety of the store: processes killed with SIGKILL at random moments.

Whatever the moment of death, ``current`` must name a complete release, and
the next locked operation must clear every leftover so the next install works.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import SRC, pack_tree, run_roost, write_tree
from roost.runtime.manifest import Manifest
from roost.runtime.store import Store, install
from roost.runtime.tree import TreeSource, verify_tree

MiB = 1024 * 1024
ENV = {**os.environ, "PYTHONPATH": str(SRC)}


def small_release(root: Path, label: str) -> tuple[Path, Manifest]:
    src = write_tree(
        root / f"src-{label}",
        {
            "version.txt": label.encode() + b"\n",
            "bin/run": (b"#!/bin/sh\necho " + label.encode() + b"\n", 0o755),
            "data.bin": os.urandom(50_000),
            "link": ("->", "version.txt"),
            "empty/": None,
        },
    )
    return src, pack_tree(src, piece_size=16 * 1024)


def put(store: Store, release: tuple[Path, Manifest], name: str, activate: bool = False) -> None:
    src, manifest = release
    install(store, manifest, TreeSource(str(src), manifest), name=name, activate=activate)


def leftovers(store: Store) -> list[str]:
    """Everything an interrupted operation may leave behind, as paths relative to DEST."""
    found = [n for n in os.listdir(store.dest) if n.startswith(".current-")]
    for sub in ("staging", "trash"):
        found += [f".roost/{sub}/{n}" for n in os.listdir(store._meta(sub))]
    for sub in ("meta", "manifests"):
        found += [f".roost/{sub}/{n}" for n in os.listdir(store._meta(sub)) if n.endswith(".tmp")]
    found += [f".roost/{n}" for n in os.listdir(store.meta_dir) if n.endswith(".tmp")]
    return sorted(found)


def assert_consistent(store: Store, manifests: dict[str, Manifest]) -> None:
    """Every installed release is complete, metadata matches releases/, current is sane."""
    names = sorted(os.listdir(store.releases_dir))
    assert sorted(r.name for r in store.releases()) == names
    assert sorted(os.listdir(store._meta("meta"))) == [f"{n}.json" for n in names]
    assert sorted(os.listdir(store._meta("manifests"))) == sorted({manifests[n].id for n in names})
    for name in names:
        assert verify_tree(os.path.join(store.releases_dir, name), manifests[name]) == []
    if os.path.lexists(store.current_link):
        target = os.readlink(store.current_link)
        assert target.startswith("releases/") and target[len("releases/") :] in names


# -- (a) kill -9 while activating --------------------------------------------------------

FLIPPER = textwrap.dedent(
    """
    import sys
    from roost.runtime.store import Store
    store = Store(sys.argv[1])
    n = 0
    while True:
        with store.locked():
            store.activate("AB"[n % 2])
        n += 1
        if n == 2:
            print("running", flush=True)
    """
)


def test_kill_during_activation_leaves_current_complete(tmp_path):
    store = Store.open(str(tmp_path / "dest"), create=True)
    releases = {name: small_release(tmp_path, name) for name in "AB"}
    for name, release in releases.items():
        put(store, release, name)
    manifests = {name: m for name, (_, m) in releases.items()}
    rng = random.Random()
    for round_ in range(30):
        flipper = subprocess.Popen(
            [sys.executable, "-c", FLIPPER, store.dest], stdout=subprocess.PIPE, text=True, env=ENV
        )
        assert flipper.stdout is not None
        assert flipper.stdout.readline() == "running\n"
        time.sleep(rng.uniform(0, 0.03))
        flipper.kill()
        flipper.wait()
        flipper.stdout.close()
        assert flipper.returncode == -signal.SIGKILL, round_

        target = os.readlink(store.current_link)
        assert target in ("releases/A", "releases/B"), (round_, target)
        assert verify_tree(store.current_link, manifests[target[-1]]) == [], round_
        with open(store._meta("history.json"), encoding="utf-8") as f:
            assert set(json.load(f)) <= {"A", "B"}  # never a half-written file

        with store.locked():
            pass
        assert leftovers(store) == [], round_
        assert os.readlink(store.current_link) == target
        assert store.previous_name() in ("A", "B")
        assert store.previous_name() != store.current_name()
        assert_consistent(store, manifests)

    # A temporary link is rarely caught by a random kill; plant one to be sure it goes.
    os.symlink("releases/A", os.path.join(store.dest, ".current-0123456789ab.tmp"))
    assert leftovers(store) == [".current-0123456789ab.tmp"]
    result = run_roost("activate", store.dest, "A", check=True)
    assert "activated" in result.stdout
    assert leftovers(store) == []


# -- (b) kill -9 while installing a large release -------------------------------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, Path, Manifest]:
    """A 64 MiB release in small pieces, so that installing it takes a moment."""
    root = tmp_path_factory.mktemp("large")
    src = root / "src"
    files = {f"part{i}.bin": os.urandom(16 * MiB) for i in range(4)}
    write_tree(src, {**files, "README": b"large\n", "empty/": None, "link": ("->", "README")})
    manifest = pack_tree(src, piece_size=64 * 1024)
    assert manifest.total_size > 64 * MiB and manifest.piece_count > 1000
    manifest_file = root / "large.manifest"
    manifest_file.write_bytes(manifest.to_bytes())
    return src, manifest_file, manifest


@pytest.fixture
def with_previous(tmp_path) -> tuple[Store, dict[str, Manifest]]:
    store = Store.open(str(tmp_path / "dest"), create=True)
    release = small_release(tmp_path, "prev")
    put(store, release, "prev", activate=True)
    return store, {"prev": release[1]}


SUICIDE = textwrap.dedent(
    """
    import os, signal, sys
    from roost.runtime.manifest import load_manifest
    from roost.runtime.store import Store, install
    from roost.runtime.tree import TreeSource
    dest, manifest_file, src, at = sys.argv[1:]
    manifest = load_manifest(manifest_file)

    def progress(done, total):
        if done >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)

    source = TreeSource(src, manifest)
    install(Store.open(dest), manifest, source, name="new", activate=True, progress=progress)
    """
)


def test_kill_while_filling_keeps_the_previous_release(large, with_previous):
    src, manifest_file, manifest = large
    store, manifests = with_previous
    rng = random.Random()
    for _ in range(4):
        at = rng.randrange(1, manifest.total_size + 1)
        child = subprocess.run(
            [sys.executable, "-c", SUICIDE, store.dest, str(manifest_file), str(src), str(at)],
            env=ENV,
            capture_output=True,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert os.readlink(store.current_link) == "releases/prev"
        assert verify_tree(store.current_link, manifests["prev"]) == []
        assert os.listdir(store.releases_dir) == ["prev"]
        assert os.listdir(store._meta("staging")) != []  # the dead install's remains
    manifests["new"] = manifest
    result = run_roost(
        "install", str(manifest_file), "--from", str(src), "--dest", store.dest,
        "--tag", "new", "--activate", "-q", check=True,
    )  # fmt: skip
    assert "installed release" in result.stdout
    assert leftovers(store) == []
    assert os.readlink(store.current_link) == "releases/new"
    assert_consistent(store, manifests)
    assert store.previous_name() == "prev"


def test_kill_install_at_random_moments(large, with_previous):
    src, manifest_file, manifest = large
    store, manifests = with_previous
    manifests.update({f"new{i}": manifest for i in range(6)})
    rng = random.Random()
    args = ["install", str(manifest_file), "--from", str(src), "--dest", store.dest]
    # How long one whole install takes here, to spread the kills over its lifetime.
    started = time.monotonic()
    run_roost(*args, "--tag", "whole", "-q", check=True)
    duration = time.monotonic() - started
    manifests["whole"] = manifest
    for i in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-m", "roost", *args, "--tag", f"new{i}", "--activate", "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        time.sleep(rng.uniform(0.1, 1.0) * duration)
        proc.kill()
        proc.wait()
        # Wherever it died, current names a complete release: prev or (if the kill
        # came after activation) the new one; no half-built release is visible.
        target = os.readlink(store.current_link)
        assert target == "releases/prev" or target.startswith("releases/new"), target
        assert verify_tree(store.current_link, manifests[target[len("releases/") :]]) == []
        with store.locked():
            pass
        assert_consistent(store, manifests)
    result = run_roost(*args, "--tag", "final", "--activate", "-q", check=True)
    assert "installed release" in result.stdout
    assert leftovers(store) == []
    manifests["final"] = manifest
    assert_consistent(store, manifests)
    assert os.readlink(store.current_link) == "releases/final"


# -- (c) kill between a release's metadata and its rename into releases/ -----------------------

DIE_BEFORE_PUBLISHING = textwrap.dedent(
    """
    import os, signal, sys
    from roost.runtime.manifest import load_manifest
    from roost.runtime.store import Store, install
    from roost.runtime.tree import TreeSource
    dest, manifest_file, src = sys.argv[1:]
    store = Store.open(dest)
    rename = os.rename

    def rename_or_die(old, new):
        if os.path.dirname(new) == store.releases_dir:  # publishing the release
            os.kill(os.getpid(), signal.SIGKILL)
        rename(old, new)

    os.rename = rename_or_die
    manifest = load_manifest(manifest_file)
    install(store, manifest, TreeSource(src, manifest), name="new", activate=True)
    """
)


def test_kill_between_metadata_and_publishing_is_cleaned_up(tmp_path, with_previous):
    store, manifests = with_previous
    src, manifest = small_release(tmp_path, "new")
    manifest_file = tmp_path / "new.manifest"
    manifest_file.write_bytes(manifest.to_bytes())
    child = subprocess.run(
        [sys.executable, "-c", DIE_BEFORE_PUBLISHING, store.dest, str(manifest_file), str(src)],
        env=ENV,
        capture_output=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    # What the dead process left: metadata and manifest of a release that is not there.
    assert os.path.isfile(store._meta("meta", "new.json"))
    assert os.path.isfile(store.manifest_path(manifest.id))
    assert len(os.listdir(store._meta("staging"))) == 2  # the staged tree and its lock
    assert os.listdir(store.releases_dir) == ["prev"]
    assert [r.name for r in store.releases()] == ["prev"]
    assert os.readlink(store.current_link) == "releases/prev"

    run_roost("activate", store.dest, "prev", check=True)  # any locked operation recovers
    assert leftovers(store) == []
    assert_consistent(store, manifests)

    result = run_roost(
        "install", str(manifest_file), "--from", str(src), "--dest", store.dest,
        "--tag", "new", "--activate", check=True,
    )  # fmt: skip
    assert result.stdout.startswith("installed release")  # not "already installed"
    manifests["new"] = manifest
    assert_consistent(store, manifests)
    assert os.readlink(store.current_link) == "releases/new"


def test_leftovers_of_every_interrupted_step_are_removed(tmp_path, with_previous):
    store, manifests = with_previous
    for name in ("gone", "old"):
        release = small_release(tmp_path, name)
        put(store, release, name)
        manifests[name] = release[1]
    # prune died after moving 'gone' to the trash, before deleting its metadata; the
    # trash holds a read-only directory, as releases may
    os.rename(os.path.join(store.releases_dir, "gone"), store._meta("trash", "gone.1a2b3c4d"))
    os.chmod(store._meta("trash", "gone.1a2b3c4d", "bin"), 0o555)
    # a staging area whose process died (lock file no longer held), one that died before
    # creating its directory, and temporary files of interrupted atomic writes
    staged = store._meta("staging", "0123456789ab.00aa11bb22cc")
    write_tree(Path(staged), {"half.bin": b"\0" * 1000, "sub/x": b""})
    Path(staged + ".lock").write_bytes(b"")
    Path(store._meta("staging", "ba9876543210.ffee00112233.lock")).write_bytes(b"")
    for tmp in (
        store._meta("meta", "old.json.5e6f7a8b.tmp"),
        store._meta("manifests", manifests["old"].id + ".5e6f7a8b.tmp"),
        store._meta("history.json.5e6f7a8b.tmp"),
    ):
        Path(tmp).write_text("partial")
    os.symlink("releases/old", os.path.join(store.dest, ".current-feedfacecafe.tmp"))
    assert len(leftovers(store)) == 8

    with store.locked():
        pass
    assert leftovers(store) == []
    del manifests["gone"]
    assert_consistent(store, manifests)
    assert os.readlink(store.current_link) == "releases/prev"


def test_activation_recorded_in_history_after_a_kill(tmp_path, with_previous):
    store, _ = with_previous
    put(store, small_release(tmp_path, "next"), "next")
    # Killed after current was switched but before history.json was written:
    os.symlink("releases/next", os.path.join(store.dest, ".current-0a0b0c0d0e0f.tmp"))
    os.replace(os.path.join(store.dest, ".current-0a0b0c0d0e0f.tmp"), store.current_link)
    with open(store._meta("history.json"), encoding="utf-8") as f:
        assert json.load(f) == ["prev"]
    result = run_roost("rollback", store.dest, check=True)
    assert result.stdout.strip() == "rolled back: current -> releases/prev"
    assert os.readlink(store.current_link) == "releases/prev"


def test_staging_of_a_live_install_is_not_taken_for_leftovers(tmp_path, with_previous):
    store, _ = with_previous
    _, manifest = small_release(tmp_path, "live")
    with store.locked():
        staging = store.stage(manifest)
    with staging:
        # Another process's locked operation runs recovery meanwhile.
        run_roost("activate", store.dest, "prev", check=True)
        assert os.path.isdir(staging.root)
        assert os.path.exists(staging.root + ".lock")
    assert os.listdir(store._meta("staging")) == []
