"""The token bucket's arithmetic, on a fake clock: no sleeping, exact numbers."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.runtime import ratelimit
from roost.runtime.ratelimit import TokenBucket

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.mark.parametrize("rate", [0, -1, -0.5])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate)


def test_default_burst_is_a_quarter_second_but_at_least_one_mib(clock: FakeClock) -> None:
    assert TokenBucket(100 * MiB, clock=clock).burst == 25 * MiB
    assert TokenBucket(1000, clock=clock).burst == MiB
    assert TokenBucket(1000, burst=10, clock=clock).burst == 10


def test_a_full_bucket_lets_a_burst_through_then_paces(clock: FakeClock) -> None:
    bucket = TokenBucket(100, burst=300, clock=clock)
    assert bucket.delay(300) == 0.0
    assert bucket.delay(50) == pytest.approx(0.5)
    assert bucket.delay(50) == pytest.approx(1.0)  # debts add up


def test_one_large_send_goes_into_debt(clock: FakeClock) -> None:
    bucket = TokenBucket(10, burst=100, clock=clock)
    assert bucket.delay(300) == pytest.approx(20.0)
    assert bucket.delay(10) == pytest.approx(21.0)
    clock.now += 21.0
    assert bucket.delay(0) == pytest.approx(0.0)
    assert bucket.delay(10) == pytest.approx(1.0)


def test_tokens_refill_with_time_up_to_the_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(100, burst=200, clock=clock)
    assert bucket.delay(200) == 0.0
    clock.now += 0.5  # 50 tokens back
    assert bucket.delay(50) == 0.0
    assert bucket.delay(10) == pytest.approx(0.1)
    clock.now += 1e6  # a long idle time refills only up to the burst
    assert bucket.delay(200) == 0.0
    assert bucket.delay(100) == pytest.approx(1.0)


def test_time_going_nowhere_adds_nothing(clock: FakeClock) -> None:
    bucket = TokenBucket(100, burst=100, clock=clock)
    bucket.delay(100)
    for _ in range(5):
        assert bucket.delay(0) == 0.0


@given(
    rate=st.floats(1.0, 1e9),
    burst=st.floats(1.0, 1e8),
    sends=st.lists(st.integers(0, 10**8), max_size=40),
)
def test_a_sender_that_waits_as_told_runs_at_exactly_the_rate(rate, burst, sends) -> None:
    clock = FakeClock()
    start = clock.now
    bucket = TokenBucket(rate, burst=burst, clock=clock)
    for amount in sends:
        wait = bucket.delay(amount)
        assert wait >= 0.0
        clock.now += wait
    expected = max(0.0, sum(sends) - burst) / rate
    assert clock.now - start == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_consume_sleeps_for_the_delay(clock: FakeClock, monkeypatch) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(ratelimit.asyncio, "sleep", fake_sleep)
    bucket = TokenBucket(1000, burst=1000, clock=clock)

    async def main() -> None:
        await bucket.consume(1000)  # within the burst: no sleep at all
        await bucket.consume(500)

    asyncio.run(main())
    assert slept == [pytest.approx(0.5)]
