"""The Stripe emulator's catalog, billing and webhooks, driven by the real stripe SDK over HTTP.

Webhooks go to a small receiver on loopback (the emulator's own HTTP server running a tiny ASGI
app), which records every request and answers the statuses a test queues.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import stripe

from stripe_emulator import (
    EmulatorServer,
    StripeEmulator,
    WebhookSettings,
    serve_emulator,
    serve_emulator_in_thread,
    signature_header,
)

API_KEY = "sk_test_emulator_0123456789"
DAY = 86_400
Json = dict[str, Any]


class Receiver:
    """A webhook endpoint: records (headers, raw body) and answers the queued statuses."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: deque[int] = deque()
        self.url = ""

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append((headers, body))
        status = self.statuses.popleft() if self.statuses else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"received"})

    def events(self) -> list[Json]:
        return [json.loads(body) for _, body in self.requests]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events()]


@pytest.fixture
async def emulator() -> AsyncIterator[StripeEmulator]:
    emu = StripeEmulator(
        seed=11, webhooks=WebhookSettings(retry_base=0.01, retry_max=0.05, timeout=2.0)
    )
    async with serve_emulator(emu):
        yield emu


@pytest.fixture
async def client(emulator: StripeEmulator) -> AsyncIterator[stripe.StripeClient]:
    http = stripe.HTTPXClient(timeout=5)
    assert emulator.base_url is not None
    yield stripe.StripeClient(
        API_KEY,
        base_addresses={"api": emulator.base_url},
        http_client=http,
        max_network_retries=0,
    )
    await http.close_async()  # type: ignore[no-untyped-call]


@pytest.fixture
async def hooks(emulator: StripeEmulator) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP to the emulator's /_emulator/ test hooks."""
    async with httpx.AsyncClient(base_url=str(emulator.base_url), timeout=5) as http:
        yield http


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = EmulatorServer(recv.app)
    await server.start(sock)
    recv.url = f"http://127.0.0.1:{sock.getsockname()[1]}/webhooks/stripe"
    try:
        yield recv
    finally:
        await server.stop()
        sock.close()


