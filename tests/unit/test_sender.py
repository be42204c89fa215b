from __future__ import annotations

import asyncio
import time

from controlplane.sender import RateLimiter


async def test_rate_limiter_never_exceeds_its_rate_in_any_one_second_window() -> None:
    limiter = RateLimiter(20)
    starts: list[float] = []

    async def call() -> None:
        await limiter.wait()
        starts.append(time.monotonic())

    await asyncio.gather(*(call() for _ in range(45)))
    assert len(starts) == 45
    busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert busiest <= 20


async def test_no_rate_means_no_waiting() -> None:
    limiter = RateLimiter(None)
    for _ in range(1000):
        await limiter.wait()
    assert limiter.capacity == 0
