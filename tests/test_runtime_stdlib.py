"""The runtime ships to hosts that have only python3: it must import nothing else."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import roost.runtime

SRC = Path(__file__).resolve().parents[1] / "src"

RUNTIME_MODULES = sorted(
    f"roost.runtime.{m.name}"
    for m in pkgutil.iter_modules(roost.runtime.__path__)
    if m.name != "__main__"
)

# A child interpreter in isolated mode (no site-packages, no user env) whose import
# system refuses every module that is neither stdlib nor part of the runtime.
BLOCKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {src!r})
    ALLOWED_ROOST = ("roost", "roost.runtime")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top == "roost":
                if name in ALLOWED_ROOST or name.startswith("roost.runtime."):
                    return None
                raise ImportError(f"runtime imported controller module {{name}}")
            if top not in sys.stdlib_module_names:
                raise ImportError(f"runtime imported third-party module {{name}}")
            return None

    sys.meta_path.insert(0, Blocker())
    import importlib
    for name in {modules!r}:
        importlib.import_module(name)
    print("ok", len({modules!r}))
    """
)


def test_runtime_modules_are_found() -> None:
    assert "roost.runtime.manifest" in RUNTIME_MODULES
    assert "roost.runtime.store" in RUNTIME_MODULES


def test_runtime_imports_only_the_standard_library() -> None:
    code = BLOCKER.format(src=str(SRC), modules=RUNTIME_MODULES)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(RUNTIME_MODULES)}"


def test_blocker_catches_a_third_party_import(tmp_path: Path) -> None:
    """The check itself must be able to fail: a module importing pytest is refused."""
    code = BLOCKER.format(src=str(SRC), modules=["pytest"])
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "third-party module pytest" in result.stderr


def test_runtime_cli_runs_in_isolated_mode(tmp_path: Path) -> None:
    """``python -I -S -m roost.runtime`` (as on a bare host) packs a tree."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"x" * 1000)
    code = (
        f"import sys, runpy; sys.path.insert(0, {str(SRC)!r});"
        f" sys.argv = ['roost-runtime', 'pack', {str(tmp_path / 'tree')!r},"
        f" '-o', {str(tmp_path / 'm')!r}]; runpy.run_module('roost.runtime', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m").read_bytes().startswith(b'{"dirs":')


def after_the_entry_point(code: str) -> list[str]:
    """What ``code`` prints, run in an isolated interpreter once the runtime's entry point
    has run (``roost-runtime --version``)."""
    program = (
        f"import sys, runpy; sys.path.insert(0, {str(SRC)!r});"
        " sys.argv = ['roost-runtime', '--version']\n"
        "try:\n    runpy.run_module('roost.runtime', run_name='__main__')\n"
        "except SystemExit:\n    pass\n" + code
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", program], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_entry_point_leaves_the_garbage_collector_running() -> None:
    """The entry point pauses the collector while the runtime is imported (a start-up
    cost on every host) and must resume it: a seeder runs for hours, and asyncio makes
    reference cycles. What it imported is frozen out of the collector's way."""
    printed = after_the_entry_point(
        "import gc; print(gc.isenabled(), gc.get_freeze_count() > 1000)"
    )
    assert printed[-2:] == ["True", "True"]


def test_the_entry_point_imports_asyncio_without_tls_and_leaves_ssl_importable() -> None:
    """asyncio is imported while ``ssl`` cannot be (a start-up cost the runtime has no
    use for); an https tracker still imports ``ssl`` afterwards."""
    printed = after_the_entry_point(
        "import asyncio.base_events, asyncio.sslproto\n"
        "tls_in_asyncio = asyncio.base_events.ssl is not None\n"
        "import ssl\n"
        "print(tls_in_asyncio, callable(ssl.create_default_context))"
    )
    assert printed[-2:] == ["False", "True"]