async def endpoint(
    client: stripe.StripeClient, receiver: Receiver, *events: str
) -> stripe.WebhookEndpoint:
    params: Any = {"url": receiver.url, "enabled_events": list(events) or ["*"]}
    return await client.v1.webhook_endpoints.create_async(params=params)


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def metered_setup(
    client: stripe.StripeClient, *, interval: str = "day", unit: str = "0.5"
) -> tuple[str, str, str, str]:
    """A customer (paying with pm_card_visa), a meter, a metered price on it and a licensed
    price: their ids."""
    customer = await client.v1.customers.create_async(
        params={
            "email": "org@example.com",
            "payment_method": "pm_card_visa",
            "invoice_settings": {"default_payment_method": "pm_card_visa"},
        }
    )
    meter = await client.v1.billing.meters.create_async(
        params={
            "display_name": "API calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    product = await client.v1.products.create_async(params={"name": "API"})
    metered = await client.v1.prices.create_async(
        params={
            "product": product.id,
            "currency": "usd",
            "unit_amount_decimal": unit,  # type: ignore[typeddict-item]
            "recurring": {"interval": interval, "usage_type": "metered", "meter": meter.id},
            "lookup_key": "api_calls_v1",
        }
    )
    flat = await client.v1.prices.create_async(
        params={
            "product": product.id,
            "currency": "usd",
            "unit_amount": 1000,
            "recurring": {"interval": interval},
            "lookup_key": "base_v1",
        }
    )
    return customer.id, meter.id, metered.id, flat.id


async def meter_event(client: stripe.StripeClient, customer: str, value: int, at: int) -> None:
    await client.v1.billing.meter_events.create_async(
        params={
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "timestamp": at,
        }
    )


# ---------------------------------------------------------------------------------------------
# products, prices and lookup keys


async def test_lookup_keys_are_unique_and_transfer_atomically(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    product = await client.v1.products.create_async(
        params={"name": "Pro", "metadata": {"catalog": "v1"}}
    )
    assert product.id.startswith("prod_") and product.metadata.to_dict() == {"catalog": "v1"}
    assert (await client.v1.products.retrieve_async(product.id)).name == "Pro"
    assert [p.id for p in (await client.v1.products.list_async()).data] == [product.id]

    old = await client.v1.prices.create_async(
        params={
            "product": product.id,
            "currency": "usd",
            "unit_amount": 1000,
            "recurring": {"interval": "month"},
            "lookup_key": "pro_monthly",
        }
    )
    assert old.lookup_key == "pro_monthly" and old.type == "recurring"
    assert old.unit_amount_decimal is not None and str(old.unit_amount_decimal) == "1000"
    assert old.recurring is not None and old.recurring.usage_type == "licensed"

    new_params: Any = {
        "product": product.id,
        "currency": "usd",
        "unit_amount": 1200,
        "recurring": {"interval": "month"},
        "lookup_key": "pro_monthly",
    }
    with pytest.raises(stripe.InvalidRequestError) as taken:
        await client.v1.prices.create_async(params=new_params)
    assert taken.value.user_message == f"A price (`{old.id}`) already uses that lookup key."
    assert taken.value.param == "lookup_key"
    assert len(emulator.prices) == 1  # nothing was created

    transfer: Any = {**new_params, "transfer_lookup_key": True}
    new = await client.v1.prices.create_async(params=transfer)
    assert new.lookup_key == "pro_monthly"
    old_now = await client.v1.prices.retrieve_async(old.id)
    assert old_now.lookup_key is None and old_now.active  # key moved, price untouched
    found = await client.v1.prices.list_async(params={"lookup_keys": ["pro_monthly", "nope"]})
    assert [p.id for p in found.data] == [new.id]

    # the move is told as price.updated on the old holder, with the key it had
    updates = await client.v1.events.list_async(params={"type": "price.updated"})
    assert [e.data.object["id"] for e in updates.data] == [old.id]
    previous = updates.data[0].data.previous_attributes
    assert previous is not None and previous.to_dict() == {"lookup_key": "pro_monthly"}

    # an inactive holder still holds its key
    await client.v1.prices.update_async(new.id, params={"active": False})
    with pytest.raises(stripe.InvalidRequestError, match="already uses that lookup key"):
        await client.v1.prices.update_async(old.id, params={"lookup_key": "pro_monthly"})
    moved = await client.v1.prices.update_async(
        old.id, params={"lookup_key": "pro_monthly", "transfer_lookup_key": True}
    )
    assert moved.lookup_key == "pro_monthly"
    assert (await client.v1.prices.retrieve_async(new.id)).lookup_key is None
    active = await client.v1.prices.list_async(params={"active": True})
    assert [p.id for p in active.data] == [old.id]


async def test_prices_refuse_what_stripe_refuses(client: stripe.StripeClient) -> None:
    product = await client.v1.products.create_async(params={"name": "API"})
    price = await client.v1.prices.create_async(
        params={"product": product.id, "currency": "usd", "unit_amount": 5}
    )
    new_amount: Any = {"unit_amount": 6}
    with pytest.raises(stripe.InvalidRequestError) as amount:  # amounts are immutable
        await client.v1.prices.update_async(price.id, params=new_amount)
    assert amount.value.code == "parameter_unknown" and amount.value.param == "unit_amount"
    assert (await client.v1.prices.retrieve_async(price.id)).unit_amount == 5
    with pytest.raises(stripe.InvalidRequestError, match="must be backed by meters"):
        await client.v1.prices.create_async(
            params={
                "product": product.id,
                "currency": "usd",
                "unit_amount": 1,
                "recurring": {"interval": "month", "usage_type": "metered"},
            }
        )
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        await client.v1.prices.create_async(
            params={
                "product": product.id,
                "currency": "usd",
                "unit_amount": 1,
                "recurring": {"interval": "month", "usage_type": "metered", "meter": "mtr_x"},
            }
        )
    assert no_meter.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError, match="unit_amount"):
        await client.v1.prices.create_async(params={"product": product.id, "currency": "usd"})
    with pytest.raises(stripe.InvalidRequestError) as many:
        await client.v1.prices.list_async(params={"lookup_keys": [f"k{i}" for i in range(11)]})
    assert many.value.param == "lookup_keys"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.prices.retrieve_async("price_nope")
    assert missing.value.http_status == 404
    decimal = await client.v1.prices.create_async(
        params={
            "product": product.id,
            "currency": "USD",
            "unit_amount_decimal": "0.0125",  # type: ignore[typeddict-item]
        }
    )
    assert decimal.unit_amount is None and str(decimal.unit_amount_decimal) == "0.0125"
    assert decimal.currency == "usd" and decimal.type == "one_time"


# ---------------------------------------------------------------------------------------------
# subscriptions and credit grants


async def test_subscription_items_periods_and_cancel(client: stripe.StripeClient) -> None:
    customer, _, metered, flat = await metered_setup(client, interval="month")
    with pytest.raises(stripe.InvalidRequestError) as quantity:
        await client.v1.subscriptions.create_async(
            params={
                "customer": customer,
                "items": [{"price": flat, "quantity": 2}, {"price": metered, "quantity": 1}],
            }
        )
    assert quantity.value.user_message == "You cannot set the quantity for metered plans."
    assert quantity.value.param == "items[1][quantity]"

    sub = await client.v1.subscriptions.create_async(
        params={
            "customer": customer,
            "items": [{"price": flat, "quantity": 2}, {"price": metered}],
            "metadata": {"org": "org_1"},
        },
        options={"idempotency_key": "org_1:catalog_1"},
    )
    assert sub.status == "active" and sub.customer == customer
    flat_item, metered_item = sub["items"].data
    assert flat_item.quantity == 2 and "quantity" not in metered_item  # Stripe omits it
    assert metered_item.price.recurring is not None
    assert metered_item.price.recurring.usage_type == "metered"
    start, end = metered_item.current_period_start, metered_item.current_period_end
    assert 28 * DAY <= end - start <= 31 * DAY  # one calendar month, on the items (basil)
    again = await client.v1.subscriptions.create_async(
        params={
            "customer": customer,
            "items": [{"price": flat, "quantity": 2}, {"price": metered}],
            "metadata": {"org": "org_1"},
        },
        options={"idempotency_key": "org_1:catalog_1"},
    )
    assert again.id == sub.id  # replayed, not a second subscription
    listed = await client.v1.subscriptions.list_async(params={"customer": customer})
    assert [s.id for s in listed.data] == [sub.id]

    canceled = await client.v1.subscriptions.cancel_async(sub.id)
    assert canceled.status == "canceled" and canceled.canceled_at is not None
    assert (await client.v1.subscriptions.list_async(params={"customer": customer})).data == []
    ended = await client.v1.subscriptions.list_async(params={"customer": customer, "status": "all"})
    assert [s.id for s in ended.data] == [sub.id]
    events = await client.v1.events.list_async(params={"type": "customer.subscription.*"})
    assert [e.type for e in events.data] == [
        "customer.subscription.deleted",
        "customer.subscription.created",
    ]
    created_event = events.data[1]
    assert created_event.data.object["id"] == sub.id
    assert created_event.request is not None
    assert created_event.request.idempotency_key == "org_1:catalog_1"
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.subscriptions.cancel_async(sub.id)


async def test_credit_grants(client: stripe.StripeClient) -> None:
    customer, _, metered, _ = await metered_setup(client)
    grant = await client.v1.billing.credit_grants.create_async(
        params={
            "customer": customer,
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 500}},
            "applicability_config": {"scope": {"price_type": "metered"}},
            "category": "promotional",
            "name": "Welcome credit",
            "metadata": {"org": "org_1"},
        }
    )
    assert grant.object == "billing.credit_grant" and grant.customer == customer
    assert grant.amount.monetary is not None and grant.amount.monetary.value == 500
    assert grant.applicability_config.scope.price_type == "metered"
    assert grant.category == "promotional" and grant.priority == 50
    listed = await client.v1.billing.credit_grants.list_async(params={"customer": customer})
    assert [g.id for g in listed.data] == [grant.id]
    balance = await client.v1.billing.credit_balance_summary.retrieve_async(
        params={
            "customer": customer,
            "filter": {
                "type": "applicability_scope",
                "applicability_scope": {"price_type": "metered"},
            },
        }
    )
    assert balance.balances[0].available_balance.monetary is not None
    assert balance.balances[0].available_balance.monetary.value == 500

    base: Any = {
        "customer": customer,
        "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 0}},
        "applicability_config": {"scope": {"price_type": "metered"}},
    }
    with pytest.raises(stripe.InvalidRequestError) as zero:
        await client.v1.billing.credit_grants.create_async(params=base)
    assert zero.value.param == "amount[monetary][value]"
    base["amount"]["monetary"]["value"] = 5
    base["applicability_config"]["scope"]["prices"] = [{"id": metered}]
    with pytest.raises(stripe.InvalidRequestError, match="only specify one of"):
        await client.v1.billing.credit_grants.create_async(params=base)


