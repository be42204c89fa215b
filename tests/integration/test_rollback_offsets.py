"""A rollback days after the cutover: rows Stripe received more than 24 hours ago cannot be
cancelled, so each is offset in the customer's open billing period by an event of its negative
value, stamped as it was (Stripe documents negative values as the way to fix recorded usage;
a `sum` meter adds them up). The org is provisioned by the emulator's own signed checkout
webhook, its usage sent by the real sender over the real SDK; Stripe's summaries then hold
nothing for the hours handed back, its invoice preview bills none of them, reconciliation
finds the books agree, and a second rollback does nothing more."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import stripe

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import BillingError
from controlplane.flags import FlagChange
from controlplane.interfaces import CreditNotes
from controlplane.ledger import Reason, RowState
from stripe_emulator import StripeEmulator, serve_emulator
from tests.conftest import HOUR, tick
from tests.stripe_helpers import deliver, provision

API_KEY = "sk_test_rollback_offsets"
SECRET = "whsec_rollback_offsets"
CATALOG = {
    "products": [{"key": "pro", "name": "Pro"}],
    "prices": [
        {"key": "memory", "product": "pro", "lookup_key": "mem_v1", "meter": "gbs",
         "unit_amount": "0.01"},
    ],
}  # fmt: skip


class Live:
    """A control plane cut over at `first`, with `hours` of acme's usage sent."""

    def __init__(self, cp: ControlPlane, emulator: StripeEmulator, clock: list[float]) -> None:
        self.cp, self.emulator, self.clock = cp, emulator, clock

    def advance(self, seconds: int) -> None:
        self.clock[0] += seconds
        self.emulator.advance(seconds)


