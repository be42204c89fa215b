"""One Stripe customer maps to one org, even when two orgs' checkouts arrive at once.

The control plane runs in-process against the Stripe emulator over loopback HTTP; the events
are the emulator's own ``checkout.session.completed`` events, signed and handed to the
webhook handler concurrently (as two requests would be).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import stripe
from structlog.testing import capture_logs

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError
from controlplane.interfaces import AuditEntry
from controlplane.plugins.billing.stripe.webhooks import ALERTS, WebhookResult
from stripe_emulator import StripeEmulator, serve_emulator

API_KEY = "sk_test_webhook_customers"
SECRET = "whsec_webhook_customers"
CATALOG = {
    "products": [{"key": "pro", "name": "Pro"}],
    "prices": [
        {
            "key": "pro_memory",
            "product": "pro",
            "lookup_key": "pro_memory_gb_seconds",
            "meter": "gbs",
            "unit_amount": "0.0004",
            "currency": "usd",
            "interval": "month",
        },
        {
            "key": "pro_base",
            "product": "pro",
            "lookup_key": "pro_base_fee",
            "unit_amount": "20.00",
            "currency": "usd",
            "interval": "month",
        },
    ],
    "welcome_credit": {"amount": "10.00", "currency": "usd", "name": "Welcome credit"},
}


class Setup:
    def __init__(self, emulator: StripeEmulator, plane: ControlPlane) -> None:
        self.emulator = emulator
        self.plane = plane
        assert emulator.base_url is not None
        self.http = stripe.HTTPXClient(timeout=5)
        self.stripe = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": emulator.base_url},
            http_client=self.http,
            max_network_retries=0,
        )

    async def checkout_event(self, org: str, customer: str) -> dict[str, Any]:
        """A completed setup checkout for `org` with `customer`: the emulator's event."""
        params: Any = {
            "mode": "setup",
            "currency": "usd",
            "customer": customer,
            "client_reference_id": org,
            "success_url": "https://example.com/done",
        }
        session = await self.stripe.v1.checkout.sessions.create_async(params=params)
        self.emulator.complete_checkout(session.id)
        listing: Any = {"type": "checkout.session.completed", "limit": 100}
        for e in (await self.stripe.v1.events.list_async(params=listing)).data:
            plain: dict[str, Any] = e.to_dict()
            if plain["data"]["object"]["id"] == session.id:
                return plain
        raise AssertionError(f"no checkout.session.completed event for {session.id}")

    async def deliver(self, event: dict[str, Any]) -> WebhookResult:
        body = json.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(body, SECRET, int(time.time()))
        return await self.plane.stripe_webhook(body.encode(), header)

    async def grants(self, customer: str) -> int:
        params: Any = {"customer": customer}
        return len((await self.stripe.v1.billing.credit_grants.list_async(params=params)).data)

    async def subscriptions(self, customer: str) -> int:
        params: Any = {"customer": customer, "status": "all"}
        return len((await self.stripe.v1.subscriptions.list_async(params=params)).data)


@pytest.fixture
async def setup(make_config: Callable[..., Config], clock: list[float]) -> AsyncIterator[Setup]:
    emulator = StripeEmulator(seed=5)
    async with serve_emulator(emulator):
        config = make_config(
            billing={
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": emulator.base_url,
                "rate_limit": 200.0,
                "max_retries": 0,
            },
            stripe={"webhook_secret": SECRET},
            catalog=CATALOG,
        )
        async with ControlPlane(config, clock=lambda: clock[0]) as plane:
            await plane.catalog_publish(actor="test")
            made = Setup(emulator, plane)
            yield made
            await made.http.close_async()  # type: ignore[no-untyped-call]


