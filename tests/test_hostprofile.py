"""bench.hostprofile: the sampling profiler the testbed can run roost's processes under."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from bench import hostprofile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUSY = textwrap.dedent(
    """
    import sys, time

    def spin(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            sum(range(100))

    if __name__ == "__main__":
        spin(0.3)
        print(" ".join(sys.argv[1:]))
        sys.exit(3)
    """
)


def run_profiled(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "busy.py").write_text(BUSY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    return subprocess.run(
        [sys.executable, "-m", "bench.hostprofile", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_profiled_module_runs_as_with_python_m_and_its_cpu_is_sampled(tmp_path):
    out = tmp_path / "profiles"
    result = run_profiled(tmp_path, "--out", str(out), "busy", "one", "--two")
    assert result.returncode == 3, result.stderr  # the module's exit status
    assert result.stdout.strip() == "one --two"  # its own arguments, untouched
    (profile_file,) = out.iterdir()
    profile = json.loads(profile_file.read_text())
    # 0.3 s of CPU at one sample per 4 ms: most samples found spin() running or below.
    assert profile["cpu_seconds"] >= 0.3
    assert profile["samples"] >= 50
    assert profile["total"]["busy.py:spin"] >= 0.8 * profile["samples"]
    assert profile["total"]["busy.py:<module>"] >= profile["total"]["busy.py:spin"]
    assert profile["own"].get("busy.py:<module>", 0) < profile["own"]["busy.py:spin"]


def test_the_report_sums_every_process_of_a_folder(tmp_path):
    for pid, own in ((1, {"a.py:f": 30, "a.py:g": 10}), (2, {"a.py:f": 10, "b.py:h": 50})):
        total = {**own, "a.py:main": sum(own.values())}
        samples = sum(own.values())
        profile = {"cpu_seconds": samples * 0.004, "interval": 0.004, "samples": samples}
        profile.update(own=own, total=total)
        (tmp_path / f"{pid}.json").write_text(json.dumps(profile))
    text = hostprofile.report(str(tmp_path))
    assert "2 processes, 100 samples" in text
    assert "median 0.20 s, max 0.24 s" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0] == "| `b.py:h` | 50.0 | 50.0 |"  # most samples of its own first
    assert rows[1] == "| `a.py:f` | 40.0 | 40.0 |"


def test_wrong_use_is_an_error_not_a_trace(tmp_path):
    result = run_profiled(tmp_path, "--report", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_profiled(tmp_path, "busy")
    assert result.returncode == 2
    assert "--out DIR MODULE" in result.stderr


def test_the_testbed_starts_roost_under_the_profiler_only_when_asked(tmp_path):
    from types import SimpleNamespace

    from bench.systems.base import PYTHON
    from bench.systems.roost_swarm import runtime_command

    run = SimpleNamespace(bench=SimpleNamespace(profiles=None), dir=str(tmp_path / "roost-0"))
    assert runtime_command(run) == [PYTHON, "-m", "roost.runtime"]
    run.bench.profiles = str(tmp_path / "profiles")
    assert runtime_command(run) == [
        PYTHON, "-m", "bench.hostprofile", "--out", str(tmp_path / "profiles" / "roost-0"),
        "roost.runtime",
    ]  # fmt: skip