@pytest.fixture
async def live(make_config: Callable[..., Config]) -> AsyncIterator[tuple[Live, str, int]]:
    emulator = StripeEmulator(seed=23)
    clock = [time.time()]
    async with serve_emulator(emulator) as url:
        config = make_config(
            billing={"backend": "stripe", "api_key": API_KEY, "api_base": url, "max_retries": 0},
            stripe={"webhook_secret": SECRET},
            catalog=CATALOG,
            reconcile={"settle_seconds": HOUR},
        )
        client = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": url},
            http_client=stripe.HTTPXClient(timeout=5),
            max_network_retries=0,
        )
        async with ControlPlane(config, clock=lambda: int(clock[0])) as cp:
            await cp.catalog_publish(actor="test")
            customer = await provision(cp, client, emulator, "acme", SECRET)
            first = (int(clock[0]) // HOUR + 1) * HOUR
            made = Live(cp, emulator, clock)
            made.advance(first + 4 * HOUR - int(clock[0]))
            await cp.ingest([tick(f"a{h}", "acme", first + h * HOUR + 5) for h in range(3)], "t")
            await cp.set_flags(
                [
                    FlagChange("authority", "controlplane"),
                    FlagChange("bill_from", first),
                    FlagChange("shadow", False),
                ],
                actor="test",
                reason="cut over",
            )
            await cp.rollup()
            assert (await cp.send()).sent == 3
            yield made, customer, first
        await client._requestor._get_http_client().close_async()  # type: ignore[attr-defined]


async def test_rows_past_the_cancel_window_are_offset_in_their_open_period(
    live: tuple[Live, str, int],
) -> None:
    made, customer, first = live
    cp, emulator = made.cp, made.emulator
    made.advance(26 * HOUR)  # the three rows: received by Stripe more than 24 hours ago
    await cp.ingest([tick("late", "acme", first + 28 * HOUR)], "t")
    await cp.rollup()
    assert (await cp.send()).sent == 1  # and one inside the window
    made.advance(HOUR)
    preview = await cp.hand_back.preview()
    assert (preview.to_offset_count, preview.to_cancel_count, preview.credit_notes_count) == (
        3,
        1,
        0,
    )

    result = await cp.cutover.rollback(actor="ops", reason="bad invoices", cancel_sent=True)
    assert [r.bucket_start for r in result.cancelled] == [first + 28 * HOUR]
    assert sorted(r.bucket_start for r in result.offset) == [first + h * HOUR for h in range(3)]
    assert result.not_cancelled == [] and result.credit_notes == []
    for h in range(3):  # Stripe holds each row and its offset: nothing for the hour
        assert emulator.meter_total("memory_gb_seconds", customer, first + h * HOUR,
                                    first + (h + 1) * HOUR) == 0  # fmt: skip
    rows = await cp.storage.ledger(org_id="acme")
    originals = [r for r in rows if r.reason == Reason.OFFSET]
    offsets = [r for r in rows if r.offsets_id is not None]
    assert len(originals) == len(offsets) == 3
    assert all(r.state is RowState.CANCELLED for r in originals)
    for o in offsets:
        row = next(r for r in originals if r.id == o.offsets_id)
        assert (o.state, o.quantity, o.attempt_timestamp) == (
            RowState.SENT,
            -row.quantity,
            row.attempt_timestamp,
        )
    assert not [r for r in rows if r.state is RowState.SENT and r.offsets_id is None]

    run = await cp.reconciler.run(first, first + 30 * HOUR)
    assert run.clean, run.findings  # Stripe's books and the ledger agree, hour by hour
    again = await cp.cutover.rollback(actor="ops", reason="again", cancel_sent=True)
    assert (again.cancelled, again.offset, again.not_cancelled) == ([], [], [])
    audit = await cp.storage.audit_log(action_prefix="ledger.offset")
    assert sorted(a.action for a in audit) == ["ledger.offset"] * 3 + ["ledger.offset_appended"] * 3


def newest(emulator: StripeEmulator, event_type: str) -> dict[str, Any]:
    """Stripe's newest event of `event_type`."""
    return next(
        e for e in reversed(list(emulator.stripe_events.values())) if e["type"] == event_type
    )


async def test_usage_on_a_finalized_invoice_is_credited_there_and_handed_back(
    live: tuple[Live, str, int],
) -> None:
    """The period closed and its invoice was finalized (and paid) before the rollback: no
    cancel nor offset can reach that usage. With `--credit-notes create`, one credit note per
    invoice (a line per meter) takes exactly its units off (credited to the customer's balance, the
    invoice being paid), and the rows go back to the legacy biller."""
    made, customer, first = live
    cp, emulator = made.cp, made.emulator
    org = await cp.storage.get_org("acme")
    assert org is not None and org.subscription is not None
    made.advance(26 * HOUR)
    closed = emulator.close_period(org.subscription, at="now")  # the period ends here
    invoice = emulator.finalize_invoice(closed["id"])
    await deliver(cp, newest(emulator, "invoice.finalized"), SECRET)
    rows = await cp.storage.ledger(org_id="acme", state=RowState.SENT)
    units = sum(r.quantity for r in rows)
    assert invoice["status"] == "paid" and units > 0

    listed = await cp.cutover.rollback(actor="ops", reason="first look", cancel_sent=True)
    (note,) = listed.credit_notes
    assert (note.invoice_id, note.quantity, note.issued) == (invoice["id"], units, None)
    assert [r.state for r in await cp.storage.ledger(org_id="acme")] == [RowState.SENT] * 3

    done = await cp.cutover.rollback(
        actor="ops", reason="credit them", cancel_sent=True, create_credit_notes=True
    )
    assert done.not_cancelled == [], done.not_cancelled[0].note
    (issued,) = done.credit_notes
    assert (issued.invoice_id, issued.quantity, issued.rows) == (invoice["id"], units, 3)
    (credit_note,) = emulator.credit_notes.values()
    assert credit_note["id"] == issued.issued and credit_note["amount"] == issued.amount_minor
    assert credit_note["lines"]["data"][0]["quantity"] == units
    assert credit_note["type"] == "post_payment"  # paid: credited to the customer's balance
    assert emulator.customers[customer]["balance"] == -credit_note["amount"]
    states = {(r.state, r.reason) for r in await cp.storage.ledger(org_id="acme")}
    assert states == {(RowState.CANCELLED, Reason.CREDITED)}
    seam = await cp.cutover.seam(first, first + 3 * HOUR)
    assert all(seam.legacy_bills("acme", first + h * HOUR) for h in range(3))  # legacy's again
    again = await cp.cutover.rollback(
        actor="ops", reason="again", cancel_sent=True, create_credit_notes=True
    )
    assert again.credit_notes == [] and len(emulator.credit_notes) == 1
    # a credit asked again under the note's key (an answer lost, Stripe's idempotency keys
    # long gone) finds the note by its metadata instead of issuing a second one
    billing = cp.billing
    assert isinstance(billing, CreditNotes)
    key = credit_note["metadata"]["controlplane_key"]
    event_name = cp.meters.by_name[issued.meter].config.provider_event_name
    found = await billing.credit_usage(invoice["id"], {event_name: 1}, memo="again", key=key)
    assert found.credit_note == credit_note["id"] and len(emulator.credit_notes) == 1
    assert found.amounts == {event_name: credit_note["amount"]}
    assert found.quantities == {event_name: credit_note["lines"]["data"][0]["quantity"]}
    # other rows on an invoice that has a note of ours: which units it took is not known here
    with pytest.raises(BillingError, match="issued by an earlier rollback for other rows"):
        await billing.credit_usage(invoice["id"], {event_name: 1}, memo="x", key="credit:other")
    assert len(emulator.credit_notes) == 1