# ---------------------------------------------------------------------------------------------
# checkout and signed webhooks


async def test_setup_checkout_completion_is_a_signed_webhook(
    client: stripe.StripeClient,
    emulator: StripeEmulator,
    hooks: httpx.AsyncClient,
    receiver: Receiver,
) -> None:
    registered = await endpoint(client, receiver, "checkout.session.completed")
    secret = registered.secret
    assert secret is not None and secret.startswith("whsec_")
    fetched = await client.v1.webhook_endpoints.retrieve_async(registered.id)
    assert "secret" not in fetched.to_dict()  # shown once, at creation

    with pytest.raises(stripe.InvalidRequestError) as currency:
        await client.v1.checkout.sessions.create_async(params={"mode": "setup"})
    assert currency.value.param == "currency"
    session = await client.v1.checkout.sessions.create_async(
        params={
            "mode": "setup",
            "currency": "usd",
            "customer_creation": "always",
            "client_reference_id": "org_42",
            "metadata": {"org": "org_42"},
            "success_url": "https://app.example.com/done?session={CHECKOUT_SESSION_ID}",
        }
    )
    assert session.status == "open" and session.mode == "setup" and session.customer is None

    completed = (await hooks.post(f"/_emulator/checkout/{session.id}/complete", json={})).json()
    assert completed["status"] == "complete"
    assert completed["customer"].startswith("cus_")
    assert completed["setup_intent"].startswith("seti_")
    await until(lambda: len(receiver.requests) == 1)

    headers, body = receiver.requests[0]
    event = stripe.Webhook.construct_event(body, headers["stripe-signature"], secret)
    assert event.type == "checkout.session.completed"
    obj = event.data.object
    assert obj["id"] == session.id and obj["status"] == "complete"
    assert obj["client_reference_id"] == "org_42" and obj["metadata"].to_dict() == {"org": "org_42"}
    assert obj["customer"] == completed["customer"]
    assert event.api_version == "2026-10-28.endive" and event.livemode is False
    setup = await client.v1.setup_intents.retrieve_async(obj["setup_intent"])
    assert setup.status == "succeeded" and setup.customer == obj["customer"]

    tampered = body.replace(b"org_42", b"org_43")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, headers["stripe-signature"], secret)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_other")

    assert await emulator.wait_for_webhooks()
    assert (await client.v1.events.retrieve_async(event.id)).pending_webhooks == 0
    assert (await hooks.post(f"/_emulator/checkout/{session.id}/complete")).status_code == 400


