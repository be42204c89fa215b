"""Provisioning against Stripe's test mode: the same scenarios the emulator is held to, so
anyone with a test key can hold the emulator against the real thing.

Opt in: ``STRIPE_TEST_API_KEY=sk_test_... pytest -m stripe_live tests/live``. Without the key
every test is skipped, saying so. It publishes a small catalog (lookup keys ``cp_live_*``,
found again on later runs), creates customers and subscriptions in the account's test mode,
and cancels the subscriptions it made. Checkout's hosted page needs a browser, so the
completed setup Checkout is a signed ``checkout.session.completed`` event naming a SetupIntent
confirmed over the API with Stripe's test card, which leaves what a completed setup Checkout
leaves: a succeeded SetupIntent whose payment method is attached to the customer (CO-1, CO-3).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import stripe

from controlplane.config import Config
from controlplane.core import ControlPlane

KEY = os.environ.get("STRIPE_TEST_API_KEY", "")
SECRET = "whsec_live_suite_local"  # the events are signed here, not by Stripe

pytestmark = [
    pytest.mark.stripe_live,
    pytest.mark.skipif(
        not KEY.startswith(("sk_test_", "rk_test_")),
        reason="needs STRIPE_TEST_API_KEY (a Stripe test-mode secret key, sk_test_...)",
    ),
]

CATALOG = {
    "products": [{"key": "pro", "name": "Control plane live suite: Pro"}],
    "prices": [
        {
            "key": "pro_memory",
            "product": "pro",
            "lookup_key": "cp_live_pro_memory_gb_seconds",
            "meter": "gbs",
            "unit_amount": "0.0004",
            "currency": "usd",
            "interval": "month",
        },
        {
            "key": "pro_base",
            "product": "pro",
            "lookup_key": "cp_live_pro_base_fee",
            "unit_amount": "20.00",
            "currency": "usd",
            "interval": "month",
        },
    ],
}


class Live:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.stripe = stripe.StripeClient(KEY, max_network_retries=2)
        self.made: list[str] = []

    async def completed_setup(self, org: str, card: str) -> dict[str, Any]:
        """A customer with a succeeded SetupIntent for `card`, as a setup Checkout leaves it,
        and the signed event of that checkout's completion."""
        customer = await self.stripe.v1.customers.create_async({"name": org})
        params: Any = {
            "customer": customer.id,
            "payment_method": card,
            "payment_method_types": ["card"],
            "confirm": True,
            "usage": "off_session",
        }
        intent = await self.stripe.v1.setup_intents.create_async(params)
        assert intent.status == "succeeded"
        return {
            "id": f"evt_live_{uuid.uuid4().hex}",
            "object": "event",
            "type": "checkout.session.completed",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": f"cs_live_{uuid.uuid4().hex}",
                    "object": "checkout.session",
                    "mode": "setup",
                    "customer": customer.id,
                    "client_reference_id": org,
                    "setup_intent": intent.id,
                }
            },
        }

    async def deliver(self, event: dict[str, Any]) -> str:
        body = json.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(body, SECRET, int(time.time()))
        result = await self.plane.stripe_webhook(body.encode(), header)
        return result.outcome


@pytest.fixture
async def live(make_config: Callable[..., Config]) -> AsyncIterator[Live]:
    config = make_config(
        billing={"backend": "stripe", "api_key": KEY, "rate_limit": 20.0, "max_retries": 2},
        stripe={"webhook_secret": SECRET},
        catalog=CATALOG,
    )
    async with ControlPlane(config) as plane:
        await plane.catalog_publish(actor="live-suite")
        made = Live(plane)
        try:
            yield made
        finally:
            for sub in made.made:
                with contextlib.suppress(stripe.StripeError):  # already ended
                    await made.stripe.v1.subscriptions.cancel_async(sub)


async def test_a_paid_setup_checkout_provisions_pro_with_its_card(live: Live) -> None:
    org = f"live-{uuid.uuid4().hex[:8]}"
    event = await live.completed_setup(org, "pm_card_visa")
    outcome = await live.deliver(event)
    assert outcome.startswith("provisioned: sub_"), outcome
    found = await live.plane.storage.get_org(org)
    assert found is not None and found.subscription is not None
    live.made.append(found.subscription)
    assert found.subscription_status == "active" and found.plan_at(live.plane.now()) == "pro"
    session = event["data"]["object"]
    intent = await live.stripe.v1.setup_intents.retrieve_async(session["setup_intent"])
    customer = await live.stripe.v1.customers.retrieve_async(session["customer"])
    assert customer.invoice_settings.default_payment_method == intent.payment_method
    sub = await live.stripe.v1.subscriptions.retrieve_async(found.subscription)
    assert sub.status == "active"


async def test_a_card_that_fails_charges_leaves_the_org_unpaid(live: Live) -> None:
    org = f"live-{uuid.uuid4().hex[:8]}"
    event = await live.completed_setup(org, "pm_card_chargeCustomerFail")
    outcome = await live.deliver(event)
    assert outcome.startswith("not provisioned: sub_") and "incomplete" in outcome, outcome
    found = await live.plane.storage.get_org(org)
    assert found is not None and found.subscription is not None
    live.made.append(found.subscription)
    assert found.subscription_status == "incomplete" and found.plans == []
    sub = await live.stripe.v1.subscriptions.retrieve_async(found.subscription)
    assert sub.status == "incomplete"
