"""Invoice previews: ``POST /v1/invoices/create_preview``.

The invoice a subscription's current period would produce, computed now and stored nowhere
(rows INV-1 to INV-6 of docs/reference/stripe-behaviour.md):

- ``customer`` and ``subscription`` (the subscription's customer) are required: since
  ``2025-03-31.basil`` a preview names the subscription it previews (INV-1);
- metered items bill the current period in arrears: quantity = the meter's aggregate of the
  customer's non-cancelled events with timestamp in the period (a negative total bills 0);
  licensed items bill their quantity for the next period in advance (INV-2);
- each line's amount is quantity x ``unit_amount_decimal`` rounded to a whole minor unit, half
  up, per line; the subtotal is the sum of the rounded lines (INV-3, INV-4);
- billing credits show on metered lines only, as ``pretax_credit_amounts``: grants usable at
  the period's end (effective, not expired, not voided), by priority, then soonest expiry,
  promotional before paid, oldest first; a preview consumes no balance (INV-5, INV-6).

The preview has an ``id`` of its own (``upcoming_in_...``), ``status: draft`` and is not listed
or retrievable afterwards, as Stripe's previews are not.
"""

from __future__ import annotations

import copy
from decimal import ROUND_HALF_UP, Decimal

from stripe_emulator.errors import Json, invalid
from stripe_emulator.invoices import invoice_totals
from stripe_emulator.params import ApiRequest, only_params, str_param
from stripe_emulator.shapes import INVOICE_SHAPE
from stripe_emulator.state import EmulatorState

_PREVIEW_FIELDS = frozenset({"customer", "subscription"})


class PreviewsMixin(EmulatorState):
    """``POST /v1/invoices/create_preview`` for a subscription's current period."""

    def create_invoice_preview(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _PREVIEW_FIELDS)
        subscription_id = str_param(params, "subscription", required=True)
        customer = str_param(params, "customer")
        state = self._subscription(subscription_id)
        sub = state.obj
        if customer and customer != sub["customer"]:
            raise invalid(
                "customer",
                f"The subscription {subscription_id} does not belong to customer {customer}.",
            )
        if not state.active:
            raise invalid(
                "subscription",
                f"The subscription {subscription_id} is canceled: it has no upcoming invoice.",
            )
        start, end = state.bounds()
        state.period += 1
        try:
            next_start, next_end = state.bounds()
        finally:
            state.period -= 1
        lines: list[Json] = []
        for item in sub["items"]["data"]:
            price = item["price"]
            if price["recurring"]["usage_type"] == "metered":
                meter = self.meters.get(price["recurring"]["meter"])
                usage = self._aggregate(meter, sub["customer"], start, end) if meter else 0
                lines.append(self._preview_line(item, start, end, max(0, usage)))
            else:
                lines.append(self._preview_line(item, next_start, next_end, item["quantity"]))
        invoice = copy.deepcopy(INVOICE_SHAPE)
        invoice.update(
            id="upcoming_" + self._new_id("in", 24),
            billing_reason="upcoming",
            collection_method=sub["collection_method"],
            created=int(self.now()),
            currency=sub["currency"],
            customer=sub["customer"],
            period_start=start,
            period_end=end,
        )
        invoice["parent"] = {
            "quote_details": None,
            "subscription_details": {"metadata": dict(sub["metadata"]), "subscription": sub["id"]},
            "type": "subscription_details",
        }
        invoice["lines"] = {
            "object": "list",
            "data": lines,
            "has_more": False,
            "url": "/v1/invoices/upcoming/lines",
        }
        self._preview_credits(invoice, at=end)
        invoice_totals(invoice)
        return invoice

    def _preview_line(self, item: Json, start: int, end: int, quantity: int) -> Json:
        """An invoice line as the subscription's invoices make it, priced (a preview line
        has no invoice and a temporary id)."""
        price = item["price"]
        unit = Decimal(price["unit_amount_decimal"])
        amount = int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        product = self.products.get(price["product"], {})
        return {
            **self._line(item, start, end, quantity),
            "id": self._new_id("il_tmp", 24),
            "amount": amount,
            "description": f"{quantity} \u00d7 {product.get('name', price['product'])}",
            "subtotal": amount,
        }

    def _preview_credits(self, invoice: Json, *, at: int) -> None:
        grants = [
            g
            for g in self.credit_grants.values()
            if g["customer"] == invoice["customer"]
            and g["amount"]["monetary"]["currency"] == invoice["currency"]
            and g["voided_at"] is None
            and (g["effective_at"] or 0) <= at
            and (g["expires_at"] is None or g["expires_at"] > at)
        ]
        grants.sort(
            key=lambda g: (
                g["priority"],
                g["expires_at"] is None,
                g["expires_at"] or 0,
                g["category"] != "promotional",
                g["created"],
            )
        )
        balance = {g["id"]: self._grant_balance.get(g["id"], 0) for g in grants}
        for line in invoice["lines"]["data"]:
            price = self.prices[line["pricing"]["price_details"]["price"]]
            remaining = int(line["amount"])
            for grant in grants:
                if remaining <= 0:
                    break
                if not _applies(grant, price):
                    continue
                take = min(remaining, balance[grant["id"]])
                if take <= 0:
                    continue
                balance[grant["id"]] -= take
                remaining -= take
                line["pretax_credit_amounts"].append(
                    {
                        "amount": take,
                        "credit_balance_transaction": None,
                        "discount": None,
                        "type": "credit_balance_transaction",
                    }
                )


def _applies(grant: Json, price: Json) -> bool:
    scope = grant["applicability_config"]["scope"]
    if scope.get("price_type") == "metered":
        recurring = price["recurring"]
        return bool(recurring and recurring["usage_type"] == "metered")
    return any(p["id"] == price["id"] for p in scope.get("prices") or ())
