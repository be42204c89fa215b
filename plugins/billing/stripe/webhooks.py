"""Stripe webhooks: verify, deduplicate, provision Pro, true up, record closed periods.

Every delivery is checked first: the ``Stripe-Signature`` header against the raw body with the
SDK (``stripe.WebhookSignature.verify_header``, ``stripe.webhook_tolerance_seconds``, 300 s by
default). A bad signature, a stale timestamp or a body changed after signing is refused with
400 and nothing is done. (The SDK's age check is one-sided: a timestamp ahead of our clock is
accepted, as Stripe's own libraries do; the signature still has to match.)

A signed body is then decoded with msgspec, never with ``json.loads``: first its event id, then
the whole event as the struct of its type (:class:`Event` of :class:`CheckoutSession`,
:class:`Subscription` or :class:`Invoice`), so a field of the wrong type or a missing one is
found before any work, with its path. What a signed delivery is answered:

==================================================  ======  =======================================
the delivery                                        answer  what is kept
==================================================  ======  =======================================
not a Stripe v1 event: not JSON, not an object,     400     nothing to record (no event id); an
no usable ``id``, nested deeper than                        alert and ``webhook.not_an_event``
:data:`MAX_DEPTH`, a v2 thin event
an event id already recorded                        200     the recorded outcome, no work
a handled type whose fields are unusable            200     ``unprocessable: <path>: <why>``, an
(``data.object.period_start: expected int,                  alert and ``webhook.unprocessable``
got str``)
``checkout.session.completed`` whose customer is    200     ``refused: ...``, an alert and
another org's                                               ``webhook.refused``; nothing provisioned
processing failed midway (Stripe down, no catalog)  5xx     nothing: Stripe's retry redoes it
==================================================  ======  =======================================

Unusable and refused events are answered 2xx because Stripe resends an event it got no 2xx for
for up to three days (docs.stripe.com/webhooks/process-undelivered-events), and the same signed
bytes can never become usable: retries would only delay the alert. Alerts are stored as the
``job:webhooks`` job's (``storage.record_alert``), at most one a second.

Event ids are recorded once an event is processed to the end, in the same transaction as its
storage changes; a redelivered id is answered 200 without work. When processing fails midway
(Stripe unreachable, no catalog yet) the answer is 5xx and nothing is recorded, so Stripe's
retry redoes it; every Stripe write is idempotent (an idempotency key, and a look for what a
lost earlier attempt created, since Stripe forgets keys after 24 h). Work for one org, and
provisioning for one Stripe customer, is serialised in this process, so concurrent duplicates
cannot race each other.

Types handled:

- ``checkout.session.completed`` in setup mode (org from ``client_reference_id`` or
  ``metadata.org_id``, customer from the session or the org): one Stripe customer maps to one
  org, so a customer that is already another org's is refused. Unless the org has a
  subscription whose status keeps the paid plan: the Checkout's SetupIntent payment method
  becomes the customer's invoice default, then one subscription with every price of the
  newest catalog version (metered prices without quantity; key ``sub:{org}:{version}``; see
  :mod:`~controlplane.plugins.billing.stripe.subscriptions`). Only when its status is paid
  (``[stripe.plan_policy]``): the welcome credit once per org (key ``credit:{org}``), then the
  org is `pro` from now. Otherwise (``incomplete``) the subscription and status are stored,
  the plan is left as it was, and an alert is raised. 503 when no catalog is published.
- ``customer.subscription.updated`` / ``.deleted`` for the org's current subscription: the
  subscription is retrieved (its own state decides, never arrival order), its status stored
  and the plan set by :func:`controlplane.subscriptions.plan_steps`, audited. Other
  subscriptions are ignored.
- ``invoice.created``: true-up; the org's buckets up to the invoice's ``period_end`` are rolled
  up (grace ignored) and sent before the answer. 503 if some could not be delivered yet.
- ``invoice.finalized``: the period is recorded as closed, keyed by invoice id; later
  corrections for it are stamped into the current period (see :mod:`controlplane.sender`).
- anything else: 200, ignored.

:class:`StripeWebhooks` is the :class:`~controlplane.interfaces.WebhookReceiver`. It is given
what it needs, never the control plane: the storage, the ``[stripe]`` section, a clock, whether
alerts are delivered (``parity.alert.webhook_url``), the billing plugin (provisioning needs
:class:`~controlplane.plugins.billing.stripe.StripeBilling`'s client; everything else works
whatever the billing plugin), and two callbacks from the core: the true-up (roll up and send one
org up to a time) and the re-issue of rows that missed a finalized invoice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Generic, TypeVar

import msgspec
import stripe
import structlog

from controlplane.config import StripeConfig
from controlplane.errors import ConfigError, ControlPlaneError, StorageError
from controlplane.interfaces import (
    WEBHOOK_ALERTS,
    AuditEntry,
    Billing,
    ClosedPeriod,
    NotAnEvent,
    Org,
    OrgChange,
    ParityAlert,
    PlanPeriod,
    ReissueCallback,
    Storage,
    TrueUpCallback,
    WebhookReceiver,
    WebhookRecord,
    WebhookRejected,
    WebhookResult,
)
from controlplane.plugins.billing.stripe import subscriptions as subs
from controlplane.plugins.billing.stripe.client import StripeBilling
from controlplane.secrets import reveal
from controlplane.subscriptions import is_paid, plan_at, plan_steps

log = structlog.get_logger("webhooks")

PRO_PLAN = "pro"
FREE_PLAN = "free"
ACTOR = "stripe-webhook"
ALERTS = WEBHOOK_ALERTS  # the webhook handler's alerts (ParityAlert.meter)
MAX_DEPTH = 64  # JSON nesting a signed body may have; Stripe's events are far shallower
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z


__all__ = [
    "ALERTS",
    "MAX_DEPTH",
    "CatalogNotPublished",
    "NotAnEvent",
    "StripeWebhooks",
    "TrueUpIncomplete",
    "WebhookNotConfigured",
    "WebhookRejected",
    "WebhookResult",
]


class WebhookNotConfigured(ControlPlaneError):
    """Stripe webhooks are not configured: set [stripe] webhook_secret."""


class CatalogNotPublished(ControlPlaneError):
    """No catalog version is published yet: run `controlplane catalog publish`."""


class TrueUpIncomplete(ControlPlaneError):
    """The true-up could not deliver every row yet; Stripe will retry the event."""


# the events, as decoded --------------------------------------------------------------------------

T = TypeVar("T")
StripeId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Timestamp = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMESTAMP)]
MAX_ORG_ID = 256  # as an event's subject (controlplane.events.Text)


class _Head(msgspec.Struct, frozen=True, kw_only=True):
    id: StripeId
    object: Any = None


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What every event has: enough to route and record it. `created` is checked only for
    the handled types (in :class:`Event`); here it is kept when it is a usable timestamp."""

    id: StripeId
    type: StripeId
    created: Any = None

    @property
    def created_at(self) -> int | None:
        c = self.created
        return c if type(c) is int and 0 <= c <= MAX_TIMESTAMP else None


