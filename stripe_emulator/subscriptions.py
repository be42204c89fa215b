"""Subscriptions and their billing cycles.

``POST /v1/subscriptions``, ``GET /v1/subscriptions`` (``customer``, ``price``, ``status``),
``GET /v1/subscriptions/{id}``, ``DELETE /v1/subscriptions/{id}`` (cancel; ``invoice_now``).

- Subscriptions: an existing customer and at least one item; each item an active recurring
  price, at most once, all of one currency and interval; ``quantity`` (default 1) only on
  licensed prices: on a metered one it is refused with ``You cannot set the quantity for
  metered plans.``, and metered items carry no ``quantity``. The billing period is on the items
  (``current_period_start``/``_end``, the basil shape); months keep the anchor's day, clamped
  to the month's end. A new subscription gets a first invoice (``subscription_create``: its
  licensed items for the first period), finalized in the request and, per ``payment_behavior``
  (default ``allow_incomplete``), paid: ``active`` when paid or nothing is due, ``incomplete``
  when declined, a 402 and nothing created with ``error_if_incomplete``, ``incomplete``
  without an attempt with ``default_incomplete`` (SUB-2, SUB-9 to SUB-12; see ``collection``
  for what follows). ``default_payment_method`` must be the customer's (a test token is made
  and attached). Only ``active``, ``trialing``, ``past_due`` and ``unpaid`` subscriptions
  renew. The list leaves canceled ones out unless ``status=canceled``/``ended``/``all``.
  Cancelling sets ``canceled``; an ended subscription cannot be canceled again.
"""

from __future__ import annotations

import copy
from decimal import ROUND_HALF_UP, Decimal

from stripe_emulator.collection import INCOMPLETE_SECONDS
from stripe_emulator.errors import EmulatedError, Json, card_error, invalid, missing, no_such
from stripe_emulator.invoices import invoice_subscription
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    bool_param,
    int_param,
    list_page,
    metadata_param,
    obj_param,
    only_keys,
    only_params,
    str_param,
)
from stripe_emulator.records import SubscriptionState
from stripe_emulator.shapes import SUBSCRIPTION_SHAPE
from stripe_emulator.state import EmulatorState

_SUBSCRIPTION_FIELDS = frozenset(
    {
        "collection_method",
        "customer",
        "days_until_due",
        "default_payment_method",
        "description",
        "items",
        "metadata",
        "off_session",
        "payment_behavior",
        "proration_behavior",
    }
)
_PAYMENT_BEHAVIORS = frozenset(
    {"allow_incomplete", "default_incomplete", "error_if_incomplete", "pending_if_incomplete"}
)


