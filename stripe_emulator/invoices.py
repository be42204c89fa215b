"""Invoices, made when a subscription's period closes.

``GET /v1/invoices`` (``customer``, ``subscription``, ``status``), ``GET /v1/invoices/{id}``,
``POST /v1/invoices/{id}/finalize``.

- Invoices: when a period ends (the emulator clock passes its end; see
  :meth:`StripeEmulator.close_period`) a draft invoice is created (``billing_reason=
  subscription_cycle``, ``period_start``/``period_end`` the closed period,
  ``parent.subscription_details.subscription``) with one line per item: metered items bill the
  closed period in arrears, quantity = the meter's aggregate of that customer's non-cancelled
  events with timestamp in ``[period_start, period_end)`` (negative totals bill 0); licensed
  items bill the next period in advance. Amount = quantity x ``unit_amount_decimal``, rounded
  half up. A draft keeps counting usage reported late for its period (Stripe's grace period,
  which is what a true-up relies on) until it is finalized: by ``POST
  /v1/invoices/{id}/finalize`` or automatically ``invoice_finalize_delay`` seconds (emulator
  clock; default 3600, ``None`` never, then ``auto_advance`` is false) after creation, as
  ``automatically_finalizes_at`` says. Finalizing sets ``open``, a ``number``, applies billing
  credits and freezes the invoice: later usage or cancellations no longer change it; an
  automatically advancing ``charge_automatically`` invoice is then paid (``collection``). A
  cancellation with ``invoice_now=true`` bills the usage so far on a last invoice
  (``billing_reason=subscription_update``). A subscription's first invoice
  (``subscription_create``) is made when it is created (``subscriptions``).
"""

from __future__ import annotations

import copy
from decimal import ROUND_HALF_UP, Decimal

from stripe_emulator.errors import Json, invalid
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    bool_param,
    list_page,
    only_params,
    str_param,
)
from stripe_emulator.shapes import INVOICE_SHAPE
from stripe_emulator.state import EmulatorState