async def test_two_orgs_claiming_one_customer_at_once_provision_one(setup: Setup) -> None:
    customer = str((await setup.stripe.v1.customers.create_async(params={"name": "c"})).id)
    first = await setup.checkout_event("first", customer)
    second = await setup.checkout_event("second", customer)

    answers = await asyncio.gather(setup.deliver(first), setup.deliver(second))
    outcomes = sorted(a.outcome for a in answers)
    assert outcomes[0].startswith("provisioned: sub_"), outcomes
    assert outcomes[1].startswith(f"refused: customer {customer} is org "), outcomes

    assert await setup.subscriptions(customer) == 1
    assert await setup.grants(customer) == 1
    orgs = [await setup.plane.storage.get_org(o) for o in ("first", "second")]
    provisioned = [o for o in orgs if o is not None]
    assert len(provisioned) == 1 and provisioned[0].plan_at(setup.plane.now()) == "pro"
    (alert,) = await setup.plane.storage.parity_alerts(ALERTS, limit=10)
    assert customer in alert.text and alert.state == "logged"


async def test_a_customer_set_on_another_org_is_refused_and_logged(setup: Setup) -> None:
    customer = str((await setup.stripe.v1.customers.create_async(params={"name": "c"})).id)
    audit = AuditEntry(action="org.set", subject="owner", actor="test")
    now = setup.plane.now()
    await setup.plane.storage.set_org(
        "owner", customer=customer, plan="free", effective_from=0, at=now, audit=audit
    )
    claim = await setup.checkout_event("claimer", customer)
    with capture_logs() as logs:
        result = await setup.deliver(claim)
    assert result.outcome.startswith(f"refused: customer {customer} is org owner's")
    (refused,) = [e for e in logs if e["event"] == "webhook.refused"]
    assert refused["log_level"] == "warning"
    assert (refused["org"], refused["owner"], refused["customer"]) == ("claimer", "owner", customer)
    assert await setup.plane.storage.webhook_outcome(claim["id"]) == result.outcome
    assert await setup.subscriptions(customer) == 0 and await setup.grants(customer) == 0
    assert await setup.plane.storage.get_org("claimer") is None
    owner = await setup.plane.storage.get_org("owner")
    assert owner is not None and owner.subscription is None and owner.plan_at(now) == "free"
    (alert,) = await setup.plane.storage.parity_alerts(ALERTS, limit=10)
    assert claim["id"] in alert.text

    again = await setup.deliver(claim)  # a redelivery: the same answer, no second alert
    assert again.duplicate and again.outcome == result.outcome
    assert len(await setup.plane.storage.parity_alerts(ALERTS, limit=10)) == 1


async def test_a_subscription_holds_the_prices_its_plan_names(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    """`[[plans]] prices` names the catalog prices a pro subscription holds (here the metered
    one alone); without it, every catalog price."""
    emulator = StripeEmulator(seed=6)
    async with serve_emulator(emulator):
        config = make_config(
            billing={"backend": "stripe", "api_key": API_KEY, "api_base": emulator.base_url},
            stripe={"webhook_secret": SECRET},
            catalog=CATALOG,
            plans=[
                {"name": "free", "billable": False},
                {"name": "pro", "billable": True, "prices": ["pro_memory"]},
            ],
        )
        async with ControlPlane(config, clock=lambda: clock[0]) as plane:
            version = await plane.catalog_publish(actor="test")
            assert version.version is not None
            setup = Setup(emulator, plane)
            customer = str((await setup.stripe.v1.customers.create_async(params={"name": "c"})).id)
            answer = await setup.deliver(await setup.checkout_event("acme", customer))
            assert answer.outcome.startswith("provisioned: sub_"), answer.outcome
            params: Any = {"customer": customer}
            (sub,) = (await setup.stripe.v1.subscriptions.list_async(params=params)).data
            prices = {i["price"]["id"] for i in sub.to_dict()["items"]["data"]}
            assert prices == {version.version.catalog["prices"]["pro_memory"]["id"]}
            await setup.http.close_async()  # type: ignore[no-untyped-call]


def test_a_plan_naming_a_price_the_catalog_lacks_is_refused(
    make_config: Callable[..., Config],
) -> None:
    with pytest.raises(
        ConfigError, match=r"plans\[1\]\.prices\[0\]: .*'pro_memori'.*did you mean 'pro_memory'"
    ):
        make_config(
            catalog=CATALOG,
            plans=[
                {"name": "free", "billable": False},
                {"name": "pro", "billable": True, "prices": ["pro_memori"]},
            ],
        )
