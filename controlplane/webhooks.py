"""Stripe webhooks: verify, deduplicate, provision Pro, true up, record closed periods.

Every delivery is checked first: the ``Stripe-Signature`` header against the raw body with the
SDK (``stripe.Webhook.construct_event``, ``stripe.webhook_tolerance_seconds``, 300 s by
default). A bad signature, a stale timestamp or a body changed after signing is refused with
400 and nothing is done. (The SDK's age check is one-sided: a timestamp ahead of our clock is
accepted, as Stripe's own libraries do; the signature still has to match.)

Event ids are recorded once an event is processed to the end, in the same transaction as its
storage changes; a redelivered id is answered 200 without work. When processing fails midway
(Stripe unreachable, no catalog yet) the answer is 5xx and nothing is recorded, so Stripe's
retry redoes it; every Stripe write is idempotent (an idempotency key, and a look for what a
lost earlier attempt created, since Stripe forgets keys after 24 h). Work for one org is
serialised in this process, so concurrent duplicates cannot race each other.

Types handled:

- ``checkout.session.completed`` in setup mode (org from ``client_reference_id`` or
  ``metadata.org_id``, customer from the session or the org): unless the org has a live
  subscription, one subscription with every price of the newest catalog version (metered
  prices without quantity; key ``sub:{org}:{version}``), the welcome credit once per org (key
  ``credit:{org}``), then the org is `pro` from now with its customer and subscription. 503
  when no catalog is published.
- ``customer.subscription.deleted`` for the org's current subscription: `free` from the
  subscription's end (``ended_at``, else ``canceled_at``, else the event's time). Other
  subscriptions are ignored.
- ``invoice.created``: true-up; the org's buckets up to the invoice's ``period_end`` are rolled
  up (grace ignored) and sent before the answer. 503 if some could not be delivered yet.
- ``invoice.finalized``: the period is recorded as closed, keyed by invoice id; later
  corrections for it are stamped into the current period (see :mod:`controlplane.sender`).
- anything else: 200, ignored.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import TYPE_CHECKING, Any

import msgspec
import stripe
import structlog

from controlplane.catalog import stripe_call, stripe_client
from controlplane.errors import ControlPlaneError
from controlplane.interfaces import (
    AuditEntry,
    CatalogVersion,
    ClosedPeriod,
    OrgChange,
    WebhookRecord,
)
from controlplane.secrets import reveal

if TYPE_CHECKING:
    from controlplane.core import ControlPlane

log = structlog.get_logger("webhooks")

PRO_PLAN = "pro"
FREE_PLAN = "free"
ACTOR = "stripe-webhook"


class WebhookRejected(ControlPlaneError):
    """The webhook's signature or body is not valid; nothing was done."""


class WebhookNotConfigured(ControlPlaneError):
    """Stripe webhooks are not configured: set [stripe] webhook_secret."""


class CatalogNotPublished(ControlPlaneError):
    """No catalog version is published yet: run `controlplane catalog publish`."""


class TrueUpIncomplete(ControlPlaneError):
    """The true-up could not deliver every row yet; Stripe will retry the event."""


class WebhookResult(msgspec.Struct, frozen=True):
    event_id: str
    type: str
    outcome: str
    duplicate: bool = False


_locks: weakref.WeakKeyDictionary[ControlPlane, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _lock(cp: ControlPlane, key: str) -> asyncio.Lock:
    return _locks.setdefault(cp, {}).setdefault(key, asyncio.Lock())


def verify(cp: ControlPlane, body: bytes, signature: str | None) -> dict[str, Any]:
    """The event, once its signature is checked against the raw body; else WebhookRejected."""
    settings = cp.config.stripe
    if settings.webhook_secret is None:
        raise WebhookNotConfigured()
    secret = reveal(settings.webhook_secret, "stripe.webhook_secret")
    try:
        stripe.Webhook.construct_event(
            body, signature or "", secret, tolerance=settings.webhook_tolerance_seconds
        )
    except stripe.SignatureVerificationError as exc:
        raise WebhookRejected(f"signature check failed: {exc.user_message or exc}") from None
    except ValueError as exc:
        raise WebhookRejected(f"not a Stripe v1 event: {exc}") from None
    try:
        event = json.loads(body)
    except ValueError:
        raise WebhookRejected("the body is not JSON") from None
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
        or not isinstance((event.get("data") or {}).get("object"), dict)
    ):
        raise WebhookRejected("not a Stripe event: id, type and data.object are required")
    return event


