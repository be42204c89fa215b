"""The Stripe calls provisioning and the subscription lifecycle make.

- :func:`checkout_payment_method`: the payment method a setup-mode Checkout left, read from its
  SetupIntent (CO-2; rule ids are rows of ``docs/reference/stripe-behaviour.md``).
- :func:`make_invoice_default`: that payment method as the customer's
  ``invoice_settings.default_payment_method``, which Checkout does not set (CO-4), so the first
  invoice and every renewal are charged to it (SUB-14).
- :func:`find_or_create`: the org's subscription, one made by an earlier attempt whose answer
  was lost, or a new one; always read back, since a replayed idempotent answer shows the
  subscription as it was when first made, not as it is.
- :func:`retry_payment`: a subscription waiting for payment (``incomplete``, ``past_due``,
  ``unpaid``) is paid again with a new checkout's card (its latest open invoice).
- :func:`welcome_credit`: the welcome credit, once per org.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import stripe

from controlplane.errors import BillingError
from controlplane.interfaces import CatalogVersion
from controlplane.plugins.billing.stripe.catalog import stripe_call

ENDED = frozenset({"canceled", "incomplete_expired"})
AWAITING_PAYMENT = frozenset({"incomplete", "past_due", "unpaid"})
DUNNING = frozenset({"past_due", "unpaid", "canceled"})  # where failed renewals lead (SUB-6)


class SubscriptionState(msgspec.Struct, frozen=True, kw_only=True):
    """What provisioning and the lifecycle read of a Stripe subscription."""

    id: str
    status: str
    ended_at: int | None = None
    canceled_at: int | None = None
    latest_invoice: str | None = None
    unpaid_since: int | None = None  # when its latest invoice, still unpaid, was finalized


def state_of(sub: Any) -> SubscriptionState:
    plain = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)
    latest = plain.get("latest_invoice")
    if isinstance(latest, dict):
        latest = latest.get("id")
    return SubscriptionState(
        id=str(plain["id"]),
        status=str(plain["status"]),
        ended_at=plain.get("ended_at"),
        canceled_at=plain.get("canceled_at"),
        latest_invoice=latest,
    )


async def checkout_payment_method(client: stripe.StripeClient, setup_intent: str) -> str | None:
    intent = await stripe_call(
        "retrieve setup intent", client.v1.setup_intents.retrieve_async(setup_intent)
    )
    pm = intent.payment_method
    if pm is None:
        return None
    return pm if isinstance(pm, str) else str(pm.id)


async def make_invoice_default(client: stripe.StripeClient, customer: str, pm: str) -> None:
    params: Any = {"invoice_settings": {"default_payment_method": pm}}
    await stripe_call("update customer", client.v1.customers.update_async(customer, params))


async def retrieve(client: stripe.StripeClient, subscription: str) -> SubscriptionState:
    """The subscription as Stripe holds it now; for one that payments failed for, when its
    latest invoice (attempted, still unpaid) was finalized."""
    sub = await stripe_call(
        "retrieve subscription", client.v1.subscriptions.retrieve_async(subscription)
    )
    state = state_of(sub)
    if state.status not in DUNNING or not state.latest_invoice:
        return state
    invoice = await stripe_call(
        "retrieve invoice", client.v1.invoices.retrieve_async(state.latest_invoice)
    )
    plain = invoice.to_dict()
    finalized = (plain.get("status_transitions") or {}).get("finalized_at")
    if plain.get("status") in ("open", "uncollectible") and plain.get("attempted") and finalized:
        return msgspec.structs.replace(state, unpaid_since=int(finalized))
    return state


async def find_or_create(
    client: stripe.StripeClient,
    org_id: str,
    customer: str,
    version: CatalogVersion,
    session_id: str,
    price_keys: Sequence[str] = (),
) -> SubscriptionState:
    """The org's live subscription on `customer`, else a new one with the catalog prices
    `price_keys` names (every catalog price when it names none: `[[plans]] prices`)."""
    prices: dict[str, dict[str, Any]] = {
        key: price
        for key, price in version.catalog["prices"].items()
        if not price_keys or key in price_keys
    }
    ids = {p["id"] for p in prices.values()}
    listing: Any = {"customer": customer, "limit": 100}
    page = await stripe_call("list subscriptions", client.v1.subscriptions.list_async(listing))
    for sub in page.data:
        plain = sub.to_dict()
        if plain.get("status") in ENDED:
            continue
        items = (plain.get("items") or {}).get("data") or []
        owner = (plain.get("metadata") or {}).get("org_id")
        ours = owner == org_id or (
            owner is None and any((i.get("price") or {}).get("id") in ids for i in items)
        )
        if ours:  # made by an attempt whose answer was lost; never another org's
            return state_of(sub)
    params: Any = {
        "customer": customer,
        "items": [
            {"price": p["id"]}
            if p["usage_type"] == "metered"
            else {"price": p["id"], "quantity": 1}
            for p in prices.values()
        ],
        "metadata": {"org_id": org_id, "catalog_version": str(version.version)},
    }
    key = f"sub:{org_id}:{version.version}"
    created = await stripe_call(
        "create subscription",
        client.v1.subscriptions.create_async(params, {"idempotency_key": key}),
    )
    state = await retrieve(client, created.id)
    if state.status in ENDED:
        # Stripe replayed the subscription this key made before, since ended: a new checkout.
        created = await stripe_call(
            "create subscription",
            client.v1.subscriptions.create_async(
                params, {"idempotency_key": f"{key}:{session_id}"}
            ),
        )
        state = await retrieve(client, created.id)
    return state


async def retry_payment(
    client: stripe.StripeClient, sub: SubscriptionState, pm: str
) -> SubscriptionState:
    """Pay the latest open invoice of a subscription waiting for payment with `pm`; a decline
    is an answer (the subscription stays as it is), not an error."""
    if sub.status not in AWAITING_PAYMENT or not sub.latest_invoice:
        return sub
    invoice = await stripe_call(
        "retrieve invoice", client.v1.invoices.retrieve_async(sub.latest_invoice)
    )
    if invoice.status == "open":
        try:
            await client.v1.invoices.pay_async(invoice.id, {"payment_method": pm})
        except stripe.CardError:
            pass  # declined: read back below
        except stripe.StripeError as exc:
            raise BillingError(f"Stripe pay invoice: {exc.user_message or exc}") from exc
    return await retrieve(client, sub.id)


async def welcome_credit(
    client: stripe.StripeClient,
    org_id: str,
    customer: str,
    version: CatalogVersion,
    event_created: int,
) -> str | None:
    credit: dict[str, Any] | None = version.catalog.get("welcome_credit")
    if not credit:
        return None
    listing: Any = {"customer": customer, "limit": 100}
    page = await stripe_call(
        "list credit grants", client.v1.billing.credit_grants.list_async(listing)
    )
    for grant in page.data:
        metadata = grant.to_dict().get("metadata") or {}
        if metadata.get("cp_welcome_credit") == org_id:
            return str(grant.id)  # granted once per org, ever
    params: Any = {
        "customer": customer,
        "name": credit["name"],
        "category": "promotional",
        "amount": {
            "type": "monetary",
            "monetary": {"currency": credit["currency"], "value": credit["amount_minor"]},
        },
        "applicability_config": {"scope": {"price_type": "metered"}},
        "metadata": {"cp_welcome_credit": org_id},
    }
    if credit.get("expires_after_days"):
        # From the event's time, so a retry sends the same parameters under the same key.
        params["expires_at"] = event_created + int(credit["expires_after_days"]) * 86400
    created = await stripe_call(
        "create credit grant",
        client.v1.billing.credit_grants.create_async(
            params, {"idempotency_key": f"credit:{org_id}"}
        ),
    )
    return str(created.id)
