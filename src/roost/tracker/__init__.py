"""The tracker: knows each swarm's members and hands each peer a bounded set of neighbours.

Controller side (may use aiohttp). ``policy`` holds the pure hand-out and
interval decisions, ``db`` the SQLite-backed state, ``service`` the HTTP API and
the ways to run it (``run_tracker``, ``running_tracker``). The wire format is
shared with hosts through ``roost.runtime.announce``. See ``docs/tracker.md``.
"""

from roost.tracker.service import (
    RunningTracker,
    Tracker,
    TrackerConfig,
    load_or_create_token,
    make_app,
    run_tracker,
    running_tracker,
)

__all__ = [
    "RunningTracker",
    "Tracker",
    "TrackerConfig",
    "load_or_create_token",
    "make_app",
    "run_tracker",
    "running_tracker",
]