async def test_session_url_completes_and_redirects(
    client: stripe.StripeClient, hooks: httpx.AsyncClient
) -> None:
    customer = await client.v1.customers.create_async()
    session = await client.v1.checkout.sessions.create_async(
        params={
            "mode": "setup",
            "currency": "eur",
            "customer": customer.id,
            "success_url": "https://app.example.com/done?session={CHECKOUT_SESSION_ID}",
        }
    )
    assert session.url is not None
    page = await hooks.get(session.url)
    assert page.status_code == 303
    assert page.headers["location"] == f"https://app.example.com/done?session={session.id}"
    done = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert done.status == "complete" and done.customer == customer.id


async def test_non_2xx_is_retried_until_2xx(
    client: stripe.StripeClient, emulator: StripeEmulator, receiver: Receiver
) -> None:
    registered = await endpoint(client, receiver, "product.created")
    receiver.statuses.extend([500, 503])
    product = await client.v1.products.create_async(params={"name": "Retried"})
    assert await emulator.wait_for_webhooks()
    assert len(receiver.requests) == 3
    ids = {e["id"] for e in receiver.events()}
    assert len(ids) == 1  # the same event each time
    for headers, body in receiver.requests:  # each attempt freshly and validly signed
        assert registered.secret is not None
        event = stripe.Webhook.construct_event(body, headers["stripe-signature"], registered.secret)
        assert event.data.object["id"] == product.id
    records = [d for d in emulator.deliveries if d["event"] in ids]
    assert [(d["attempt"], d["status"], d["ok"]) for d in records] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]
    (event_id,) = ids
    assert (await client.v1.events.retrieve_async(event_id)).pending_webhooks == 0


