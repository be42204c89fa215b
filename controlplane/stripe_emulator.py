"""A stateful Stripe emulator: a test double of Stripe for the endpoints the control plane uses.

It is an ASGI app, served by a small built-in HTTP/1.1 server, that the real ``stripe`` SDK
talks to over HTTP::

    client = stripe.StripeClient("sk_test_x", base_addresses={"api": "http://127.0.0.1:12111"})

Run it with ``controlplane stripe-emulator --port 12111`` (see :func:`run`; ``--webhook-url URL
[--webhook-secret whsec_...]`` registers an endpoint receiving every event,
``--invoice-finalize-delay S`` sets when drafts finalize), or in-process from a test with
``async with serve_emulator(StripeEmulator()) as url: ...``.

Emulated endpoints (form-encoded bodies exactly as the SDK sends them, ``a[b][c]=v`` and
``items[0][price]=p``; query strings on GET):

- ``POST /v1/customers``, ``GET /v1/customers/{id}``, ``GET /v1/customers``
- ``POST /v1/billing/meters``, ``GET /v1/billing/meters``, ``GET /v1/billing/meters/{id}``,
  ``POST /v1/billing/meters/{id}/deactivate`` and ``/reactivate``
- ``POST /v1/billing/meter_events``
- ``POST /v1/billing/meter_event_adjustments`` (``type=cancel``)
- ``GET /v1/billing/meters/{id}/event_summaries``
- ``POST /v1/products``, ``GET /v1/products`` (``active``, ``ids[]``), ``GET`` and ``POST``
  ``/v1/products/{id}``
- ``POST /v1/prices``, ``GET /v1/prices`` (``lookup_keys[]``, ``active``, ``product``,
  ``currency``, ``type``, ``recurring[...]``), ``GET /v1/prices/{id}``, ``POST /v1/prices/{id}``
  (``active``, ``lookup_key`` + ``transfer_lookup_key``, ``nickname``, ``metadata``)
- ``POST /v1/subscriptions``, ``GET /v1/subscriptions`` (``customer``, ``price``, ``status``),
  ``GET /v1/subscriptions/{id}``, ``DELETE /v1/subscriptions/{id}`` (cancel; ``invoice_now``)
- ``GET /v1/invoices`` (``customer``, ``subscription``, ``status``), ``GET /v1/invoices/{id}``,
  ``POST /v1/invoices/{id}/finalize``
- ``POST /v1/billing/credit_grants``, ``GET /v1/billing/credit_grants`` (``customer``),
  ``GET /v1/billing/credit_grants/{id}``, ``POST .../{id}/void`` and ``/expire``,
  ``GET /v1/billing/credit_balance_summary``
- ``POST /v1/checkout/sessions`` (``mode=setup`` only), ``GET /v1/checkout/sessions/{id}``,
  ``POST /v1/checkout/sessions/{id}/expire``; ``GET /v1/setup_intents/{id}``
- ``POST /v1/webhook_endpoints``, ``GET /v1/webhook_endpoints``, ``GET``, ``POST`` (update,
  ``disabled``) and ``DELETE`` ``/v1/webhook_endpoints/{id}``
- ``GET /v1/events`` (``type`` with ``*`` wildcards, ``types[]``, ``delivery_success``,
  ``created``), ``GET /v1/events/{id}``

Stripe rules it enforces:

- ``Authorization: Bearer sk_...`` (or ``rk_...``; or Basic with the key as user name, as
  ``curl -u sk_test_...:`` sends) on every ``/v1`` call, else 401.
- Unknown parameters are refused (``parameter_unknown``), as Stripe does.
- A meter's ``event_name`` is unique among meters; formula ``sum``, ``count`` or ``last``.
- Meter events: ``event_name`` must name an active meter; the payload must carry the meter's
  customer key naming an existing customer and (except for ``count`` meters) its value key;
  the value is a whole number (an integer string, may be negative, at most 15 digits);
  ``timestamp`` within the past 35 days and at most 5 minutes ahead of the emulator clock;
  ``identifier`` (generated when absent, at most 100 characters) unique for 24 hours: a second
  event with it gets HTTP 400 ``An event already exists with identifier {id}.`` with header
  ``Stripe-Should-Retry: false``. After 24 hours (emulator clock) the identifier is forgotten
  and an event reusing it is accepted and counted again, which is the hazard the control
  plane's ledger guards against. Real Stripe reports some of these (unknown meter or customer)
  asynchronously through error reports; the emulator answers them synchronously with 400, using
  the codes of Stripe's error-report enum (``no_meter``, ``meter_event_customer_not_found``...).
- One concurrent call per customer per meter: a meter event that arrives while another for the
  same (event name, customer) is still being processed gets 429 ``lock_timeout``. Processing
  is atomic, so this can only happen while an injected latency is holding the first one.
- Adjustments cancel an event by identifier only within 24 hours of the emulator receiving it;
  a cancelled event no longer counts in summaries.
- Summaries aggregate non-cancelled events with timestamp in ``[start_time, end_time)`` for one
  customer by the meter's formula; both bounds must be minute-aligned (hour- or day-aligned with
  ``value_grouping_window``). Unlike Stripe, they are immediately consistent.
- Idempotency keys (every POST), following Stripe's v1 rules: the first response is saved once
  the endpoint has begun executing, that is every 2xx and every injected fault that happens
  *after* the write (``fail_after_write_rate``, and the 200 behind a dropped connection), and is
  replayed (status and body, headers ``Idempotent-Replayed: true`` and ``Original-Request``) for
  the same key, endpoint and parameters. Nothing is saved for requests that failed validation
  (4xx), were rate-limited (429) or hit an injected pre-write 500, so those are safe to retry.
  The same key with other parameters or another endpoint gets 400 ``idempotency_error``. Keys
  are forgotten after 24 hours (emulator clock).
- Prices: ``product`` (existing) or ``product_data``; exactly one of ``unit_amount`` and
  ``unit_amount_decimal`` (at most 12 decimals), ``billing_scheme=per_unit`` only; amounts can
  never be edited (not an update parameter). ``recurring[interval]`` day/week/month/year, at most
  three years; ``usage_type=metered`` needs ``recurring[meter]`` naming a meter (since basil:
  ``... metered prices must be backed by meters.``) and only metered prices take one. A lookup
  key (at most 200 characters) belongs to one price in the account, active or not: another
  price asking for it gets 400 ``A price (`price_...`) already uses that lookup key.``, unless
  ``transfer_lookup_key=true``, which atomically clears it from the holder (still active; it
  gets ``price.updated`` with ``previous_attributes.lookup_key``) and gives it to this price.
  ``lookup_keys[]`` takes at most 10 keys.
- Subscriptions: an existing customer and at least one item; each item an active recurring
  price, at most once, all of one currency and interval; ``quantity`` (default 1) only on
  licensed prices: on a metered one it is refused with ``You cannot set the quantity for
  metered plans.``, and metered items carry no ``quantity``. The billing period is on the items
  (``current_period_start``/``_end``, the basil shape); months keep the anchor's day, clamped
  to the month's end. New subscriptions are ``active`` (payments are not emulated, and no
  ``subscription_create`` invoice is made). The list leaves canceled ones out unless
  ``status=canceled``/``ended``/``all``. Cancelling sets ``canceled``; a canceled subscription
  cannot be canceled again.
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
  credits and freezes the invoice: later usage or cancellations no longer change it. A
  cancellation with ``invoice_now=true`` bills the usage so far on a last invoice
  (``billing_reason=subscription_update``). Invoices are never paid.
- Billing credits: ``amount[type]=monetary`` with a currency and a positive integer value;
  ``applicability_config[scope]`` is ``price_type=metered`` or ``prices[]`` (at most 20), not
  both; ``category`` paid/promotional; ``priority`` 0-100 (default 50). At finalization they
  reduce metered lines only (``pretax_credit_amounts``), by priority, soonest expiry,
  promotional before paid, oldest first.
- Checkout Sessions: ``mode=setup`` only; ``currency`` required unless
  ``allowed_payment_method_types``; ``customer`` excludes ``customer_creation`` and
  ``customer_email``; ``expires_at`` 30 minutes to 24 hours ahead (default 24 hours; they then
  expire with ``checkout.session.expired``). Completing one (a test hook, or visiting its
  ``url``) creates a customer only if none was given and ``customer_creation=always`` (setup
  mode creates none otherwise), a succeeded SetupIntent with a new payment method, and sets
  ``status=complete``, ``payment_status=no_payment_required``.
- Events: each of these changes is recorded as a v1 ``event`` (``evt_...``, ``api_version``
  ``2026-10-28.endive``, ``data.object`` a snapshot, ``data.previous_attributes`` on
  ``*.updated``, ``request.id``/``request.idempotency_key`` of the API call behind it, null for
  test hooks and time passing, ``pending_webhooks`` = endpoints not yet answering 2xx),
  listed newest first and kept 30 days: ``customer.created``, ``product.created/updated``,
  ``price.created/updated``, ``customer.subscription.created/updated/deleted`` (``updated`` at
  each renewal), ``invoice.created``, ``invoice.finalized``, ``billing.credit_grant.created/
  updated``, ``setup_intent.created/succeeded``, ``checkout.session.completed/expired``.
- Webhook endpoints: ``url`` (http or https; loopback allowed, unlike Stripe) and
  ``enabled_events[]`` (types, or ``*``); the ``whsec_...`` ``secret`` is in the create
  response only. Each event is POSTed, as its exact JSON, to every enabled endpoint subscribed
  to its type, by a background task on the serving loop, with ``Content-Type:
  application/json; charset=utf-8`` and ``Stripe-Signature: t=<unix>,v1=<hex>``, the
  HMAC-SHA256 of ``"{t}.{body}"`` keyed with the secret, computed per attempt (see
  :func:`signature_header`; ``t`` is the emulator clock, so after ``advance`` it is in the
  future, which ``stripe.Webhook.construct_event`` accepts). A non-2xx answer, a timeout or a
  connection error is retried with backoff, up to ``max_attempts``; each attempt is logged in
  :attr:`StripeEmulator.deliveries`. Attempts go one at a time, first attempts in event order
  (a slow endpoint delays the others by at most its ``timeout``).

Webhook settings, at construction (``webhooks=WebhookSettings(...)``) or at run time
(:meth:`StripeEmulator.set_webhooks`, ``POST /_emulator/webhooks``): ``max_attempts`` (4),
``retry_base`` (0.05 s of real time, doubling per retry) and ``retry_max`` (2 s), ``timeout``
(5 s per attempt), ``duplicate_rate`` / ``duplicate_next`` (deliver a fraction of events, or
the next N, twice: same event id, separately signed), ``hold`` (queue first attempts instead of
sending them; :meth:`StripeEmulator.release_webhooks` or ``POST /_emulator/webhooks/release``
``{"order": "reverse"|"shuffle"|"fifo"}`` sends what is held, out of order if asked; turning
``hold`` off releases in order).

Faults, set at construction or at run time (:meth:`StripeEmulator.set_faults`,
``POST /_emulator/faults``), drawn from one seedable ``random.Random``:

- ``rate_limit``: requests per second across all callers, a token bucket holding one second's
  worth (Stripe's limiters are token buckets); beyond it 429 ``rate_limit`` with
  ``Retry-After: 1`` and nothing applied.
- ``fail_rate`` / ``fail_next``: fraction of POSTs (or the next N POSTs) answered 500
  ``api_error`` with nothing applied.
- ``fail_after_write_rate``: fraction of new meter events that are applied and then answered 500
  (saved under the idempotency key, as Stripe does).
- ``drop_rate`` / ``drop_next``: fraction of successful meter-event responses (or the next N),
  fresh or replayed, whose connection is cut after the headers: the client sees a connection
  error although a fresh write was applied.
- ``latency_ms``: sleep before processing each ``/v1`` request.

Test hooks, without auth (JSON bodies; errors are ``{"error": {...}}`` with a 4xx):

- ``GET /_emulator/state``: counters, see :meth:`StripeEmulator.state`; ``?identifiers=1`` adds
  every identifier's acceptance count.
- ``POST /_emulator/clock`` ``{"advance": seconds}``: what falls due on the way happens
  (period ends, automatic finalizations, session expiries).
- ``POST /_emulator/faults``, ``POST /_emulator/reset``.
- ``POST /_emulator/checkout/{id}/complete`` ``{"email"?, "name"?}``: the customer finishes the
  session; answers the session. ``GET /_emulator/checkout/{id}`` (the session's ``url``) does
  the same and redirects (303) to ``success_url`` with ``{CHECKOUT_SESSION_ID}`` filled in.
- ``POST /_emulator/subscriptions/{id}/advance`` ``{"at": "period_end"|"now"}``: close the
  current period, by moving the clock to its end (default) or by ending it now and restarting
  the cycle there; answers ``{"invoice", "subscription", "now"}``.
- ``POST /_emulator/invoices/{id}/finalize``; ``POST /_emulator/billing``
  ``{"invoice_finalize_delay": seconds|null}``.
- ``GET``/``POST /_emulator/webhooks`` (settings), ``POST /_emulator/webhooks/release``,
  ``POST /_emulator/webhooks/flush`` ``{"timeout": s}`` (wait until nothing is queued or in
  flight; answers ``{"idle", "pending"}``), ``POST /_emulator/events/{id}/redeliver``
  ``{"endpoint"?}``, ``GET /_emulator/deliveries?event=&endpoint=&type=`` (the attempt log:
  ``event``, ``type``, ``endpoint``, ``url``, ``attempt``, ``status``, ``error``, ``ok``,
  ``will_retry``, ``duplicate``, ``redelivery``, ``signed_at``, ``at``, ``response``; plus
  ``pending`` and ``held``), ``POST /_emulator/webhook_endpoints`` ``{"url", "enabled_events",
  "secret"?}`` (register with a chosen secret, e.g. the one in a config file).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import contextlib
import copy
import dataclasses
import hashlib
import heapq
import hmac
import math
import random
import re
import socket
import string
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import msgspec
import structlog

__all__ = [
    "DEFAULT_PORT",
    "EmulatorServer",
    "Faults",
    "StripeEmulator",
    "WebhookSettings",
    "main",
    "parse_form",
    "run",
    "serve_emulator",
    "serve_emulator_in_thread",
    "signature_header",
]

DEFAULT_PORT = 12111  # the port stripe-mock uses, so tools pointed at it find this one
DAY = 86_400
IDENTIFIER_MEMORY_SECONDS = DAY
IDEMPOTENCY_KEY_SECONDS = DAY
CANCEL_WINDOW_SECONDS = DAY
MAX_PAST_SECONDS = 35 * DAY
MAX_FUTURE_SECONDS = 300
MAX_IDENTIFIER_LENGTH = 100
MAX_EVENT_NAME_LENGTH = 100
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_VALUE_DIGITS = 15
API_VERSION = "2026-10-28.endive"  # the stripe SDK 16.1.0 pin, carried by every event
EVENT_RETENTION_SECONDS = 30 * DAY
MAX_LOOKUP_KEY_LENGTH = 200
MAX_LOOKUP_KEYS = 10
MAX_EVENT_TYPES = 20
MAX_CREDIT_GRANT_PRICES = 20
CHECKOUT_LIFETIME_SECONDS = DAY
DEFAULT_INVOICE_FINALIZE_DELAY = 3600.0  # Stripe waits an hour after invoice.created
INTERVALS = ("day", "week", "month", "year")
MAX_INTERVAL_COUNT = {"day": 3 * 365, "week": 3 * 52, "month": 36, "year": 3}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Json = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Response shapes, from Stripe's published OpenAPI fixtures (stripe/openapi fixtures3.json, MIT)

CUSTOMER_SHAPE: Json = {
    "id": "cus_",
    "object": "customer",
    "address": None,
    "balance": 0,
    "created": 0,
    "currency": None,
    "default_source": None,
    "delinquent": False,
    "description": None,
    "discount": None,
    "email": None,
    "invoice_prefix": "",
    "invoice_settings": {
        "custom_fields": None,
        "default_payment_method": None,
        "footer": None,
        "rendering_options": None,
    },
    "livemode": False,
    "metadata": {},
    "name": None,
    "next_invoice_sequence": 1,
    "phone": None,
    "preferred_locales": [],
    "shipping": None,
    "tax_exempt": "none",
    "test_clock": None,
}

METER_SHAPE: Json = {
    "id": "mtr_",
    "object": "billing.meter",
    "created": 0,
    "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
    "default_aggregation": {"formula": "sum"},
    "display_name": "",
    "event_name": "",
    "event_time_window": None,
    "livemode": False,
    "status": "active",
    "status_transitions": {"deactivated_at": None},
    "updated": 0,
    "value_settings": {"event_payload_key": "value"},
}

PRODUCT_SHAPE: Json = {
    "id": "prod_",
    "object": "product",
    "active": True,
    "created": 0,
    "default_price": None,
    "description": None,
    "images": [],
    "livemode": False,
    "marketing_features": [],
    "metadata": {},
    "name": "",
    "package_dimensions": None,
    "shippable": None,
    "statement_descriptor": None,
    "tax_code": None,
    "type": "service",
    "unit_label": None,
    "updated": 0,
    "url": None,
}

PRICE_SHAPE: Json = {
    "id": "price_",
    "object": "price",
    "active": True,
    "billing_scheme": "per_unit",
    "created": 0,
    "currency": "usd",
    "custom_unit_amount": None,
    "livemode": False,
    "lookup_key": None,
    "metadata": {},
    "nickname": None,
    "product": "",
    "recurring": None,
    "tax_behavior": "unspecified",
    "tiers_mode": None,
    "transform_quantity": None,
    "type": "one_time",
    "unit_amount": None,
    "unit_amount_decimal": None,
}

SUBSCRIPTION_SHAPE: Json = {
    "id": "sub_",
    "object": "subscription",
    "application": None,
    "application_fee_percent": None,
    "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
    "billing_cycle_anchor": 0,
    "billing_cycle_anchor_config": None,
    "billing_mode": {"flexible": None, "type": "classic"},
    "billing_thresholds": None,
    "cancel_at": None,
    "cancel_at_period_end": False,
    "canceled_at": None,
    "cancellation_details": {"comment": None, "feedback": None, "reason": None},
    "collection_method": "charge_automatically",
    "created": 0,
    "currency": "usd",
    "customer": "",
    "customer_account": None,
    "days_until_due": None,
    "default_payment_method": None,
    "default_source": None,
    "default_tax_rates": [],
    "description": None,
    "discounts": [],
    "ended_at": None,
    "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
    "items": {"object": "list", "data": [], "has_more": False, "total_count": 0, "url": ""},
    "latest_invoice": None,
    "livemode": False,
    "metadata": {},
    "next_pending_invoice_item_invoice": None,
    "on_behalf_of": None,
    "pause_collection": None,
    "payment_settings": {
        "payment_method_options": None,
        "payment_method_types": None,
        "save_default_payment_method": "off",
    },
    "pending_invoice_item_interval": None,
    "pending_setup_intent": None,
    "pending_update": None,
    "schedule": None,
    "start_date": 0,
    "status": "active",
    "test_clock": None,
    "transfer_data": None,
    "trial_end": None,
    "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
    "trial_start": None,
}

INVOICE_SHAPE: Json = {
    "id": "in_",
    "object": "invoice",
    "account_country": "US",
    "account_name": None,
    "account_tax_ids": None,
    "amount_due": 0,
    "amount_overpaid": 0,
    "amount_paid": 0,
    "amount_remaining": 0,
    "amount_shipping": 0,
    "application": None,
    "attempt_count": 0,
    "attempted": False,
    "auto_advance": True,
    "automatic_tax": {
        "disabled_reason": None,
        "enabled": False,
        "liability": None,
        "provider": None,
        "status": None,
    },
    "automatically_finalizes_at": None,
    "billing_reason": "subscription_cycle",
    "collection_method": "charge_automatically",
    "created": 0,
    "currency": "usd",
    "custom_fields": None,
    "customer": "",
    "customer_account": None,
    "customer_address": None,
    "customer_email": None,
    "customer_name": None,
    "customer_phone": None,
    "customer_shipping": None,
    "customer_tax_exempt": "none",
    "customer_tax_ids": [],
    "default_payment_method": None,
    "default_source": None,
    "default_tax_rates": [],
    "description": None,
    "discounts": [],
    "due_date": None,
    "effective_at": None,
    "ending_balance": None,
    "footer": None,
    "from_invoice": None,
    "hosted_invoice_url": None,
    "invoice_pdf": None,
    "issuer": {"type": "self"},
    "last_finalization_error": None,
    "latest_revision": None,
    "lines": {"object": "list", "data": [], "has_more": False, "url": ""},
    "livemode": False,
    "metadata": {},
    "next_payment_attempt": None,
    "number": None,
    "on_behalf_of": None,
    "parent": None,
    "period_end": 0,
    "period_start": 0,
    "post_payment_credit_notes_amount": 0,
    "pre_payment_credit_notes_amount": 0,
    "receipt_number": None,
    "starting_balance": 0,
    "statement_descriptor": None,
    "status": "draft",
    "status_transitions": {
        "finalized_at": None,
        "marked_uncollectible_at": None,
        "paid_at": None,
        "voided_at": None,
    },
    "subtotal": 0,
    "subtotal_excluding_tax": 0,
    "test_clock": None,
    "total": 0,
    "total_discount_amounts": [],
    "total_excluding_tax": 0,
    "total_pretax_credit_amounts": [],
    "total_taxes": [],
    "webhooks_delivered_at": None,
}

CHECKOUT_SESSION_SHAPE: Json = {
    "id": "cs_test_",
    "object": "checkout.session",
    "adaptive_pricing": None,
    "after_expiration": None,
    "allow_promotion_codes": None,
    "amount_subtotal": None,
    "amount_total": None,
    "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
    "billing_address_collection": None,
    "cancel_url": None,
    "client_reference_id": None,
    "client_secret": None,
    "collected_information": None,
    "consent": None,
    "consent_collection": None,
    "created": 0,
    "currency": None,
    "currency_conversion": None,
    "custom_fields": [],
    "custom_text": {
        "after_submit": None,
        "shipping_address": None,
        "submit": None,
        "terms_of_service_acceptance": None,
    },
    "customer": None,
    "customer_account": None,
    "customer_creation": None,
    "customer_details": None,
    "customer_email": None,
    "discounts": None,
    "expires_at": 0,
    "invoice": None,
    "invoice_creation": None,
    "livemode": False,
    "locale": None,
    "metadata": {},
    "mode": "setup",
    "origin_context": None,
    "payment_intent": None,
    "payment_link": None,
    "payment_method_collection": "always",
    "payment_method_configuration_details": None,
    "payment_method_options": {},
    "payment_method_types": ["card"],
    "payment_status": "no_payment_required",
    "permissions": None,
    "phone_number_collection": {"enabled": False},
    "recovered_from": None,
    "saved_payment_method_options": None,
    "setup_intent": None,
    "shipping_address_collection": None,
    "shipping_cost": None,
    "shipping_options": [],
    "status": "open",
    "submit_type": None,
    "subscription": None,
    "success_url": None,
    "total_details": None,
    "ui_mode": "hosted_page",
    "url": None,
    "wallet_options": None,
}

SETUP_INTENT_SHAPE: Json = {
    "id": "seti_",
    "object": "setup_intent",
    "application": None,
    "automatic_payment_methods": None,
    "cancellation_reason": None,
    "client_secret": "",
    "created": 0,
    "customer": None,
    "customer_account": None,
    "description": None,
    "flow_directions": None,
    "last_setup_error": None,
    "latest_attempt": None,
    "livemode": False,
    "mandate": None,
    "metadata": {},
    "next_action": None,
    "on_behalf_of": None,
    "payment_method": None,
    "payment_method_configuration_details": None,
    "payment_method_options": {},
    "payment_method_types": ["card"],
    "single_use_mandate": None,
    "status": "succeeded",
    "usage": "off_session",
}

MESSAGE_UNKNOWN_ERROR = (
    "Sorry, something went wrong on our end (injected by the Stripe emulator). "
    "Please retry the request."
)
MESSAGE_RATE_LIMIT = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
MESSAGE_LOCK_TIMEOUT = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request. If you see "
    "this error frequently and are making multiple concurrent requests to a single object, make "
    "your requests serially or at a lower rate."
)
MESSAGE_NO_API_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
)

_ID_ALPHABET = string.ascii_letters + string.digits

log = structlog.get_logger("stripe_emulator")


class EmulatedError(Exception):
    """A Stripe error response: status, error type, message, and optional param/code/headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # Stripe's own field name
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = tuple(headers)

    def body(self) -> Json:
        error: Json = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}


