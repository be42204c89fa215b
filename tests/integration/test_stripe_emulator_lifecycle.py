"""The Stripe emulator's subscription lifecycle, payment methods, test clocks and API versions,
driven by the real stripe SDK over HTTP. Rule ids (SUB-4, PM-3...) are rows of
docs/reference/stripe-behaviour.md."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe

from stripe_emulator import StripeEmulator, WebhookSettings, serve_emulator
from tests.integration.test_stripe_emulator_billing import (
    API_KEY,
    DAY,
    Receiver,
    endpoint,
    metered_setup,
    until,
)
from tests.integration.test_stripe_emulator_billing import receiver as receiver

HOUR = 3600


@pytest.fixture
async def emulator() -> AsyncIterator[StripeEmulator]:
    emu = StripeEmulator(
        seed=5, webhooks=WebhookSettings(retry_base=0.01, retry_max=0.05, timeout=2.0)
    )
    async with serve_emulator(emu):
        yield emu


@pytest.fixture
async def client(emulator: StripeEmulator) -> AsyncIterator[stripe.StripeClient]:
    http = stripe.HTTPXClient(timeout=5)
    assert emulator.base_url is not None
    yield stripe.StripeClient(
        API_KEY, base_addresses={"api": emulator.base_url}, http_client=http, max_network_retries=0
    )
    await http.close_async()  # type: ignore[no-untyped-call]


async def customer_paying_with(client: stripe.StripeClient, card: str | None) -> str:
    params: Any = {"email": "org@example.com"}
    if card is not None:
        params.update(payment_method=card, invoice_settings={"default_payment_method": card})
    return str((await client.v1.customers.create_async(params=params)).id)


async def subscribe(client: stripe.StripeClient, customer: str, *prices: str, **extra: Any) -> Any:
    params: Any = {"customer": customer, "items": [{"price": p} for p in prices], **extra}
    return await client.v1.subscriptions.create_async(params=params)


async def types(client: stripe.StripeClient) -> list[str]:
    return [e.type for e in reversed((await client.v1.events.list_async({"limit": 100})).data)]


# payment methods ------------------------------------------------------------------------------


async def test_test_cards_attach_or_decline_as_stripe_documents(
    client: stripe.StripeClient,
) -> None:
    customer = await customer_paying_with(client, None)
    visa = await client.v1.payment_methods.attach_async("pm_card_visa", {"customer": customer})
    assert visa.id.startswith("pm_") and visa.customer == customer and visa.card is not None
    assert visa.card.last4 == "4242"
    with pytest.raises(stripe.CardError) as declined:  # PM-3: this family cannot be attached
        await client.v1.payment_methods.attach_async(
            "pm_card_visa_chargeDeclined", {"customer": customer}
        )
    assert declined.value.code == "card_declined"
    assert declined.value.error is not None and declined.value.error.decline_code == (
        "generic_decline"
    )
    fails = await client.v1.payment_methods.attach_async(
        "pm_card_chargeCustomerFail", {"customer": customer}
    )  # PM-4: attaches, charges fail
    assert fails.customer == customer
    listed = await client.v1.payment_methods.list_async({"customer": customer})
    assert {pm.id for pm in listed.data} == {visa.id, fails.id}
    with pytest.raises(stripe.InvalidRequestError) as foreign:
        await client.v1.customers.update_async(
            await customer_paying_with(client, None),
            {"invoice_settings": {"default_payment_method": visa.id}},
        )
    assert foreign.value.param == "invoice_settings[default_payment_method]"


# the first invoice and payment_behavior --------------------------------------------------------


async def test_a_paid_first_invoice_makes_the_subscription_active(
    client: stripe.StripeClient,
) -> None:
    customer = await customer_paying_with(client, "pm_card_visa")
    _, _, metered, flat = await metered_setup(client)
    sub = await subscribe(client, customer, metered, flat)
    assert sub.status == "active"
    invoice = await client.v1.invoices.retrieve_async(str(sub.latest_invoice))
    assert invoice.billing_reason == "subscription_create" and invoice.status == "paid"
    assert invoice.amount_paid == 1000 and [line.quantity for line in invoice.lines.data] == [1]
    assert "invoice.paid" in await types(client)


async def test_a_declined_first_payment_leaves_it_incomplete_until_paid(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    customer = await customer_paying_with(client, "pm_card_chargeCustomerFail")
    _, _, metered, flat = await metered_setup(client)
    sub = await subscribe(client, customer, metered, flat)  # allow_incomplete, the default
    assert sub.status == "incomplete"  # SUB-3
    invoice = await client.v1.invoices.retrieve_async(str(sub.latest_invoice))
    assert invoice.status == "open" and invoice.attempted and invoice.attempt_count == 1
    assert "invoice.payment_failed" in await types(client)

    with pytest.raises(stripe.CardError):  # the same card again
        await client.v1.invoices.pay_async(invoice.id)
    emulator.advance(22 * HOUR)
    paid = await client.v1.invoices.pay_async(invoice.id, {"payment_method": "pm_card_visa"})
    assert paid.status == "paid"
    assert (await client.v1.subscriptions.retrieve_async(sub.id)).status == "active"
    updated = await client.v1.events.list_async({"type": "customer.subscription.updated"})
    previous = updated.data[0].data.previous_attributes
    assert previous is not None and previous.to_dict() == {"status": "incomplete"}


async def test_incomplete_expires_after_23_hours_on_a_test_clock(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    customer = await customer_paying_with(client, None)  # no payment method at all
    _, _, _, flat = await metered_setup(client)
    sub = await subscribe(client, customer, flat)
    assert sub.status == "incomplete"
    now = int(emulator.now())
    clock = await client.v1.test_helpers.test_clocks.create_async({"frozen_time": now + 1})
    clock = await client.v1.test_helpers.test_clocks.advance_async(
        clock.id, {"frozen_time": now + 23 * HOUR - 60}
    )
    assert clock.status == "ready"
    assert (await client.v1.subscriptions.retrieve_async(sub.id)).status == "incomplete"
    await client.v1.test_helpers.test_clocks.advance_async(
        clock.id, {"frozen_time": now + 23 * HOUR + 1}
    )
    expired = await client.v1.subscriptions.retrieve_async(sub.id)
    assert expired.status == "incomplete_expired" and expired.ended_at is not None  # SUB-4
    assert (await client.v1.invoices.retrieve_async(str(sub.latest_invoice))).status == "void"
    with pytest.raises(stripe.InvalidRequestError, match="after the current frozen time"):
        await client.v1.test_helpers.test_clocks.advance_async(clock.id, {"frozen_time": now})


async def test_error_if_incomplete_creates_nothing_and_default_incomplete_waits(
    client: stripe.StripeClient,
) -> None:
    customer = await customer_paying_with(client, "pm_card_chargeCustomerFail")
    _, _, _, flat = await metered_setup(client)
    with pytest.raises(stripe.CardError):  # SUB-12: 402
        await subscribe(client, customer, flat, payment_behavior="error_if_incomplete")
    assert (await client.v1.subscriptions.list_async({"customer": customer})).data == []
    waiting = await subscribe(client, customer, flat, payment_behavior="default_incomplete")
    invoice = await client.v1.invoices.retrieve_async(str(waiting.latest_invoice))
    assert waiting.status == "incomplete" and invoice.status == "open"
    assert not invoice.attempted  # SUB-11: no payment until confirmed


# renewals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("after_retries", ["canceled", "unpaid"])
async def test_a_failed_renewal_goes_past_due_then_per_the_account_setting(
    client: stripe.StripeClient, emulator: StripeEmulator, after_retries: str
) -> None:
    emulator.set_collection(payment_retry_days=[1, 2], failed_subscription=after_retries)
    customer = await customer_paying_with(client, "pm_card_visa")
    _, _, metered, flat = await metered_setup(client, interval="month")
    sub = await subscribe(client, customer, metered, flat)
    failing = await client.v1.payment_methods.attach_async(
        "pm_card_chargeCustomerFail", {"customer": customer}
    )
    await client.v1.customers.update_async(
        customer, {"invoice_settings": {"default_payment_method": failing.id}}
    )
    end = sub["items"].data[0].current_period_end
    emulator.advance(end - emulator.now() + HOUR + 1)  # renewal, finalized an hour later
    renewed = await client.v1.subscriptions.retrieve_async(sub.id)
    assert renewed.status == "past_due"  # SUB-6
    invoice = await client.v1.invoices.retrieve_async(str(renewed.latest_invoice))
    assert invoice.status == "open" and invoice.attempt_count == 1
    assert invoice.next_payment_attempt == end + HOUR + DAY
    emulator.advance(DAY)
    assert (await client.v1.invoices.retrieve_async(invoice.id)).attempt_count == 2
    emulator.advance(2 * DAY)  # the last retry fails
    final = await client.v1.subscriptions.retrieve_async(sub.id)
    assert final.status == after_retries
    kinds = await types(client)
    assert kinds.count("invoice.payment_failed") == 3
    assert ("customer.subscription.deleted" in kinds) is (after_retries == "canceled")
    statuses = [
        e.data.object["status"]
        for e in reversed(
            (await client.v1.events.list_async({"type": "customer.subscription.updated"})).data
        )
    ]
    assert "past_due" in statuses


# checkout and API versions -------------------------------------------------------------------


async def test_setup_checkout_attaches_the_card_but_sets_no_default(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    customer = await customer_paying_with(client, None)
    params: Any = {"mode": "setup", "currency": "usd", "customer": customer}
    session = await client.v1.checkout.sessions.create_async(params=params)
    assert emulator.base_url is not None
    async with httpx.AsyncClient(base_url=emulator.base_url) as http:
        refused = await http.post(
            f"/_emulator/checkout/{session.id}/complete",
            json={"payment_method": "pm_card_visa_chargeDeclined"},
        )
        assert refused.status_code == 402  # PM-3: cannot be set up
        done = await http.post(f"/_emulator/checkout/{session.id}/complete", json={})
        assert done.status_code == 200
    completed = await client.v1.checkout.sessions.retrieve_async(session.id)
    intent = await client.v1.setup_intents.retrieve_async(str(completed.setup_intent))
    assert intent.status == "succeeded" and intent.customer == customer  # CO-3
    pm = await client.v1.payment_methods.retrieve_async(str(intent.payment_method))
    assert pm.customer == customer
    found = await client.v1.customers.retrieve_async(customer)
    assert found.invoice_settings.default_payment_method is None  # CO-4: set it yourself


async def test_events_are_rendered_in_the_endpoints_api_version(
    client: stripe.StripeClient, emulator: StripeEmulator, receiver: Receiver
) -> None:
    old = await client.v1.webhook_endpoints.create_async(
        params={
            "url": receiver.url,
            "enabled_events": ["invoice.created", "customer.subscription.updated"],
            "api_version": "2025-02-24.acacia",
        }
    )
    assert old.api_version == "2025-02-24.acacia"
    with pytest.raises(stripe.InvalidRequestError) as bad:
        await client.v1.webhook_endpoints.create_async(
            params={"url": receiver.url, "enabled_events": ["*"], "api_version": "yesterday"}
        )
    assert bad.value.param == "api_version"
    await endpoint(client, receiver, "invoice.created", "customer.subscription.updated")
    customer = await customer_paying_with(client, "pm_card_visa")
    _, _, metered, flat = await metered_setup(client, interval="day")
    sub = await subscribe(client, customer, metered, flat)
    emulator.close_period(sub.id)
    await until(lambda: len(receiver.events()) == 6)  # 2 invoices, 1 renewal, to 2 endpoints
    by_version: dict[str, list[Any]] = {}
    for event in receiver.events():
        by_version.setdefault(event["api_version"], []).append(event)
    assert set(by_version) == {"2025-02-24.acacia", "2026-10-28.endive"}

    def of(version: str, kind: str) -> Any:
        return [e for e in by_version[version] if e["type"] == kind][-1]["data"]

    before, after = (
        of("2025-02-24.acacia", "invoice.created"),
        of("2026-10-28.endive", "invoice.created"),
    )
    assert before["object"]["subscription"] == sub.id and "parent" not in before["object"]  # VER-5
    line = before["object"]["lines"]["data"][0]
    assert line["price"]["id"] in (metered, flat) and "pricing" not in line  # VER-7
    assert after["object"]["parent"]["subscription_details"]["subscription"] == sub.id
    assert "subscription" not in after["object"]
    old_sub, new_sub = (
        of("2025-02-24.acacia", "customer.subscription.updated"),
        of("2026-10-28.endive", "customer.subscription.updated"),
    )
    start = sub["items"].data[0].current_period_start
    assert old_sub["object"]["current_period_start"] == start + DAY  # VER-6
    assert old_sub["previous_attributes"]["current_period_start"] == start
    assert "current_period_start" not in old_sub["object"]["items"]["data"][0]
    assert "current_period_start" not in new_sub["object"]
    assert new_sub["object"]["items"]["data"][0]["current_period_start"] == start + DAY
    assert old.secret is not None
    for headers, body in receiver.requests:  # each rendering is signed as sent
        if b"2025-02-24.acacia" in body:
            stripe.Webhook.construct_event(body, headers["stripe-signature"], old.secret)
