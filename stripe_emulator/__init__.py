"""A stateful Stripe emulator: a test double of Stripe for the endpoints the control plane uses.

It is independent of the control plane (it imports nothing from ``controlplane``): every rule
it enforces is Stripe's, cited from Stripe's documentation. It is an ASGI app, served over
HTTP by uvicorn, that the real ``stripe`` SDK talks to::

    client = stripe.StripeClient("sk_test_x", base_addresses={"api": "http://127.0.0.1:12111"})

Run it with ``python -m stripe_emulator --port 12111`` or ``controlplane stripe-emulator``
(see :func:`run`; ``--webhook-url URL [--webhook-secret whsec_...]`` registers an endpoint
receiving every event, ``--invoice-finalize-delay S`` sets when drafts finalize), or in-process
from a test with ``async with serve_emulator(StripeEmulator()) as url: ...``.

Emulated endpoints (form-encoded bodies exactly as the SDK sends them, ``a[b][c]=v`` and
``items[0][price]=p``; query strings on GET):

- ``POST /v1/customers`` (``payment_method``, ``invoice_settings``), ``POST`` and ``GET``
  ``/v1/customers/{id}``, ``GET /v1/customers``
- ``GET /v1/payment_methods`` (``customer``), ``GET /v1/payment_methods/{id}``,
  ``POST /v1/payment_methods/{id}/attach`` and ``/detach`` (Stripe's test cards)
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
  ``POST /v1/invoices/{id}/finalize``, ``POST /v1/invoices/{id}/pay``
- ``POST /v1/billing/credit_grants``, ``GET /v1/billing/credit_grants`` (``customer``),
  ``GET /v1/billing/credit_grants/{id}``, ``POST .../{id}/void`` and ``/expire``,
  ``GET /v1/billing/credit_balance_summary``
- ``POST /v1/checkout/sessions`` (``mode=setup`` only), ``GET /v1/checkout/sessions/{id}``,
  ``POST /v1/checkout/sessions/{id}/expire``; ``GET /v1/setup_intents/{id}``
- ``POST /v1/webhook_endpoints``, ``GET /v1/webhook_endpoints``, ``GET``, ``POST`` (update,
  ``disabled``) and ``DELETE`` ``/v1/webhook_endpoints/{id}``
- ``GET /v1/events`` (``type`` with ``*`` wildcards, ``types[]``, ``delivery_success``,
  ``created``), ``GET /v1/events/{id}``
- ``POST /v1/test_helpers/test_clocks``, ``GET .../{id}``, ``POST .../{id}/advance``

Where each part lives (each module's docstring lists the Stripe rules it enforces):

- ``app``: :class:`StripeEmulator`, the ASGI app; the ``/v1`` pipeline (auth, routing, rate
  limit, injected faults, idempotency keys); ``hooks``: the ``/_emulator/`` test hooks.
- ``customers``, ``payment_methods`` (test cards, attaching, charging), ``meters`` (meters,
  meter events, adjustments, summaries), ``catalog`` (products, prices), ``subscriptions``
  (``payment_behavior``, the first invoice), ``invoices``, ``collection`` (payment attempts,
  retries, ``past_due``/``unpaid``/``canceled``, 23-hour expiry), ``credit_grants``,
  ``checkout`` (sessions, setup intents), ``clocks`` (test clocks), ``webhooks`` (events,
  webhook endpoints, signed delivery; ``versions`` renders events in an endpoint's API
  version): one mixin each over ``state`` (the account's objects, its clock and its faults).
- ``params`` (form encoding, parameter checks, pagination), ``errors``, ``records``,
  ``shapes`` (response shapes from Stripe's OpenAPI fixtures).
- ``server``: :func:`serve_emulator`, :func:`serve_emulator_in_thread`, :class:`EmulatorServer`
  (uvicorn); ``cli``: :func:`run` and :func:`main`.
"""

from __future__ import annotations

from stripe_emulator.app import StripeEmulator
from stripe_emulator.cli import main, run
from stripe_emulator.errors import EmulatedError
from stripe_emulator.params import parse_form
from stripe_emulator.server import (
    DEFAULT_PORT,
    EmulatorServer,
    serve_emulator,
    serve_emulator_in_thread,
)
from stripe_emulator.state import Faults, MeterValidation, WebhookSettings
from stripe_emulator.webhooks import signature_header

__all__ = [
    "DEFAULT_PORT",
    "EmulatedError",
    "EmulatorServer",
    "Faults",
    "MeterValidation",
    "StripeEmulator",
    "WebhookSettings",
    "main",
    "parse_form",
    "run",
    "serve_emulator",
    "serve_emulator_in_thread",
    "signature_header",
]