def _missing(param: str) -> EmulatedError:
    return EmulatedError(
        400, f"Missing required param: {param}.", param=param, code="parameter_missing"
    )


def _invalid(param: str, message: str, code: str = "parameter_invalid") -> EmulatedError:
    return EmulatedError(400, message, param=param, code=code)


def _no_such(kind: str, ident: str, param: str, status: int = 400) -> EmulatedError:
    return EmulatedError(status, f"No such {kind}: '{ident}'", param=param, code="resource_missing")


# ---------------------------------------------------------------------------------------------
# Request parsing

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def parse_form(raw: str) -> Json:
    """Decode Stripe's form encoding (``a[b][c]=v``, ``items[0][price]=p``, ``a[]=v``).

    Values stay strings, as on the wire; objects whose keys are all indexes become lists.
    """
    root: Json = {}
    nested = False
    for key, value in parse_qsl(raw, keep_blank_values=True):
        bracket = key.find("[")
        if bracket <= 0:
            root[key] = value
            continue
        nested = True
        parts = [key[:bracket], *_BRACKETS.findall(key[bracket:])]
        node: Json = root
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            name = part if part else str(len(node))
            if last:
                node[name] = value
                break
            child = node.get(name)
            if not isinstance(child, dict):
                if child is not None:
                    raise _invalid(key, f"Invalid parameter: {key} mixes a value and an object.")
                child = {}
                node[name] = child
            node = child
    return _listify(root) if nested else root


def _listify(node: Json) -> Json:
    for key, value in node.items():
        if isinstance(value, dict):
            value = _listify(value)
            if value and all(k.isdigit() for k in value):
                node[key] = [value[k] for k in sorted(value, key=int)]
            else:
                node[key] = value
    return node


@dataclasses.dataclass(slots=True)
class ApiRequest:
    """One parsed ``/v1`` request, as the handlers see it."""

    method: str
    path: str
    params: Json
    headers: dict[str, str]
    args: dict[str, str]  # path parameters, e.g. {"id": "mtr_..."}
    request_id: str = ""  # carried by the events the request emits


def _string(params: Json, name: str, *, required: bool = False, max_length: int = 5000) -> str:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _missing(name)
        return ""
    if not isinstance(value, str):
        raise _invalid(name, f"Invalid string: {name} must be a string.")
    if len(value) > max_length:
        raise _invalid(
            name, f"Invalid string: {name} must be at most {max_length} characters long."
        )
    return value


def _integer(params: Json, name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value):
        raise _invalid(name, f"Invalid integer: {value}", code="parameter_invalid_integer")
    return int(value)


