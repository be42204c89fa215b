"""Stripe thin events from an event destination: the asynchronous meter-event errors.

Stripe answers a meter event before validating all of it; what fails later is reported in thin
events (docs/reference/stripe-behaviour.md ME-9, ME-15 to ME-18, TE-1 to TE-12). Every delivery
is verified and parsed with the SDK, ``StripeClient.parse_event_notification`` (the
``Stripe-Signature`` header against the raw body with ``[stripe] event_destination_secret``,
``webhook_tolerance_seconds``), then:

=================================================  ======  ====================================
the delivery                                       answer  what is done
=================================================  ======  ====================================
bad or missing signature, stale timestamp          400     nothing
signed, but not a v2 thin event (a v1 event, not   400     an alert; nothing else
JSON, no id or type)
an event id already recorded                       200     nothing again (``duplicate``)
``v1.billing.meter.error_report_triggered`` or     200     the full event is fetched
``v1.billing.meter.no_meter_found``                        (``fetch_event``, TE-3); every
                                                           sampled identifier that is a ledger
                                                           row the provider has becomes
                                                           ``held``/``provider_error`` with the
                                                           code in ``detail``; a
                                                           customer-not-found code flags the
                                                           org; counts by code go to
                                                           ``controlplane_provider_errors``; an
                                                           alert names the codes, the rows and,
                                                           for no-meter-found, the event names
Stripe unreachable while fetching the event        5xx     nothing recorded: Stripe resends
any other type                                     200     recorded, ignored
=================================================  ======  ====================================

The event id is recorded in the transaction that holds the rows
(:meth:`~controlplane.interfaces.ProviderErrorStore.hold_provider_errors`), so a redelivery, or
two racing deliveries, change the ledger once. Samples are partial (``error_count`` can exceed
them): the rows not sampled stay ``sent`` until reconciliation finds them.

Releasing a ``provider_error`` row (see docs/explanation/invariants.md) re-issues its usage under
a new identifier once the cause is fixed: Stripe keeps the old identifier for at least 24 hours
and answers it "already exists", which the sender would take as delivered, and the reported
event was never counted, so a new identifier cannot bill twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import stripe
import structlog

from controlplane.config import StripeConfig
from controlplane.errors import BillingError, ControlPlaneError, StorageError
from controlplane.interfaces import (
    Billing,
    HeldErrors,
    NotAnEvent,
    ParityAlert,
    ProviderError,
    Storage,
    WebhookRecord,
    WebhookRejected,
    WebhookResult,
)
from controlplane.ledger import CUSTOMER_NOT_FOUND
from controlplane.plugins.billing.stripe.webhooks import ALERTS, stripe_client
from controlplane.secrets import reveal

log = structlog.get_logger("thin_events")

ACTOR = "stripe-thin-event"
ERROR_REPORT = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND = "v1.billing.meter.no_meter_found"
HANDLED = (ERROR_REPORT, NO_METER_FOUND)


class ThinEventsNotConfigured(ControlPlaneError):
    """Stripe thin events are not configured: set [stripe] event_destination_secret."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StripeThinEvents:
    """Thin events from a Stripe event destination, with what handling them needs."""

    storage: Storage
    settings: StripeConfig  # the [stripe] section
    billing: Billing | None  # fetching the full event needs StripeBilling's client
    now: Callable[[], int]
    alerts_delivered: bool  # alerts are POSTed (parity.alert.webhook_url), not only logged
    count_errors: Callable[[str, int], None]  # (code, events): the metric

    async def receive(self, body: bytes, signature: str | None) -> WebhookResult:
        """Verify and process one delivery; WebhookRejected (NotAnEvent for a signed body
        that is not a thin event) when nothing was done."""
        if self.settings.event_destination_secret is None:
            raise ThinEventsNotConfigured()
        secret = reveal(self.settings.event_destination_secret, "stripe.event_destination_secret")
        try:
            stripe.WebhookSignature.verify_header(
                body, signature or "", secret, tolerance=self.settings.webhook_tolerance_seconds
            )
        except stripe.SignatureVerificationError as exc:
            raise WebhookRejected(f"signature check failed: {exc.user_message or exc}") from None
        except UnicodeDecodeError:
            raise WebhookRejected("the body is not UTF-8") from None
        # Verified above so that a bad signature and a body that is not a thin event are told
        # apart; the SDK's parse verifies again, cheaply, and builds the typed notification.
        client = stripe_client(self.billing)
        try:
            notification: Any = client.parse_event_notification(
                body, signature, secret, tolerance=self.settings.webhook_tolerance_seconds
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            text = f"A signed Stripe thin-event delivery is not a v2 thin event ({exc}); refused."
            log.warning("thin_event.not_an_event", error=str(exc))
            await self._alert(f"thin_not_an_event:{self.now()}", text)
            raise NotAnEvent(f"signed, but not a Stripe thin event: {exc}") from None
        event_id, kind = str(notification.id), str(notification.type)
        prior = await self.storage.webhook_outcome(event_id)
        if prior is not None:
            log.info("thin_event.duplicate", event_id=event_id, type=kind)
            return WebhookResult(event_id, kind, prior, duplicate=True)
        if kind not in HANDLED:
            record = WebhookRecord(event_id, kind, None, "ignored: type not handled")
            fresh = await self.storage.record_webhook(record, self.now())
            return WebhookResult(event_id, kind, record.outcome, duplicate=not fresh)
        try:
            full: Any = await notification.fetch_event_async()
        except stripe.StripeError as exc:
            raise BillingError(
                f"Stripe fetch event {event_id}: {exc.user_message or type(exc).__name__}"
            ) from exc
        counts, errors = _errors(full)
        meter = getattr(getattr(notification, "related_object", None), "id", None)
        outcome = "error report: " + ", ".join(f"{c} x{n}" for c, n in counts.items())
        record = WebhookRecord(event_id, kind, None, outcome)
        held = await self.storage.hold_provider_errors(record, errors, self.now(), ACTOR)
        if held is None:
            prior = await self.storage.webhook_outcome(event_id) or outcome
            return WebhookResult(event_id, kind, prior, duplicate=True)
        for code, events in counts.items():
            self.count_errors(code, events)
        log.warning(
            "thin_event.error_report",
            event_id=event_id,
            type=kind,
            meter=meter,
            counts=counts,
            held=held.held,
            unmatched=held.unmatched,
            flagged=held.flagged,
        )
        await self._alert(event_id, _alert_text(kind, event_id, meter, counts, errors, held))
        return WebhookResult(event_id, kind, f"{outcome}; held {len(held.held)} rows")

    async def _alert(self, key: str, text: str) -> None:
        """Store an alert with the webhook handler's (delivered to the alert webhook when one
        is configured); a storage failure is logged, not raised."""
        now = self.now()
        found = ParityAlert(
            meter=ALERTS,
            bucket_start=now,
            dedup_key=f"{ALERTS}:{key}",
            text=text,
            state="pending" if self.alerts_delivered else "logged",
            created_at=now,
        )
        try:
            await self.storage.record_alert(found)
        except StorageError as exc:
            log.error("thin_event.alert_failed", dedup_key=found.dedup_key, error=str(exc))


def _errors(full: Any) -> tuple[dict[str, int], list[ProviderError]]:
    """Counts by code, and every sampled error, from a fetched error-report event."""
    data: dict[str, Any] = full.to_dict().get("data") or {}
    counts: dict[str, int] = {}
    errors: list[ProviderError] = []
    for kind in (data.get("reason") or {}).get("error_types") or []:
        code = str(kind.get("code") or "unknown")
        counts[code] = counts.get(code, 0) + int(kind.get("error_count") or 0)
        for sample in kind.get("sample_errors") or []:
            identifier = (sample.get("request") or {}).get("identifier")
            if isinstance(identifier, str) and identifier:
                errors.append(
                    ProviderError(identifier, code, str(sample.get("error_message") or ""))
                )
    return counts, errors


def _alert_text(
    kind: str,
    event_id: str,
    meter: str | None,
    counts: dict[str, int],
    errors: list[ProviderError],
    held: HeldErrors,
) -> str:
    by_code = ", ".join(f"{code}: {n}" for code, n in counts.items())
    where = f" for meter {meter}" if meter else ""
    text = f"Stripe reported invalid meter events{where} ({kind} {event_id}): {by_code}."
    if kind == NO_METER_FOUND:
        messages = sorted({e.message for e in errors if e.message})
        text += " No meter matched: " + "; ".join(messages) + "."
    if held.held:
        text += f" Held as provider_error: {', '.join(held.held)}."
    if held.flagged:
        text += (
            f" Stripe did not find the customer of org(s) {', '.join(held.flagged)} "
            f"({CUSTOMER_NOT_FOUND}): check their customer mapping."
        )
    if sum(counts.values()) > len(errors):
        text += " Samples are partial: reconciliation finds the other events."
    return text