async def handle(cp: ControlPlane, body: bytes, signature: str | None) -> WebhookResult:
    """Verify and process one delivery (see the module docstring)."""
    event = verify(cp, body, signature)
    event_id, kind = event["id"], event["type"]
    prior = await cp.storage.webhook_outcome(event_id)
    if prior is not None:
        log.info("webhook.duplicate", event_id=event_id, type=kind)
        return WebhookResult(event_id, kind, prior, duplicate=True)
    handler = HANDLERS.get(kind)
    if handler is None:
        return WebhookResult(event_id, kind, "ignored: type not handled")
    result = await handler(cp, event)
    log.info("webhook.processed", event_id=event_id, type=kind, outcome=result.outcome)
    return result


def _record(event: dict[str, Any], outcome: str) -> WebhookRecord:
    created = event.get("created")
    return WebhookRecord(
        event_id=event["id"],
        type=event["type"],
        created=created if isinstance(created, int) else None,
        outcome=outcome,
    )


async def _finish(
    cp: ControlPlane,
    event: dict[str, Any],
    outcome: str,
    *,
    org: OrgChange | None = None,
    closed: ClosedPeriod | None = None,
    audit: tuple[AuditEntry, ...] = (),
) -> WebhookResult:
    fresh = await cp.storage.record_webhook(
        _record(event, outcome), cp.now(), org=org, closed=closed, audit=audit
    )
    if not fresh:
        prior = await cp.storage.webhook_outcome(event["id"]) or outcome
        return WebhookResult(event["id"], event["type"], prior, duplicate=True)
    return WebhookResult(event["id"], event["type"], outcome)


async def _duplicate(cp: ControlPlane, event: dict[str, Any]) -> WebhookResult | None:
    prior = await cp.storage.webhook_outcome(event["id"])
    if prior is None:
        return None
    return WebhookResult(event["id"], event["type"], prior, duplicate=True)


# checkout.session.completed -------------------------------------------------------------------


async def checkout_completed(cp: ControlPlane, event: dict[str, Any]) -> WebhookResult:
    session = event["data"]["object"]
    if session.get("mode") != "setup":
        return await _finish(cp, event, f"ignored: mode {session.get('mode')}, not setup")
    org_id = session.get("client_reference_id") or (session.get("metadata") or {}).get("org_id")
    if not org_id:
        log.warning("webhook.no_org", event_id=event["id"], session=session.get("id"))
        return await _finish(cp, event, "ignored: no client_reference_id or metadata.org_id")
    async with _lock(cp, org_id):
        if (dup := await _duplicate(cp, event)) is not None:
            return dup
        org = await cp.storage.get_org(org_id)
        customer = session.get("customer") or (org.customer if org else None)
        if not customer:
            log.warning("webhook.no_customer", event_id=event["id"], org=org_id)
            return await _finish(cp, event, "ignored: the session has no customer")
        if org is not None and org.subscription and org.subscription_status == "active":
            return await _finish(cp, event, f"no-op: {org_id} already has {org.subscription}")
        version = await cp.storage.catalog_version()
        if version is None:
            raise CatalogNotPublished()
        client = stripe_client(cp)
        subscription = await _subscription(client, org_id, customer, version, session["id"])
        credit = await _welcome_credit(client, org_id, customer, version, event)
        at = cp.now()
        after = {
            "customer": customer,
            "subscription": subscription,
            "credit_grant": credit,
            "catalog_version": version.version,
            "plan": PRO_PLAN,
            "effective_from": at,
        }
        return await _finish(
            cp,
            event,
            f"provisioned: {subscription}",
            org=OrgChange(
                org_id=org_id,
                customer=customer,
                subscription=subscription,
                subscription_status="active",
                plan=PRO_PLAN,
                effective_from=at,
            ),
            audit=(
                AuditEntry(
                    action="org.provisioned",
                    subject=org_id,
                    actor=ACTOR,
                    reason=f"{event['type']} {event['id']}",
                    before=msgspec.to_builtins(org) if org else None,
                    after=after,
                ),
            ),
        )


async def _subscription(
    client: stripe.StripeClient,
    org_id: str,
    customer: str,
    version: CatalogVersion,
    session_id: str,
) -> str:
    prices: dict[str, dict[str, Any]] = version.catalog["prices"]
    ids = {p["id"] for p in prices.values()}
    listing: Any = {"customer": customer, "limit": 100}
    page = await stripe_call("list subscriptions", client.v1.subscriptions.list_async(listing))
    for sub in page.data:
        plain = sub.to_dict()
        items = (plain.get("items") or {}).get("data") or []
        ours = (plain.get("metadata") or {}).get("org_id") == org_id
        if ours or any((i.get("price") or {}).get("id") in ids for i in items):
            return str(plain["id"])  # made by an attempt whose answer was lost
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
    if created.status in ("canceled", "incomplete_expired"):
        # Stripe replayed the subscription this key made before, since ended: a new checkout.
        created = await stripe_call(
            "create subscription",
            client.v1.subscriptions.create_async(
                params, {"idempotency_key": f"{key}:{session_id}"}
            ),
        )
    return str(created.id)


