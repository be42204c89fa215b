"""Credit notes for usage a finalized invoice billed (the :class:`~controlplane.interfaces.
CreditNotes` capability of :class:`~controlplane.plugins.billing.stripe.StripeBilling`).

One credit note per call, with a line per meter: each metered line is found among the
invoice's lines (``GET /v1/invoices/{id}/lines``) by its price's meter (CN-13: a newer catalog
price may have replaced the one the invoice used) and credited by ``quantity``, so Stripe
prices it as it priced the line (CN-5, CN-6), with reason ``duplicate`` (the usage was billed
by the legacy biller too) and the memo given. One note is created or none (one call), so a
refusal never credits one meter of a bucket without the others. What it cannot take off the
invoice's amount still due (``post_payment_amount``, read from ``GET /v1/credit_notes/preview``,
CN-10) goes to the customer's balance (``credit_amount``), applied to their next invoice
(CN-1, CN-8): the product never refunds on its own.

The caller's key is both the idempotency key and the note's ``metadata[controlplane_key]``:
before creating, the invoice's notes are listed (``GET /v1/credit_notes?invoice=``, CN-14) and
a note with that key is returned instead, so a run after a lost answer, even past Stripe's 24
hours of idempotency keys, issues nothing twice; a note with another key of ours (other rows,
whose units it took off are not known here) refuses the credit, for a person to settle. A
call Stripe may have applied without answering (a dropped connection, a 5xx, an idempotency
conflict) raises :class:`~controlplane.errors.BillingUnanswered`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import stripe

from controlplane.errors import BillingError, BillingUnanswered
from controlplane.interfaces import CreditNoted

KEY = "controlplane_key"  # the metadata field naming the credit a note was issued for


async def credit_usage(
    client: stripe.StripeClient,
    meter_ids: Mapping[str, str],
    invoice: str,
    lines: Mapping[str, int],
    *,
    memo: str,
    key: str,
) -> CreditNoted:
    """`meter_ids` gives the Stripe meter of each event name in `lines`."""
    metered = await _metered_lines(client, invoice)
    line_of: dict[str, str] = {}
    for event_name, meter_id in meter_ids.items():
        if meter_id not in metered:
            raise BillingError(f"Stripe invoice {invoice} has no line for meter {meter_id}")
        line_of[metered[meter_id]] = event_name
    try:
        notes = await client.v1.credit_notes.list_async(params={"invoice": invoice, "limit": 100})
        async for earlier in notes.auto_paging_iter():
            found = _key_of(earlier) if earlier.status != "void" else None
            if found == key:
                return _noted(earlier, invoice, line_of)
            if found is not None:  # which rows it took off is not known here
                raise BillingError(
                    f"credit note {earlier.id} on {invoice} was issued by an earlier rollback "
                    "for other rows: settle these by hand"
                )
        params: Any = {
            "invoice": invoice,
            "lines": [
                {"type": "invoice_line_item", "invoice_line_item": line, "quantity": lines[name]}
                for line, name in sorted(line_of.items())
            ],
            "reason": "duplicate",
            "memo": memo,
            "metadata": {KEY: key},
        }
        preview = await client.v1.credit_notes.preview_async(params=params)
        if preview.post_payment_amount:
            params["credit_amount"] = preview.post_payment_amount
        note = await client.v1.credit_notes.create_async(
            params=params, options={"idempotency_key": key}
        )
    except stripe.StripeError as exc:
        raise _error(f"Stripe credit note on {invoice}", exc) from exc
    return _noted(note, invoice, line_of)


def _key_of(note: stripe.CreditNote) -> str | None:
    metadata: Any = note.metadata
    return str(metadata[KEY]) if metadata and KEY in metadata else None


def _noted(note: stripe.CreditNote, invoice: str, line_of: Mapping[str, str]) -> CreditNoted:
    lines = [line for line in note.lines.data if str(line.invoice_line_item) in line_of]
    quantities = {line_of[str(line.invoice_line_item)]: line.quantity or 0 for line in lines}
    amounts = {line_of[str(line.invoice_line_item)]: line.amount for line in lines}
    return CreditNoted(note.id, invoice, quantities, amounts, note.currency)


def _error(what: str, exc: stripe.StripeError) -> BillingError:
    """A refusal, or no definite answer (the call may have been applied)."""
    unanswered = isinstance(exc, stripe.APIConnectionError | stripe.IdempotencyError) or (
        exc.http_status is not None and (exc.http_status >= 500 or exc.http_status == 429)
    )
    return (BillingUnanswered if unanswered else BillingError)(f"{what}: {exc.user_message}")


async def _metered_lines(client: stripe.StripeClient, invoice: str) -> dict[str, str]:
    """The invoice's metered lines: their id, per Stripe meter."""
    meters: dict[str, str | None] = {}
    found: dict[str, str] = {}
    try:
        lines = await client.v1.invoices.line_items.list_async(invoice, params={"limit": 100})
        async for line in lines.auto_paging_iter():
            details = line.pricing.price_details if line.pricing else None
            price = str(details.price) if details and details.price else None
            if price is None:
                continue
            if price not in meters:
                price_object = await client.v1.prices.retrieve_async(price)
                recurring = price_object.recurring
                meters[price] = recurring.meter if recurring else None
            meter = meters[price]
            if meter is not None:
                found.setdefault(meter, str(line.id))
    except stripe.StripeError as exc:
        raise _error(f"Stripe invoice {invoice} lines", exc) from exc
    return found
