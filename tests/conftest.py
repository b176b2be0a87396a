"""Shared test helpers: build trees, run the CLI in-process or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from roost.runtime.manifest import Manifest
from roost.runtime.pack import pack

SRC = Path(__file__).resolve().parents[1] / "src"

# The network-namespace fleet of SSH hosts (tests/fleet.py): fixtures fleet, fleet_factory.
pytest_plugins = ["fleet"]


def write_tree(root: Path, spec: dict[str, object]) -> Path:
    """Create files from ``{"a/b.txt": b"data", "run.sh": (b"#!", 0o755),
    "link": ("->", "a/b.txt"), "empty/": None}``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in spec.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, tuple) and value[0] == "->":
            os.symlink(value[1], path)
        elif isinstance(value, tuple):
            path.write_bytes(value[0])
            path.chmod(value[1])
        else:
            path.write_bytes(value)  # type: ignore[arg-type]
            path.chmod(0o644)
    return root


def pack_tree(root: Path, **options: object) -> Manifest:
    return pack(str(root), **options)  # type: ignore[arg-type]


def run_roost(*args: str, check: bool = False, **kwargs: object) -> subprocess.CompletedProcess:
    """Run the real ``roost`` command line in a child process."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-m", "roost", *args],
        capture_output=True,
        text=True,
        env=env,
        **kwargs,  # type: ignore[arg-type]
    )
    if check and result.returncode != 0:
        raise AssertionError(f"roost {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    """A small tree with every kind of entry a release can hold."""
    return write_tree(
        tmp_path / "src",
        {
            "a/b/hello.txt": b"hello\n",
            "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
            "spaces in name.txt": b"spaces",
            "unicodé/ñame.txt": b"unicode",
            "zero": b"",
            "link": ("->", "a/b/hello.txt"),
            "dirlink": ("->", "a"),
            "empty/": None,
            "data.bin": os.urandom(700_000),
        },
    )
