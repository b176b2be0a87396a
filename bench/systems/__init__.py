"""The systems the benchmark compares, each a small adapter behind :class:`base.System`."""

from __future__ import annotations

from bench.systems.base import System
from bench.systems.bittorrent import LibtorrentSystem
from bench.systems.http_central import HttpSystem
from bench.systems.roost_swarm import RoostPlainSwarmSystem, RoostSystem

SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (RoostSystem, HttpSystem, LibtorrentSystem, RoostPlainSwarmSystem)
}

__all__ = ["SYSTEMS", "System"]