async def test_delivery_gives_up_after_max_attempts(
    client: stripe.StripeClient, emulator: StripeEmulator, receiver: Receiver
) -> None:
    emulator.set_webhooks(max_attempts=2)
    await endpoint(client, receiver, "product.created")
    receiver.statuses.extend([500] * 5)
    await client.v1.products.create_async(params={"name": "Never delivered"})
    assert await emulator.wait_for_webhooks()
    assert len(receiver.requests) == 2
    assert emulator.state()["webhooks_abandoned"] == 1
    failed = await client.v1.events.list_async(params={"delivery_success": False})
    assert [e.type for e in failed.data] == ["product.created"]
    assert failed.data[0].pending_webhooks == 1


async def test_connection_errors_are_retried(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    await client.v1.webhook_endpoints.create_async(
        params={"url": f"http://127.0.0.1:{port}/hook", "enabled_events": ["product.created"]}
    )
    emulator.set_webhooks(max_attempts=3)
    await client.v1.products.create_async(params={"name": "Unreachable"})
    assert await emulator.wait_for_webhooks()
    assert [d["attempt"] for d in emulator.deliveries] == [1, 2, 3]
    assert all(d["status"] is None and d["error"] for d in emulator.deliveries)


async def test_duplicate_delivery_and_redelivery(
    client: stripe.StripeClient,
    emulator: StripeEmulator,
    hooks: httpx.AsyncClient,
    receiver: Receiver,
) -> None:
    await endpoint(client, receiver, "product.created")
    settings = await hooks.post("/_emulator/webhooks", json={"duplicate_next": 1})
    assert settings.json()["duplicate_next"] == 1
    await client.v1.products.create_async(params={"name": "Twice"})
    assert await emulator.wait_for_webhooks()
    first, second = receiver.events()
    assert first["id"] == second["id"] and first["type"] == "product.created"
    assert emulator.state()["webhook_duplicates"] == 1

    queued = await hooks.post(f"/_emulator/events/{first['id']}/redeliver", json={})
    assert queued.json() == {"queued": 1}
    flushed = await hooks.post("/_emulator/webhooks/flush", json={"timeout": 3})
    assert flushed.json()["idle"] is True
    assert [e["id"] for e in receiver.events()] == [first["id"]] * 3
    log = (await hooks.get("/_emulator/deliveries", params={"event": first["id"]})).json()
    assert [(d["duplicate"], d["redelivery"]) for d in log["data"]] == [
        (False, False),
        (True, False),
        (False, True),
    ]


async def test_held_deliveries_arrive_out_of_order(
    client: stripe.StripeClient,
    emulator: StripeEmulator,
    hooks: httpx.AsyncClient,
    receiver: Receiver,
) -> None:
    await endpoint(client, receiver)
    await hooks.post("/_emulator/webhooks", json={"hold": True})
    customer = await client.v1.customers.create_async()
    product = await client.v1.products.create_async(params={"name": "Ordered"})
    await client.v1.prices.create_async(
        params={"product": product.id, "currency": "usd", "unit_amount": 5}
    )
    await asyncio.sleep(0.05)
    assert receiver.requests == [] and emulator.state()["webhooks_held"] == 3
    released = await hooks.post("/_emulator/webhooks/release", json={"order": "reverse"})
    assert released.json() == {"released": 3}
    assert await emulator.wait_for_webhooks()
    assert receiver.types() == ["price.created", "product.created", "customer.created"]
    assert receiver.events()[2]["data"]["object"]["id"] == customer.id


async def test_deleted_endpoint_gets_nothing_more(
    client: stripe.StripeClient, emulator: StripeEmulator, receiver: Receiver
) -> None:
    registered = await endpoint(client, receiver, "product.created")
    deleted = await client.v1.webhook_endpoints.delete_async(registered.id)
    assert deleted.deleted is True
    await client.v1.products.create_async(params={"name": "Unheard"})
    assert await emulator.wait_for_webhooks()
    assert receiver.requests == []


def test_signature_header_is_what_the_sdk_verifies() -> None:
    payload = b'{"id": "evt_1", "object": "event"}'
    header = signature_header(payload, "whsec_test", 1_700_000_000)
    expected = stripe.WebhookSignature._compute_signature(
        "1700000000." + payload.decode(), "whsec_test"
    )
    assert header == f"t=1700000000,v1={expected}"
    assert stripe.WebhookSignature.verify_header(payload.decode(), header, "whsec_test")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload.decode() + " ", header, "whsec_test")