async def _welcome_credit(
    client: stripe.StripeClient,
    org_id: str,
    customer: str,
    version: CatalogVersion,
    event: dict[str, Any],
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
        params["expires_at"] = int(event["created"]) + int(credit["expires_after_days"]) * 86400
    created = await stripe_call(
        "create credit grant",
        client.v1.billing.credit_grants.create_async(
            params, {"idempotency_key": f"credit:{org_id}"}
        ),
    )
    return str(created.id)


# customer.subscription.deleted ------------------------------------------------------------------


async def subscription_deleted(cp: ControlPlane, event: dict[str, Any]) -> WebhookResult:
    sub = event["data"]["object"]
    org_id = await cp.storage.org_for_billing(subscription=sub.get("id"), customer=None)
    if org_id is None:
        return await _finish(cp, event, "ignored: not an org's current subscription")
    async with _lock(cp, org_id):
        if (dup := await _duplicate(cp, event)) is not None:
            return dup
        org = await cp.storage.get_org(org_id)
        if org is None or org.subscription != sub.get("id") or org.subscription_status != "active":
            return await _finish(cp, event, "ignored: stale subscription")
        at = int(sub.get("ended_at") or sub.get("canceled_at") or event["created"])
        return await _finish(
            cp,
            event,
            f"free from {at}",
            org=OrgChange(
                org_id=org_id, subscription_status="canceled", plan=FREE_PLAN, effective_from=at
            ),
            audit=(
                AuditEntry(
                    action="org.unsubscribed",
                    subject=org_id,
                    actor=ACTOR,
                    reason=f"{event['type']} {event['id']}",
                    before={"subscription": org.subscription, "plan": PRO_PLAN},
                    after={"plan": FREE_PLAN, "effective_from": at},
                ),
            ),
        )


# invoices ----------------------------------------------------------------------------------------


async def _invoice_org(cp: ControlPlane, invoice: dict[str, Any]) -> str | None:
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    subscription = details.get("subscription") or invoice.get("subscription")
    return await cp.storage.org_for_billing(
        subscription=subscription, customer=invoice.get("customer")
    )


async def invoice_created(cp: ControlPlane, event: dict[str, Any]) -> WebhookResult:
    invoice = event["data"]["object"]
    org_id = await _invoice_org(cp, invoice)
    if org_id is None:
        return await _finish(cp, event, "ignored: no org for this invoice")
    start, end = int(invoice.get("period_start") or 0), int(invoice.get("period_end") or 0)
    if end <= start:
        return await _finish(cp, event, "true-up: empty period")
    async with _lock(cp, org_id):
        if (dup := await _duplicate(cp, event)) is not None:
            return dup
        rolled = await cp.rollup(until=end, org_id=org_id)
        sent = await cp.send(org_id=org_id, until=end)
        if sent.retry or sent.ambiguous:
            raise TrueUpIncomplete(
                f"true-up for {org_id}: {sent.retry + sent.ambiguous} rows not delivered yet"
            )
        outcome = f"true-up to {end}: {rolled.rows} rows, {sent.sent} sent" + (
            f" (sending skipped: {sent.skipped})" if sent.skipped else ""
        )
        return await _finish(cp, event, outcome)


async def invoice_finalized(cp: ControlPlane, event: dict[str, Any]) -> WebhookResult:
    invoice = event["data"]["object"]
    org_id = await _invoice_org(cp, invoice)
    if org_id is None:
        return await _finish(cp, event, "ignored: no org for this invoice")
    start, end = int(invoice.get("period_start") or 0), int(invoice.get("period_end") or 0)
    transitions = invoice.get("status_transitions") or {}
    finalized_at = int(transitions.get("finalized_at") or event["created"])
    return await _finish(
        cp,
        event,
        f"closed period [{start}, {end}) of {invoice['id']}",
        closed=ClosedPeriod(invoice["id"], org_id, start, end, finalized_at),
    )


HANDLERS = {
    "checkout.session.completed": checkout_completed,
    "customer.subscription.deleted": subscription_deleted,
    "invoice.created": invoice_created,
    "invoice.finalized": invoice_finalized,
}
