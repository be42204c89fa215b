"""Handing rows back after a rollback: the decision per row (pure), the credit notes' sums,
and an offset the provider refuses or does not answer (the fake billing plugin with an
invoice preview)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from decimal import Decimal

import msgspec
import pytest

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import BillingError, BillingUnanswered, HandBackBusy
from controlplane.flags import FlagChange
from controlplane.interfaces import (
    Claim,
    ClosedPeriod,
    CreditNoted,
    CreditNotes,
    Delivery,
    InvoicePreview,
    InvoicePreviewer,
    MeterEvent,
    OrgChange,
    Outcome,
    WebhookRecord,
)
from controlplane.ledger import LedgerRow, Reason, RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.pricing import Price
from controlplane.reversal import MAX_OFFSET_AGE, Way, credit_notes, way_back
from tests.conftest import HOUR, tick

NOW = 1_800_000_000
DAY = 86400
T = 1_799_000_000 // HOUR * HOUR


def row(
    *,
    sent_at: int | None = NOW - 2 * DAY,
    stamp: int = NOW - 2 * DAY,
    state: RowState = RowState.SENT,
    attempts: int = 1,
    quantity: int = 5,
) -> LedgerRow:
    return LedgerRow(
        1, "o:m:0:1", "o", "m", stamp, stamp + HOUR, 1, quantity * 1_000_000, quantity, state,
        None, None, attempts, sent_at, None, 0, 0, sent_at=sent_at, attempt_customer="cus",
        attempt_timestamp=stamp,
    )  # fmt: skip


OPEN = (NOW - 10 * DAY, NOW + 20 * DAY)


@pytest.mark.parametrize(
    ("kind", "given", "open_period", "closed", "way"),
    [
        ("inside the window", row(sent_at=NOW - HOUR), OPEN, [], Way.CANCEL),
        ("answered inside it, first received before", msgspec.structs.replace(
            row(sent_at=NOW - HOUR), first_attempt_at=NOW - 2 * DAY), OPEN, [], Way.OFFSET),
        ("past it, open period", row(), OPEN, [], Way.OFFSET),
        ("past it, period unknown", row(), None, [], Way.CREDIT_NOTE),
        ("past it, before the open period", row(stamp=NOW - 11 * DAY), OPEN, [], Way.CREDIT_NOTE),
        ("older than Stripe takes", row(stamp=NOW - MAX_OFFSET_AGE), (0, NOW + DAY), [],
         Way.CREDIT_NOTE),
        ("finalized", row(), OPEN, [ClosedPeriod("in_1", "o", NOW - 3 * DAY, NOW - DAY, NOW)],
         Way.CREDIT_NOTE),
        ("attempted, no answer", row(state=RowState.PENDING), OPEN, [], Way.KEEP),
        ("never delivered, recent", row(sent_at=NOW - HOUR, attempts=0), OPEN, [],
         Way.HAND_BACK),
        ("never delivered, old", row(attempts=0), OPEN, [], Way.KEEP),
        ("re-stamped into a later period", msgspec.structs.replace(row(), attempt_key="k@1"),
         OPEN, [], Way.CREDIT_NOTE),
    ],
)  # fmt: skip
def test_each_row_is_handed_back_the_way_stripe_allows(
    kind: str,
    given: LedgerRow,
    open_period: tuple[int, int] | None,
    closed: list[ClosedPeriod],
    way: Way,
) -> None:
    decided = way_back(given, now=NOW, cancel_window=DAY, open_period=open_period, closed=closed)
    assert decided.way is way, kind
    if closed:
        assert decided.invoice_id == "in_1" and "in_1" in (decided.note or "")


def test_credit_notes_sum_per_customer_invoice_and_meter_at_the_catalog_price() -> None:
    a, b = row(quantity=3), row(quantity=4)
    notes = credit_notes(
        [(a, "in_1"), (b, "in_1"), (row(quantity=2), None)],
        {"m": Price("memory", "usd", Decimal("2.5"), meter="m")},
    )
    assert [(n.invoice_id, n.quantity, n.rows, n.amount_minor) for n in notes] == [
        (None, 2, 1, 5),  # the invoice is not known here
        ("in_1", 7, 2, 18),  # 7 x 2.5 = 17.5 cents, rounded half up as Stripe rounds a line
    ]
    assert credit_notes([(a, None)], {})[0].amount_minor is None


class PreviewingBilling(FakeBilling, InvoicePreviewer):
    """The fake plugin, with the current billing period of every subscription."""

    period = (0, 2**40)

    async def preview_invoice(self, customer: str, subscription: str) -> InvoicePreview:
        return InvoicePreview("usd", *self.period, subtotal=0, total=0, lines=[])


async def send_one_row(cp: ControlPlane, clock: list[float]) -> None:
    """o1 (customer cus_1, subscription sub_1) with one row sent, then two days pass."""
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.storage.record_webhook(
        WebhookRecord("evt_1", "checkout.session.completed", None, "provisioned"),
        T,
        org=OrgChange("o1", subscription="sub_1", subscription_status="active"),
    )
    await cp.ingest([tick("a", "o1", T + 5)], "http")
    await cp.rollup()
    await cp.set_flags(
        [
            FlagChange("authority", "controlplane"),
            FlagChange("bill_from", T),
            FlagChange("shadow", False),
        ],
        actor="t",
        reason="go",
    )
    assert (await cp.send()).sent == 1
    clock[0] += 2 * DAY


@pytest.fixture
async def sent_long_ago(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[tuple[ControlPlane, PreviewingBilling]]:
    billing = PreviewingBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        yield cp, billing


async def test_an_offset_the_provider_refuses_leaves_its_row_billed_and_listed(
    sent_long_ago: tuple[ControlPlane, PreviewingBilling],
) -> None:
    cp, billing = sent_long_ago
    billing.fail_next(Outcome.REJECTED)
    result = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert result.offset == [] and result.cancelled == []
    (kept,) = result.not_cancelled
    assert "refused its offset" in (kept.note or "")
    (note,) = result.credit_notes
    assert (note.org_id, note.customer, note.quantity) == ("o1", "cus_1", kept.quantity)
    rows = await cp.storage.ledger()
    original = next(r for r in rows if r.offsets_id is None)
    offset = next(r for r in rows if r.offsets_id is not None)
    assert original.state is RowState.SENT  # the legacy biller skips it: billed once
    assert (offset.state, offset.reason) == (RowState.HELD, Reason.PROVIDER_REJECTED)
    again = await cp.cutover.rollback(actor="ops", reason="again", cancel_sent=True)
    assert again.offset == [] and len(billing.calls) == 2  # no second offset for the row


async def test_an_unanswered_offset_is_sent_again_by_the_next_rollback(
    sent_long_ago: tuple[ControlPlane, PreviewingBilling],
) -> None:
    cp, billing = sent_long_ago
    billing.fail_next(Outcome.AMBIGUOUS)
    first = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    (kept,) = first.not_cancelled
    assert "not answered" in (kept.note or "") and first.offset == []
    assert [r.state for r in await cp.storage.ledger()] == [RowState.SENT, RowState.PENDING]
    second = await cp.cutover.rollback(actor="ops", reason="retry", cancel_sent=True)
    assert [r.note for r in second.offset] == ["offset sent again"]
    offsets = [c for c in billing.calls if c.value < 0]
    assert len(offsets) == 2 and len({c.identifier for c in offsets}) == 1  # the same event
    states = sorted((r.state, r.reason) for r in await cp.storage.ledger())
    assert states == [(RowState.CANCELLED, Reason.OFFSET), (RowState.SENT, None)]
    assert billing.totals() == {("cus_1", "memory_gb_seconds"): 0}


async def finalized(cp: ControlPlane, at: int = T + DAY, recorded: float | None = None) -> None:
    """o1's invoice in_1, for [T, T + DAY), was finalized at `at`; the webhook says so (at
    `recorded`, by default then)."""
    period = ClosedPeriod("in_1", "o1", T, T + DAY, at)
    when = int(at if recorded is None else recorded)
    await cp.storage.record_webhook(
        WebhookRecord("evt_f", "invoice.finalized", None, "closed"), when, closed=period
    )


class CreditingBilling(PreviewingBilling, CreditNotes):
    """The fake provider, refusing every credit note (say, the invoice was voided)."""

    async def credit_usage(
        self, invoice: str, lines: Mapping[str, int], *, memo: str, key: str
    ) -> CreditNoted:
        raise BillingError(f"invoice {invoice} is void")


async def test_a_credit_note_the_provider_refuses_leaves_the_usage_billed_and_listed(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    billing = CreditingBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        await finalized(cp)
        result = await cp.cutover.rollback(
            actor="ops", reason="bad", cancel_sent=True, create_credit_notes=True
        )
        (kept,) = result.not_cancelled
        assert "credit note on in_1 not issued: invoice in_1 is void" in (kept.note or "")
        (note,) = result.credit_notes
        assert (note.invoice_id, note.issued) == ("in_1", None)
        assert [r.state for r in await cp.storage.ledger()] == [RowState.SENT]  # billed here


class IssuingBilling(PreviewingBilling, CreditNotes):
    """The fake provider, issuing every credit note asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.issued: list[tuple[str, dict[str, int]]] = []

    async def credit_usage(
        self, invoice: str, lines: Mapping[str, int], *, memo: str, key: str
    ) -> CreditNoted:
        self.issued.append((invoice, dict(lines)))
        return CreditNoted(f"cn_{len(self.issued)}", invoice, dict(lines), dict(lines), "usd")


