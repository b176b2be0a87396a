"""The testbed's self-check policy (the probes themselves run in test_bench_quick)."""

from __future__ import annotations

from bench.testbed import check_twice


def attempts(*results: bool) -> tuple[list[dict], object]:
    """A fake self-check returning the given verdicts in turn, and the list of its calls."""
    calls: list[dict] = []

    def check() -> dict:
        result = {"passed": results[len(calls)], "attempt": len(calls) + 1}
        calls.append(result)
        return result

    return calls, check


def test_a_passing_self_check_runs_once():
    calls, check = attempts(True)
    said: list[str] = []
    assert check_twice(check, say=said.append) == {"passed": True, "attempt": 1}
    assert len(calls) == 1 and said == []


def test_a_failed_self_check_is_repeated_and_the_first_attempt_kept():
    calls, check = attempts(False, True)
    said: list[str] = []
    result = check_twice(check, say=said.append)
    assert result["passed"] and result["attempt"] == 2
    assert result["first_attempt"] == {"passed": False, "attempt": 1}
    assert len(calls) == 2 and len(said) == 1


def test_a_testbed_failing_twice_stays_flagged():
    calls, check = attempts(False, False)
    result = check_twice(check, say=lambda line: None)
    assert not result["passed"] and result["first_attempt"]["attempt"] == 1
    assert len(calls) == 2
