"""The benchmark's CI scenario: ``python -m bench --quick`` must deliver correct bytes to
every host with every system. Never a timing: only that the bytes are right, and that
the testbed leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["roost", "http", "libtorrent", "roost-swarm"]


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    for tool in ("ip", "tc"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            missing.append(f"`{tool}` (apt-get install iproute2)")
    return missing


def _libtorrent_missing() -> str | None:
    if importlib.util.find_spec("libtorrent") is None:
        return "libtorrent is not installed (pip install -e '.[bench]')"
    try:
        import libtorrent  # noqa: F401
    except ImportError as exc:
        return f"libtorrent cannot be imported: {exc}"
    return None


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = _missing()
    if missing:
        pytest.skip("the benchmark testbed needs " + "; ".join(missing))
    systems = [s for s in SYSTEMS if s != "libtorrent" or _libtorrent_missing() is None]
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--systems", ",".join(systems),
         "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    output, _ = proc.communicate(timeout=280)
    if proc.returncode == 2 and "needs" in output:
        pytest.skip(output.strip().splitlines()[-1])
    results_path = out / "results.json"
    assert results_path.exists(), f"no results (exit {proc.returncode}):\n{output}"
    results = json.loads(results_path.read_text())
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {
        "results": results,
        "output": output,
        "returncode": proc.returncode,
        "pid": proc.pid,
        "netns": leftovers,
        "out": out,
    }


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_host_gets_correct_bytes(quick: dict[str, Any], system: str) -> None:
    if system == "libtorrent":
        reason = _libtorrent_missing()
        if reason:
            pytest.skip(reason)
    results = quick["results"]
    assert system in results["systems"], quick["output"]
    figures = results["systems"][system]
    problems = [p for run in figures["runs"] for p in run["problems"]]
    assert figures["correct"], f"{system}: {problems}\n{quick['output']}"
    times = figures["host_times"]
    assert len(times) == results["scenario"]["hosts"] == 4
    assert all(t is not None for t in times.values()), times


def test_results_folder_and_teardown(quick: dict[str, Any]) -> None:
    assert quick["returncode"] == 0, quick["output"]
    assert (quick["out"] / "results.md").exists()
    for key in ("t_first", "t_p50", "t_last", "eta", "origin_egress_ratio", "cpu_idle", "correct"):
        for name, figures in quick["results"]["systems"].items():
            assert key in figures, (name, key)
    out = quick["out"]
    assert (out / "completion.png").exists() and (out / "progress.png").exists()
    for name, figures in quick["results"]["systems"].items():
        (run,) = figures["runs"]
        # every host reported its progress, ending with the whole release
        assert all(tl and tl[-1][1] == 1.0 for tl in run["host_progress"].values()), name
        assert (out / "logs" / f"{name}-0").is_dir()
        assert 0 <= figures["cpu_system_seconds"] <= figures["cpu_seconds"]
    # the testbed's namespaces (named after the bench's pid) are gone
    assert f"roost-b{quick['pid']}-" not in quick["netns"]
