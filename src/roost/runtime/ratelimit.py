"""A token bucket for optional per-process upload and download rate limits."""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class TokenBucket:
    """Lets ``rate`` bytes per second through, with bursts of up to ``burst`` bytes.

    ``delay`` is pure (given the clock) so tests check the arithmetic without
    sleeping; ``consume`` is the asyncio wrapper the engine awaits.
    """

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 4, 1 << 20)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()

    def delay(self, amount: int) -> float:
        """Take ``amount`` tokens (going into debt if needed); seconds to wait before sending."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def consume(self, amount: int) -> None:
        wait = self.delay(amount)
        if wait > 0:
            await asyncio.sleep(wait)