class EventData(msgspec.Struct, Generic[T], frozen=True):
    object: T


class Event(Envelope, Generic[T], frozen=True, kw_only=True):
    """An event of a handled type, with its object decoded as `T`."""

    created: Timestamp
    data: EventData[T]


class CheckoutSession(msgspec.Struct, frozen=True, kw_only=True):
    id: StripeId
    mode: str | None = None
    client_reference_id: Annotated[str, msgspec.Meta(max_length=MAX_ORG_ID)] | None = None
    customer: StripeId | None = None
    metadata: dict[str, str] | None = None
    setup_intent: StripeId | None = None


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    id: StripeId
    status: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    ended_at: Timestamp | None = None
    canceled_at: Timestamp | None = None


class InvoiceSubscriptionDetails(msgspec.Struct, frozen=True, kw_only=True):
    subscription: StripeId | None = None


class InvoiceParent(msgspec.Struct, frozen=True, kw_only=True):
    subscription_details: InvoiceSubscriptionDetails | None = None


class InvoiceTransitions(msgspec.Struct, frozen=True, kw_only=True):
    finalized_at: Timestamp | None = None


class Invoice(msgspec.Struct, frozen=True, kw_only=True):
    id: StripeId
    customer: StripeId | None = None
    period_start: Timestamp
    period_end: Timestamp
    parent: InvoiceParent | None = None  # API 2025-03-31.basil and later
    subscription: StripeId | None = None  # before basil
    status_transitions: InvoiceTransitions | None = None


