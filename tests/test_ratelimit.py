"""The shared create rate limiter: spacing, bursts, and holding off after a 429."""

from __future__ import annotations

import asyncio
import time

import pytest

from kontext.ratelimit import RateLimiter


async def _stamps(limiter: RateLimiter, n: int) -> list[float]:
    stamps: list[float] = []

    async def one():
        await limiter.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(n)))
    return sorted(stamps)


def test_spacing_after_the_burst_is_at_least_one_over_the_rate():
    stamps = asyncio.run(_stamps(RateLimiter(1200, burst=2), 6))  # 20/s after a burst of 2
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    assert all(gap >= 0.05 * 0.95 for gap in gaps)  # lower bounds only: slowness cannot fail this


def test_hold_off_delays_every_waiter():
    async def go():
        limiter = RateLimiter(None)
        limiter.hold_off(0.2)
        start = time.monotonic()
        stamps = await _stamps(limiter, 3)
        return start, stamps

    start, stamps = asyncio.run(go())
    assert all(stamp - start >= 0.2 * 0.95 for stamp in stamps)


def test_unlimited_is_immediate_and_bad_rates_refused():
    asyncio.run(_stamps(RateLimiter(None), 100))
    with pytest.raises(ValueError):
        RateLimiter(0)
