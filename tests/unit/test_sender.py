from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from controlplane.core import ControlPlane
from controlplane.interfaces import ClosedPeriod, Outcome, WebhookRecord
from controlplane.ledger import RowState
from controlplane.sender import RateLimiter
from flags import FlagChange
from plugins.billing.fake import FakeBilling
from tests.conftest import HOUR, T0, tick


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


async def live(cp: ControlPlane) -> None:
    """Org o1 on pro with a customer; the control plane sends buckets from T0."""
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.set_flags(
        [
            FlagChange("authority", "controlplane"),
            FlagChange("bill_from", T0),
            FlagChange("shadow", False),
        ],
        actor="t",
        reason="go",
    )


async def test_a_row_whose_quantity_changed_under_the_sender_waits_for_the_next_pass(
    cp: ControlPlane, fake_billing: FakeBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    (read,) = await cp.storage.ledger()
    recorded = cp.storage.record_attempts

    async def re_derived(row_ids: Any, at: int, claim: Any = None, **kw: Any) -> dict[int, int]:
        # as if another replica had re-derived the chain after this sender's claim lapsed
        return {i: q + 1 for i, q in (await recorded(row_ids, at, claim, **kw)).items()}

    monkeypatch.setattr(cp.storage, "record_attempts", re_derived)
    stats = await cp.send()
    assert (stats.calls, stats.sent) == (0, 0) and fake_billing.calls == []
    (row,) = await cp.storage.ledger()
    assert (row.state, row.attempts, row.first_attempt_at) == (RowState.PENDING, 0, None)

    monkeypatch.setattr(cp.storage, "record_attempts", recorded)
    assert (await cp.send()).sent == 1
    assert [c.value for c in fake_billing.calls] == [read.quantity]


async def test_a_retry_keeps_the_timestamp_of_its_first_attempt(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    fake_billing.fail_next(Outcome.AMBIGUOUS)  # it may have arrived, stamped T0
    assert (await cp.send()).ambiguous == 1
    # Then the invoice of the period holding T0 is finalized.
    finalized = int(clock[0]) + 60
    await cp.storage.record_webhook(
        WebhookRecord("evt_1", "invoice.finalized", finalized, "closed"),
        finalized,
        closed=ClosedPeriod("in_1", "o1", T0 - HOUR, T0 + HOUR, finalized),
    )
    clock[0] += 120
    assert (await cp.send()).sent == 1
    assert [c.timestamp for c in fake_billing.calls] == [T0, T0]  # same parameters, same key


async def test_a_late_correction_for_a_finalized_period_goes_out_even_past_the_window(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    assert (await cp.send()).sent == 1
    period_end = T0 + 30 * 86400  # the invoice holding T0 was finalized then
    await cp.storage.record_webhook(
        WebhookRecord("evt_1", "invoice.finalized", period_end, "closed"),
        period_end,
        closed=ClosedPeriod("in_1", "o1", T0 - HOUR, period_end, period_end + 60),
    )
    clock[0] = T0 + 40 * 86400  # T0 is now older than the provider accepts
    await cp.ingest([tick("late", "o1", T0 + 10)], "http")
    await cp.rollup()
    assert (await cp.send()).sent == 1
    first, correction = fake_billing.calls
    assert (first.timestamp, correction.timestamp) == (T0, period_end)
    # Without a finalized period to stamp it into, an old bucket stays unbillable.
    await cp.ingest([tick("later", "o2", T0 + 3 * HOUR)], "http")
    await cp.set_org("o2", customer="cus_2", plan="pro", actor="t", effective_from=0)
    await cp.rollup()
    assert (await cp.send()).excluded == 1