class Unusable(Exception):
    """A signed body's field that cannot be used: where, and why."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


_AT = re.compile(r"^(?P<why>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_STRING = re.compile(rb'"[^"]*"')  # once escaped backslashes and quotes are taken out
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _too_deep(body: bytes) -> bool:
    """Whether the JSON in `body` nests deeper than MAX_DEPTH (msgspec's decoder recurses).
    Linear in the body's length: no pattern here can backtrack."""
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", unescaped).translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_DEPTH:
        return False
    depth = 0
    for char in brackets:
        depth += 1 if char in b"[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def decode(body: bytes, kind: type[T]) -> T:
    """`body` as `kind`; else Unusable, with the field's path (``data.object.period_end``)."""
    if _too_deep(body):
        raise Unusable("(body)", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        found = _AT.match(str(exc))
        assert found is not None  # the pattern matches any text
        why, path = found["why"], (found["path"] or "").lstrip(".")
        if missing := _MISSING.match(why):
            path, why = ".".join(p for p in (path, missing["field"]) if p), "required"
        raise Unusable(path or "(body)", why.replace("`", "").lower()) from None
    except msgspec.DecodeError as exc:
        raise Unusable("(body)", str(exc).replace("`", "")) from None
    except RecursionError:
        raise Unusable("(body)", "JSON nested too deeply") from None


# the receiver ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StripeWebhooks(WebhookReceiver):
    """Stripe's webhook deliveries, with what handling them needs (see the module docstring)."""

    storage: Storage
    settings: StripeConfig  # the [stripe] section
    billing: Billing | None  # provisioning needs StripeBilling's client
    now: Callable[[], int]
    alerts_delivered: bool  # alerts are POSTed (parity.alert.webhook_url), not only logged
    true_up: TrueUpCallback
    reissue: ReissueCallback
    pro_prices: Sequence[str] = ()  # `[[plans]] prices` of pro: the catalog keys it holds

    async def receive(self, body: bytes, signature: str | None) -> WebhookResult:
        return await handle(self, body, signature)


def stripe_client(billing: Billing | None) -> stripe.StripeClient:
    """The billing plugin's Stripe client; ConfigError when billing is not Stripe."""
    if not isinstance(billing, StripeBilling):
        raise ConfigError('billing: the catalog and webhooks need [billing] backend = "stripe"')
    return billing.client


# verifying and dispatching -----------------------------------------------------------------------

# Per store (so per control plane): work for one org, or one customer, is serialised.
_locks: weakref.WeakKeyDictionary[Storage, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


def _lock(hooks: StripeWebhooks, key: str) -> asyncio.Lock:
    return _locks.setdefault(hooks.storage, {}).setdefault(key, asyncio.Lock())


def verify(hooks: StripeWebhooks, body: bytes, signature: str | None) -> None:
    """Check the signature against the raw body; WebhookRejected if it does not verify."""
    settings = hooks.settings
    if settings.webhook_secret is None:
        raise WebhookNotConfigured()
    secret = reveal(settings.webhook_secret, "stripe.webhook_secret")
    try:
        stripe.WebhookSignature.verify_header(
            body, signature or "", secret, tolerance=settings.webhook_tolerance_seconds
        )
    except stripe.SignatureVerificationError as exc:
        raise WebhookRejected(f"signature check failed: {exc.user_message or exc}") from None
    except UnicodeDecodeError:
        raise WebhookRejected("the body is not UTF-8") from None


async def handle(hooks: StripeWebhooks, body: bytes, signature: str | None) -> WebhookResult:
    """Verify and process one delivery (see the module docstring)."""
    verify(hooks, body, signature)
    try:
        head = decode(body, _Head)
        if head.object == "v2.core.event":
            raise Unusable("object", "a v2 thin event: this endpoint takes v1 (snapshot) events")
    except Unusable as exc:
        text = f"A signed Stripe webhook delivery is not a Stripe v1 event ({exc}); refused."
        log.warning("webhook.not_an_event", path=exc.path, error=exc.why)
        await _alert(hooks, f"not_an_event:{hooks.now()}", text)
        raise NotAnEvent(f"signed, but not a Stripe v1 event: {exc}") from None
    try:
        envelope, problem = decode(body, Envelope), None
    except Unusable as exc:
        envelope, problem = Envelope(id=head.id, type="unknown"), exc
    prior = await hooks.storage.webhook_outcome(envelope.id)
    # A redelivered invoice.finalized runs again (it is answered as a duplicate): the rows
    # that missed the invoice may not all have been re-issued the first time.
    if prior is not None and (problem is not None or envelope.type != "invoice.finalized"):
        log.info("webhook.duplicate", event_id=envelope.id, type=envelope.type)
        return WebhookResult(envelope.id, envelope.type, prior, duplicate=True)
    if problem is not None:
        return await _unprocessable(hooks, envelope, problem)
    route = ROUTES.get(envelope.type)
    if route is None:
        return WebhookResult(envelope.id, envelope.type, "ignored: type not handled")
    try:
        event = decode(body, route.event)
    except Unusable as exc:
        return await _unprocessable(hooks, envelope, exc)
    result = await route.run(hooks, event)
    log.info("webhook.processed", event_id=event.id, type=event.type, outcome=result.outcome)
    return result


def _record(event: Envelope, outcome: str) -> WebhookRecord:
    return WebhookRecord(
        event_id=event.id, type=event.type, created=event.created_at, outcome=outcome
    )


async def _finish(
    hooks: StripeWebhooks,
    event: Envelope,
    outcome: str,
    *,
    org: OrgChange | None = None,
    closed: ClosedPeriod | None = None,
    audit: tuple[AuditEntry, ...] = (),
) -> WebhookResult:
    fresh = await hooks.storage.record_webhook(
        _record(event, outcome), hooks.now(), org=org, closed=closed, audit=audit
    )
    if not fresh:
        prior = await hooks.storage.webhook_outcome(event.id) or outcome
        return WebhookResult(event.id, event.type, prior, duplicate=True)
    return WebhookResult(event.id, event.type, outcome)


async def _duplicate(hooks: StripeWebhooks, event: Envelope) -> WebhookResult | None:
    prior = await hooks.storage.webhook_outcome(event.id)
    if prior is None:
        return None
    return WebhookResult(event.id, event.type, prior, duplicate=True)


async def _alert(hooks: StripeWebhooks, key: str, text: str) -> None:
    """Store an alert where operators look (the job alerts); a storage failure is logged, not
    raised, so the delivery's answer does not depend on it."""
    now = hooks.now()
    alert = ParityAlert(
        meter=ALERTS,
        bucket_start=now,
        dedup_key=f"{ALERTS}:{key}",
        text=text,
        state="pending" if hooks.alerts_delivered else "logged",
        created_at=now,
    )
    try:
        await hooks.storage.record_alert(alert)
    except StorageError as exc:
        log.error("webhook.alert_failed", dedup_key=alert.dedup_key, error=str(exc))


async def _unprocessable(
    hooks: StripeWebhooks, event: Envelope, problem: Unusable
) -> WebhookResult:
    """Record a signed event that cannot be used as such, answered 2xx so Stripe stops
    resending it, and raise an alert (once: a redelivery finds the record)."""
    result = await _finish(hooks, event, f"unprocessable: {problem}")
    if not result.duplicate:
        log.warning(
            "webhook.unprocessable",
            event_id=event.id,
            type=event.type,
            path=problem.path,
            error=problem.why,
        )
        await _alert(
            hooks,
            event.id,
            f"Stripe event {event.id} ({event.type}) is unprocessable and was not applied: "
            f"{problem}. Look at it in the Stripe Dashboard and apply it by hand if needed.",
        )
    return result


# checkout.session.completed -------------------------------------------------------------------


async def checkout_completed(hooks: StripeWebhooks, event: Event[CheckoutSession]) -> WebhookResult:
    session = event.data.object
    if session.mode != "setup":
        return await _finish(hooks, event, f"ignored: mode {session.mode}, not setup")
    org_id = session.client_reference_id or (session.metadata or {}).get("org_id")
    if not org_id:
        log.warning("webhook.no_org", event_id=event.id, session=session.id)
        return await _finish(hooks, event, "ignored: no client_reference_id or metadata.org_id")
    if len(org_id) > MAX_ORG_ID:
        too_long = f"longer than {MAX_ORG_ID} characters"
        return await _unprocessable(hooks, event, Unusable("data.object.metadata.org_id", too_long))
    async with _lock(hooks, org_id):
        if (dup := await _duplicate(hooks, event)) is not None:
            return dup
        org = await hooks.storage.get_org(org_id)
        customer = session.customer or (org.customer if org else None)
        if not customer:
            log.warning("webhook.no_customer", event_id=event.id, org=org_id)
            return await _finish(hooks, event, "ignored: the session has no customer")
        # Taken inside the org's lock, never the other way round: two orgs claiming one
        # customer are decided one after the other.
        async with _lock(hooks, f"customer:{customer}"):
            owner = await hooks.storage.org_for_billing(subscription=None, customer=customer)
            if owner is not None and owner != org_id:
                return await _refused(hooks, event, org_id, customer, owner)
            # An unpaid subscription (incomplete, past_due...) is provisioned again: the new
            # checkout's card becomes the default and pays its open invoice.
            paid = hooks.settings.plan_policy.paid
            if org is not None and org.subscription and org.subscription_status in paid:
                return await _finish(
                    hooks, event, f"no-op: {org_id} already has {org.subscription}"
                )
            return await _provision(hooks, event, org_id, customer, org)


async def _refused(
    hooks: StripeWebhooks, event: Event[CheckoutSession], org_id: str, customer: str, owner: str
) -> WebhookResult:
    """One Stripe customer maps to one org: a checkout for another org is recorded, not
    applied (answered 2xx, so Stripe stops resending it), and alerted."""
    outcome = (
        f"refused: customer {customer} is org {owner}'s; one Stripe customer maps to one org, "
        f"so {org_id} was not provisioned"
    )
    result = await _finish(hooks, event, outcome)
    if not result.duplicate:
        log.warning(
            "webhook.refused",
            event_id=event.id,
            session=event.data.object.id,
            org=org_id,
            customer=customer,
            owner=owner,
        )
        await _alert(
            hooks,
            event.id,
            f"Stripe checkout {event.data.object.id} (event {event.id}) for org {org_id!r} used "
            f"customer {customer}, which is org {owner!r}'s: refused, nothing provisioned. "
            f"Give {org_id!r} its own Stripe customer and a new checkout.",
        )
    return result


async def _provision(
    hooks: StripeWebhooks,
    event: Event[CheckoutSession],
    org_id: str,
    customer: str,
    org: Org | None,
) -> WebhookResult:
    version = await hooks.storage.catalog_version()
    if version is None:
        raise CatalogNotPublished()
    client = stripe_client(hooks.billing)
    session = event.data.object
    pm = None
    if session.setup_intent:
        pm = await subs.checkout_payment_method(client, session.setup_intent)
        if pm is not None:
            await subs.make_invoice_default(client, customer, pm)
    sub = await subs.find_or_create(client, org_id, customer, version, session.id, hooks.pro_prices)
    if pm is not None and sub.status in subs.AWAITING_PAYMENT:
        sub = await subs.retry_payment(client, sub, pm)  # a new card for an unpaid subscription
    policy = hooks.settings.plan_policy
    before = msgspec.to_builtins(org) if org else None
    if not is_paid(policy, sub.status):
        return await _not_paid(hooks, event, org_id, customer, sub, before)
    credit = await subs.welcome_credit(client, org_id, customer, version, event.created)
    at = hooks.now()
    after = {
        "customer": customer,
        "subscription": sub.id,
        "subscription_status": sub.status,
        "credit_grant": credit,
        "catalog_version": version.version,
        "plan": PRO_PLAN,
        "effective_from": at,
    }
    return await _finish(
        hooks,
        event,
        f"provisioned: {sub.id}",
        org=OrgChange(
            org_id=org_id,
            customer=customer,
            subscription=sub.id,
            subscription_status=sub.status,
            plan=PRO_PLAN,
            effective_from=at,
        ),
        audit=(
            AuditEntry(
                action="org.provisioned",
                subject=org_id,
                actor=ACTOR,
                reason=f"{event.type} {event.id}",
                before=before,
                after=after,
            ),
        ),
    )


async def _not_paid(
    hooks: StripeWebhooks,
    event: Event[CheckoutSession],
    org_id: str,
    customer: str,
    sub: subs.SubscriptionState,
    before: Any,
) -> WebhookResult:
    """The subscription exists but is not paid (its first invoice could not be charged):
    linked and shown with its status, the plan left as it was, alerted."""
    result = await _finish(
        hooks,
        event,
        f"not provisioned: {sub.id} is {sub.status}; plan unchanged",
        org=OrgChange(
            org_id=org_id, customer=customer, subscription=sub.id, subscription_status=sub.status
        ),
        audit=(
            AuditEntry(
                action="org.subscription",
                subject=org_id,
                actor=ACTOR,
                reason=f"{event.type} {event.id}",
                before=before,
                after={"customer": customer, "subscription": sub.id, "status": sub.status},
            ),
        ),
    )
    if not result.duplicate:
        log.warning("webhook.not_paid", org=org_id, subscription=sub.id, status=sub.status)
        await _alert(
            hooks,
            f"{sub.status}:{sub.id}",
            f"Stripe subscription {sub.id} for org {org_id!r} is {sub.status} after checkout "
            f"{event.data.object.id}: its invoice could not be paid, so the org was not moved "
            "to the paid plan. It is when the invoice is paid (Stripe expires an incomplete "
            "subscription after 23 hours); a new checkout with another card retries it.",
        )
    return result


# customer.subscription.updated / .deleted ----------------------------------------------------


async def subscription_changed(hooks: StripeWebhooks, event: Event[Subscription]) -> WebhookResult:
    """Keep the org's subscription status current and its plan by the plan policy.

    Decided by the subscription's own state, never by arrival order: with the Stripe billing
    plugin the subscription is retrieved, so an old, redelivered or out-of-order event applies
    the status Stripe holds now. Without it (a control plane whose billing plugin is not
    Stripe, as in some tests) the event's own object is used, and then arrival order matters."""
    sub = event.data.object
    org_id = await hooks.storage.org_for_billing(subscription=sub.id, customer=None)
    if org_id is None:
        return await _finish(hooks, event, "ignored: not an org's current subscription")
    async with _lock(hooks, org_id):
        if (dup := await _duplicate(hooks, event)) is not None:
            return dup
        org = await hooks.storage.get_org(org_id)
        if org is None or org.subscription != sub.id:
            return await _finish(hooks, event, "ignored: stale subscription")
        if isinstance(hooks.billing, StripeBilling):
            state = await subs.retrieve(hooks.billing.client, sub.id)
        else:
            status = sub.status or (
                "canceled" if event.type == "customer.subscription.deleted" else None
            )
            if status is None:
                return await _unprocessable(
                    hooks, event, Unusable("data.object.status", "required")
                )
            state = subs.SubscriptionState(
                id=sub.id, status=status, ended_at=sub.ended_at, canceled_at=sub.canceled_at
            )
        return await _apply_status(hooks, event, org, state)


async def _apply_status(
    hooks: StripeWebhooks, event: Event[Subscription], org: Org, state: subs.SubscriptionState
) -> WebhookResult:
    policy = hooks.settings.plan_policy
    ended_at = state.ended_at or state.canceled_at if state.status in subs.ENDED else None
    steps = plan_steps(
        policy,
        org.plans,
        state.status,
        event.created,
        ended_at=ended_at,
        unpaid_since=state.unpaid_since,
    )
    if not steps and state.status == org.subscription_status:
        return await _finish(hooks, event, f"unchanged: {state.id} is {state.status}")
    if steps and is_paid(policy, state.status):
        await _credit_on_payment(hooks, org, event.created)
    plans = tuple(PlanPeriod(s.plan, s.effective_from) for s in steps)
    outcome = ", ".join(f"{s.plan} from {s.effective_from}" for s in steps) or (
        f"status {state.status}: plan unchanged"
    )
    return await _finish(
        hooks,
        event,
        outcome,
        org=OrgChange(org_id=org.org_id, subscription_status=state.status, plans=plans),
        audit=(
            AuditEntry(
                action="org.subscription",
                subject=org.org_id,
                actor=ACTOR,
                reason=f"{event.type} {event.id}",
                before={
                    "subscription": org.subscription,
                    "status": org.subscription_status,
                    "plan": plan_at(org.plans, event.created),
                },
                after={
                    "status": state.status,
                    "plans": [msgspec.to_builtins(p) for p in plans],
                },
            ),
        ),
    )


async def _credit_on_payment(hooks: StripeWebhooks, org: Org, event_created: int) -> None:
    """An org that becomes paid after an unpaid start gets its welcome credit then (once)."""
    version = await hooks.storage.catalog_version()
    if version is None or not isinstance(hooks.billing, StripeBilling) or not org.customer:
        return
    await subs.welcome_credit(
        hooks.billing.client, org.org_id, org.customer, version, event_created
    )


# invoices ----------------------------------------------------------------------------------------


async def _invoice_org(hooks: StripeWebhooks, invoice: Invoice) -> str | None:
    details = invoice.parent.subscription_details if invoice.parent else None
    subscription = (details.subscription if details else None) or invoice.subscription
    return await hooks.storage.org_for_billing(subscription=subscription, customer=invoice.customer)


async def invoice_created(hooks: StripeWebhooks, event: Event[Invoice]) -> WebhookResult:
    invoice = event.data.object
    org_id = await _invoice_org(hooks, invoice)
    if org_id is None:
        return await _finish(hooks, event, "ignored: no org for this invoice")
    start, end = invoice.period_start, invoice.period_end
    if end <= start:
        return await _finish(hooks, event, "true-up: empty period")
    async with _lock(hooks, org_id):
        if (dup := await _duplicate(hooks, event)) is not None:
            return dup
        done = await hooks.true_up(org_id, end)
        if done.undelivered:
            raise TrueUpIncomplete(
                f"true-up for {org_id}: {done.undelivered} rows not delivered yet"
            )
        outcome = f"true-up to {end}: {done.rows} rows, {done.sent} sent" + (
            f" (sending skipped: {done.skipped})" if done.skipped else ""
        )
        return await _finish(hooks, event, outcome)


async def invoice_finalized(hooks: StripeWebhooks, event: Event[Invoice]) -> WebhookResult:
    invoice = event.data.object
    org_id = await _invoice_org(hooks, invoice)
    if org_id is None:
        return await _finish(hooks, event, "ignored: no org for this invoice")
    start, end = invoice.period_start, invoice.period_end
    transitions = invoice.status_transitions
    finalized_at = (transitions.finalized_at if transitions else None) or event.created
    period = ClosedPeriod(invoice.id, org_id, start, end, finalized_at)
    result = await _finish(
        hooks, event, f"closed period [{start}, {end}) of {invoice.id}", closed=period
    )
    # Once the period is recorded closed (so the re-issues are stamped into the current one),
    # on every delivery, redeliveries included: a crash in between leaves the rows to them.
    await hooks.reissue(period)
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class _Route(Generic[T]):
    event: type[Event[T]]
    run: Callable[[StripeWebhooks, Event[T]], Awaitable[WebhookResult]]


ROUTES: dict[str, _Route[Any]] = {
    "checkout.session.completed": _Route(Event[CheckoutSession], checkout_completed),
    "customer.subscription.updated": _Route(Event[Subscription], subscription_changed),
    "customer.subscription.deleted": _Route(Event[Subscription], subscription_changed),
    "invoice.created": _Route(Event[Invoice], invoice_created),
    "invoice.finalized": _Route(Event[Invoice], invoice_finalized),
}
