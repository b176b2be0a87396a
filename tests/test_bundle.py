"""The runtime zipapp shipped to hosts: deterministic, minimal, standard library only."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Callable

import pytest

import roost
from roost.deploy import remote
from roost.deploy.bundle import RuntimeBundle, runtime_bundle
from roost.deploy.ssh import runtime_command

MiB = 1024 * 1024
HOST_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"


def build() -> RuntimeBundle:
    """A fresh build, bypassing the per-process cache."""
    return runtime_bundle.__wrapped__()


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / runtime_bundle().name
    path.write_bytes(runtime_bundle().data)
    return path


def run_bundle(bundle: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the zipapp the way a host would: isolated, no site-packages, bare environment."""
    return subprocess.run(
        [HOST_PYTHON, "-I", "-S", str(bundle), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd or bundle.parent)},
    )


def test_bundle_is_deterministic() -> None:
    first, second = build(), build()
    assert first.data == second.data
    assert first.sha256 == second.sha256 == hashlib.sha256(first.data).hexdigest()
    assert first.name == f"roost-runtime-{roost.__version__}-{first.sha256[:16]}.pyz"
    with zipfile.ZipFile(io.BytesIO(first.data)) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == ["__main__.py", *sorted(i.filename for i in infos[1:])]
    assert {i.date_time for i in infos} == {(2020, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos} == {0o644}


def test_bundle_holds_only_the_runtime() -> None:
    package = Path(roost.__file__).resolve().parent
    sources = {"__main__.py", "roost/__init__.py"} | {
        f"roost/runtime/{p.name}" for p in (package / "runtime").glob("*.py")
    }
    expected = sources | {name + "c" for name in sources}  # and their bytecode
    with zipfile.ZipFile(io.BytesIO(runtime_bundle().data)) as archive:
        names = set(archive.namelist())
        assert names == expected
        assert archive.read("roost/runtime/cli.py") == (package / "runtime" / "cli.py").read_bytes()


def test_bundle_size(capsys: pytest.CaptureFixture[str]) -> None:
    size = len(runtime_bundle().data)
    with capsys.disabled():
        print(f"\nruntime bundle: {size} bytes ({size / 1024:.1f} KiB)")
    assert size < 1 * MiB


def test_bundle_runs_isolated_on_the_host_python(bundle_file: Path) -> None:
    result = run_bundle(bundle_file, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"roost {roost.__version__}"
    help_text = run_bundle(bundle_file, "--help")
    assert help_text.returncode == 0, help_text.stderr
    for command in ("pack", "inspect", "fetch", "seed", "activate", "rollback"):
        assert command in help_text.stdout
    controller_only = run_bundle(bundle_file, "deploy", ".")  # the controller's, not shipped
    assert controller_only.returncode == 2
    assert "invalid choice: 'deploy'" in controller_only.stderr


def test_bundle_runs_its_bytecode_or_else_its_source(tmp_path: Path) -> None:
    """Python caches no bytecode for modules in a zip, so the bundle carries it: a host
    with the controller's Python version runs it without compiling anything, and one
    with another version (a foreign magic number) compiles the sources instead."""
    magic = subprocess.run(
        [HOST_PYTHON, "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if magic != importlib.util.MAGIC_NUMBER.hex():
        pytest.skip(f"{HOST_PYTHON} reads another bytecode version than the test's Python")

    def variant(name: str, change: Callable[[str, bytes], bytes]) -> Path:
        path = tmp_path / name
        original = zipfile.ZipFile(io.BytesIO(runtime_bundle().data))
        with original, zipfile.ZipFile(path, "w") as changed:
            for info in original.infolist():
                changed.writestr(info, change(info.filename, original.read(info)))
        return path

    def without_sources(name: str, data: bytes) -> bytes:
        return b"raise SystemExit('compiled from source')\n" if name.endswith(".py") else data

    def foreign_bytecode(name: str, data: bytes) -> bytes:
        return b"\x00\x00\r\n" + data[4:] if name.endswith(".pyc") else data

    for name, change in (("bytecode.pyz", without_sources), ("sources.pyz", foreign_bytecode)):
        result = run_bundle(variant(name, change), "--version")
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.strip() == f"roost {roost.__version__}"
    neither = variant("neither.pyz", lambda n, d: foreign_bytecode(n, without_sources(n, d)))
    broken = run_bundle(neither, "--version")
    assert "compiled from source" in broken.stderr  # the check above can fail


def test_the_runtime_command_ignores_the_hosts_python_setup(
    bundle_file: Path, tmp_path: Path
) -> None:
    """The runtime needs nothing but the standard library: whatever PYTHONPATH or
    site-packages hold on the host cannot shadow its modules."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "json.py").write_text("raise SystemExit('a shadowing json was imported')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(shadow)}

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60
        )

    isolated = run(runtime_command(str(bundle_file), ["--version"]))
    assert isolated.returncode == 0, isolated.stderr
    assert isolated.stdout.strip() == f"roost {roost.__version__}"
    plain = run(f"python3 {shlex.quote(str(bundle_file))} --version")
    assert "a shadowing json was imported" in plain.stderr  # the check above can fail


def test_bundle_packs_and_inspects(bundle_file: Path, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_bytes(b"hello\n")
    (src / "b.bin").write_bytes(os.urandom(300_000))
    os.symlink("sub/a.txt", src / "link")
    packed = run_bundle(bundle_file, "pack", str(src), "-o", "tree.manifest", "-q", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr
    assert "packed 2 files" in packed.stdout
    inspected = run_bundle(bundle_file, "inspect", "tree.manifest", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    assert (summary["files"], summary["symlinks"], summary["bytes"]) == (2, 1, 300_006)
    verified = run_bundle(bundle_file, "verify", str(src), "tree.manifest", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # No bytecode or other droppings next to the bundle or in the tree.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree", "tree.manifest"]


def run_snippet(
    script: str, *args: str, home: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess:
    """Run one of the bootstrap snippets as a host does (``python3 -c``), HOME at ``home``."""
    return subprocess.run(
        [HOST_PYTHON, "-c", script, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
    )


def test_probe_and_install_snippets(tmp_path: Path) -> None:
    bundle = runtime_bundle()
    probe = run_snippet(remote.PROBE, bundle.name, bundle.sha256, home=tmp_path)
    info = json.loads(probe.stdout)
    cache = tmp_path / ".cache" / "roost" / "runtime"
    assert info["runtime"] == str(cache / bundle.name)
    assert info["has_runtime"] is False
    assert tuple(info["python"]) >= remote.MIN_PYTHON
    # A damaged transfer is refused and leaves nothing behind.
    damaged = run_snippet(
        remote.INSTALL, info["runtime"], bundle.sha256, home=tmp_path, stdin=bundle.data[:-1]
    )
    assert damaged.returncode == 1
    assert b"sha256 mismatch" in damaged.stderr
    assert not cache.exists() or list(cache.iterdir()) == []
    # Temporary files: a dead install's is removed, a running one's is left alone.
    cache.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stale = cache / f"{bundle.name}.999999999.tmp"
        live = cache / f"{bundle.name}.{sleeper.pid}.tmp"
        stale.write_bytes(b"half")
        live.write_bytes(b"half")
        installed = run_snippet(
            remote.INSTALL, info["runtime"], bundle.sha256, home=tmp_path, stdin=bundle.data
        )
        assert installed.returncode == 0, installed.stderr
        assert sorted(p.name for p in cache.iterdir()) == sorted([bundle.name, live.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (cache / bundle.name).read_bytes() == bundle.data
    again = json.loads(run_snippet(remote.PROBE, bundle.name, bundle.sha256, home=tmp_path).stdout)
    assert again["has_runtime"] is True
    # The cached bundle runs from where it was installed.
    assert run_bundle(cache / bundle.name, "--version").returncode == 0