class InvoicesMixin(EmulatorState):
    """Invoices: drafts that keep counting usage until finalized."""

    def retrieve_invoice(self, request: ApiRequest) -> Json:
        invoice = self._invoice(request.args["id"])
        if invoice["status"] == "draft":
            self._refresh_usage(invoice)  # a draft shows the usage reported so far
        return invoice

    def list_invoices(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"customer", "subscription", "status"})
        items = list(reversed(self.invoices.values()))
        customer = str_param(params, "customer")
        if customer:
            items = [i for i in items if i["customer"] == customer]
        subscription = str_param(params, "subscription")
        if subscription:
            items = [i for i in items if invoice_subscription(i) == subscription]
        status = str_param(params, "status")
        if status:
            items = [i for i in items if i["status"] == status]
        for invoice in items:
            if invoice["status"] == "draft":
                self._refresh_usage(invoice)
        return list_page(items, params, "/v1/invoices")

    def finalize_invoice_request(self, request: ApiRequest) -> Json:
        only_params(request.params, frozenset({"auto_advance"}))
        bool_param(request.params, "auto_advance")
        return self.finalize_invoice(request.args["id"], request)

    def finalize_invoice(
        self, invoice_id: str, request: ApiRequest | None = None, *, collect: bool = True
    ) -> Json:
        """Finalize a draft (``draft`` -> ``open``): usage is counted a last time, billing
        credits are applied to metered lines, a number is assigned, ``invoice.finalized`` sent.
        Then, when `collect` and the invoice ``auto_advance``s, a ``charge_automatically``
        subscription invoice is paid (see ``collection``), unless the subscription is
        ``unpaid`` (SUB-7)."""
        invoice = self._invoice(invoice_id)
        if invoice["status"] != "draft":
            raise invalid(
                "invoice",
                "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
            )
        self._refresh_usage(invoice)
        self._apply_credits(invoice)
        now = int(self.now())
        customer = self.customers.get(invoice["customer"])
        if customer is not None:
            sequence = customer["next_invoice_sequence"]
            customer["next_invoice_sequence"] = sequence + 1
            invoice["number"] = f"{customer['invoice_prefix']}-{sequence:04d}"
        invoice.update(status="open", effective_at=now, automatically_finalizes_at=None)
        invoice["status_transitions"]["finalized_at"] = now
        self._auto_finalize.pop(invoice_id, None)
        self._reschedule()
        self._emit("invoice.finalized", invoice, request)
        state = self.subscriptions.get(invoice_subscription(invoice) or "")
        if (
            collect
            and invoice["auto_advance"]
            and invoice["collection_method"] == "charge_automatically"
            and state is not None
            and state.obj["status"] != "unpaid"
        ):
            self.collect(invoice, request)
        return invoice

    def _line(self, item: Json, start: int, end: int, quantity: int) -> Json:
        price = item["price"]
        return {
            "id": self._new_id("il", 24),
            "object": "line_item",
            "amount": 0,
            "currency": price["currency"],
            "description": None,
            "discount_amounts": [],
            "discountable": True,
            "discounts": [],
            "invoice": None,
            "livemode": False,
            "metadata": {},
            "parent": {
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": None,
                    "proration": False,
                    "proration_details": {"credited_items": None},
                    "subscription": item["subscription"],
                    "subscription_item": item["id"],
                },
                "type": "subscription_item_details",
            },
            "period": {"end": end, "start": start},
            "pretax_credit_amounts": [],
            "pricing": {
                "price_details": {"price": price["id"], "product": price["product"]},
                "type": "price_details",
                "unit_amount_decimal": price["unit_amount_decimal"],
            },
            "quantity": quantity,
            "subscription": item["subscription"],
            "subtotal": 0,
            "taxes": [],
        }

    def _new_invoice(
        self, sub: Json, start: int, end: int, lines: list[Json], reason: str, created: int
    ) -> Json:
        invoice_id = self._new_id("in", 24)
        customer = self.customers.get(sub["customer"], {})
        delay = self.invoice_finalize_delay
        finalizes_at = None if delay is None else int(created + delay)
        invoice = copy.deepcopy(INVOICE_SHAPE)
        invoice.update(
            id=invoice_id,
            auto_advance=delay is not None,
            automatically_finalizes_at=finalizes_at,
            billing_reason=reason,
            collection_method=sub["collection_method"],
            created=created,
            currency=sub["currency"],
            customer=sub["customer"],
            customer_email=customer.get("email"),
            customer_name=customer.get("name"),
            period_end=end,
            period_start=start,
        )
        invoice["parent"] = {
            "quote_details": None,
            "subscription_details": {
                "metadata": dict(sub["metadata"]),
                "subscription": sub["id"],
            },
            "type": "subscription_details",
        }
        for line in lines:
            line["invoice"] = invoice_id
        invoice["lines"] = {
            "object": "list",
            "data": lines,
            "has_more": False,
            "url": f"/v1/invoices/{invoice_id}/lines",
        }
        self.invoices[invoice_id] = invoice
        self._refresh_usage(invoice)
        if finalizes_at is not None:
            self._auto_finalize[invoice_id] = finalizes_at
        self._reschedule()
        return invoice

    def _refresh_usage(self, invoice: Json) -> None:
        """Recount metered lines from the meter events (a draft keeps taking late usage, as
        Stripe's grace period allows) and recompute amounts and totals."""
        customer = invoice["customer"]
        for line in invoice["lines"]["data"]:
            price = self.prices[line["pricing"]["price_details"]["price"]]
            recurring = price["recurring"]
            if recurring["usage_type"] == "metered":
                meter = self.meters.get(recurring["meter"])
                period = line["period"]
                usage = (
                    self._aggregate(meter, customer, period["start"], period["end"])
                    if meter is not None
                    else 0
                )
                line["quantity"] = max(0, usage)  # negative usage bills as 0, as Stripe does
            unit = Decimal(price["unit_amount_decimal"])
            amount = int((unit * line["quantity"]).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            line["amount"] = line["subtotal"] = amount
            product = self.products.get(price["product"], {})
            name = product.get("name", price["product"])
            line["description"] = f"{line['quantity']} \u00d7 {name}"
        invoice_totals(invoice)


def invoice_subscription(invoice: Json) -> str | None:
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    subscription = details.get("subscription")
    return str(subscription) if subscription else None


def invoice_totals(invoice: Json) -> None:
    lines = invoice["lines"]["data"]
    subtotal = sum(int(line["amount"]) for line in lines)
    credits = [c for line in lines for c in line["pretax_credit_amounts"]]
    total = subtotal - sum(int(c["amount"]) for c in credits)
    invoice.update(
        subtotal=subtotal,
        subtotal_excluding_tax=subtotal,
        total=total,
        total_excluding_tax=total,
        total_pretax_credit_amounts=credits,
        amount_due=total,
        amount_remaining=total - int(invoice["amount_paid"]),
    )
