"""What tests that provision orgs through the Stripe emulator share: the setup Checkout as a
customer completes it, and Stripe's events delivered signed to the control plane."""

from __future__ import annotations

import json
import time
from typing import Any

import stripe

from controlplane.core import ControlPlane
from stripe_emulator import StripeEmulator


async def deliver(cp: ControlPlane, event: dict[str, Any], secret: str) -> str:
    """`event` delivered to the control plane's webhook, signed with `secret`: the outcome."""
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, secret, int(time.time()))
    return (await cp.stripe_webhook(body.encode(), header)).outcome


async def provision(
    cp: ControlPlane,
    client: stripe.StripeClient,
    emulator: StripeEmulator,
    org_id: str,
    secret: str,
    name: str = "Acme",
) -> str:
    """A customer for `org_id` completes a setup Checkout and Stripe's signed
    `checkout.session.completed` reaches the control plane, which provisions the org: the
    customer's id."""
    customer = str((await client.v1.customers.create_async(params={"name": name})).id)
    session = await client.v1.checkout.sessions.create_async(
        params={
            "mode": "setup",
            "currency": "usd",
            "customer": customer,
            "client_reference_id": org_id,
            "success_url": "https://example.com/done",
        }
    )
    emulator.complete_checkout(session.id)
    listing: Any = {"type": "checkout.session.completed"}
    (event, *_) = [e.to_dict() for e in (await client.v1.events.list_async(listing)).data]
    outcome = await deliver(cp, event, secret)
    assert outcome.startswith("provisioned: sub_"), outcome
    return customer