class SubscriptionsMixin(EmulatorState):
    """Subscriptions; closing a period bills it (see ``invoices``)."""

    def create_subscription(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _SUBSCRIPTION_FIELDS)
        customer = str_param(params, "customer", required=True)
        if customer not in self.customers:
            raise no_such("customer", customer, "customer")
        raw_items = params.get("items")
        if not raw_items:
            raise missing("items")
        if not isinstance(raw_items, list):
            raise invalid("items", "Invalid array: items must be an array of objects.")
        chosen: list[tuple[Json, int | None, Json]] = []
        for index, raw in enumerate(raw_items):
            prefix = f"items[{index}]"
            if not isinstance(raw, dict):
                raise invalid(prefix, f"Invalid object: {prefix} must be an object.")
            only_keys(raw, frozenset({"price", "quantity", "metadata"}), prefix)
            price_id = str_param(raw, "price")
            if not price_id:
                raise missing(f"{prefix}[price]")
            price = self.prices.get(price_id)
            if price is None:
                raise no_such("price", price_id, f"{prefix}[price]")
            if not price["active"]:
                raise invalid(
                    f"{prefix}[price]",
                    "The price specified is inactive. This field only accepts active prices.",
                )
            recurring = price["recurring"]
            if recurring is None:
                raise invalid(
                    f"{prefix}[price]",
                    "The price specified is set to `type=one_time` but this field only accepts "
                    "prices with `type=recurring`.",
                )
            metered = recurring["usage_type"] == "metered"
            quantity = int_param(raw, "quantity")
            if quantity is not None and metered:
                raise EmulatedError(
                    400,
                    "You cannot set the quantity for metered plans.",
                    param=f"{prefix}[quantity]",
                )
            if quantity is not None and quantity < 0:
                raise invalid(f"{prefix}[quantity]", "Quantity must be at least 0.")
            if not metered and quantity is None:
                quantity = 1
            if any(other["id"] == price_id for other, _, _ in chosen):
                raise invalid(
                    f"{prefix}[price]",
                    f"The price `{price_id}` is already used by another item of this "
                    "subscription. Each price can only appear once.",
                )
            if chosen:
                first = chosen[0][0]
                for field, value, expected in (
                    ("currency", price["currency"], first["currency"]),
                    ("interval", recurring["interval"], first["recurring"]["interval"]),
                    (
                        "interval",
                        recurring["interval_count"],
                        first["recurring"]["interval_count"],
                    ),
                ):
                    if value != expected:
                        raise invalid(
                            f"{prefix}[price]",
                            "Currency and interval fields must match across all plans on this "
                            f"subscription. Found mismatch in {field} field.",
                        )
            chosen.append((price, quantity, metadata_param(raw) or {}))
        metadata = metadata_param(params) or {}
        description = str_param(params, "description", max_length=500) or None
        collection = str_param(params, "collection_method") or "charge_automatically"
        if collection not in ("charge_automatically", "send_invoice"):
            raise invalid(
                "collection_method",
                "Invalid collection_method: must be charge_automatically or send_invoice.",
            )
        days_until_due = int_param(params, "days_until_due")
        behavior = str_param(params, "payment_behavior")
        if behavior and behavior not in _PAYMENT_BEHAVIORS:
            raise invalid("payment_behavior", f"Invalid payment_behavior: '{behavior}'.")
        str_param(params, "proration_behavior")
        bool_param(params, "off_session")
        behavior = behavior or "allow_incomplete"  # SUB-10: the default
        if behavior == "pending_if_incomplete":
            raise invalid(
                "payment_behavior",
                "`pending_if_incomplete` is only valid when updating a subscription.",
            )  # SUB-13
        # all validated
        pm_ref = str_param(params, "default_payment_method")
        default_pm = (
            self.customer_payment_method(pm_ref, customer, "default_payment_method")
            if pm_ref
            else None
        )
        automatic = collection == "charge_automatically"
        due = sum(
            _amount(price, quantity)
            for price, quantity, _ in chosen
            if quantity is not None  # licensed: billed in advance on the first invoice
        )
        pm = default_pm or self.charge_method(None, customer)
        decline = self.charge_decline(pm) if automatic and due > 0 else None
        if decline is not None and behavior == "error_if_incomplete":
            if pm is None:
                raise EmulatedError(
                    400,
                    "This customer has no attached payment source or default payment method. "
                    "Please consider adding a default payment method.",
                    code="resource_missing",
                )
            raise card_error(*decline)  # SUB-12: 402, nothing created
        if decline is not None or (behavior == "default_incomplete" and automatic and due > 0):
            status = "incomplete"  # SUB-3, SUB-11
        else:
            status = "active"  # paid, nothing to pay, or send_invoice (SUB-9)
        now = int(self.now())
        first = chosen[0][0]["recurring"]
        state = SubscriptionState(
            copy.deepcopy(SUBSCRIPTION_SHAPE),
            anchor=now,
            interval=first["interval"],
            interval_count=first["interval_count"],
        )
        start, end = state.bounds()
        sub = state.obj
        sub_id = self._new_id("sub", 24)
        items = [
            self._subscription_item(sub_id, price, quantity, item_metadata, start, end)
            for price, quantity, item_metadata in chosen
        ]
        sub.update(
            id=sub_id,
            billing_cycle_anchor=now,
            collection_method=collection,
            created=now,
            currency=chosen[0][0]["currency"],
            customer=customer,
            days_until_due=days_until_due,
            default_payment_method=default_pm,
            description=description,
            metadata=metadata,
            start_date=now,
            status=status,
        )
        sub["items"] = {
            "object": "list",
            "data": items,
            "has_more": False,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub_id}",
        }
        self.subscriptions[sub_id] = state
        self._emit("customer.subscription.created", sub, request)
        self._first_invoice(state, behavior, request)
        if sub["status"] == "incomplete":
            self._incomplete_until[sub_id] = now + INCOMPLETE_SECONDS  # SUB-4
        self._reschedule()
        return sub

    def _first_invoice(self, state: SubscriptionState, behavior: str, request: ApiRequest) -> None:
        """The ``subscription_create`` invoice: the licensed items for the first period, in
        advance; finalized in the request and, unless ``default_incomplete``, paid (SUB-2)."""
        sub = state.obj
        start, end = state.bounds()
        lines = [
            self._line(item, start, end, int(item["quantity"]))
            for item in sub["items"]["data"]
            if item["price"]["recurring"]["usage_type"] == "licensed"
        ]
        now = int(sub["created"])
        invoice = self._new_invoice(sub, now, now, lines, "subscription_create", now)
        sub["latest_invoice"] = invoice["id"]
        self._emit("invoice.created", invoice, request)
        if sub["collection_method"] != "charge_automatically":
            return  # finalized by its own schedule; send_invoice is active regardless (SUB-9)
        self.finalize_invoice(invoice["id"], request, collect=False)
        if behavior != "default_incomplete" or int(invoice["amount_remaining"]) <= 0:
            self.collect(invoice, request)

    def _subscription_item(
        self,
        subscription: str,
        price: Json,
        quantity: int | None,
        metadata: Json,
        start: int,
        end: int,
    ) -> Json:
        recurring = price["recurring"]
        item: Json = {
            "id": self._new_id("si", 14),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": start,
            "current_period_end": end,
            "current_period_start": start,
            "discounts": [],
            "metadata": metadata,
            "plan": {
                "id": price["id"],
                "object": "plan",
                "active": price["active"],
                "amount": price["unit_amount"],
                "amount_decimal": price["unit_amount_decimal"],
                "billing_scheme": price["billing_scheme"],
                "created": price["created"],
                "currency": price["currency"],
                "interval": recurring["interval"],
                "interval_count": recurring["interval_count"],
                "livemode": False,
                "metadata": {},
                "meter": recurring["meter"],
                "nickname": price["nickname"],
                "product": price["product"],
                "tiers_mode": None,
                "transform_usage": None,
                "trial_period_days": None,
                "usage_type": recurring["usage_type"],
            },
            "price": price,  # the price itself, so its later updates show
            "subscription": subscription,
            "tax_rates": [],
        }
        if quantity is not None:  # Stripe leaves it out on metered items
            item["quantity"] = quantity
        return item

    def retrieve_subscription(self, request: ApiRequest) -> Json:
        return self._subscription(request.args["id"]).obj

    def list_subscriptions(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"customer", "price", "status"})
        items = [s.obj for s in reversed(self.subscriptions.values())]
        customer = str_param(params, "customer")
        if customer:
            items = [s for s in items if s["customer"] == customer]
        price = str_param(params, "price")
        if price:
            items = [s for s in items if any(i["price"]["id"] == price for i in s["items"]["data"])]
        status = str_param(params, "status")
        if status == "ended":
            items = [s for s in items if s["status"] in ("canceled", "incomplete_expired")]
        elif status and status != "all":
            items = [s for s in items if s["status"] == status]
        elif not status:  # Stripe's default leaves canceled subscriptions out
            items = [s for s in items if s["status"] != "canceled"]
        return list_page(items, params, "/v1/subscriptions")

    def cancel_subscription(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, frozenset({"invoice_now", "prorate", "cancellation_details"}))
        state = self._subscription(request.args["id"])
        if not state.active:
            raise invalid(
                "subscription",
                f"This subscription ({state.obj['id']}) is already {state.obj['status']}; an "
                "ended subscription cannot be canceled again.",
            )
        invoice_now = bool(bool_param(params, "invoice_now"))
        bool_param(params, "prorate")  # no prorations are emulated
        details = obj_param(params, "cancellation_details")
        only_keys(details, frozenset({"comment", "feedback"}), "cancellation_details")
        now = int(self.now())
        if invoice_now:
            self._close_period(state, end=now, final=True, request=request)
        sub = state.obj
        sub.update(status="canceled", canceled_at=now, ended_at=now)
        sub["cancellation_details"] = {
            "comment": details.get("comment") or None,
            "feedback": details.get("feedback") or None,
            "reason": "cancellation_requested",
        }
        self._reschedule()
        self._emit("customer.subscription.deleted", sub, request)
        return sub

    def close_period(self, subscription_id: str, *, at: str = "period_end") -> Json:
        """Close a subscription's current period and return its (draft) invoice.

        ``at="period_end"`` moves the emulator clock to the period's end, as a Stripe test
        clock would (everything else due by then happens too); ``at="now"`` ends the period at
        the current emulator time instead and restarts the billing cycle there.
        """
        state = self._subscription(subscription_id)
        if not state.cycling:
            raise invalid(
                "subscription",
                f"Subscription {subscription_id} is {state.obj['status']}: it does not renew.",
            )
        start, end = state.bounds()
        if at == "now":
            now = int(self.now())
            if now <= start:
                raise invalid("at", "The current period started this second: nothing to close yet.")
            invoice = self._close_period(state, end=now)
            self._run_due()
            return invoice
        if at != "period_end":
            raise invalid("at", "at must be period_end or now")
        self.advance(max(0.0, end - self.now()) + 0.001)  # a margin over float rounding
        for invoice in self.invoices.values():
            if invoice_subscription(invoice) == subscription_id and (
                invoice["period_start"],
                invoice["period_end"],
            ) == (start, end):
                return invoice
        raise RuntimeError(f"closing {subscription_id} produced no invoice")  # pragma: no cover

    def _close_period(
        self,
        state: SubscriptionState,
        *,
        end: int | None = None,
        final: bool = False,
        request: ApiRequest | None = None,
    ) -> Json:
        """Bill the current period and start the next: one draft invoice with, for each item,
        metered usage over the closed period (arrears) and licensed quantity over the next one
        (advance). `end` closes the period early, at that time, and re-anchors the cycle there;
        `final` (a cancellation with ``invoice_now``) bills usage only and starts nothing."""
        sub = state.obj
        start, scheduled_end = state.bounds()
        at_period_end = end is None
        end = scheduled_end if end is None else end
        previous: Json = {
            "items": copy.deepcopy(sub["items"]),
            "latest_invoice": sub["latest_invoice"],
        }
        if not final:
            if at_period_end:
                state.period += 1
            else:
                state.anchor, state.period = end, 0
                sub["billing_cycle_anchor"] = end
        next_start, next_end = state.bounds()
        lines: list[Json] = []
        for item in sub["items"]["data"]:
            if item["price"]["recurring"]["usage_type"] == "metered":
                lines.append(self._line(item, start, end, 0))
            elif not final:
                lines.append(self._line(item, next_start, next_end, int(item["quantity"])))
            if not final:
                item["current_period_start"], item["current_period_end"] = next_start, next_end
        created = end if at_period_end else int(self.now())
        reason = "subscription_update" if final else "subscription_cycle"
        invoice = self._new_invoice(sub, start, end, lines, reason, created)
        sub["latest_invoice"] = invoice["id"]
        if not final:
            self._emit("customer.subscription.updated", sub, request, previous=previous)
        self._emit("invoice.created", invoice, request)
        return invoice


def _amount(price: Json, quantity: int) -> int:
    unit = Decimal(price["unit_amount_decimal"])
    return int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))