# ---------------------------------------------------------------------------------------------
# invoices


async def test_period_end_invoice_counts_the_meter_events_then_finalizes(
    client: stripe.StripeClient,
    emulator: StripeEmulator,
    hooks: httpx.AsyncClient,
    receiver: Receiver,
) -> None:
    registered = await endpoint(client, receiver, "invoice.created", "invoice.finalized")
    customer, _, metered, flat = await metered_setup(client, interval="day", unit="0.5")
    sub = await client.v1.subscriptions.create_async(
        params={"customer": customer, "items": [{"price": metered}, {"price": flat}]}
    )
    start = sub["items"].data[0].current_period_start
    end = sub["items"].data[0].current_period_end
    assert end - start == DAY
    await meter_event(client, customer, 100, start - 60)  # before the period: not billed
    await meter_event(client, customer, 3, start)
    await meter_event(client, customer, 4, start + 1)

    closed = (await hooks.post(f"/_emulator/subscriptions/{sub.id}/advance", json={})).json()
    invoice = closed["invoice"]
    assert emulator.now() >= end  # the clock moved to the period end, like a test clock
    assert invoice["status"] == "draft" and invoice["billing_reason"] == "subscription_cycle"
    assert (invoice["period_start"], invoice["period_end"]) == (start, end)
    assert invoice["parent"]["subscription_details"]["subscription"] == sub.id
    assert invoice["automatically_finalizes_at"] == end + 3600
    lines = {line["pricing"]["price_details"]["price"]: line for line in invoice["lines"]["data"]}
    assert lines[metered]["quantity"] == 7  # usage in [start, end): arrears
    assert lines[metered]["period"] == {"start": start, "end": end}
    assert lines[flat]["quantity"] == 1  # licensed: the next period, in advance
    assert lines[flat]["period"] == {"start": end, "end": end + DAY}
    assert invoice["subtotal"] == 4 + 1000  # 7 x 0.5 = 3.5, rounded half up
    renewed = await client.v1.subscriptions.retrieve_async(sub.id)
    assert renewed["items"].data[0].current_period_start == end
    assert renewed.latest_invoice == invoice["id"]
    first = ["invoice.created", "invoice.finalized"]  # the subscription_create invoice
    await until(lambda: receiver.types() == [*first, "invoice.created"])

    # usage reported late for the closed period (a true-up) lands on the draft
    await meter_event(client, customer, 5, start + 2)
    draft = await client.v1.invoices.retrieve_async(invoice["id"])
    assert draft.lines.data[0].quantity == 12 and draft.status == "draft"

    emulator.advance(3600)  # automatic finalization, one hour after creation
    final = await client.v1.invoices.retrieve_async(invoice["id"])
    assert final.status == "paid" and final.number is not None  # charged pm_card_visa
    assert final.status_transitions.finalized_at is not None
    await meter_event(client, customer, 50, start + 3)  # after finalization: not re-invoiced
    final = await client.v1.invoices.retrieve_async(invoice["id"])
    assert final.lines.data[0].quantity == 12 and final.total == 6 + 1000
    await until(lambda: receiver.types() == [*first, "invoice.created", "invoice.finalized"])
    assert registered.secret is not None
    for headers, body in receiver.requests:
        stripe.Webhook.construct_event(body, headers["stripe-signature"], registered.secret)
    finalized = receiver.events()[3]["data"]["object"]
    assert finalized["id"] == invoice["id"] and finalized["status"] == "open"
    listed = await client.v1.invoices.list_async(params={"customer": customer})
    assert [i.billing_reason for i in listed.data] == ["subscription_cycle", "subscription_create"]
    assert listed.data[0].id == invoice["id"]


