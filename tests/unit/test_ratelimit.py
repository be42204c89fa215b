"""The per-token ingest limit: a token bucket of events, admitted by one event, charged whole."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from controlplane.config import Config
from controlplane.ratelimit import Bucket, IngestLimiter, RateLimited


def test_bucket_starts_full_refills_at_its_rate_and_never_above_its_burst() -> None:
    bucket = Bucket(rate=5.0, burst=10, now=0.0)
    assert bucket.wait(0.0) == 0
    bucket.take(10, 0.0)
    assert bucket.wait(0.0) == pytest.approx(0.2)  # one event back after 1/5 s
    assert bucket.wait(0.2) == 0
    bucket.take(1, 0.2)
    assert bucket.wait(1000.0) == 0 and bucket.level == 10  # capped at the burst


def test_a_large_batch_is_admitted_and_paid_for_by_the_requests_after_it() -> None:
    bucket = Bucket(rate=5.0, burst=10, now=0.0)
    bucket.take(25, 0.0)  # admitted with 10 in the bucket: 15 owed
    assert bucket.wait(0.0) == pytest.approx(16 / 5)
    assert bucket.wait(3.0) == pytest.approx(0.2)
    assert bucket.wait(3.2) == 0


def test_a_clock_going_backwards_refills_nothing() -> None:
    bucket = Bucket(rate=5.0, burst=10, now=10.0)
    bucket.take(10, 10.0)
    assert bucket.wait(5.0) == pytest.approx(0.2)


def limiter(
    make_config: Callable[..., Config], clock: list[float], **tokens: object
) -> IngestLimiter:
    token_list = [
        {"name": "a", "sha256": "0" * 64, "scopes": ["ingest"]},
        {"name": "b", "sha256": "1" * 64, "scopes": ["ingest"], **tokens},
        {"name": "c", "sha256": "2" * 64, "scopes": ["ingest"], "events_per_second": 0},
    ]
    config = make_config(
        auth={"tokens": token_list},
        rate_limit={"events_per_second": 2.0, "burst_events": 4},
    )
    return IngestLimiter(config, clock=lambda: clock[0])


def test_each_token_has_its_own_bucket_and_may_override_or_disable_the_limit(
    make_config: Callable[..., Config],
) -> None:
    clock = [100.0]
    limits = limiter(make_config, clock, events_per_second=100.0, burst_events=1000)
    assert limits.limits == {"a": (2.0, 4), "b": (100.0, 1000)}  # c: 0 disables
    limits.admit("a")
    limits.charge("a", 4)
    with pytest.raises(RateLimited) as refused:
        limits.admit("a")
    assert refused.value.token == "a"
    assert refused.value.retry_after == pytest.approx(0.5)
    assert refused.value.retry_after_header == "1"  # whole seconds, at least 1
    limits.admit("b")  # another token is not affected
    limits.charge("c", 10**9)
    limits.admit("c")  # no limit
    limits.admit("unknown")  # a name without a token: nothing to limit
    clock[0] += 0.5
    limits.admit("a")


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert RateLimited("t", 0.01).retry_after_header == "1"
    assert RateLimited("t", 2.01).retry_after_header == "3"
    assert RateLimited("t", 3.0).retry_after_header == "3"