async def test_no_credit_note_for_a_row_whose_bucket_stays_billed_here(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    """Row 1 of a bucket is on a finalized invoice; its late correction went out stamped into
    a period Stripe does not say is open, so it can only be listed: the bucket stays billed
    here, whole, so row 1 is not credited either (the legacy biller skips the bucket:
    credited, it would be billed by no one)."""
    billing = IssuingBilling()
    billing.period = (0, T + DAY)  # the customer's open period ends where row 2 is stamped
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        await finalized(cp)
        await cp.ingest([tick("b", "o1", T + 7, mb=4096, s=100)], "http")  # late, same bucket
        await cp.rollup()
        assert (await cp.send()).sent == 1  # stamped into the current period
        clock[0] += 2 * DAY
        result = await cp.cutover.rollback(
            actor="ops", reason="bad", cancel_sent=True, create_credit_notes=True
        )
        assert billing.issued == [] and result.credited == []
        assert {r.state for r in await cp.storage.ledger()} == {RowState.SENT}
        seam = await cp.cutover.seam(T, T + HOUR)
        assert not seam.legacy_bills("o1", T)  # billed here, whole, once


# -- a bucket goes back whole ------------------------------------------------------------------


def refuse_offsets(of: str) -> Callable[[MeterEvent], Outcome | None]:
    """The provider refuses every offset of event name `of` (say, its meter was deactivated)."""
    return lambda e: Outcome.REJECTED if e.value < 0 and e.event_name == of else None


async def test_a_refused_offset_bills_again_the_row_its_bucket_already_cancelled(
    sent_long_ago: tuple[ControlPlane, PreviewingBilling], clock: list[float]
) -> None:
    """Row 1 of a bucket is past the cancel window, its late correction (row 2) inside it.
    Row 2's cancel is taken, then row 1's offset refused: the bucket stays billed here, so
    row 2's units are billed again (re-issued under the next revision, sent at once)."""
    cp, billing = sent_long_ago
    await cp.ingest([tick("late", "o1", T + 7, mb=2048, s=10)], "http")
    await cp.rollup()
    assert (await cp.send()).sent == 1
    before = billing.totals()
    billing.decide = refuse_offsets("memory_gb_seconds")
    result = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert result.cancelled == [] and result.offset == []
    assert billing.totals() == before  # Stripe bills the bucket whole, still
    rows = await cp.storage.ledger(org_id="o1")
    states = [(r.revision, r.state, r.reason, r.quantity) for r in rows]
    first, late = rows[0].quantity, rows[1].quantity
    assert states == [
        (1, RowState.SENT, None, first),
        (2, RowState.CANCELLED, Reason.REISSUED, late),  # cancelled at Stripe
        (3, RowState.HELD, Reason.PROVIDER_REJECTED, -first),  # row 1's refused offset
        (4, RowState.SENT, None, late),  # row 2's units, billed again
    ]
    assert any("billed here again as o1:gbs:" in (k.note or "") for k in result.not_cancelled)
    seam = await cp.cutover.seam(T, T + HOUR)
    assert not seam.legacy_bills("o1", T)  # billed here, whole, once
    calls = len(billing.calls)
    again = await cp.cutover.rollback(actor="ops", reason="again", cancel_sent=True)
    assert again.cancelled == [] and again.offset == [] and len(billing.calls) == calls


async def test_a_refused_offset_undoes_the_offset_taken_for_another_meter(
    sent_long_ago: tuple[ControlPlane, PreviewingBilling], clock: list[float]
) -> None:
    """Two meters' rows of one bucket, both past the cancel window: the first meter's offset
    is taken, the second's refused. The first is undone by an offset of its own, its row
    billed here again, so the bucket stays billed here whole."""
    cp, billing = sent_long_ago
    call = {"id": "c1", "type": "call", "subject": "o1", "ts": (T + 9) * 1000, "data": {}}
    clock[0] -= 2 * DAY
    await cp.ingest([call], "http")
    clock[0] += HOUR
    await cp.rollup()
    assert (await cp.send()).sent == 1
    clock[0] += 2 * DAY
    before = billing.totals()
    billing.decide = refuse_offsets("calls")
    result = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert result.cancelled == [] and result.offset == []
    assert billing.totals() == before
    rows = {(r.meter, r.revision): r for r in await cp.storage.ledger(org_id="o1")}
    gbs, offset, undo = rows[("gbs", 1)], rows[("gbs", 2)], rows[("gbs", 3)]
    assert (gbs.state, gbs.reason) == (RowState.SENT, None)  # billed here again
    assert (offset.state, offset.reason, offset.offsets_id) == (
        RowState.CANCELLED, Reason.OFFSET, gbs.id
    )  # fmt: skip
    assert (undo.state, undo.offsets_id, undo.quantity) == (RowState.SENT, offset.id, gbs.quantity)
    assert (rows[("calls", 2)].state, rows[("calls", 1)].state) == (RowState.HELD, RowState.SENT)
    (undone,) = await cp.storage.audit_log(action_prefix="ledger.offset_undone")
    assert undone.subject == offset.identifier
    seam = await cp.cutover.seam(T, T + HOUR)
    assert not seam.legacy_bills("o1", T)


async def test_one_credit_note_per_invoice_with_a_line_per_meter(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    """Two meters of one bucket on a finalized invoice are credited by one note (one call:
    issued whole or not at all), so one meter's note can never be refused after another's
    was issued, leaving the bucket half handed back."""
    billing = IssuingBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        call = {"id": "c1", "type": "call", "subject": "o1", "ts": (T + 9) * 1000, "data": {}}
        await cp.ingest([call], "http")
        await cp.rollup()
        assert (await cp.send()).sent == 1
        clock[0] += 2 * DAY
        await finalized(cp)
        result = await cp.cutover.rollback(
            actor="ops", reason="bad", cancel_sent=True, create_credit_notes=True
        )
        rows = await cp.storage.ledger(org_id="o1")
        units = {r.meter: r.quantity for r in rows}
        assert billing.issued == [("in_1", {"calls": units["calls"], "memory_gb_seconds": 20})]
        assert {(n.meter, n.quantity, n.issued) for n in result.credit_notes} == {
            ("calls", units["calls"], "cn_1"),
            ("gbs", 20, "cn_1"),
        }
        assert {(r.state, r.reason) for r in rows} == {(RowState.CANCELLED, Reason.CREDITED)}


class SilentBilling(PreviewingBilling, CreditNotes):
    """The fake provider, whose credit note calls all go unanswered."""

    async def credit_usage(
        self, invoice: str, lines: Mapping[str, int], *, memo: str, key: str
    ) -> CreditNoted:
        raise BillingUnanswered("connection dropped")


async def test_a_credit_note_without_an_answer_keeps_its_rows_for_the_next_run(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    billing = SilentBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        await finalized(cp)
        result = await cp.cutover.rollback(
            actor="ops", reason="bad", cancel_sent=True, create_credit_notes=True
        )
        (kept,) = result.not_cancelled
        assert "credit note on in_1 no answer (a note may have been issued" in (kept.note or "")
        assert result.credit_notes == []  # not listed "to issue": it may have been issued
        assert [r.state for r in await cp.storage.ledger()] == [RowState.SENT]


# -- found by an independent review of the per-bucket hand-back -------------------------------


class SendingDuringCancel(PreviewingBilling):
    """The provider; a sender pass runs (on another replica, say) while the hand-back calls."""

    def __init__(self) -> None:
        super().__init__()
        self.cp: ControlPlane | None = None
        self.during: list[int] = []  # rows each sender pass sent

    async def cancel(self, event_name: str, identifier: str) -> Delivery:
        if self.cp is not None and not self.during:
            self.during.append((await self.cp.send()).sent)
        return await super().cancel(event_name, identifier)


async def test_no_sender_sends_a_correction_of_a_bucket_being_handed_back(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    """A late correction of a bucket billed here waits while the rollback hands the bucket
    back: sent meanwhile, it would keep the bucket billed here with its original cancelled
    (the original's units billed by no one)."""
    billing = SendingDuringCancel()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        clock[0] -= 2 * DAY - 600  # the row was sent ten minutes ago: inside the window
        await cp.ingest([tick("late", "o1", T + 7, mb=4096, s=100)], "http")
        await cp.rollup()
        billing.cp = cp
        result = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
        assert billing.during == [0] and len(result.cancelled) == 1
        assert billing.totals().get(("cus_1", "memory_gb_seconds"), 0) == 0
        assert (await cp.cutover.seam(T, T + HOUR)).legacy_bills("o1", T)  # whole
        assert (await cp.send()).sent == 0  # the legacy biller's bucket now


async def test_a_bucket_whose_undo_offset_is_unanswered_stays_billed_here_whole(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    """The undo of an offset (its bucket stays) goes unanswered, and the period is finalized
    before the next rollback: the bucket stays billed here, whole; no credit note takes the
    other meter's row back (its units would be billed by no one)."""
    billing = IssuingBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        clock[0] -= 2 * DAY - HOUR
        call = {"id": "c1", "type": "call", "subject": "o1", "ts": (T + 9) * 1000, "data": {}}
        await cp.ingest([call], "http")
        await cp.rollup()
        assert (await cp.send()).sent == 1
        clock[0] += 2 * DAY
        before = billing.totals()

        def decide(e: MeterEvent) -> Outcome | None:
            if e.value < 0 and e.event_name == "calls":
                return Outcome.REJECTED
            return Outcome.AMBIGUOUS if e.value > 0 else None  # the undo: applied, unanswered

        billing.decide = decide
        await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
        billing.decide = None
        await finalized(cp, int(clock[0]))
        billing.period = (T + DAY, T + 31 * DAY)
        second = await cp.cutover.rollback(
            actor="ops", reason="again", cancel_sent=True, create_credit_notes=True
        )
        assert billing.issued == [] and second.credited == []
        calls = next(r for r in await cp.storage.ledger(org_id="o1") if r.meter == "calls")
        assert calls.state is RowState.SENT
        assert billing.totals() == before  # Stripe bills the bucket whole
        assert not (await cp.cutover.seam(T, T + HOUR)).legacy_bills("o1", T)
        assert await cp.storage.parity_alerts("job:rollback:split")  # said where one looks


class LosingBilling(IssuingBilling):
    """Issues each credit note once per key; the first answer is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.by_key: dict[str, CreditNoted] = {}
        self.lose = True

    async def credit_usage(
        self, invoice: str, lines: Mapping[str, int], *, memo: str, key: str
    ) -> CreditNoted:
        if key not in self.by_key:
            self.by_key[key] = await super().credit_usage(invoice, lines, memo=memo, key=key)
        if self.lose:
            self.lose = False
            raise BillingUnanswered("connection dropped after the write")
        return self.by_key[key]


async def test_a_credit_note_whose_answer_was_lost_is_found_by_the_next_run(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    billing = LosingBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        await finalized(cp)
        first = await cp.cutover.rollback(
            actor="ops", reason="bad", cancel_sent=True, create_credit_notes=True
        )
        (kept,) = first.not_cancelled
        assert "do not issue one by hand" in (kept.note or "")
        second = await cp.cutover.rollback(
            actor="ops", reason="again", cancel_sent=True, create_credit_notes=True
        )
        assert [n.issued for n in second.credit_notes] == ["cn_1"] and len(billing.issued) == 1
        assert [(r.state, r.reason) for r in await cp.storage.ledger()] == [
            (RowState.CANCELLED, Reason.CREDITED)
        ]


async def test_a_row_whose_offset_went_unanswered_before_its_invoice_is_not_credited(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    """The offset may have been applied before the invoice was finalized: crediting the row
    too would take its units back twice; sending the offset again could land on no invoice.
    The row stays, said so, for reconciliation to settle."""
    billing = IssuingBilling()
    clock[0] = T + 2 * HOUR
    async with ControlPlane(make_config(), billing=billing, clock=lambda: clock[0]) as cp:
        await send_one_row(cp, clock)
        billing.fail_next(Outcome.AMBIGUOUS)  # the offset: applied, answer lost
        await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
        period = ClosedPeriod("in_1", "o1", T, T + DAY, clock[0] + 60)
        clock[0] += 120
        await cp.storage.record_webhook(
            WebhookRecord("evt_f", "invoice.finalized", None, "closed"), clock[0], closed=period
        )
        billing.period = (T + DAY, T + 31 * DAY)
        calls = len(billing.calls)
        second = await cp.cutover.rollback(
            actor="ops", reason="again", cancel_sent=True, create_credit_notes=True
        )
        assert billing.issued == [] and len(billing.calls) == calls
        assert any("not known here" in (k.note or "") for k in second.not_cancelled)
        states = [(r.state, r.offsets_id is None) for r in await cp.storage.ledger()]
        assert states == [(RowState.SENT, True), (RowState.PENDING, False)]


async def test_a_second_hand_back_waits_for_the_first(
    sent_long_ago: tuple[ControlPlane, PreviewingBilling], clock: list[float]
) -> None:
    """Two rollbacks handing back at once would act twice on the same buckets (one's offset
    taken for the other's refusal): the second is refused while the first holds them."""
    cp, billing = sent_long_ago
    now = int(clock[0])
    assert await cp.storage.hold_billed_buckets(Claim("rollback:first", now, now + 600))
    with pytest.raises(HandBackBusy):
        await cp.cutover.rollback(actor="ops", reason="again", cancel_sent=True)
    assert billing.calls[-1].value > 0  # no call made for the second
    await cp.storage.release_claims("rollback:first")
    result = await cp.cutover.rollback(actor="ops", reason="again", cancel_sent=True)
    assert [n.note for n in result.offset] == ["offset"]