def _only(params: Json, allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed and name != "expand":
            raise EmulatedError(
                400, f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
            )


def _object(params: Json, name: str) -> Json:
    value = params.get(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise _invalid(name, f"Invalid object: {name} must be an object.")
    return value


def _boolean(params: Json, name: str) -> bool | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value not in ("true", "false"):
        raise _invalid(name, f"Invalid boolean: {value}", code="parameter_invalid_boolean")
    return bool(value == "true")


def _strings(params: Json, name: str, *, max_items: int | None = None) -> list[str] | None:
    """An array of strings (``a[0]=x&a[1]=y`` or ``a[]=x``); None when absent."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(name, f"Invalid array: {name} must be an array of strings.")
    if max_items is not None and len(value) > max_items:
        raise _invalid(name, f"Invalid {name}: you can specify up to {max_items} values.")
    return value


def _currency(params: Json, name: str, *, required: bool = False) -> str:
    value = _string(params, name, required=required).lower()
    if value and not re.fullmatch(r"[a-z]{3}", value):
        raise _invalid(name, f"Invalid currency: {value}.")
    return value


def _metadata(params: Json, current: Json | None = None) -> Json | None:
    """Stripe's metadata rules; None when absent. On update an empty value unsets its key and
    an empty ``metadata`` unsets them all."""
    if "metadata" not in params:
        return None
    raw = params["metadata"]
    if raw == "":
        return {}
    if not isinstance(raw, dict):
        raise _invalid("metadata", "Invalid object: metadata must be an object.")
    merged = dict(current or {})
    for key, value in raw.items():
        param = f"metadata[{key}]"
        if not isinstance(value, str):
            raise _invalid(param, f"Invalid string: {param} must be a string.")
        if len(key) > 40:
            raise _invalid(param, "Metadata keys can be at most 40 characters long.")
        if len(value) > 500:
            raise _invalid(param, "Metadata values can be at most 500 characters long.")
        if value:
            merged[key] = value
        else:
            merged.pop(key, None)
    if len(merged) > 50:
        raise _invalid("metadata", "Metadata can have at most 50 keys.")
    return merged


def _only_keys(value: Json, allowed: frozenset[str], prefix: str) -> None:
    for name in value:
        if name not in allowed:
            param = f"{prefix}[{name}]"
            raise EmulatedError(
                400, f"Received unknown parameter: {param}", param=param, code="parameter_unknown"
            )


def _one_of(*names: str) -> EmulatedError:
    return _invalid(names[0], f"You may only specify one of these parameters: {', '.join(names)}.")


# ---------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass(slots=True)
class Faults:
    """Injected faults; see the module docstring for what each one does."""

    rate_limit: float | None = None
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    latency_ms: float = 0.0
    fail_after_write_rate: float = 0.0
    fail_next: int = 0
    drop_next: int = 0

    def check(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive (or null for none)")
        for name in ("fail_rate", "drop_rate", "fail_after_write_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.latency_ms < 0 or self.fail_next < 0 or self.drop_next < 0:
            raise ValueError("latency_ms, fail_next and drop_next must not be negative")


@dataclasses.dataclass(slots=True)
class WebhookSettings:
    """Webhook delivery; see the module docstring for what each setting does."""

    max_attempts: int = 4
    retry_base: float = 0.05  # seconds (real time) before the first retry, doubling each time
    retry_max: float = 2.0
    timeout: float = 5.0
    duplicate_rate: float = 0.0
    duplicate_next: int = 0
    hold: bool = False

    def check(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.retry_base < 0 or self.retry_max < 0 or not self.timeout > 0:
            raise ValueError("retry_base and retry_max must not be negative, timeout positive")
        if not 0.0 <= self.duplicate_rate <= 1.0:
            raise ValueError("duplicate_rate must be between 0 and 1")
        if self.duplicate_next < 0:
            raise ValueError("duplicate_next must not be negative")


@dataclasses.dataclass(slots=True)
class Delivery:
    """One event queued for one webhook endpoint; ``body`` is the exact JSON that is signed."""

    event: str
    endpoint: str
    body: bytes
    attempts: int = 0
    duplicate: bool = False
    redelivery: bool = False


@dataclasses.dataclass(slots=True)
class SubscriptionState:
    """A subscription and its billing cycle: period k is [anchor + k, anchor + k + 1) intervals."""

    obj: Json
    anchor: int
    interval: str
    interval_count: int
    period: int = 0

    def bounds(self) -> tuple[int, int]:
        step = self.interval_count
        return (
            _add_interval(self.anchor, self.interval, self.period * step),
            _add_interval(self.anchor, self.interval, (self.period + 1) * step),
        )

    @property
    def active(self) -> bool:
        return bool(self.obj["status"] != "canceled")


@dataclasses.dataclass(slots=True)
class Meter:
    obj: Json
    id: str
    event_name: str
    customer_key: str
    value_key: str
    formula: str

    @property
    def active(self) -> bool:
        return bool(self.obj["status"] == "active")


@dataclasses.dataclass(slots=True)
class AcceptedEvent:
    identifier: str
    meter_id: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    received_at: float
    cancelled: bool = False


@dataclasses.dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    drop: bool = False


@dataclasses.dataclass(slots=True)
class SavedResponse:
    method: str
    path: str
    params: Json
    reply: Reply
    request_id: str
    saved_at: float


@dataclasses.dataclass(slots=True)
class Counters:
    requests: int = 0
    meter_events_accepted: int = 0
    meter_events_cancelled: int = 0
    duplicate_identifier_rejections: int = 0
    idempotent_replays: int = 0
    idempotency_errors: int = 0
    rate_limited: int = 0
    lock_timeouts: int = 0
    injected_failures: int = 0
    failures_after_write: int = 0
    dropped_connections: int = 0
    accepted_again_within_memory: int = 0  # must stay 0: Stripe's own guarantee
    events_emitted: int = 0
    webhook_attempts: int = 0
    webhooks_delivered: int = 0  # attempts answered 2xx
    webhook_failures: int = 0  # attempts answered otherwise or not at all
    webhooks_abandoned: int = 0  # deliveries that used up max_attempts
    webhook_duplicates: int = 0  # extra deliveries injected by duplicate_rate/_next


Handler = Callable[["StripeEmulator", ApiRequest], Json]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    meter_event: bool = False  # subject to lock_timeout, fail_after_write and drops

    def compile(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


class StripeEmulator:
    """The emulated Stripe account: its objects, its memory windows, its clock and its faults.

    ``app`` is the ASGI application. Everything else is for tests: :meth:`advance` the clock,
    :meth:`set_faults`, read :meth:`state`, :meth:`reset`, seed objects with
    :meth:`add_customer` / :meth:`add_meter` / :meth:`add_webhook_endpoint`, read
    :meth:`meter_total`; billing: :meth:`complete_checkout`, :meth:`close_period`,
    :meth:`finalize_invoice`; webhooks: :meth:`set_webhooks`, :meth:`release_webhooks`,
    :meth:`redeliver`, :meth:`wait_for_webhooks` and the :attr:`deliveries` log.
    """

    def __init__(
        self,
        *,
        rate_limit: float | None = None,
        fail_rate: float = 0.0,
        drop_rate: float = 0.0,
        latency_ms: float = 0.0,
        fail_after_write_rate: float = 0.0,
        seed: int | None = None,
        log_events: bool = False,
        clock: Callable[[], float] = time.time,
        webhooks: WebhookSettings | None = None,
        invoice_finalize_delay: float | None = DEFAULT_INVOICE_FINALIZE_DELAY,
    ) -> None:
        self._initial_webhooks = dataclasses.replace(webhooks or WebhookSettings())
        self._initial_webhooks.check()
        if invoice_finalize_delay is not None and invoice_finalize_delay < 0:
            raise ValueError("invoice_finalize_delay must not be negative (or None: never)")
        self._initial_finalize_delay = invoice_finalize_delay
        # webhook delivery runs on the event loop serving the app (see _kick)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._due_timer: asyncio.TimerHandle | None = None
        self._sending = 0  # attempts in flight (kept across reset: they still finish)
        self._initial_faults = Faults(
            rate_limit=rate_limit,
            fail_rate=fail_rate,
            drop_rate=drop_rate,
            latency_ms=latency_ms,
            fail_after_write_rate=fail_after_write_rate,
        )
        self._initial_faults.check()
        self._seed = seed
        self._clock = clock
        self.log_events = log_events
        self.base_url: str | None = None  # set while served by serve_emulator*
        self.reset()

    # -- lifecycle and test hooks -----------------------------------------------------------

    def reset(self) -> None:
        """Forget every object, counter and memory; restore the construction-time faults."""
        self.faults = dataclasses.replace(self._initial_faults)
        self._rng = random.Random(self._seed)
        self._ids = random.Random(None if self._seed is None else self._seed + 1)
        self._offset = 0.0
        self.customers: dict[str, Json] = {}
        self.meters: dict[str, Meter] = {}
        self._meters_by_event: dict[str, Meter] = {}
        self.events: dict[tuple[str, str], list[AcceptedEvent]] = {}  # (meter id, customer)
        self._identifiers: dict[str, AcceptedEvent] = {}  # remembered ones, oldest first
        self._idempotency: dict[str, SavedResponse] = {}  # oldest first
        self._acceptances: dict[str, int] = {}  # identifier -> times accepted, ever
        self._last_accepted: dict[str, float] = {}  # identifier -> emulator time
        self._in_flight: set[tuple[str, str]] = set()
        self.counters = Counters()
        self._tokens = self.faults.rate_limit or 0.0
        self._tokens_at = time.monotonic()
        self._window: deque[float] = deque()
        self._max_per_second = 0
        # billing objects
        self.invoice_finalize_delay = self._initial_finalize_delay
        self.products: dict[str, Json] = {}
        self.prices: dict[str, Json] = {}
        self._lookup_keys: dict[str, str] = {}  # lookup key -> price id
        self.subscriptions: dict[str, SubscriptionState] = {}
        self.invoices: dict[str, Json] = {}
        self._auto_finalize: dict[str, int] = {}  # draft invoice id -> when it finalizes
        self.credit_grants: dict[str, Json] = {}
        self._grant_balance: dict[str, int] = {}  # credit grant id -> what is left of it
        self.checkout_sessions: dict[str, Json] = {}
        self._setup_data: dict[str, Json] = {}  # session id -> its setup_intent_data
        self.setup_intents: dict[str, Json] = {}
        self._due_at = math.inf  # the next period end, auto-finalization or session expiry
        # events and webhooks
        self.webhook_settings = dataclasses.replace(self._initial_webhooks)
        self._webhook_rng = random.Random(None if self._seed is None else self._seed + 2)
        self.webhook_endpoints: dict[str, Json] = {}  # without their secrets
        self._endpoint_secrets: dict[str, str] = {}
        self.stripe_events: dict[str, Json] = {}  # oldest first
        self._undelivered: dict[str, set[str]] = {}  # event id -> endpoints not yet answering 2xx
        self.deliveries: list[Json] = []  # every delivery attempt, in order
        self._outbox: list[tuple[float, int, Delivery]] = []  # heap by due time (monotonic)
        self._held: list[Delivery] = []
        self._sequence = 0

    def now(self) -> float:
        """The emulator clock: real time plus the offset tests advance."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> float:
        """Move the emulator clock forward; returns the new time.

        As with a Stripe test clock, what falls due on the way happens: subscription periods
        that end are closed (one draft invoice each), drafts whose ``automatically_finalizes_at``
        passes are finalized and open Checkout Sessions past ``expires_at`` expire.
        """
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        self._offset += seconds
        self._run_due()
        return self.now()

    def set_faults(self, **changes: Any) -> Faults:
        """Change some faults (the fields of :class:`Faults`); returns the new settings."""
        known = {f.name for f in dataclasses.fields(Faults)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}; known: {sorted(known)}")
        faults = dataclasses.replace(self.faults, **changes)
        if faults.rate_limit == 0:
            faults.rate_limit = None
        faults.check()
        if faults.rate_limit != self.faults.rate_limit:
            self._tokens = faults.rate_limit or 0.0
            self._tokens_at = time.monotonic()
        self.faults = faults
        return faults

    def state(self, *, identifiers: bool = False) -> Json:
        """Counters for assertions (``GET /_emulator/state``).

        ``accepted_again_within_memory`` counts identifiers accepted twice inside their 24 h
        window (always 0: that is Stripe's guarantee); ``identifiers_accepted_more_than_once``
        counts those accepted again after being forgotten (double counting at the provider).
        """
        reaccepted = {k: n for k, n in self._acceptances.items() if n > 1}
        state: Json = dataclasses.asdict(self.counters)
        state.update(
            now=self.now(),
            clock_offset=self._offset,
            customers=len(self.customers),
            meters=len(self.meters),
            max_requests_per_second=self._max_per_second,
            identifiers_remembered=len(self._identifiers),
            identifiers_accepted_more_than_once=len(reaccepted),
            reaccepted_identifiers=reaccepted,
            faults=dataclasses.asdict(self.faults),
            products=len(self.products),
            prices=len(self.prices),
            subscriptions=len(self.subscriptions),
            invoices=len(self.invoices),
            credit_grants=len(self.credit_grants),
            checkout_sessions=len(self.checkout_sessions),
            stripe_events=len(self.stripe_events),
            webhook_endpoints=len(self.webhook_endpoints),
            webhooks_pending=len(self._outbox) + self._sending,
            webhooks_held=len(self._held),
            webhooks=dataclasses.asdict(self.webhook_settings),
            invoice_finalize_delay=self.invoice_finalize_delay,
        )
        if identifiers:
            state["accepted_by_identifier"] = dict(self._acceptances)
        return state

    def add_customer(self, id: str | None = None, **fields: Any) -> Json:
        """Create a customer directly (no HTTP), optionally with a chosen id."""
        customer = copy.deepcopy(CUSTOMER_SHAPE)
        customer.update(
            id=id or self._new_id("cus", 14),
            created=int(self.now()),
            invoice_prefix="".join(self._ids.choices("0123456789ABCDEF", k=8)),
        )
        customer.update(fields)
        self.customers[customer["id"]] = customer
        return customer

    def add_meter(
        self,
        event_name: str,
        *,
        display_name: str | None = None,
        formula: str = "sum",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        id: str | None = None,
    ) -> Json:
        """Create a meter directly (no HTTP); same rules as ``POST /v1/billing/meters``."""
        if event_name in self._meters_by_event:
            raise EmulatedError(
                400,
                f"A meter with event_name '{event_name}' already exists. An event name can "
                "only be used by one meter.",
                param="event_name",
            )
        if formula not in ("sum", "count", "last"):
            raise _invalid(
                "default_aggregation[formula]",
                f"Invalid default_aggregation[formula]: must be one of sum, count or last, "
                f"got '{formula}'.",
            )
        now = int(self.now())
        obj = copy.deepcopy(METER_SHAPE)
        obj.update(
            id=id or self._new_id("mtr", 24),
            created=now,
            updated=now,
            display_name=display_name or event_name,
            event_name=event_name,
            customer_mapping={"event_payload_key": customer_key, "type": "by_id"},
            default_aggregation={"formula": formula},
            value_settings={"event_payload_key": value_key},
        )
        meter = Meter(obj, obj["id"], event_name, customer_key, value_key, formula)
        self.meters[meter.id] = meter
        self._meters_by_event[event_name] = meter
        return obj

    def meter_total(self, meter: str, customer: str, start: int, end: int) -> int:
        """Aggregated value of `customer`'s non-cancelled events in [start, end) (meter id or
        event name), by the meter's formula."""
        found = self.meters.get(meter) or self._meters_by_event.get(meter)
        if found is None:
            raise KeyError(meter)
        return self._aggregate(found, customer, start, end)

    # -- ASGI ---------------------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        method: str = scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        if path.startswith("/_emulator/"):
            reply = await self._hook(method, path, query, body)
        else:
            reply = await self._api(method, path, query, headers, body)
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
        )
        if reply.drop:
            # headers promised a body that never comes; returning closes the connection
            await send({"type": "http.response.body", "body": reply.body[:1], "more_body": True})
            return
        await send({"type": "http.response.body", "body": reply.body})

    # -- the API pipeline ---------------------------------------------------------------------

    async def _api(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> Reply:
        self.counters.requests += 1
        self._note_request(time.monotonic())
        request_id = "req_" + self._random_chars(14)
        try:
            _authenticate(headers.get("authorization"))
            route, args = _route(method, path)
            params = parse_form(body.decode("utf-8", "replace") if method == "POST" else query)
            if not self._take_token():
                self.counters.rate_limited += 1
                raise EmulatedError(
                    429, MESSAGE_RATE_LIMIT, code="rate_limit", headers=[("Retry-After", "1")]
                )
        except EmulatedError as exc:
            return _error_reply(exc, request_id)
        request = ApiRequest(method, path, params, headers, args, request_id)
        if not route.meter_event and self._due_at <= self.now():
            self._run_due()  # periods that ended, drafts due to finalize, sessions expired
        lane = self._lane(route, params)
        if lane is not None:
            if lane in self._in_flight:
                self.counters.lock_timeouts += 1
                return _error_reply(
                    EmulatedError(429, MESSAGE_LOCK_TIMEOUT, code="lock_timeout"), request_id
                )
            self._in_flight.add(lane)
        try:
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            reply = self._execute(route, request, request_id)
        finally:
            if lane is not None:
                self._in_flight.discard(lane)
        if route.meter_event and 200 <= reply.status < 300 and self._draw_drop():
            self.counters.dropped_connections += 1
            reply.drop = True
        return reply

    def _execute(self, route: Route, request: ApiRequest, request_id: str) -> Reply:
        """Everything after the pre-processing faults; synchronous, hence atomic."""
        if request.method != "POST":
            try:
                return _json_reply(200, route.handler(self, request), request_id)
            except EmulatedError as exc:
                return _error_reply(exc, request_id)
        if self.faults.fail_next or (
            self.faults.fail_rate and self._rng.random() < self.faults.fail_rate
        ):
            self.faults.fail_next = max(0, self.faults.fail_next - 1)
            self.counters.injected_failures += 1
            return _error_reply(
                EmulatedError(500, MESSAGE_UNKNOWN_ERROR, type="api_error"), request_id
            )
        key = request.headers.get("idempotency-key")
        try:
            if key is not None:
                replay = self._replay(key, request, request_id)
                if replay is not None:
                    return replay
            obj = route.handler(self, request)
        except EmulatedError as exc:
            return _error_reply(exc, request_id)  # validation failed: nothing saved
        reply = _json_reply(200, obj, request_id)
        if (
            route.meter_event
            and self.faults.fail_after_write_rate
            and self._rng.random() < self.faults.fail_after_write_rate
        ):
            self.counters.failures_after_write += 1
            reply = _error_reply(
                EmulatedError(500, MESSAGE_UNKNOWN_ERROR, type="api_error"), request_id
            )
        if key is not None:
            reply.headers.append((b"idempotency-key", key.encode("latin-1")))
            self._idempotency[key] = SavedResponse(
                request.method, request.path, request.params, reply, request_id, self.now()
            )
        return reply

    def _replay(self, key: str, request: ApiRequest, request_id: str) -> Reply | None:
        if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise EmulatedError(
                400,
                f"Idempotency keys can be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
                type="idempotency_error",
            )
        self._forget_expired()
        saved = self._idempotency.get(key)
        if saved is None:
            return None
        if (saved.method, saved.path) != (request.method, request.path):
            self.counters.idempotency_errors += 1
            raise EmulatedError(
                400,
                "Keys for idempotent requests can only be used for the same endpoint they were "
                f"first used for ('{saved.method} {saved.path}' vs '{request.method} "
                f"{request.path}'). Try using a key other than '{key}' if you meant to execute "
                "a different request.",
                type="idempotency_error",
            )
        if saved.params != request.params:
            self.counters.idempotency_errors += 1
            raise EmulatedError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                type="idempotency_error",
            )
        self.counters.idempotent_replays += 1
        original = saved.reply
        headers = [h for h in original.headers if h[0] != b"request-id"]
        headers += [
            (b"request-id", request_id.encode()),
            (b"original-request", saved.request_id.encode()),
            (b"idempotent-replayed", b"true"),
        ]
        return Reply(original.status, original.body, headers)

    # -- resources ----------------------------------------------------------------------------

    def create_customer(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _CUSTOMER_FIELDS)
        fields: Json = {}
        for name in ("email", "name", "description", "phone"):
            value = _string(params, name, max_length=512)
            if value:
                fields[name] = value
        metadata = _object(params, "metadata")
        if metadata:
            fields["metadata"] = metadata
        customer = self.add_customer(**fields)
        self._emit("customer.created", customer, request)
        return customer

    def retrieve_customer(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        customer = self.customers.get(ident)
        if customer is None:
            raise _no_such("customer", ident, "id", status=404)
        return customer

    def list_customers(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"email"})
        items = list(reversed(self.customers.values()))  # newest first, as Stripe lists
        email = _string(params, "email")
        if email:
            items = [c for c in items if c.get("email") == email]
        return _page(items, params, "/v1/customers")

    def create_meter(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _METER_FIELDS)
        display_name = _string(params, "display_name", required=True, max_length=250)
        event_name = _string(params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH)
        aggregation = _object(params, "default_aggregation")
        formula = aggregation.get("formula")
        if not formula:
            raise _missing("default_aggregation[formula]")
        mapping = _object(params, "customer_mapping")
        values = _object(params, "value_settings")
        return self.add_meter(
            event_name,
            display_name=display_name,
            formula=str(formula),
            customer_key=str(mapping.get("event_payload_key") or "stripe_customer_id"),
            value_key=str(values.get("event_payload_key") or "value"),
        )

    def retrieve_meter(self, request: ApiRequest) -> Json:
        return self._meter(request.args["id"]).obj

    def list_meters(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"status"})
        items = [m.obj for m in reversed(self.meters.values())]
        status = _string(params, "status")
        if status:
            items = [m for m in items if m["status"] == status]
        return _page(items, params, "/v1/billing/meters")

    def deactivate_meter(self, request: ApiRequest) -> Json:
        meter = self._meter(request.args["id"])
        now = int(self.now())
        meter.obj.update(status="inactive", updated=now)
        meter.obj["status_transitions"] = {"deactivated_at": now}
        return meter.obj

    def reactivate_meter(self, request: ApiRequest) -> Json:
        meter = self._meter(request.args["id"])
        meter.obj.update(status="active", updated=int(self.now()))
        meter.obj["status_transitions"] = {"deactivated_at": None}
        return meter.obj

    def create_meter_event(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _METER_EVENT_FIELDS)
        event_name = _string(params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH)
        if "payload" not in params:
            raise _missing("payload")
        payload = _object(params, "payload")
        for key, value in payload.items():
            if not isinstance(value, str):
                raise _invalid(
                    f"payload[{key}]", f"Invalid payload: payload[{key}] must be a string."
                )
        meter = self._meters_by_event.get(event_name)
        if meter is None or not meter.active:
            raise EmulatedError(
                400,
                f"No active meter was found that matches the event name '{event_name}'.",
                param="event_name",
                code="no_meter",
            )
        now = self.now()
        customer = payload.get(meter.customer_key)
        if not customer:
            raise EmulatedError(
                400,
                f"The payload is missing the key '{meter.customer_key}' that this meter uses to "
                "map events to customers.",
                param=f"payload[{meter.customer_key}]",
                code="meter_event_no_customer_defined",
            )
        if customer not in self.customers:
            raise EmulatedError(
                400,
                f"No such customer: '{customer}'",
                param=f"payload[{meter.customer_key}]",
                code="meter_event_customer_not_found",
            )
        value = _event_value(meter, payload)
        timestamp = _integer(params, "timestamp")
        if timestamp is None:
            timestamp = int(now)
        _check_timestamp(timestamp, now)
        identifier = _string(params, "identifier", max_length=MAX_IDENTIFIER_LENGTH)
        if not identifier:
            identifier = self._new_id("evt", 24)
        self._forget_expired()
        if identifier in self._identifiers:
            self.counters.duplicate_identifier_rejections += 1
            raise EmulatedError(
                400,
                f"An event already exists with identifier {identifier}.",
                param="identifier",
                headers=[("Stripe-Should-Retry", "false")],
            )
        event = AcceptedEvent(
            identifier, meter.id, event_name, customer, value, timestamp, received_at=now
        )
        self._identifiers[identifier] = event
        self.events.setdefault((meter.id, customer), []).append(event)
        self.counters.meter_events_accepted += 1
        self._acceptances[identifier] = self._acceptances.get(identifier, 0) + 1
        previous = self._last_accepted.get(identifier)
        if previous is not None and now - previous < IDENTIFIER_MEMORY_SECONDS:
            self.counters.accepted_again_within_memory += 1  # an emulator bug if ever > 0
        self._last_accepted[identifier] = now
        if self.log_events:
            self._log_event(event)
        return {
            "object": "billing.meter_event",
            "created": int(now),
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": payload,
            "timestamp": timestamp,
        }

    def create_meter_event_adjustment(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _ADJUSTMENT_FIELDS)
        event_name = _string(params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH)
        kind = _string(params, "type", required=True)
        if kind != "cancel":
            raise _invalid("type", f"Invalid type: must be cancel, got '{kind}'.")
        identifier = _object(params, "cancel").get("identifier")
        if not identifier:
            raise _missing("cancel[identifier]")
        if not isinstance(identifier, str):
            raise _invalid("cancel[identifier]", "Invalid string: cancel[identifier].")
        self._forget_expired()
        event = self._identifiers.get(identifier)
        if event is not None and self.now() - event.received_at >= CANCEL_WINDOW_SECONDS:
            event = None
        if event is None or event.event_name != event_name:
            if identifier in self._acceptances and event is None:
                message = (
                    f"The meter event with identifier {identifier} was received more than 24 "
                    "hours ago. Meter events can only be cancelled within 24 hours of Stripe "
                    "receiving them."
                )
            else:
                message = (
                    f"No meter event with identifier {identifier} was found for event name "
                    f"'{event_name}'."
                )
            raise _invalid("cancel[identifier]", message)
        if event.cancelled:
            raise _invalid(
                "cancel[identifier]",
                f"The meter event with identifier {identifier} has already been cancelled.",
            )
        event.cancelled = True
        self.counters.meter_events_cancelled += 1
        if self.log_events:
            print(f"[stripe-emulator] meter event cancelled  identifier={identifier}", flush=True)
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "complete",
            "type": "cancel",
        }

    def list_event_summaries(self, request: ApiRequest) -> Json:
        params = request.params
        _only(
            params, _LIST_FIELDS | {"customer", "start_time", "end_time", "value_grouping_window"}
        )
        meter = self._meter(request.args["id"])
        customer = _string(params, "customer", required=True)
        if customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        start = _integer(params, "start_time", required=True)
        end = _integer(params, "end_time", required=True)
        assert start is not None and end is not None
        window = _string(params, "value_grouping_window")
        step = {"": 60, "hour": 3600, "day": DAY}.get(window)
        if step is None:
            raise _invalid(
                "value_grouping_window",
                f"Invalid value_grouping_window: must be hour or day, got '{window}'.",
            )
        unit = {60: "minute", 3600: "hour", DAY: "UTC day"}[step]
        for name, value in (("start_time", start), ("end_time", end)):
            if value % step:
                raise _invalid(name, f"{name} must be aligned with {unit} boundaries.")
        if end <= start:
            raise _invalid("end_time", "end_time must be after start_time.")
        bounds = [(start, end)] if not window else [(s, s + step) for s in range(start, end, step)]
        items = [
            {
                "id": _summary_id(meter.id, customer, s, e),
                "object": "billing.meter_event_summary",
                "aggregated_value": self._aggregate(meter, customer, s, e),
                "end_time": e,
                "livemode": False,
                "meter": meter.id,
                "start_time": s,
            }
            for s, e in bounds
        ]
        return _page(items, params, f"/v1/billing/meters/{meter.id}/event_summaries")

    # -- products and prices ----------------------------------------------------------------

    def create_product(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _PRODUCT_FIELDS)
        name = _string(params, "name", required=True, max_length=250)
        ident = _string(params, "id", max_length=255)
        if ident in self.products:
            raise EmulatedError(
                400, "Product already exists.", param="id", code="resource_already_exists"
            )
        product = self._new_product(name, params, ident or None)
        self._emit("product.created", product, request)
        return product

    def _new_product(self, name: str, params: Json, ident: str | None = None) -> Json:
        """Validates `params` (the product fields besides name and id), then creates."""
        fields: Json = {}
        for field in ("description", "statement_descriptor", "tax_code", "unit_label", "url"):
            value = _string(params, field, max_length=5000)
            if value:
                fields[field] = value
        active = _boolean(params, "active")
        metadata = _metadata(params) or {}
        now = int(self.now())
        product = copy.deepcopy(PRODUCT_SHAPE)
        product.update(
            fields,
            id=ident or self._new_id("prod", 14),
            name=name,
            created=now,
            updated=now,
            active=True if active is None else active,
            metadata=metadata,
        )
        self.products[product["id"]] = product
        return product

    def update_product(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _PRODUCT_FIELDS - {"id"})
        product = self._product(request.args["id"])
        changes: Json = {}
        for field in ("name", "description", "statement_descriptor", "tax_code", "unit_label"):
            if field in params:
                changes[field] = _string(params, field, max_length=5000) or None
        if "url" in params:
            changes["url"] = _string(params, "url") or None
        active = _boolean(params, "active")
        if active is not None:
            changes["active"] = active
        metadata = _metadata(params, product["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        if "name" in changes and not changes["name"]:
            raise _invalid("name", "A product's name cannot be empty.")
        return self._update(product, changes, "product.updated", request)

    def retrieve_product(self, request: ApiRequest) -> Json:
        return self._product(request.args["id"])

    def list_products(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"active", "ids"})
        items = list(reversed(self.products.values()))
        active = _boolean(params, "active")
        if active is not None:
            items = [p for p in items if p["active"] is active]
        ids = _strings(params, "ids")
        if ids is not None:
            items = [p for p in items if p["id"] in ids]
        return _page(items, params, "/v1/products")

    def create_price(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _PRICE_FIELDS)
        currency = _currency(params, "currency", required=True)
        product_id = _string(params, "product")
        product_data = _object(params, "product_data")
        if product_id and product_data:
            raise _one_of("product", "product_data")
        if not product_id and not product_data:
            raise EmulatedError(
                400,
                "You must specify either `product` or `product_data` when creating a price.",
                param="product",
            )
        if product_id and product_id not in self.products:
            raise _no_such("product", product_id, "product")
        product_name = ""
        if product_data:
            _only_keys(product_data, _PRODUCT_DATA_FIELDS, "product_data")
            product_name = _string(product_data, "name", max_length=250)
            if not product_name:
                raise _missing("product_data[name]")
        scheme = _string(params, "billing_scheme") or "per_unit"
        if scheme != "per_unit":
            raise _invalid(
                "billing_scheme",
                "The Stripe emulator supports only billing_scheme=per_unit prices.",
            )
        unit_amount, unit_amount_decimal = _unit_amount(params)
        recurring = self._recurring(_object(params, "recurring"))
        lookup_key = _string(params, "lookup_key", max_length=MAX_LOOKUP_KEY_LENGTH)
        transfer = bool(_boolean(params, "transfer_lookup_key"))
        holder = self._lookup_key_holder(lookup_key, None, transfer)
        tax_behavior = _string(params, "tax_behavior") or "unspecified"
        if tax_behavior not in ("inclusive", "exclusive", "unspecified"):
            raise _invalid(
                "tax_behavior",
                f"Invalid tax_behavior: must be one of inclusive, exclusive or unspecified, "
                f"got '{tax_behavior}'.",
            )
        nickname = _string(params, "nickname", max_length=5000) or None
        active = _boolean(params, "active")
        metadata = _metadata(params) or {}
        # all validated: from here on nothing fails, so the whole create is atomic
        if product_data:
            product = self._new_product(product_name, product_data)
            product_id = product["id"]
            self._emit("product.created", product, request)
        if holder is not None:
            self._update(holder, {"lookup_key": None}, "price.updated", request)
        price = copy.deepcopy(PRICE_SHAPE)
        price.update(
            id=self._new_id("price", 24),
            active=True if active is None else active,
            created=int(self.now()),
            currency=currency,
            lookup_key=lookup_key or None,
            metadata=metadata,
            nickname=nickname,
            product=product_id,
            recurring=recurring,
            tax_behavior=tax_behavior,
            type="recurring" if recurring else "one_time",
            unit_amount=unit_amount,
            unit_amount_decimal=unit_amount_decimal,
        )
        self.prices[price["id"]] = price
        if lookup_key:
            self._lookup_keys[lookup_key] = price["id"]
        self._emit("price.created", price, request)
        return price

    def _recurring(self, raw: Json) -> Json | None:
        if not raw:
            return None
        _only_keys(raw, _RECURRING_FIELDS, "recurring")
        interval = _string(raw, "interval")
        if not interval:
            raise _missing("recurring[interval]")
        if interval not in INTERVALS:
            raise _invalid(
                "recurring[interval]",
                f"Invalid recurring[interval]: must be one of day, week, month or year, got "
                f"'{interval}'.",
            )
        count = _integer(raw, "interval_count")
        count = 1 if count is None else count
        if not 1 <= count <= MAX_INTERVAL_COUNT[interval]:
            raise _invalid(
                "recurring[interval_count]",
                "The maximum billing frequency is three years (3 years, 36 months, or 156 weeks).",
            )
        usage_type = _string(raw, "usage_type") or "licensed"
        if usage_type not in ("licensed", "metered"):
            raise _invalid(
                "recurring[usage_type]",
                f"Invalid recurring[usage_type]: must be licensed or metered, got '{usage_type}'.",
            )
        meter = _string(raw, "meter")
        if usage_type == "metered" and not meter:
            raise EmulatedError(
                400,
                "Starting with Stripe version `2025-03-31.basil`, metered prices must be backed "
                "by meters.",
                param="recurring[meter]",
            )
        if meter and usage_type != "metered":
            raise _invalid(
                "recurring[meter]",
                "A meter can only be set on prices with `recurring[usage_type]=metered`.",
            )
        if meter and meter not in self.meters:
            raise _no_such("billing meter", meter, "recurring[meter]")
        return {
            "interval": interval,
            "interval_count": count,
            "meter": meter or None,
            "trial_period_days": None,
            "usage_type": usage_type,
        }

    def _lookup_key_holder(self, key: str, owner: str | None, transfer: bool) -> Json | None:
        """The other price holding `key`, if `transfer` allows taking it; else a 400."""
        holder_id = self._lookup_keys.get(key) if key else None
        if holder_id is None or holder_id == owner:
            return None
        if not transfer:
            raise EmulatedError(
                400, f"A price (`{holder_id}`) already uses that lookup key.", param="lookup_key"
            )
        return self.prices[holder_id]

    def update_price(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _PRICE_UPDATE_FIELDS)
        price = self._price(request.args["id"])
        lookup_key = _string(params, "lookup_key", max_length=MAX_LOOKUP_KEY_LENGTH)
        transfer = bool(_boolean(params, "transfer_lookup_key"))
        holder = self._lookup_key_holder(lookup_key, price["id"], transfer)
        changes: Json = {}
        active = _boolean(params, "active")
        if active is not None:
            changes["active"] = active
        if "nickname" in params:
            changes["nickname"] = _string(params, "nickname", max_length=5000) or None
        metadata = _metadata(params, price["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        if lookup_key and lookup_key != price["lookup_key"]:
            changes["lookup_key"] = lookup_key
            if holder is not None:
                self._update(holder, {"lookup_key": None}, "price.updated", request)
            if price["lookup_key"]:
                self._lookup_keys.pop(price["lookup_key"], None)
            self._lookup_keys[lookup_key] = price["id"]
        return self._update(price, changes, "price.updated", request)

    def retrieve_price(self, request: ApiRequest) -> Json:
        return self._price(request.args["id"])

    def list_prices(self, request: ApiRequest) -> Json:
        params = request.params
        _only(
            params,
            _LIST_FIELDS | {"active", "currency", "product", "type", "lookup_keys", "recurring"},
        )
        lookup_keys = _strings(params, "lookup_keys", max_items=MAX_LOOKUP_KEYS)
        items = list(reversed(self.prices.values()))
        if lookup_keys is not None:
            wanted = set(lookup_keys)
            items = [p for p in items if p["lookup_key"] in wanted]
        active = _boolean(params, "active")
        if active is not None:
            items = [p for p in items if p["active"] is active]
        currency = _currency(params, "currency")
        if currency:
            items = [p for p in items if p["currency"] == currency]
        product = _string(params, "product")
        if product:
            if product not in self.products:
                raise _no_such("product", product, "product")
            items = [p for p in items if p["product"] == product]
        kind = _string(params, "type")
        if kind:
            items = [p for p in items if p["type"] == kind]
        recurring = _object(params, "recurring")
        _only_keys(recurring, frozenset({"interval", "meter", "usage_type"}), "recurring")
        for key, wanted in recurring.items():
            items = [p for p in items if p["recurring"] and p["recurring"][key] == wanted]
        return _page(items, params, "/v1/prices")

    # -- subscriptions ----------------------------------------------------------------------

    def create_subscription(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _SUBSCRIPTION_FIELDS)
        customer = _string(params, "customer", required=True)
        if customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        raw_items = params.get("items")
        if not raw_items:
            raise _missing("items")
        if not isinstance(raw_items, list):
            raise _invalid("items", "Invalid array: items must be an array of objects.")
        chosen: list[tuple[Json, int | None, Json]] = []
        for index, raw in enumerate(raw_items):
            prefix = f"items[{index}]"
            if not isinstance(raw, dict):
                raise _invalid(prefix, f"Invalid object: {prefix} must be an object.")
            _only_keys(raw, frozenset({"price", "quantity", "metadata"}), prefix)
            price_id = _string(raw, "price")
            if not price_id:
                raise _missing(f"{prefix}[price]")
            price = self.prices.get(price_id)
            if price is None:
                raise _no_such("price", price_id, f"{prefix}[price]")
            if not price["active"]:
                raise _invalid(
                    f"{prefix}[price]",
                    "The price specified is inactive. This field only accepts active prices.",
                )
            recurring = price["recurring"]
            if recurring is None:
                raise _invalid(
                    f"{prefix}[price]",
                    "The price specified is set to `type=one_time` but this field only accepts "
                    "prices with `type=recurring`.",
                )
            metered = recurring["usage_type"] == "metered"
            quantity = _integer(raw, "quantity")
            if quantity is not None and metered:
                raise EmulatedError(
                    400,
                    "You cannot set the quantity for metered plans.",
                    param=f"{prefix}[quantity]",
                )
            if quantity is not None and quantity < 0:
                raise _invalid(f"{prefix}[quantity]", "Quantity must be at least 0.")
            if not metered and quantity is None:
                quantity = 1
            if any(other["id"] == price_id for other, _, _ in chosen):
                raise _invalid(
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
                        raise _invalid(
                            f"{prefix}[price]",
                            "Currency and interval fields must match across all plans on this "
                            f"subscription. Found mismatch in {field} field.",
                        )
            chosen.append((price, quantity, _metadata(raw) or {}))
        metadata = _metadata(params) or {}
        description = _string(params, "description", max_length=500) or None
        collection = _string(params, "collection_method") or "charge_automatically"
        if collection not in ("charge_automatically", "send_invoice"):
            raise _invalid(
                "collection_method",
                "Invalid collection_method: must be charge_automatically or send_invoice.",
            )
        days_until_due = _integer(params, "days_until_due")
        behavior = _string(params, "payment_behavior")
        if behavior and behavior not in _PAYMENT_BEHAVIORS:
            raise _invalid("payment_behavior", f"Invalid payment_behavior: '{behavior}'.")
        _string(params, "proration_behavior")
        _boolean(params, "off_session")
        # all validated
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
            default_payment_method=_string(params, "default_payment_method") or None,
            description=description,
            metadata=metadata,
            start_date=now,
        )
        sub["items"] = {
            "object": "list",
            "data": items,
            "has_more": False,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub_id}",
        }
        self.subscriptions[sub_id] = state
        self._reschedule()
        self._emit("customer.subscription.created", sub, request)
        return sub

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
        _only(params, _LIST_FIELDS | {"customer", "price", "status"})
        items = [s.obj for s in reversed(self.subscriptions.values())]
        customer = _string(params, "customer")
        if customer:
            items = [s for s in items if s["customer"] == customer]
        price = _string(params, "price")
        if price:
            items = [s for s in items if any(i["price"]["id"] == price for i in s["items"]["data"])]
        status = _string(params, "status")
        if status == "ended":
            items = [s for s in items if s["status"] in ("canceled", "incomplete_expired")]
        elif status and status != "all":
            items = [s for s in items if s["status"] == status]
        elif not status:  # Stripe's default leaves canceled subscriptions out
            items = [s for s in items if s["status"] != "canceled"]
        return _page(items, params, "/v1/subscriptions")

    def cancel_subscription(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, frozenset({"invoice_now", "prorate", "cancellation_details"}))
        state = self._subscription(request.args["id"])
        if not state.active:
            raise _invalid(
                "subscription",
                f"This subscription ({state.obj['id']}) is already canceled; a canceled "
                "subscription cannot be canceled again.",
            )
        invoice_now = bool(_boolean(params, "invoice_now"))
        _boolean(params, "prorate")  # no prorations are emulated
        details = _object(params, "cancellation_details")
        _only_keys(details, frozenset({"comment", "feedback"}), "cancellation_details")
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

    # -- invoices -----------------------------------------------------------------------------

    def retrieve_invoice(self, request: ApiRequest) -> Json:
        invoice = self._invoice(request.args["id"])
        if invoice["status"] == "draft":
            self._refresh_usage(invoice)  # a draft shows the usage reported so far
        return invoice

    def list_invoices(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"customer", "subscription", "status"})
        items = list(reversed(self.invoices.values()))
        customer = _string(params, "customer")
        if customer:
            items = [i for i in items if i["customer"] == customer]
        subscription = _string(params, "subscription")
        if subscription:
            items = [i for i in items if _invoice_subscription(i) == subscription]
        status = _string(params, "status")
        if status:
            items = [i for i in items if i["status"] == status]
        for invoice in items:
            if invoice["status"] == "draft":
                self._refresh_usage(invoice)
        return _page(items, params, "/v1/invoices")

    def finalize_invoice_request(self, request: ApiRequest) -> Json:
        _only(request.params, frozenset({"auto_advance"}))
        _boolean(request.params, "auto_advance")
        return self.finalize_invoice(request.args["id"], request)

    def finalize_invoice(self, invoice_id: str, request: ApiRequest | None = None) -> Json:
        """Finalize a draft (``draft`` -> ``open``): usage is counted a last time, billing
        credits are applied to metered lines, a number is assigned, ``invoice.finalized`` sent."""
        invoice = self._invoice(invoice_id)
        if invoice["status"] != "draft":
            raise _invalid(
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
        return invoice

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
        _invoice_totals(invoice)

    def _apply_credits(self, invoice: Json) -> None:
        """Billing credits, at finalization, on meter-backed lines only: grants by priority,
        then soonest expiry, promotional before paid, oldest first."""
        now = self.now()
        grants = [
            g
            for g in self.credit_grants.values()
            if g["customer"] == invoice["customer"]
            and g["amount"]["monetary"]["currency"] == invoice["currency"]
            and self._grant_usable(g, now)
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
        for line in invoice["lines"]["data"]:
            price = self.prices[line["pricing"]["price_details"]["price"]]
            remaining = line["amount"]
            applied: list[Json] = []
            for grant in grants:
                if remaining <= 0:
                    break
                if not _grant_applies(grant, price):
                    continue
                take = min(remaining, self._grant_balance[grant["id"]])
                if take <= 0:
                    continue
                self._grant_balance[grant["id"]] -= take
                remaining -= take
                applied.append(
                    {
                        "amount": take,
                        "credit_balance_transaction": self._new_id("cbtxn", 24),
                        "discount": None,
                        "type": "credit_balance_transaction",
                    }
                )
            line["pretax_credit_amounts"] = applied
        _invoice_totals(invoice)

    def _grant_usable(self, grant: Json, now: float) -> bool:
        return (
            grant["voided_at"] is None
            and self._grant_balance.get(grant["id"], 0) > 0
            and (grant["effective_at"] or 0) <= now
            and (grant["expires_at"] is None or grant["expires_at"] > now)
        )

    # -- billing credits --------------------------------------------------------------------

    def create_credit_grant(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _CREDIT_GRANT_FIELDS)
        customer = _string(params, "customer", required=True)
        if customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        if "amount" not in params:
            raise _missing("amount")
        amount = _object(params, "amount")
        _only_keys(amount, frozenset({"type", "monetary"}), "amount")
        kind = _string(amount, "type")
        if not kind:
            raise _missing("amount[type]")
        if kind != "monetary":
            raise _invalid("amount[type]", f"Invalid amount[type]: must be monetary, got '{kind}'.")
        monetary = amount.get("monetary")
        if not isinstance(monetary, dict):
            raise _missing("amount[monetary]")
        _only_keys(monetary, frozenset({"currency", "value"}), "amount[monetary]")
        currency = str(monetary.get("currency") or "").lower()
        if not currency:
            raise _missing("amount[monetary][currency]")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _invalid("amount[monetary][currency]", f"Invalid currency: {currency}.")
        raw_value = monetary.get("value")
        if raw_value is None or raw_value == "":
            raise _missing("amount[monetary][value]")
        if not isinstance(raw_value, str) or not re.fullmatch(r"\d+", raw_value):
            raise _invalid(
                "amount[monetary][value]",
                f"Invalid integer: {raw_value}",
                code="parameter_invalid_integer",
            )
        value = int(raw_value)
        if value <= 0:
            raise _invalid(
                "amount[monetary][value]", "amount[monetary][value] must be a positive integer."
            )
        if "applicability_config" not in params:
            raise _missing("applicability_config")
        config = _object(params, "applicability_config")
        _only_keys(config, frozenset({"scope"}), "applicability_config")
        scope = config.get("scope")
        if not isinstance(scope, dict):
            raise _missing("applicability_config[scope]")
        _only_keys(scope, frozenset({"price_type", "prices"}), "applicability_config[scope]")
        price_type = scope.get("price_type") or None
        prices = scope.get("prices") or None
        if price_type and prices:
            raise _invalid(
                "applicability_config[scope]",
                "You may only specify one of these parameters: price_type, prices.",
            )
        if not price_type and not prices:
            raise _missing("applicability_config[scope][price_type]")
        if price_type and price_type != "metered":
            raise _invalid(
                "applicability_config[scope][price_type]",
                f"Invalid applicability_config[scope][price_type]: must be metered, got "
                f"'{price_type}'.",
            )
        price_ids: list[str] = []
        if prices:
            param = "applicability_config[scope][prices]"
            if not isinstance(prices, list) or len(prices) > MAX_CREDIT_GRANT_PRICES:
                raise _invalid(
                    param, f"Invalid {param}: an array of at most {MAX_CREDIT_GRANT_PRICES}."
                )
            for index, entry in enumerate(prices):
                ident = entry.get("id") if isinstance(entry, dict) else None
                if not ident:
                    raise _missing(f"{param}[{index}][id]")
                if ident not in self.prices:
                    raise _no_such("price", str(ident), f"{param}[{index}][id]")
                price_ids.append(str(ident))
        category = _string(params, "category") or "paid"
        if category not in ("paid", "promotional"):
            raise _invalid(
                "category", f"Invalid category: must be paid or promotional, got '{category}'."
            )
        now = int(self.now())
        effective_at = _integer(params, "effective_at")
        expires_at = _integer(params, "expires_at")
        if expires_at is not None and expires_at <= (effective_at or now):
            raise _invalid("expires_at", "expires_at must be after effective_at (or now).")
        priority = _integer(params, "priority")
        priority = 50 if priority is None else priority
        if not 0 <= priority <= 100:
            raise _invalid("priority", "priority must be between 0 and 100.")
        name = _string(params, "name", max_length=100) or None
        metadata = _metadata(params) or {}
        grant: Json = {
            "id": self._new_id("credgr_test", 24),
            "object": "billing.credit_grant",
            "amount": {"monetary": {"currency": currency, "value": value}, "type": "monetary"},
            "applicability_config": {
                "scope": {
                    "price_type": price_type,
                    "prices": [{"id": p} for p in price_ids] if price_ids else None,
                }
            },
            "category": category,
            "created": now,
            "customer": customer,
            "customer_account": None,
            "effective_at": now if effective_at is None else effective_at,
            "expires_at": expires_at,
            "livemode": False,
            "metadata": metadata,
            "name": name,
            "priority": priority,
            "test_clock": None,
            "updated": now,
            "voided_at": None,
        }
        self.credit_grants[grant["id"]] = grant
        self._grant_balance[grant["id"]] = value
        self._emit("billing.credit_grant.created", grant, request)
        return grant

    def retrieve_credit_grant(self, request: ApiRequest) -> Json:
        return self._credit_grant(request.args["id"])

    def list_credit_grants(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"customer"})
        items = list(reversed(self.credit_grants.values()))
        customer = _string(params, "customer")
        if customer:
            items = [g for g in items if g["customer"] == customer]
        return _page(items, params, "/v1/billing/credit_grants")

    def void_credit_grant(self, request: ApiRequest) -> Json:
        grant = self._credit_grant(request.args["id"])
        if grant["voided_at"] is not None:
            raise _invalid("id", "This credit grant has already been voided.")
        now = int(self.now())
        return self._update(
            grant, {"voided_at": now, "updated": now}, "billing.credit_grant.updated", request
        )

    def expire_credit_grant(self, request: ApiRequest) -> Json:
        grant = self._credit_grant(request.args["id"])
        now = int(self.now())
        if grant["expires_at"] is not None and grant["expires_at"] <= now:
            raise _invalid("id", "This credit grant has already expired.")
        return self._update(
            grant, {"expires_at": now, "updated": now}, "billing.credit_grant.updated", request
        )

    def credit_balance_summary(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, frozenset({"customer", "filter"}))
        customer = _string(params, "customer", required=True)
        if customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        if "filter" not in params:
            raise _missing("filter")
        wanted = _object(params, "filter")
        kind = wanted.get("type")
        now = self.now()
        grants = [
            g
            for g in self.credit_grants.values()
            if g["customer"] == customer and self._grant_usable(g, now)
        ]
        if kind == "credit_grant":
            ident = wanted.get("credit_grant")
            if not ident:
                raise _missing("filter[credit_grant]")
            grants = [g for g in grants if g["id"] == ident]
        elif kind == "applicability_scope":
            scope = wanted.get("applicability_scope")
            if not isinstance(scope, dict):
                raise _missing("filter[applicability_scope]")
            if scope.get("price_type") == "metered":
                grants = [g for g in grants if g["applicability_config"]["scope"]["price_type"]]
            else:
                ids = {p.get("id") for p in scope.get("prices") or [] if isinstance(p, dict)}
                grants = [
                    g
                    for g in grants
                    if {p["id"] for p in g["applicability_config"]["scope"]["prices"] or []} & ids
                ]
        else:
            raise _invalid(
                "filter[type]", "Invalid filter[type]: must be applicability_scope or credit_grant."
            )
        totals: dict[str, int] = {}
        for grant in grants:
            currency = grant["amount"]["monetary"]["currency"]
            totals[currency] = totals.get(currency, 0) + self._grant_balance[grant["id"]]
        balances = [
            {
                "available_balance": _monetary(currency, value),
                "ledger_balance": _monetary(currency, value),
            }
            for currency, value in sorted(totals.items())
        ]
        return {
            "object": "billing.credit_balance_summary",
            "balances": balances,
            "customer": customer,
            "customer_account": None,
            "livemode": False,
        }

    # -- checkout (setup mode) ----------------------------------------------------------------

    def create_checkout_session(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _CHECKOUT_FIELDS)
        mode = _string(params, "mode", required=True)
        if mode != "setup":
            raise _invalid(
                "mode",
                f"The Stripe emulator supports only mode=setup Checkout Sessions, got '{mode}'.",
            )
        customer = _string(params, "customer")
        creation = _string(params, "customer_creation")
        email = _string(params, "customer_email", max_length=800)
        if customer and creation:
            raise _one_of("customer", "customer_creation")
        if customer and email:
            raise _one_of("customer", "customer_email")
        if customer and customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        if creation and creation not in ("always", "if_required"):
            raise _invalid(
                "customer_creation",
                f"Invalid customer_creation: must be always or if_required, got '{creation}'.",
            )
        methods = _strings(params, "allowed_payment_method_types")
        currency = _currency(params, "currency")
        if not currency and not methods:
            raise EmulatedError(
                400,
                "Missing required param: currency. In `setup` mode it is required when "
                "`allowed_payment_method_types` is not set.",
                param="currency",
                code="parameter_missing",
            )
        now = int(self.now())
        expires_at = _integer(params, "expires_at")
        if expires_at is None:
            expires_at = now + CHECKOUT_LIFETIME_SECONDS
        elif not now + 1800 <= expires_at <= now + CHECKOUT_LIFETIME_SECONDS:
            raise _invalid(
                "expires_at",
                "The `expires_at` timestamp must be between 30 minutes and 24 hours from now.",
            )
        setup_data = _object(params, "setup_intent_data")
        _only_keys(setup_data, frozenset({"description", "metadata"}), "setup_intent_data")
        setup_metadata = _metadata(setup_data) or {}
        session = copy.deepcopy(CHECKOUT_SESSION_SHAPE)
        session_id = "cs_test_" + self._random_chars(58)
        session.update(
            id=session_id,
            cancel_url=_string(params, "cancel_url") or None,
            client_reference_id=_string(params, "client_reference_id", max_length=200) or None,
            created=now,
            currency=currency or None,
            customer=customer or None,
            customer_creation=creation or None,
            customer_email=email or None,
            expires_at=expires_at,
            metadata=_metadata(params) or {},
            payment_method_types=methods or ["card"],
            success_url=_string(params, "success_url") or None,
            url=(
                f"{self.base_url}/_emulator/checkout/{session_id}"
                if self.base_url
                else f"https://checkout.stripe.com/c/pay/{session_id}"
            ),
        )
        self.checkout_sessions[session_id] = session
        self._setup_data[session_id] = {
            "description": _string(setup_data, "description") or None,
            "metadata": setup_metadata,
        }
        self._reschedule()
        return session

    def retrieve_checkout_session(self, request: ApiRequest) -> Json:
        return self._checkout_session(request.args["id"])

    def expire_checkout_session(self, request: ApiRequest) -> Json:
        session = self._checkout_session(request.args["id"])
        if session["status"] != "open":
            raise _invalid(
                "session", "Only Checkout Sessions with a status of `open` can be expired."
            )
        return self._expire_session(session, request)

    def _expire_session(self, session: Json, request: ApiRequest | None = None) -> Json:
        session.update(status="expired", url=None)
        self._reschedule()
        self._emit("checkout.session.expired", session, request)
        return session

    def complete_checkout(
        self, session_id: str, *, email: str | None = None, name: str | None = None
    ) -> Json:
        """What a customer finishing the hosted page does: for a setup session, a customer is
        created if ``customer_creation=always`` and none was given (Stripe creates none for
        ``if_required`` in setup mode), a SetupIntent succeeds with a new payment method and
        the session becomes ``complete``. Emits ``customer.created`` (when created),
        ``setup_intent.created``, ``setup_intent.succeeded``, ``checkout.session.completed``."""
        session = self._checkout_session(session_id)
        if session["status"] != "open":
            raise _invalid(
                "session", f"Checkout Session {session_id} is {session['status']}, not open."
            )
        customer_id = session["customer"]
        if customer_id is None and session["customer_creation"] == "always":
            fields: Json = {"email": email or session["customer_email"] or "customer@example.com"}
            if name:
                fields["name"] = name
            customer = self.add_customer(**fields)
            customer_id = customer["id"]
            self._emit("customer.created", customer)
        known = self.customers.get(customer_id) if customer_id else None
        email = email or (known or {}).get("email") or session["customer_email"]
        now = int(self.now())
        setup = copy.deepcopy(SETUP_INTENT_SHAPE)
        setup_id = self._new_id("seti", 24)
        setup.update(self._setup_data.get(session_id, {}))
        setup.update(
            id=setup_id,
            client_secret=f"{setup_id}_secret_{self._random_chars(32)}",
            created=now,
            customer=customer_id,
            latest_attempt=self._new_id("setatt", 24),
            payment_method=self._new_id("pm", 24),
            payment_method_types=list(session["payment_method_types"]),
        )
        self.setup_intents[setup_id] = setup
        self._emit("setup_intent.created", setup)
        self._emit("setup_intent.succeeded", setup)
        session.update(
            status="complete",
            customer=customer_id,
            setup_intent=setup_id,
            url=None,
            customer_details={
                "address": None,
                "business_name": None,
                "email": email,
                "individual_name": None,
                "name": name or (known or {}).get("name"),
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
        )
        self._reschedule()
        self._emit("checkout.session.completed", session)
        return session

    def retrieve_setup_intent(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        setup = self.setup_intents.get(ident)
        if setup is None:
            raise _no_such("setupintent", ident, "intent", status=404)
        return setup

    # -- webhook endpoints and events -------------------------------------------------------

    def create_webhook_endpoint(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _WEBHOOK_ENDPOINT_FIELDS)
        url = _webhook_url(_string(params, "url", required=True))
        events = _strings(params, "enabled_events")
        if not events:
            raise _missing("enabled_events")
        _check_event_types(events)
        if _boolean(params, "connect"):
            raise _invalid("connect", "The Stripe emulator has no Connect accounts.")
        endpoint = self.add_webhook_endpoint(
            url,
            events,
            description=_string(params, "description") or None,
            metadata=_metadata(params) or {},
            api_version=_string(params, "api_version") or None,
        )
        return endpoint

    def add_webhook_endpoint(
        self,
        url: str,
        enabled_events: Sequence[str] = ("*",),
        *,
        secret: str | None = None,
        description: str | None = None,
        metadata: Json | None = None,
        api_version: str | None = None,
    ) -> Json:
        """Register an endpoint directly (no HTTP), optionally with a chosen signing secret;
        returns it with its ``secret``, which, as on Stripe, no later read shows."""
        _webhook_url(url)
        _check_event_types(list(enabled_events))
        endpoint: Json = {
            "id": self._new_id("we", 24),
            "object": "webhook_endpoint",
            "api_version": api_version,
            "application": None,
            "created": int(self.now()),
            "description": description,
            "enabled_events": list(enabled_events),
            "livemode": False,
            "metadata": metadata or {},
            "status": "enabled",
            "url": url,
        }
        self.webhook_endpoints[endpoint["id"]] = endpoint
        self._endpoint_secrets[endpoint["id"]] = secret or "whsec_" + self._random_chars(32)
        return {**endpoint, "secret": self._endpoint_secrets[endpoint["id"]]}

    def update_webhook_endpoint(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, frozenset({"url", "enabled_events", "description", "metadata", "disabled"}))
        endpoint = self._webhook_endpoint(request.args["id"])
        changes: Json = {}
        if "url" in params:
            changes["url"] = _webhook_url(_string(params, "url", required=True))
        events = _strings(params, "enabled_events")
        if events is not None:
            _check_event_types(events)
            changes["enabled_events"] = events
        if "description" in params:
            changes["description"] = _string(params, "description") or None
        metadata = _metadata(params, endpoint["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        disabled = _boolean(params, "disabled")
        if disabled is not None:
            changes["status"] = "disabled" if disabled else "enabled"
        endpoint.update(changes)
        return endpoint

    def retrieve_webhook_endpoint(self, request: ApiRequest) -> Json:
        return self._webhook_endpoint(request.args["id"])

    def list_webhook_endpoints(self, request: ApiRequest) -> Json:
        _only(request.params, _LIST_FIELDS)
        items = list(reversed(self.webhook_endpoints.values()))
        return _page(items, request.params, "/v1/webhook_endpoints")

    def delete_webhook_endpoint(self, request: ApiRequest) -> Json:
        endpoint = self._webhook_endpoint(request.args["id"])
        del self.webhook_endpoints[endpoint["id"]]
        del self._endpoint_secrets[endpoint["id"]]
        for event_id, pending in self._undelivered.items():
            if endpoint["id"] in pending:
                pending.discard(endpoint["id"])
                self.stripe_events[event_id]["pending_webhooks"] = len(pending)
        return {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}

    def retrieve_event(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        event = self.stripe_events.get(ident)
        if event is None or event["created"] < self.now() - EVENT_RETENTION_SECONDS:
            raise _no_such("event", ident, "id", status=404)
        return event

    def list_events(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"type", "types", "delivery_success", "created"})
        oldest = self.now() - EVENT_RETENTION_SECONDS
        items = [e for e in reversed(self.stripe_events.values()) if e["created"] >= oldest]
        kind = _string(params, "type")
        types = _strings(params, "types", max_items=MAX_EVENT_TYPES)
        if kind and types:
            raise _one_of("type", "types")
        if kind:
            items = [e for e in items if _type_matches(kind, e["type"])]
        if types:
            items = [e for e in items if any(_type_matches(t, e["type"]) for t in types)]
        success = _boolean(params, "delivery_success")
        if success is not None:
            items = [e for e in items if (e["pending_webhooks"] == 0) is success]
        items = _created_filter(items, params)
        return _page(items, params, "/v1/events")

    # -- events and webhook delivery --------------------------------------------------------

    def _update(
        self, obj: Json, changes: Json, event_type: str, request: ApiRequest | None
    ) -> Json:
        """Apply `changes` to `obj`; if anything changed, emit `event_type` with the previous
        values as ``previous_attributes``."""
        previous = {k: copy.deepcopy(obj.get(k)) for k, v in changes.items() if obj.get(k) != v}
        if not previous:
            return obj
        obj.update(changes)
        if "updated" in obj and "updated" not in changes:
            obj["updated"] = int(self.now())
        self._emit(event_type, obj, request, previous=previous)
        return obj

    def _emit(
        self,
        event_type: str,
        obj: Json,
        request: ApiRequest | None = None,
        *,
        previous: Json | None = None,
    ) -> Json:
        """Record a Stripe ``event`` (a snapshot of `obj`) and queue it for every enabled
        endpoint subscribed to its type."""
        data: Json = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        endpoints = [
            e["id"]
            for e in self.webhook_endpoints.values()
            if e["status"] == "enabled" and _subscribed(e["enabled_events"], event_type)
        ]
        event: Json = {
            "id": self._new_id("evt", 24),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(self.now()),
            "data": data,
            "livemode": False,
            "pending_webhooks": len(endpoints),
            "request": {
                "id": request.request_id if request else None,
                "idempotency_key": request.headers.get("idempotency-key") if request else None,
            },
            "type": event_type,
        }
        self.stripe_events[event["id"]] = event
        self.counters.events_emitted += 1
        if endpoints:
            self._undelivered[event["id"]] = set(endpoints)
            body = msgspec.json.encode(event)
            for endpoint in endpoints:
                self._enqueue(Delivery(event["id"], endpoint, body))
                if self._draw_duplicate():
                    self.counters.webhook_duplicates += 1
                    self._enqueue(Delivery(event["id"], endpoint, body, duplicate=True))
        return event

    def set_webhooks(self, **changes: Any) -> WebhookSettings:
        """Change webhook settings (the fields of :class:`WebhookSettings`). Turning ``hold``
        off releases what it held, in order."""
        known = {f.name for f in dataclasses.fields(WebhookSettings)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown webhook settings: {sorted(unknown)}; known: {sorted(known)}")
        settings = dataclasses.replace(self.webhook_settings, **changes)
        settings.check()
        self.webhook_settings = settings
        if not settings.hold and self._held:
            self.release_webhooks("fifo")
        return settings

    def release_webhooks(self, order: str = "reverse") -> int:
        """Send the held deliveries now, in ``reverse``, ``shuffle`` or ``fifo`` order; returns
        how many. ``hold`` stays as it is."""
        if order not in ("reverse", "shuffle", "fifo"):
            raise ValueError("order must be reverse, shuffle or fifo")
        held, self._held = self._held, []
        if order == "reverse":
            held.reverse()
        elif order == "shuffle":
            self._webhook_rng.shuffle(held)
        due = time.monotonic()
        for delivery in held:
            self._sequence += 1
            heapq.heappush(self._outbox, (due, self._sequence, delivery))
        self._kick()
        return len(held)

    def redeliver(self, event_id: str, endpoint: str | None = None) -> int:
        """Send an event again (to `endpoint`, else to every enabled endpoint subscribed to its
        type), as the Dashboard's "Resend" does; returns how many deliveries were queued."""
        event = self.stripe_events.get(event_id)
        if event is None:
            raise _no_such("event", event_id, "id", status=404)
        if endpoint is not None:
            self._webhook_endpoint(endpoint)
            targets = [endpoint]
        else:
            targets = [
                e["id"]
                for e in self.webhook_endpoints.values()
                if e["status"] == "enabled" and _subscribed(e["enabled_events"], event["type"])
            ]
        body = msgspec.json.encode(event)
        for target in targets:
            self._enqueue(Delivery(event_id, target, body, redelivery=True))
        return len(targets)

    async def wait_for_webhooks(self, max_wait: float = 5.0) -> bool:
        """Wait until no delivery is queued, retrying or in flight (held ones aside); False if
        `max_wait` seconds pass first. Call it on the loop serving the emulator."""
        deadline = time.monotonic() + max_wait
        while self._outbox or self._sending:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _enqueue(self, delivery: Delivery, delay: float = 0.0) -> None:
        if self.webhook_settings.hold and delivery.attempts == 0:
            self._held.append(delivery)
            return
        self._sequence += 1
        heapq.heappush(self._outbox, (time.monotonic() + delay, self._sequence, delivery))
        self._kick()

    def _draw_duplicate(self) -> bool:
        settings = self.webhook_settings
        if settings.duplicate_next:
            settings.duplicate_next -= 1
            return True
        return bool(settings.duplicate_rate) and (
            self._webhook_rng.random() < settings.duplicate_rate
        )

    def _kick(self) -> None:
        """Make sure the dispatcher runs on the loop serving the app, from any thread."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or self._loop.is_closed():
            if running is None:
                return  # not served yet: delivered once it is
            self._loop = running  # served by something else (uvicorn): adopt its loop
        if running is self._loop:
            self._ensure_dispatcher()
        else:
            self._loop.call_soon_threadsafe(self._ensure_dispatcher)

    def _ensure_dispatcher(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        self._wake.set()

    async def _attach(self) -> None:
        """Called by serve_emulator once serving: deliveries run on this loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._dispatcher = None
        if self._outbox:
            self._ensure_dispatcher()
        self._reschedule()

    async def _detach(self) -> None:
        """Stop delivering (what is queued stays queued) and stop the due-time timer."""
        task, self._dispatcher = self._dispatcher, None
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop = None

    async def _dispatch(self) -> None:
        """Deliver queued attempts in due order, one at a time (a slow endpoint delays the
        others by at most its timeout); failed attempts are queued again with backoff."""
        async with httpx.AsyncClient(trust_env=False) as http:
            while True:
                wake = self._wake
                assert wake is not None
                wake.clear()
                if not self._outbox:
                    await wake.wait()
                    continue
                due, _, delivery = self._outbox[0]
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
                    continue
                heapq.heappop(self._outbox)
                self._sending += 1
                try:
                    await self._attempt(http, delivery)
                finally:
                    self._sending -= 1

    async def _attempt(self, http: httpx.AsyncClient, delivery: Delivery) -> None:
        endpoint = self.webhook_endpoints.get(delivery.endpoint)
        secret = self._endpoint_secrets.get(delivery.endpoint)
        if endpoint is None or secret is None or endpoint["status"] != "enabled":
            return  # deleted or disabled since
        settings = self.webhook_settings
        delivery.attempts += 1
        signed_at = int(self.now())
        event = self.stripe_events.get(delivery.event, {})
        record: Json = {
            "event": delivery.event,
            "type": event.get("type"),
            "endpoint": delivery.endpoint,
            "url": endpoint["url"],
            "attempt": delivery.attempts,
            "duplicate": delivery.duplicate,
            "redelivery": delivery.redelivery,
            "signed_at": signed_at,
            "at": self.now(),
            "status": None,
            "error": None,
            "response": None,
            "ok": False,
            "will_retry": False,
        }
        self.counters.webhook_attempts += 1
        try:
            response = await http.post(
                endpoint["url"],
                content=delivery.body,
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                    "Cache-Control": "no-cache",
                    "Stripe-Signature": signature_header(delivery.body, secret, signed_at),
                },
                timeout=settings.timeout,
            )
            record["status"] = response.status_code
            record["response"] = response.text[:500]
            record["ok"] = 200 <= response.status_code < 300
        except Exception as exc:  # refused, timed out, bad URL...: a failed attempt
            record["error"] = f"{type(exc).__name__}: {exc}"
        if record["ok"]:
            self.counters.webhooks_delivered += 1
            pending = self._undelivered.get(delivery.event)
            if pending is not None and delivery.endpoint in pending:
                pending.discard(delivery.endpoint)
                event["pending_webhooks"] = len(pending)
        else:
            self.counters.webhook_failures += 1
            if delivery.attempts < settings.max_attempts:
                record["will_retry"] = True
                backoff = settings.retry_base * 2 ** (delivery.attempts - 1)
                self._enqueue(delivery, min(settings.retry_max, backoff))
            else:
                self.counters.webhooks_abandoned += 1
        self.deliveries.append(record)

    # -- time: period ends, automatic finalization, session expiry -------------------------

    def close_period(self, subscription_id: str, *, at: str = "period_end") -> Json:
        """Close a subscription's current period and return its (draft) invoice.

        ``at="period_end"`` moves the emulator clock to the period's end, as a Stripe test
        clock would (everything else due by then happens too); ``at="now"`` ends the period at
        the current emulator time instead and restarts the billing cycle there.
        """
        state = self._subscription(subscription_id)
        if not state.active:
            raise _invalid("subscription", f"Subscription {subscription_id} is canceled.")
        start, end = state.bounds()
        if at == "now":
            now = int(self.now())
            if now <= start:
                raise _invalid(
                    "at", "The current period started this second: nothing to close yet."
                )
            invoice = self._close_period(state, end=now)
            self._run_due()
            return invoice
        if at != "period_end":
            raise _invalid("at", "at must be period_end or now")
        self.advance(max(0.0, end - self.now()) + 0.001)  # a margin over float rounding
        for invoice in self.invoices.values():
            if _invoice_subscription(invoice) == subscription_id and (
                invoice["period_start"],
                invoice["period_end"],
            ) == (start, end):
                return invoice
        raise RuntimeError(f"closing {subscription_id} produced no invoice")  # pragma: no cover

    def _run_due(self) -> None:
        now = self.now()
        if now < self._due_at:
            return
        for state in list(self.subscriptions.values()):
            while state.active and state.bounds()[1] <= now:
                self._close_period(state)
        for invoice_id, when in sorted(self._auto_finalize.items(), key=lambda kv: kv[1]):
            if when <= now and self.invoices[invoice_id]["status"] == "draft":
                self.finalize_invoice(invoice_id)
        for session in list(self.checkout_sessions.values()):
            if session["status"] == "open" and session["expires_at"] <= now:
                self._expire_session(session)
        self._reschedule()

    def _reschedule(self) -> None:
        """Note when something next falls due, and wake up then (a timer on the loop)."""
        due = min(
            (
                *(s.bounds()[1] for s in self.subscriptions.values() if s.active),
                *self._auto_finalize.values(),
                *(
                    s["expires_at"]
                    for s in self.checkout_sessions.values()
                    if s["status"] == "open"
                ),
            ),
            default=math.inf,
        )
        self._due_at = due
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if due == math.inf or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            wait = min(max(0.0, due - self.now()), float(DAY))
            self._due_timer = running.call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._due_timer = None
        if self._due_at <= self.now():
            self._run_due()
        else:
            self._reschedule()  # woke early (a capped wait, or a clock that is not real time)

    # -- helpers --------------------------------------------------------------------------------

    def _meter(self, ident: str) -> Meter:
        meter = self.meters.get(ident)
        if meter is None:
            raise _no_such("billing meter", ident, "id", status=404)
        return meter

    def _product(self, ident: str) -> Json:
        product = self.products.get(ident)
        if product is None:
            raise _no_such("product", ident, "id", status=404)
        return product

    def _price(self, ident: str) -> Json:
        price = self.prices.get(ident)
        if price is None:
            raise _no_such("price", ident, "price", status=404)
        return price

    def _subscription(self, ident: str) -> SubscriptionState:
        state = self.subscriptions.get(ident)
        if state is None:
            raise _no_such("subscription", ident, "id", status=404)
        return state

    def _invoice(self, ident: str) -> Json:
        invoice = self.invoices.get(ident)
        if invoice is None:
            raise _no_such("invoice", ident, "invoice", status=404)
        return invoice

    def _credit_grant(self, ident: str) -> Json:
        grant = self.credit_grants.get(ident)
        if grant is None:
            raise _no_such("credit grant", ident, "id", status=404)
        return grant

    def _checkout_session(self, ident: str) -> Json:
        session = self.checkout_sessions.get(ident)
        if session is None:
            raise _no_such("checkout.session", ident, "session", status=404)
        return session

    def _webhook_endpoint(self, ident: str) -> Json:
        endpoint = self.webhook_endpoints.get(ident)
        if endpoint is None:
            raise _no_such("webhook endpoint", ident, "id", status=404)
        return endpoint

    def _aggregate(self, meter: Meter, customer: str, start: int, end: int) -> int:
        events = [
            e
            for e in self.events.get((meter.id, customer), ())
            if not e.cancelled and start <= e.timestamp < end
        ]
        if meter.formula == "count":
            return len(events)
        if meter.formula == "last":
            return max(events, key=lambda e: (e.timestamp, e.received_at)).value if events else 0
        return sum(e.value for e in events)

    def _lane(self, route: Route, params: Json) -> tuple[str, str] | None:
        if not route.meter_event or not self.faults.latency_ms:
            return None
        event_name = params.get("event_name")
        meter = self._meters_by_event.get(event_name) if isinstance(event_name, str) else None
        payload = params.get("payload")
        if meter is None or not isinstance(payload, dict):
            return None
        customer = payload.get(meter.customer_key)
        return (meter.event_name, customer) if isinstance(customer, str) else None

    def _forget_expired(self) -> None:
        """Drop identifiers and idempotency keys older than Stripe remembers them."""
        now = self.now()
        identifiers = self._identifiers
        while identifiers:
            oldest = next(iter(identifiers))
            if now - identifiers[oldest].received_at < IDENTIFIER_MEMORY_SECONDS:
                break
            del identifiers[oldest]
        keys = self._idempotency
        while keys:
            oldest = next(iter(keys))
            if now - keys[oldest].saved_at < IDEMPOTENCY_KEY_SECONDS:
                break
            del keys[oldest]

    def _take_token(self) -> bool:
        rate = self.faults.rate_limit
        if rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _note_request(self, now: float) -> None:
        window = self._window
        window.append(now)
        while window[0] <= now - 1.0:
            window.popleft()
        if len(window) > self._max_per_second:
            self._max_per_second = len(window)

    def _draw_drop(self) -> bool:
        if self.faults.drop_next:
            self.faults.drop_next -= 1
            return True
        return bool(self.faults.drop_rate) and self._rng.random() < self.faults.drop_rate

    def _random_chars(self, n: int) -> str:
        return "".join(self._ids.choices(_ID_ALPHABET, k=n))

    def _new_id(self, prefix: str, n: int) -> str:
        return f"{prefix}_{self._random_chars(n)}"

    def _log_event(self, event: AcceptedEvent) -> None:
        when = datetime.fromtimestamp(event.timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        again = self._acceptances[event.identifier]
        note = f"  (accepted {again} times: identifier reused after 24 h)" if again > 1 else ""
        print(
            f"[stripe-emulator] meter event accepted  {event.event_name} "
            f"customer={event.customer} value={event.value} at={when} "
            f"identifier={event.identifier}{note}",
            flush=True,
        )

    # -- test hooks -----------------------------------------------------------------------------

    async def _hook(self, method: str, path: str, query: str, body: bytes) -> Reply:
        try:
            data: Json = msgspec.json.decode(body) if body.strip() else {}
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            if self._due_at <= self.now():
                self._run_due()
            if (method, path) == ("GET", "/_emulator/state"):
                flags = dict(parse_qsl(query))
                wanted = flags.get("identifiers", "").lower() in ("1", "true", "yes")
                return _json_reply(200, self.state(identifiers=wanted), "")
            if (method, path) == ("POST", "/_emulator/clock"):
                self.advance(float(data.get("advance", 0)))
                return _json_reply(200, {"now": self.now(), "offset": self._offset}, "")
            if (method, path) == ("POST", "/_emulator/faults"):
                faults = self.set_faults(**data)
                return _json_reply(200, dataclasses.asdict(faults), "")
            if (method, path) == ("POST", "/_emulator/reset"):
                self.reset()
                return _json_reply(200, {"reset": True}, "")
            if (method, path) == ("GET", "/_emulator/webhooks"):
                return _json_reply(200, dataclasses.asdict(self.webhook_settings), "")
            if (method, path) == ("POST", "/_emulator/webhooks"):
                settings = self.set_webhooks(**data)
                return _json_reply(200, dataclasses.asdict(settings), "")
            if (method, path) == ("POST", "/_emulator/webhooks/release"):
                released = self.release_webhooks(str(data.get("order", "reverse")))
                return _json_reply(200, {"released": released}, "")
            if (method, path) == ("POST", "/_emulator/webhooks/flush"):
                idle = await self.wait_for_webhooks(float(data.get("timeout", 5.0)))
                pending = len(self._outbox) + self._sending
                return _json_reply(200, {"idle": idle, "pending": pending}, "")
            if (method, path) == ("POST", "/_emulator/webhook_endpoints"):
                events = data.get("enabled_events", ["*"])
                if not isinstance(events, list):
                    raise ValueError("enabled_events must be a list of event types")
                endpoint = self.add_webhook_endpoint(
                    str(data["url"]), [str(e) for e in events], secret=data.get("secret")
                )
                return _json_reply(200, endpoint, "")
            if (method, path) == ("GET", "/_emulator/deliveries"):
                flags = dict(parse_qsl(query))
                records = [
                    r
                    for r in self.deliveries
                    if all(str(r.get(k)) == v for k, v in flags.items() if k in _DELIVERY_FILTERS)
                ]
                return _json_reply(
                    200,
                    {
                        "data": records,
                        "pending": len(self._outbox) + self._sending,
                        "held": len(self._held),
                    },
                    "",
                )
            if (method, path) == ("POST", "/_emulator/billing"):
                if "invoice_finalize_delay" in data:
                    delay = data["invoice_finalize_delay"]
                    if delay is not None and float(delay) < 0:
                        raise ValueError("invoice_finalize_delay must not be negative")
                    self.invoice_finalize_delay = None if delay is None else float(delay)
                return _json_reply(200, {"invoice_finalize_delay": self.invoice_finalize_delay}, "")
            match = _HOOK_PATH.match(path)
            if match is not None:
                kind, ident, action = match.group("kind", "id", "action")
                if (method, kind, action) == ("POST", "checkout", "complete"):
                    session = self.complete_checkout(
                        ident, email=data.get("email"), name=data.get("name")
                    )
                    return _json_reply(200, session, "")
                if (method, kind, action) == ("GET", "checkout", None):
                    return self._checkout_page(ident)
                if (method, kind, action) == ("POST", "subscriptions", "advance"):
                    invoice = self.close_period(ident, at=str(data.get("at", "period_end")))
                    subscription = self.subscriptions[ident].obj
                    return _json_reply(
                        200,
                        {"invoice": invoice, "subscription": subscription, "now": self.now()},
                        "",
                    )
                if (method, kind, action) == ("POST", "invoices", "finalize"):
                    return _json_reply(200, self.finalize_invoice(ident), "")
                if (method, kind, action) == ("POST", "events", "redeliver"):
                    target = data.get("endpoint")
                    queued = self.redeliver(ident, None if target is None else str(target))
                    return _json_reply(200, {"queued": queued}, "")
        except EmulatedError as exc:
            return _json_reply(exc.status, exc.body(), "")
        except (ValueError, TypeError, KeyError, msgspec.DecodeError) as exc:
            return _json_reply(400, {"error": {"type": "emulator_error", "message": str(exc)}}, "")
        return _json_reply(
            404, {"error": {"type": "emulator_error", "message": f"no hook {method} {path}"}}, ""
        )

    def _checkout_page(self, session_id: str) -> Reply:
        """The session's ``url``: visiting it completes the session, as a customer would, then
        redirects to ``success_url`` (``{CHECKOUT_SESSION_ID}`` filled in) if there is one."""
        session = self._checkout_session(session_id)
        if session["status"] == "open":
            self.complete_checkout(session_id)
        target = session["success_url"]
        if not target:
            return _json_reply(200, session, "")
        location = target.replace("{CHECKOUT_SESSION_ID}", session_id).encode()
        return Reply(303, b"", [(b"location", location), (b"content-length", b"0")])


# ---------------------------------------------------------------------------------------------
# Routing table and per-endpoint parameter lists

_LIST_FIELDS = frozenset({"limit", "starting_after", "ending_before"})
_CUSTOMER_FIELDS = frozenset(
    {"email", "name", "description", "phone", "metadata", "address", "shipping"}
)
_METER_FIELDS = frozenset(
    {
        "display_name",
        "event_name",
        "default_aggregation",
        "customer_mapping",
        "value_settings",
        "event_time_window",
    }
)
_METER_EVENT_FIELDS = frozenset({"event_name", "payload", "identifier", "timestamp"})
_ADJUSTMENT_FIELDS = frozenset({"event_name", "type", "cancel"})
_PRODUCT_FIELDS = frozenset(
    {
        "active",
        "description",
        "id",
        "metadata",
        "name",
        "statement_descriptor",
        "tax_code",
        "unit_label",
        "url",
    }
)
_PRODUCT_DATA_FIELDS = frozenset(
    {"active", "metadata", "name", "statement_descriptor", "tax_code", "unit_label"}
)
_PRICE_FIELDS = frozenset(
    {
        "active",
        "billing_scheme",
        "currency",
        "lookup_key",
        "metadata",
        "nickname",
        "product",
        "product_data",
        "recurring",
        "tax_behavior",
        "transfer_lookup_key",
        "unit_amount",
        "unit_amount_decimal",
    }
)
_PRICE_UPDATE_FIELDS = frozenset(
    {"active", "lookup_key", "metadata", "nickname", "transfer_lookup_key"}
)
_RECURRING_FIELDS = frozenset(
    {"interval", "interval_count", "meter", "trial_period_days", "usage_type"}
)
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
_CREDIT_GRANT_FIELDS = frozenset(
    {
        "amount",
        "applicability_config",
        "category",
        "customer",
        "effective_at",
        "expires_at",
        "metadata",
        "name",
        "priority",
    }
)
_CHECKOUT_FIELDS = frozenset(
    {
        "allowed_payment_method_types",
        "cancel_url",
        "client_reference_id",
        "currency",
        "customer",
        "customer_creation",
        "customer_email",
        "expires_at",
        "metadata",
        "mode",
        "setup_intent_data",
        "success_url",
    }
)
_WEBHOOK_ENDPOINT_FIELDS = frozenset(
    {"api_version", "connect", "description", "enabled_events", "metadata", "url"}
)
_DELIVERY_FILTERS = frozenset({"event", "endpoint", "type", "ok"})
_HOOK_PATH = re.compile(
    r"^/_emulator/(?P<kind>checkout|subscriptions|invoices|events)/(?P<id>[^/]+)"
    r"(?:/(?P<action>[a-z_]+))?$"
)

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/billing/meter_events", StripeEmulator.create_meter_event, meter_event=True),
    Route(
        "POST", "/v1/billing/meter_event_adjustments", StripeEmulator.create_meter_event_adjustment
    ),
    Route("GET", "/v1/billing/meters/{id}/event_summaries", StripeEmulator.list_event_summaries),
    Route("POST", "/v1/billing/meters", StripeEmulator.create_meter),
    Route("GET", "/v1/billing/meters", StripeEmulator.list_meters),
    Route("GET", "/v1/billing/meters/{id}", StripeEmulator.retrieve_meter),
    Route("POST", "/v1/billing/meters/{id}/deactivate", StripeEmulator.deactivate_meter),
    Route("POST", "/v1/billing/meters/{id}/reactivate", StripeEmulator.reactivate_meter),
    Route("POST", "/v1/customers", StripeEmulator.create_customer),
    Route("GET", "/v1/customers", StripeEmulator.list_customers),
    Route("GET", "/v1/customers/{id}", StripeEmulator.retrieve_customer),
    Route("POST", "/v1/products", StripeEmulator.create_product),
    Route("GET", "/v1/products", StripeEmulator.list_products),
    Route("GET", "/v1/products/{id}", StripeEmulator.retrieve_product),
    Route("POST", "/v1/products/{id}", StripeEmulator.update_product),
    Route("POST", "/v1/prices", StripeEmulator.create_price),
    Route("GET", "/v1/prices", StripeEmulator.list_prices),
    Route("GET", "/v1/prices/{id}", StripeEmulator.retrieve_price),
    Route("POST", "/v1/prices/{id}", StripeEmulator.update_price),
    Route("POST", "/v1/subscriptions", StripeEmulator.create_subscription),
    Route("GET", "/v1/subscriptions", StripeEmulator.list_subscriptions),
    Route("GET", "/v1/subscriptions/{id}", StripeEmulator.retrieve_subscription),
    Route("DELETE", "/v1/subscriptions/{id}", StripeEmulator.cancel_subscription),
    Route("GET", "/v1/invoices", StripeEmulator.list_invoices),
    Route("GET", "/v1/invoices/{id}", StripeEmulator.retrieve_invoice),
    Route("POST", "/v1/invoices/{id}/finalize", StripeEmulator.finalize_invoice_request),
    Route("POST", "/v1/billing/credit_grants", StripeEmulator.create_credit_grant),
    Route("GET", "/v1/billing/credit_grants", StripeEmulator.list_credit_grants),
    Route("GET", "/v1/billing/credit_grants/{id}", StripeEmulator.retrieve_credit_grant),
    Route("POST", "/v1/billing/credit_grants/{id}/void", StripeEmulator.void_credit_grant),
    Route("POST", "/v1/billing/credit_grants/{id}/expire", StripeEmulator.expire_credit_grant),
    Route("GET", "/v1/billing/credit_balance_summary", StripeEmulator.credit_balance_summary),
    Route("POST", "/v1/checkout/sessions", StripeEmulator.create_checkout_session),
    Route("GET", "/v1/checkout/sessions/{id}", StripeEmulator.retrieve_checkout_session),
    Route("POST", "/v1/checkout/sessions/{id}/expire", StripeEmulator.expire_checkout_session),
    Route("GET", "/v1/setup_intents/{id}", StripeEmulator.retrieve_setup_intent),
    Route("POST", "/v1/webhook_endpoints", StripeEmulator.create_webhook_endpoint),
    Route("GET", "/v1/webhook_endpoints", StripeEmulator.list_webhook_endpoints),
    Route("GET", "/v1/webhook_endpoints/{id}", StripeEmulator.retrieve_webhook_endpoint),
    Route("POST", "/v1/webhook_endpoints/{id}", StripeEmulator.update_webhook_endpoint),
    Route("DELETE", "/v1/webhook_endpoints/{id}", StripeEmulator.delete_webhook_endpoint),
    Route("GET", "/v1/events", StripeEmulator.list_events),
    Route("GET", "/v1/events/{id}", StripeEmulator.retrieve_event),
)

_EXACT: dict[tuple[str, str], Route] = {
    (r.method, r.pattern): r for r in ROUTES if "{" not in r.pattern
}
_PATTERNS: list[tuple[Route, re.Pattern[str]]] = [
    (r, r.compile()) for r in ROUTES if "{" in r.pattern
]


def _route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    route = _EXACT.get((method, path))
    if route is not None:
        return route, {}
    for candidate, pattern in _PATTERNS:
        if candidate.method == method:
            match = pattern.match(path)
            if match:
                return candidate, match.groupdict()
    raise EmulatedError(
        404,
        f"Unrecognized request URL ({method}: {path}). The Stripe emulator supports only the "
        "endpoints the control plane uses.",
    )


# ---------------------------------------------------------------------------------------------
# Pure helpers


def _authenticate(authorization: str | None) -> None:
    if not authorization:
        raise EmulatedError(401, MESSAGE_NO_API_KEY)
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() == "basic":  # curl -u sk_test_...: (the key as the user name)
        with contextlib.suppress(ValueError):
            key = base64.b64decode(key, validate=True).decode("latin-1").partition(":")[0]
        scheme = "bearer"
    if scheme.lower() != "bearer" or not key.startswith(("sk_", "rk_")):
        raise EmulatedError(401, f"Invalid API Key provided: {_mask(key)}")


def _mask(key: str) -> str:
    """Stripe's way of naming a key in an error: never the whole key."""
    if len(key) < 12:
        return "*" * len(key)
    prefix = key[: key.find("_", 3) + 1] if key.count("_") >= 2 else key[:3]
    return prefix + "*" * (len(key) - len(prefix) - 4) + key[-4:]


def _event_value(meter: Meter, payload: Json) -> int:
    raw = payload.get(meter.value_key)
    param = f"payload[{meter.value_key}]"
    if raw is None or raw == "":
        if meter.formula == "count":
            return 1
        raise EmulatedError(
            400,
            f"The payload is missing the key '{meter.value_key}' that holds this meter's value.",
            param=param,
            code="meter_event_invalid_value",
        )
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
        raise EmulatedError(
            400,
            f"Invalid value '{raw}' for {param}: meter event values must be whole numbers.",
            param=param,
            code="meter_event_invalid_value",
        )
    if len(raw.lstrip("-").lstrip("0")) > MAX_VALUE_DIGITS:
        raise EmulatedError(
            400,
            f"Invalid value for {param}: at most {MAX_VALUE_DIGITS} significant digits.",
            param=param,
            code="meter_event_value_too_many_digits",
        )
    return int(raw)


def _check_timestamp(timestamp: int, now: float) -> None:
    oldest = math.ceil(now) - MAX_PAST_SECONDS
    newest = int(now) + MAX_FUTURE_SECONDS
    if timestamp < oldest:
        raise EmulatedError(
            400,
            "The event timestamp cannot be more than 35 days in past. Expected a timestamp "
            f"greater than or equal to {oldest}.",
            param="timestamp",
            code="timestamp_too_far_in_past",
        )
    if timestamp > newest:
        raise EmulatedError(
            400,
            "The event timestamp cannot be more than 5 minutes in the future. Expected a "
            f"timestamp less than or equal to {newest}.",
            param="timestamp",
            code="timestamp_in_future",
        )


def _summary_id(meter: str, customer: str, start: int, end: int) -> str:
    digest = hashlib.blake2b(f"{meter}|{customer}|{start}|{end}".encode(), digest_size=12)
    return "mtrusg_" + digest.hexdigest()


def signature_header(payload: bytes, secret: str, timestamp: int) -> str:
    """Stripe's ``Stripe-Signature`` value: ``t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{body}">``,
    keyed with the endpoint's ``whsec_...`` secret (what ``stripe.Webhook.construct_event``
    checks)."""
    signed = str(timestamp).encode() + b"." + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _add_interval(ts: int, interval: str, count: int) -> int:
    """`ts` plus `count` intervals; months and years keep the day of month, clamped to the
    month's last day (Jan 31 + 1 month = Feb 28), as Stripe's billing cycles do."""
    if interval == "day":
        return ts + count * DAY
    if interval == "week":
        return ts + count * 7 * DAY
    months = count * (12 if interval == "year" else 1)
    start = datetime.fromtimestamp(ts, UTC)
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def _unit_amount(params: Json) -> tuple[int | None, str]:
    """(unit_amount, unit_amount_decimal) of a new price: exactly one of them is given."""
    unit_amount = _integer(params, "unit_amount")
    decimal = _string(params, "unit_amount_decimal")
    if unit_amount is not None and decimal:
        raise _one_of("unit_amount", "unit_amount_decimal")
    if unit_amount is None and not decimal:
        raise EmulatedError(
            400,
            "Prices require an `unit_amount` or `unit_amount_decimal` parameter to be set.",
            param="unit_amount",
        )
    if unit_amount is not None:
        if unit_amount < 0:
            raise _invalid("unit_amount", "Invalid unit_amount: must be at least 0.")
        return unit_amount, str(unit_amount)
    if not re.fullmatch(r"\d+(\.\d{1,12})?", decimal):
        raise _invalid(
            "unit_amount_decimal",
            f"Invalid decimal: {decimal}. unit_amount_decimal takes at most 12 decimal places.",
        )
    try:
        Decimal(decimal)
    except InvalidOperation as exc:  # pragma: no cover - the pattern above rules it out
        raise _invalid("unit_amount_decimal", f"Invalid decimal: {decimal}.") from exc
    return None, decimal


def _invoice_subscription(invoice: Json) -> str | None:
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    subscription = details.get("subscription")
    return str(subscription) if subscription else None


def _invoice_totals(invoice: Json) -> None:
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


def _grant_applies(grant: Json, price: Json) -> bool:
    scope = grant["applicability_config"]["scope"]
    if scope["price_type"] == "metered":
        recurring = price["recurring"]
        return bool(recurring and recurring["usage_type"] == "metered")
    return any(p["id"] == price["id"] for p in scope["prices"] or ())


def _monetary(currency: str, value: int) -> Json:
    return {"monetary": {"currency": currency, "value": value}, "type": "monetary"}


def _webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid("url", f"Invalid URL: {url}. An endpoint's URL must be http(s)://host/...")
    return url


_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


def _check_event_types(types: list[str]) -> None:
    for index, value in enumerate(types):
        if value != "*" and not _EVENT_TYPE.match(value):
            raise _invalid(
                f"enabled_events[{index}]",
                f"Invalid enabled_events[{index}]: '{value}' is not an event type.",
            )


def _subscribed(enabled: list[str], event_type: str) -> bool:
    return "*" in enabled or event_type in enabled


def _type_matches(pattern: str, event_type: str) -> bool:
    """A ``type`` filter of the events list: exact, or with ``*`` wildcards (``invoice.*``)."""
    if "*" not in pattern:
        return pattern == event_type
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, event_type) is not None


def _created_filter(items: list[Json], params: Json) -> list[Json]:
    created = params.get("created")
    if created is None or created == "":
        return items
    if isinstance(created, str):
        exact = _integer(params, "created")
        return [i for i in items if i["created"] == exact]
    if not isinstance(created, dict):
        raise _invalid("created", "Invalid created: an integer or a range.")
    _only_keys(created, frozenset({"gt", "gte", "lt", "lte"}), "created")
    tests: dict[str, Callable[[int, int], bool]] = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }
    for key in created:
        bound = _integer(created, key)
        assert bound is not None
        items = [i for i in items if tests[key](int(i["created"]), bound)]
    return items


def _page(items: list[Json], params: Json, url: str) -> Json:
    limit = _integer(params, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise _invalid("limit", "Invalid limit: must be between 1 and 100.")
    after = _string(params, "starting_after")
    before = _string(params, "ending_before")
    ids = [item["id"] for item in items]
    if after:
        if after not in ids:
            raise _invalid("starting_after", f"No such object: '{after}'", code="resource_missing")
        rest = items[ids.index(after) + 1 :]
        page, has_more = rest[:limit], len(rest) > limit
    elif before:
        if before not in ids:
            raise _invalid("ending_before", f"No such object: '{before}'", code="resource_missing")
        head = items[: ids.index(before)]
        page, has_more = head[-limit:], len(head) > limit
    else:
        page, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _json_reply(status: int, obj: Json, request_id: str) -> Reply:
    body = msgspec.json.encode(obj)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if request_id:
        headers.append((b"request-id", request_id.encode()))
    return Reply(status, body, headers)


def _error_reply(exc: EmulatedError, request_id: str) -> Reply:
    reply = _json_reply(exc.status, exc.body(), request_id)
    reply.headers.extend((k.lower().encode(), v.encode()) for k, v in exc.headers)
    return reply


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------------------------------------
# Serving: a small HTTP/1.1 server for the ASGI app
#
# The app is plain ASGI and runs under uvicorn too (`uvicorn.run(StripeEmulator().app)`), but
# uvicorn without httptools parses HTTP with h11 in pure Python, which caps the emulator near
# 2,000 requests/s on a small machine. This server handles exactly what HTTP clients of Stripe
# send (Content-Length bodies, keep-alive, pipelining) and writes each response in one piece,
# which is about three times faster, so the emulator is never the bottleneck of a benchmark.

_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_REASONS = {
    200: b"OK",
    303: b"See Other",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    409: b"Conflict",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
}


class _Connection(asyncio.Protocol):
    """One client connection: parse requests in order, run the app, write the replies."""

    def __init__(self, server: EmulatorServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._closed = asyncio.get_running_loop().create_future()
        self._client: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._client = (str(peer[0]), int(peer[1])) if peer else None
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next()

    def close(self) -> None:
        if self._transport is not None and not self._busy:
            self._transport.close()

    def _next(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self._fail(431, b"request head too large")
            return
        try:
            lines = bytes(self._buffer[:end]).split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            headers: list[tuple[bytes, bytes]] = []
            length = 0
            keep_alive = version == b"HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                value = value.strip()
                headers.append((name, value))
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    keep_alive = value.lower() == b"keep-alive" or (
                        keep_alive and value.lower() != b"close"
                    )
                elif name == b"transfer-encoding":
                    self._fail(501, b"chunked request bodies are not supported")
                    return
        except ValueError:
            self._fail(400, b"malformed request")
            return
        if length > _MAX_BODY:
            self._fail(413, b"request body too large")
            return
        start = end + 4
        if len(self._buffer) < start + length:
            return  # wait for the rest of the body
        body = bytes(self._buffer[start : start + length])
        del self._buffer[: start + length]
        self._busy = True
        asyncio.get_running_loop().create_task(
            self._respond(method.decode("latin-1"), target, headers, body, keep_alive)
        )

    async def _respond(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        raw_path, _, query = target.partition(b"?")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self._client,
            "server": self._server.address,
        }
        delivered = False
        status = 500
        out_headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        complete = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._closed
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, out_headers, complete
            if message["type"] == "http.response.start":
                status = int(message["status"])
                out_headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                complete = not message.get("more_body", False)

        try:
            await self._server.app(scope, receive, send)
        except Exception:
            log.exception("stripe_emulator.app_failed")
            status, out_headers, chunks, complete, keep_alive = 500, [], [b""], True, False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        payload = b"".join(chunks)
        head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
        has_length = False
        for name, value in out_headers:
            has_length = has_length or name.lower() == b"content-length"
            head.append(name + b": " + value)
        if not has_length:
            head.append(b"content-length: %d" % len(payload))
        if not keep_alive:
            head.append(b"connection: close")
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + payload)
        if not complete:  # the app cut the response short (a drop fault): so does the socket
            transport.close()
            return
        self._busy = False
        if not keep_alive or self._server.closing:
            transport.close()
        elif self._buffer:
            self._next()

    def _fail(self, status: int, message: bytes) -> None:
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(message), message)
        )
        self._transport.close()


class EmulatorServer:
    """Serves an ASGI app over HTTP/1.1 on a bound socket, on the running event loop."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.connections: set[_Connection] = set()
        self.closing = False
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sockname = sock.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)

    async def stop(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        for _ in range(200):  # let in-flight replies finish (at most about two seconds)
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        if self._server is not None:
            await self._server.wait_closed()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets that say so,
    # and without it Nagle's algorithm stalls replies for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def serve_emulator(
    emulator: StripeEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `emulator` on the running event loop (port 0: a free one); yields the base URL."""
    emulator = emulator or StripeEmulator()
    sock = _bind(host, port)
    server = EmulatorServer(emulator.app)
    try:
        await server.start(sock)
        emulator.base_url = _url(host, sock)
        await emulator._attach()
        yield emulator.base_url
    finally:
        await emulator._detach()
        await server.stop()
        sock.close()
        emulator.base_url = None


@contextmanager
def serve_emulator_in_thread(
    emulator: StripeEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve `emulator` from a background thread with its own event loop; yields the base URL.

    For synchronous tests, or to keep the emulator off the caller's event loop. Its state is
    then touched from that thread: read it through the HTTP hooks, or while no call is in flight.
    """
    emulator = emulator or StripeEmulator()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        async with serve_emulator(emulator, host=host, port=port):
            ready.set()
            await stop.wait()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=main, name="stripe-emulator", daemon=True)
    thread.start()
    ready.wait()
    try:
        if failure or emulator.base_url is None:
            raise RuntimeError("the Stripe emulator failed to start") from (
                failure[0] if failure else None
            )
        yield emulator.base_url
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=10)


def run(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    rate_limit: float | None = None,
    fail_rate: float = 0.0,
    drop_rate: float = 0.0,
    latency_ms: float = 0.0,
    seed: int | None = None,
    *,
    log_events: bool = True,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    invoice_finalize_delay: float | None = DEFAULT_INVOICE_FINALIZE_DELAY,
) -> None:
    """Serve an emulator until interrupted, printing each accepted meter event to stdout.

    With `webhook_url`, every event is delivered there, signed with `webhook_secret` (or a
    generated one, printed)."""
    emulator = StripeEmulator(
        rate_limit=rate_limit,
        fail_rate=fail_rate,
        drop_rate=drop_rate,
        latency_ms=latency_ms,
        seed=seed,
        log_events=log_events,
        invoice_finalize_delay=invoice_finalize_delay,
    )
    if webhook_url:
        registered = emulator.add_webhook_endpoint(webhook_url, secret=webhook_secret)
        print(
            f"[stripe-emulator] webhooks -> {webhook_url}  (endpoint {registered['id']}, "
            f"secret {registered['secret']})",
            flush=True,
        )
    faults = ", ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(emulator.faults).items() if v not in (None, 0)
    )

    async def serve() -> None:
        async with serve_emulator(emulator, host=host, port=port) as url:
            print(
                f'[stripe-emulator] listening on {url}  (billing: api_base = "{url}", any '
                f"api_key starting with sk_){'  faults: ' + faults if faults else ''}",
                flush=True,
            )
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> int:
    """``controlplane stripe-emulator`` (also ``python -m controlplane.stripe_emulator``)."""
    parser = argparse.ArgumentParser(
        prog="controlplane stripe-emulator",
        description="Run a stateful Stripe emulator for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fraction of POSTs -> 500")
    parser.add_argument(
        "--drop-rate", type=float, default=0.0, help="fraction of meter events cut off"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="do not print each meter event")
    parser.add_argument("--webhook-url", default=None, help="deliver every event to this URL")
    parser.add_argument(
        "--webhook-secret", default=None, help="whsec_... to sign with (default: generated)"
    )
    parser.add_argument(
        "--invoice-finalize-delay",
        type=float,
        default=DEFAULT_INVOICE_FINALIZE_DELAY,
        help="seconds from invoice.created to automatic finalization (negative: never)",
    )
    args = parser.parse_args(argv)
    try:
        run(
            args.host,
            args.port,
            args.rate_limit,
            args.fail_rate,
            args.drop_rate,
            args.latency_ms,
            args.seed,
            log_events=not args.quiet,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            invoice_finalize_delay=(
                None if args.invoice_finalize_delay < 0 else args.invoice_finalize_delay
            ),
        )
    except (ValueError, OSError) as exc:
        print(f"stripe-emulator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
