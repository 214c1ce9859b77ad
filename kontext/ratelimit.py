"""A create rate limiter shared by every prediction in flight.

Replicate allows 600 creates a minute (accounts low on credit far fewer). Rather than firing
creates and eating 429s, every create first takes a token from one `RateLimiter`; when the API
throttles anyway (another process shares the account, the account was downgraded), the limiter is
told how long to hold off and *all* creates wait, not just the one that was refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    """An asyncio token bucket: `rate_per_minute` tokens a minute, bursts up to `burst`.

    It paces at `headroom` below the limit (2 % by default): requests leave here exactly on the
    limit but arrive at the server with jitter, and one 429 costs every create a whole second
    (Replicate's ``Retry-After`` is whole seconds), far more than the 2 % it saves.

    Example:
        ```python
        limiter = RateLimiter(600)
        await limiter.acquire()   # before each create
        limiter.hold_off(2.0)     # after a 429 asking for 2 s
        ```
    """

    def __init__(
        self,
        rate_per_minute: float | None,
        burst: int | None = None,
        *,
        headroom: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rate_per_minute is not None and rate_per_minute <= 0:
            raise ValueError("rate_per_minute must be positive (or None for no limit)")
        self.rate_per_minute = rate_per_minute
        self._per_second = (rate_per_minute or 0) * (1 - headroom) / 60.0
        # A modest burst: enough to start promptly, small enough not to trip the server's bucket.
        self.burst = burst if burst is not None else max(1, int(self._per_second) or 1)
        self._clock = clock
        self._tokens = float(self.burst)
        self._updated = clock()
        self._not_before = 0.0
        self._lock = asyncio.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self._per_second)
        self._updated = now

    async def acquire(self) -> None:
        """Wait until a create may be sent. Fair: waiters are served in arrival order."""
        if self.rate_per_minute is None and self._not_before <= self._clock():
            return
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._not_before:
                    await asyncio.sleep(self._not_before - now)
                    continue
                if self.rate_per_minute is None:
                    return
                self._refill(now)
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._per_second)

    @property
    def interval(self) -> float:
        """Seconds between two creates at the paced rate (0 when unlimited)."""
        return 1 / self._per_second if self._per_second else 0.0

    def hold_off(self, seconds: float) -> None:
        """Make every create wait at least `seconds` from now (after a 429), and drain the bucket."""
        now = self._clock()
        self._not_before = max(self._not_before, now + seconds)
        self._tokens = 0.0
        self._updated = max(self._updated, now + seconds)
