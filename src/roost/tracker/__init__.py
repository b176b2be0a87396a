"""The tracker: knows each swarm's members and hands each peer a bounded set of neighbours.

Controller side (may use aiohttp). ``policy`` holds the pure hand-out and
interval decisions, ``db`` the SQLite-backed state, ``service`` the HTTP API and
the ways to run it (``run_tracker``, ``running_tracker``), ``command`` the
``roost tracker`` command line. The wire format is shared with hosts through
``roost.runtime.announce``. See ``docs/tracker.md``.

The service's names are re-exported lazily, so that importing the package (or
its pure ``policy``) does not load aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6969

_SERVICE_NAMES = {
    "RunningTracker",
    "Tracker",
    "TrackerConfig",
    "load_or_create_token",
    "make_app",
    "run_tracker",
    "running_tracker",
}

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", *sorted(_SERVICE_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _SERVICE_NAMES:
        return getattr(importlib.import_module("roost.tracker.service"), name)
    raise AttributeError(f"module 'roost.tracker' has no attribute {name!r}")
