"""Rate limits: the calls the product makes to a provider (:class:`RateLimiter`, shared by the
sender and the reconciler), and the events a bearer token may ingest (:class:`Bucket`).

Per-token rate limit on ingest (``POST /v1/events``): one token bucket of *events* per
bearer token name.

A bucket holds at most ``burst_events`` and refills at ``events_per_second``. A request is
admitted when its token's bucket holds at least one event, before its body is read; once the
batch is decoded it costs its number of events, which may take the bucket below zero. A large
batch is therefore never refused for its size alone (``server.max_batch_events`` bounds it),
and the requests after it wait until the bucket has refilled: over any long stretch a token
gets ``events_per_second`` on average. A refused request is answered 429 with ``Retry-After``
(whole seconds until the bucket holds one event again) and changes nothing.

Limits are per process: replicas each keep their own buckets. The arithmetic here uses floats;
it decides when to answer, never what is billed.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

from controlplane.config import Config


class RateLimited(Exception):
    """Too many events for this token; retry later (429)."""

    def __init__(self, token: str, retry_after: float) -> None:
        self.token = token
        self.retry_after = retry_after
        super().__init__(
            f"token {token!r} is over its ingest rate limit; retry in {self.retry_after_header} s"
        )

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


class Bucket:
    """A token bucket of events: `rate` per second, at most `burst`, starting full."""

    __slots__ = ("burst", "level", "rate", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.level = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait(self, now: float) -> float:
        """Seconds until the bucket holds one event (0: admit now)."""
        self._refill(now)
        return 0.0 if self.level >= 1 else (1 - self.level) / self.rate

    def take(self, events: int, now: float) -> None:
        self._refill(now)
        self.level -= events


class IngestLimiter:
    """The buckets of every token with a limit (``[rate_limit]``, or the token's own)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        default = config.rate_limit
        self.limits: dict[str, tuple[float, int]] = {}
        for token in config.auth.tokens:
            rate = (
                default.events_per_second
                if token.events_per_second is None
                else token.events_per_second
            )
            burst = default.burst_events if token.burst_events is None else token.burst_events
            if rate > 0:
                self.limits[token.name] = (rate, burst)
        self._buckets: dict[str, Bucket] = {}

    def _bucket(self, token: str) -> Bucket | None:
        limit = self.limits.get(token)
        if limit is None:
            return None
        bucket = self._buckets.get(token)
        if bucket is None:
            bucket = self._buckets[token] = Bucket(*limit, now=self.clock())
        return bucket

    def admit(self, token: str) -> None:
        """Raise RateLimited when `token`'s bucket is empty."""
        bucket = self._bucket(token)
        if bucket is None:
            return
        wait = bucket.wait(self.clock())
        if wait > 0:
            raise RateLimited(token, wait)

    def charge(self, token: str, events: int) -> None:
        """Take an admitted batch's events from `token`'s bucket."""
        bucket = self._bucket(token)
        if bucket is not None:
            bucket.take(events, self.clock())


class RateLimiter:
    """At most `rate` call starts in any sliding one-second window (with a small margin for
    network jitter, so the provider's own window never sees more)."""

    MARGIN = 1.05

    def __init__(self, rate: float | None) -> None:
        self.capacity = max(1, int(rate)) if rate else 0
        self.window = self.capacity / rate * self.MARGIN if rate else 0.0
        self._starts: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.capacity:
            return
        async with self._lock:
            while len(self._starts) >= self.capacity:
                wait = self._starts[0] + self.window - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._starts.popleft()
            self._starts.append(time.monotonic())
