from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from controlplane.core import ControlPlane
from controlplane.flags import FlagChange
from controlplane.interfaces import ClosedPeriod, Delivery, Outcome, WebhookRecord
from controlplane.invoices import UNSURE_ALERTS, reissue_late
from controlplane.ledger import RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.ratelimit import RateLimiter
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


async def finalize(cp: ControlPlane, at: int, invoice: str = "in_1") -> None:
    """The invoice of o1's period holding T0 is finalized at `at`, and the webhook says so."""
    await cp.storage.record_webhook(
        WebhookRecord(f"evt_{invoice}", "invoice.finalized", at, "closed"),
        at,
        closed=ClosedPeriod(invoice, "o1", T0 - HOUR, T0 + HOUR, at),
    )


async def test_a_retry_repeats_its_first_attempt_while_its_period_is_open(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    fake_billing.fail_next(Outcome.AMBIGUOUS)
    assert (await cp.send()).ambiguous == 1
    # the org's customer changes before the retry: the retry still goes to the customer its
    # idempotency key was first used with (another would be refused as a different request)
    await cp.set_org("o1", customer="cus_2", plan=None, actor="t")
    clock[0] += 120
    assert (await cp.send()).sent == 1
    first, retry = fake_billing.calls
    assert first == retry and (retry.customer, retry.timestamp) == ("cus_1", T0)
    assert retry.idempotency_key == retry.identifier


@pytest.mark.parametrize(
    ("first", "detail"),
    [
        (Outcome.AMBIGUOUS, "provider already had this identifier"),  # it arrived, in time
        (Outcome.RETRY, None),  # it never arrived: billed in the current period
    ],
)
async def test_a_retry_after_its_invoice_was_finalized_is_re_stamped_under_a_key_of_its_own(
    cp: ControlPlane,
    clock: list[float],
    fake_billing: FakeBilling,
    first: Outcome,
    detail: str | None,
) -> None:
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    fake_billing.fail_next(first)
    await cp.send()
    await finalize(cp, int(clock[0]) + 60)  # after the attempt
    clock[0] += 120
    assert (await cp.send()).sent == 1
    attempt, retry = fake_billing.calls
    assert attempt.timestamp == T0 and attempt.idempotency_key == attempt.identifier
    assert retry.identifier == attempt.identifier  # the provider dedupes on it
    assert (
        retry.timestamp == T0 + HOUR and retry.idempotency_key == f"{retry.identifier}@{T0 + HOUR}"
    )
    assert len(fake_billing.events) == 1  # billed once either way
    (row,) = await cp.storage.ledger()
    assert row.state is RowState.SENT and "re-stamped" in (row.detail or "")
    assert detail is None or detail in (row.detail or "")


async def test_a_retry_attempted_after_its_invoice_was_finalized_is_held_as_ambiguous(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    fake_billing.fail_next(Outcome.AMBIGUOUS)
    await cp.send()
    finalized = int(clock[0]) + 60
    clock[0] += 120
    fake_billing.fail_next(Outcome.RETRY)  # a retry after Stripe finalized, before we knew
    await cp.send()
    await finalize(cp, finalized)
    clock[0] += 60
    assert (await cp.send()).held == 1
    (row,) = await cp.storage.ledger()
    assert (row.state, row.reason) == (RowState.HELD, "ambiguous")
    assert "in_1" in (row.detail or "") and len(fake_billing.calls) == 2


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


async def test_a_row_sent_after_stripe_finalized_its_invoice_is_re_issued_into_the_current_period(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    """Stripe finalized the invoice before the row went out, and the webhook said so after:
    the usage is at Stripe but on no invoice. It is cancelled there and re-issued."""
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    finalized = int(clock[0]) - 60  # by Stripe's clock, a minute before the send
    assert (await cp.send()).sent == 1
    period = ClosedPeriod("in_1", "o1", T0 - HOUR, T0 + HOUR, finalized)
    await finalize(cp, period.finalized_at)
    (new,) = await reissue_late(
        cp.storage, cp.billing, cp.meters, period, at=cp.now(), actor="webhooks"
    )
    assert (new.revision, new.state) == (2, RowState.PENDING)
    first, _ = await cp.storage.ledger()
    assert (first.state, first.reason) == (RowState.CANCELLED, "reissued")
    assert "in_1" in (first.detail or "") and first.identifier in fake_billing.cancelled
    assert (await cp.send()).sent == 1
    original, again = fake_billing.calls
    assert (again.identifier, again.value) == (new.identifier, original.value)
    assert again.timestamp == T0 + HOUR  # the current period
    # The bucket's ledger total is still its usage: a late event makes only its difference.
    await cp.ingest([tick("e2", "o1", T0 + 9)], "http")
    await cp.rollup()
    rows = await cp.storage.ledger()
    assert [(r.revision, r.value_micros) for r in rows][-1] == (3, 20_000_000)
    # Nothing else is late for that invoice now.
    assert await cp.storage.late_rows(period) == []
    audit = await cp.storage.audit_log(action_prefix="ledger.reissued")
    assert [a.subject for a in audit] == [first.identifier]


async def test_a_row_in_flight_when_its_invoice_is_finalized_is_re_issued_by_the_sender(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    """The webhook runs while the call is in flight: it finds the row not yet sent. The
    sender, settling it, sees the invoice finalized before the call and re-issues it."""
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    finalized = int(clock[0]) - 60
    period = ClosedPeriod("in_1", "o1", T0 - HOUR, T0 + HOUR, finalized)
    send = fake_billing.send

    async def webhook_meanwhile(event: Any) -> Any:
        delivery = await send(event)
        await finalize(cp, period.finalized_at)
        assert (
            await reissue_late(cp.storage, cp.billing, cp.meters, period, at=cp.now(), actor="w")
            == []
        )
        return delivery

    fake_billing.send = webhook_meanwhile  # type: ignore[method-assign]
    assert (await cp.send()).sent == 2  # the re-issue goes out in the same pass
    first, again = await cp.storage.ledger()
    assert (first.state, first.reason) == (RowState.CANCELLED, "reissued")
    assert (again.revision, again.state) == (2, RowState.SENT)
    assert [c.timestamp for c in fake_billing.calls] == [T0, T0 + HOUR]
    assert first.identifier in fake_billing.cancelled


async def test_a_retry_stripe_accepted_after_the_finalization_is_re_issued(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    """The first call came in the invoice's draft hour and failed (nothing applied); the
    retry, after Stripe finalized the invoice but before its webhook, was accepted: it
    arrived then, on no invoice. The webhook re-issues it, though its first attempt came
    before the finalization."""
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    fake_billing.fail_next(Outcome.RETRY)
    assert (await cp.send()).retry == 1
    finalized = int(clock[0]) + 60
    clock[0] += 120  # Stripe finalized the invoice meanwhile
    assert (await cp.send()).sent == 1
    (row,) = await cp.storage.ledger()
    assert row.first_attempt_at is not None and row.first_attempt_at < finalized
    assert row.last_attempt_at is not None and row.last_attempt_at >= finalized
    period = ClosedPeriod("in_1", "o1", T0 - HOUR, T0 + HOUR, finalized)
    await finalize(cp, period.finalized_at)
    (new,) = await reissue_late(
        cp.storage, cp.billing, cp.meters, period, at=cp.now(), actor="webhooks"
    )
    assert new.revision == 2


async def test_a_pass_records_each_call_and_sending_at_the_clock_of_the_moment(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    """A long pass: its calls are recorded when made, and its rows as sent when settled, not
    at the time the pass began."""
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    began = int(clock[0])

    def slow(event: Any) -> Outcome:
        clock[0] += 300  # the call itself is made later in the pass
        return Outcome.ACCEPTED

    fake_billing.decide = slow
    assert (await cp.send()).sent == 1
    (row,) = await cp.storage.ledger()
    assert row.sent_at is not None and row.sent_at >= began + 300


async def straddling(cp: ControlPlane, clock: list[float], fake: FakeBilling) -> ClosedPeriod:
    """o1's row: its first call reached Stripe but the answer was lost, then the invoice of
    its period was finalized, then its retry was answered; the period (finalized at)."""
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    fake.fail_next(Outcome.AMBIGUOUS)  # applied, the answer lost
    assert (await cp.send()).ambiguous == 1
    finalized = int(clock[0]) + 60
    clock[0] += 120
    assert (await cp.send()).sent == 1  # "already exists", or the first call's answer
    return ClosedPeriod("in_1", "o1", T0 - HOUR, T0 + HOUR, finalized)


async def test_a_row_whose_arrival_straddles_the_finalization_is_alerted_not_guessed(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    """The first call reached Stripe but its answer was lost (before the finalization); the
    retry, after it, was answered "already exists". On the invoice or not cannot be told:
    neither re-issued (it may be billed already) nor left silent."""
    period = await straddling(cp, clock, fake_billing)
    await finalize(cp, period.finalized_at)
    new = await reissue_late(cp.storage, cp.billing, cp.meters, period, at=cp.now(), actor="w")
    assert new == []
    (alert,) = await cp.storage.parity_alerts(UNSURE_ALERTS)
    assert "in_1" in alert.text and "o1:gbs:" in alert.text


async def test_an_answer_replayed_after_the_finalization_is_not_taken_for_a_late_arrival(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling, monkeypatch: Any
) -> None:
    """Stripe keeps the answer of a call for its idempotency key: the first call arrived
    before the finalization (its answer lost), the retry after it is answered 200 with that
    saved answer. The event is on the invoice or not as the first call was: never re-issued
    (that could bill it twice), alerted instead."""
    sent = fake_billing.send

    async def replaying(event: Any) -> Delivery:
        delivery = await sent(event)
        if delivery.outcome is Outcome.DUPLICATE:  # the same key: Stripe replays its answer
            return Delivery(Outcome.ACCEPTED, provider_id=event.identifier, replayed=True)
        return delivery

    monkeypatch.setattr(fake_billing, "send", replaying)
    period = await straddling(cp, clock, fake_billing)
    (row,) = await cp.storage.ledger()
    assert row.provider_id is None and "replayed" in (row.detail or "")
    await finalize(cp, period.finalized_at)
    assert (
        await reissue_late(cp.storage, cp.billing, cp.meters, period, at=cp.now(), actor="w") == []
    )
    (alert,) = await cp.storage.parity_alerts(UNSURE_ALERTS)
    assert row.identifier in alert.text


async def test_a_bucket_billed_here_gets_its_corrections_whatever_the_flags_say_since(
    cp: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    """The legacy biller skips a bucket the control plane bills (the seam), so a late
    correction for it is sent by the control plane after a rollback that kept it (shadow
    on) and after a later cutover (its bucket before the new T): else billed by no one."""
    await live(cp)
    await cp.ingest([tick("e1", "o1", T0 + 5)], "http")
    await cp.rollup()
    assert (await cp.send()).sent == 1
    await cp.cutover.rollback(actor="ops", reason="undo")  # the bucket stays billed here
    await cp.ingest([tick("e2", "o1", T0 + 6, s=40), tick("e3", "o1", T0 + HOUR + 1)], "http")
    clock[0] += 2 * HOUR
    await cp.rollup()
    stats = await cp.send()
    assert stats.skipped == "shadow is on" and stats.sent == 1  # the correction only
    assert (fake_billing.calls[-1].timestamp, fake_billing.calls[-1].value) == (T0, 40)
    (legacy,) = [r for r in await cp.storage.ledger() if r.bucket_start == T0 + HOUR]
    assert legacy.state is RowState.PENDING  # the legacy biller's bucket: nothing sent
    # a second cutover later: the kept bucket's next correction is sent, the other excluded
    await cp.cutover.execute(T0 + 2 * HOUR, actor="ops", reason="again", force=True)
    await cp.ingest([tick("e4", "o1", T0 + 7, s=60)], "http")
    await cp.rollup()
    stats = await cp.send()
    assert (stats.sent, stats.excluded) == (1, 1)
    assert fake_billing.totals() == {("cus_1", "memory_gb_seconds"): 20 + 40 + 60}
