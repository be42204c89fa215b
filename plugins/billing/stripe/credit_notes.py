"""Credit notes for usage a finalized invoice billed (the :class:`~controlplane.interfaces.
CreditNotes` capability of :class:`~controlplane.plugins.billing.stripe.StripeBilling`).

The metered line is found among the invoice's lines (``GET /v1/invoices/{id}/lines``) by its
price's meter (CN-13: a newer catalog price may have replaced the one the invoice used). The
credit note credits a ``quantity`` of that line, so Stripe prices it as it priced the line
(CN-5, CN-6), with reason ``duplicate`` (the usage was billed by the legacy biller too) and the
memo given. What it cannot take off the invoice's amount still due (``post_payment_amount``,
read from ``GET /v1/credit_notes/preview``, CN-10) goes to the customer's balance
(``credit_amount``), applied to their next invoice (CN-1, CN-8): the product never refunds on
its own. One idempotency key per credit, so a retry after a lost answer issues nothing twice.
"""

from __future__ import annotations

from typing import Any

import stripe

from controlplane.errors import BillingError
from controlplane.interfaces import CreditNoted


async def credit_usage(
    client: stripe.StripeClient,
    meter_id: str,
    invoice: str,
    quantity: int,
    *,
    memo: str,
    key: str,
) -> CreditNoted:
    line = await _metered_line(client, meter_id, invoice)
    params: Any = {
        "invoice": invoice,
        "lines": [{"type": "invoice_line_item", "invoice_line_item": line, "quantity": quantity}],
        "reason": "duplicate",
        "memo": memo,
    }
    try:
        preview = await client.v1.credit_notes.preview_async(params=params)
        if preview.post_payment_amount:
            params["credit_amount"] = preview.post_payment_amount
        note = await client.v1.credit_notes.create_async(
            params=params, options={"idempotency_key": key}
        )
    except stripe.StripeError as exc:
        raise BillingError(f"Stripe credit note on {invoice}: {exc.user_message}") from exc
    return CreditNoted(note.id, invoice, quantity, note.amount, note.currency)


async def _metered_line(client: stripe.StripeClient, meter_id: str, invoice: str) -> str:
    """The id of the invoice's line whose price charges the meter."""
    meters: dict[str, str | None] = {}
    try:
        lines = await client.v1.invoices.line_items.list_async(invoice, params={"limit": 100})
        async for line in lines.auto_paging_iter():
            details = line.pricing.price_details if line.pricing else None
            price = str(details.price) if details and details.price else None
            if price is None:
                continue
            if price not in meters:
                found = await client.v1.prices.retrieve_async(price)
                recurring = found.recurring
                meters[price] = recurring.meter if recurring else None
            if meters[price] == meter_id:
                return str(line.id)
    except stripe.StripeError as exc:
        raise BillingError(f"Stripe invoice {invoice} lines: {exc.user_message}") from exc
    raise BillingError(f"Stripe invoice {invoice} has no line for meter {meter_id}")