async def test_manual_finalization_applies_billing_credits(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    emulator.invoice_finalize_delay = None  # drafts wait for an explicit finalize
    customer, _, metered, _ = await metered_setup(client, interval="month", unit="100")
    await client.v1.billing.credit_grants.create_async(
        params={
            "customer": customer,
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 250}},
            "applicability_config": {"scope": {"price_type": "metered"}},
        }
    )
    sub = await client.v1.subscriptions.create_async(
        params={"customer": customer, "items": [{"price": metered}]}
    )
    start = sub["items"].data[0].current_period_start
    await meter_event(client, customer, 3, start)
    emulator.advance(10)
    invoice = emulator.close_period(sub.id, at="now")
    assert invoice["period_end"] == int(emulator.now()) and invoice["auto_advance"] is False
    emulator.advance(2 * DAY)
    draft = await client.v1.invoices.retrieve_async(invoice["id"])
    assert draft.status == "draft" and draft.total == 300  # no credit before finalization

    final = await client.v1.invoices.finalize_invoice_async(invoice["id"])
    assert final.status == "open" and final.total == 50 and final.amount_due == 50
    credits = final.lines.data[0].pretax_credit_amounts
    assert credits is not None and [c.amount for c in credits] == [250]
    with pytest.raises(stripe.InvalidRequestError, match="already finalized"):
        await client.v1.invoices.finalize_invoice_async(invoice["id"])
    balance = await client.v1.billing.credit_balance_summary.retrieve_async(
        params={
            "customer": customer,
            "filter": {
                "type": "applicability_scope",
                "applicability_scope": {"price_type": "metered"},
            },
        }
    )
    assert balance.balances == []  # used up


async def test_cancel_with_invoice_now_bills_the_usage_so_far(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    customer, _, metered, flat = await metered_setup(client, interval="month")
    sub = await client.v1.subscriptions.create_async(
        params={"customer": customer, "items": [{"price": metered}, {"price": flat}]}
    )
    start = sub["items"].data[0].current_period_start
    await meter_event(client, customer, 9, start)
    emulator.advance(60)
    canceled = await client.v1.subscriptions.cancel_async(sub.id, params={"invoice_now": True})
    assert canceled.status == "canceled" and canceled.latest_invoice is not None
    invoice = await client.v1.invoices.retrieve_async(str(canceled.latest_invoice))
    assert [line.quantity for line in invoice.lines.data] == [9]  # usage only, no new period
    types = [e.type for e in (await client.v1.events.list_async()).data]
    assert types.index("customer.subscription.deleted") < types.index("invoice.created")


async def test_the_clock_closes_every_period_it_passes(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    customer, _, metered, _ = await metered_setup(client, interval="day")
    sub = await client.v1.subscriptions.create_async(
        params={"customer": customer, "items": [{"price": metered}]}
    )
    start = sub["items"].data[0].current_period_start
    emulator.advance(3 * DAY - (emulator.now() - start) + 1)
    listed = (await client.v1.invoices.list_async(params={"subscription": sub.id})).data
    invoices = [i for i in listed if i.billing_reason == "subscription_cycle"]
    assert [(i.period_start - start, i.period_end - start) for i in reversed(invoices)] == [
        (0, DAY),
        (DAY, 2 * DAY),
        (2 * DAY, 3 * DAY),
    ]
    # each finalizes an hour after its period's end (then, with no usage, is paid at once):
    # the last one is still a draft
    assert [i.status for i in reversed(invoices)] == ["paid", "paid", "draft"]
    renewed = await client.v1.subscriptions.retrieve_async(sub.id)
    assert renewed["items"].data[0].current_period_start == start + 3 * DAY
    updates = await client.v1.events.list_async(params={"type": "customer.subscription.updated"})
    assert len(updates.data) == 3  # one per renewal, telling the period it left
    first = updates.data[-1].data
    assert first.previous_attributes is not None
    assert first.previous_attributes["items"]["data"][0]["current_period_start"] == start
    assert first.object["items"]["data"][0]["current_period_start"] == start + DAY


async def test_expired_session_cannot_complete(
    client: stripe.StripeClient, emulator: StripeEmulator, hooks: httpx.AsyncClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(
        params={"mode": "setup", "currency": "usd", "customer_creation": "always"}
    )
    expired = await client.v1.checkout.sessions.expire_async(session.id)
    assert expired.status == "expired"
    refused = await hooks.post(f"/_emulator/checkout/{session.id}/complete")
    assert refused.status_code == 400 and "expired" in refused.json()["error"]["message"]
    lapsed = await client.v1.checkout.sessions.create_async(
        params={"mode": "setup", "currency": "usd"}
    )
    emulator.advance(DAY)  # sessions last 24 hours by default
    assert (await client.v1.checkout.sessions.retrieve_async(lapsed.id)).status == "expired"
    types = [e.type for e in (await client.v1.events.list_async()).data]
    assert types == ["checkout.session.expired", "checkout.session.expired"]


async def test_threaded_emulator_delivers_with_a_chosen_secret(receiver: Receiver) -> None:
    emu = StripeEmulator(seed=5)
    with serve_emulator_in_thread(emu) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            registered = await http.post(
                "/_emulator/webhook_endpoints",
                json={
                    "url": receiver.url,
                    "enabled_events": ["checkout.session.completed"],
                    "secret": "whsec_from_config",
                },
            )
            assert registered.json()["secret"] == "whsec_from_config"
            session = (
                await http.post(
                    "/v1/checkout/sessions",
                    data={"mode": "setup", "currency": "usd", "customer_creation": "always"},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
            ).json()
            emu.complete_checkout(session["id"])  # from this thread: delivered on the emulator's
            await until(lambda: len(receiver.requests) == 1)
    headers, body = receiver.requests[0]
    event = stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_from_config")
    assert event.type == "checkout.session.completed"
    assert event.data.object["id"] == session["id"]
