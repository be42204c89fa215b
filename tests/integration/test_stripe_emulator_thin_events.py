"""The emulator's asynchronous meter-event validation: accepted with 200, counted nowhere,
reported in thin events to event destinations, fetched whole from /v2/core/events; and
eventually consistent summaries. Driven by the real stripe SDK over HTTP (rows ME-9, ME-15 to
ME-18, TE-1 to TE-12, SUM-1 of docs/reference/stripe-behaviour.md)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe

from stripe_emulator import (
    EmulatorServer,
    MeterValidation,
    StripeEmulator,
    WebhookSettings,
    serve_emulator,
)

API_KEY = "sk_test_emulator_0123456789"


class Receiver:
    """A destination: records (headers, raw body), answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
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
        self.requests.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def emulator() -> AsyncIterator[StripeEmulator]:
    emu = StripeEmulator(
        seed=5,
        webhooks=WebhookSettings(retry_base=0.01, retry_max=0.05, timeout=2.0),
        meter_validation=MeterValidation(report_window_seconds=60, sample_size=2),
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
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = EmulatorServer(recv.app)
    await server.start(sock)
    recv.url = f"http://127.0.0.1:{sock.getsockname()[1]}/webhooks/stripe/thin"
    try:
        yield recv
    finally:
        await server.stop()
        sock.close()


async def destination(client: stripe.StripeClient, receiver: Receiver) -> str:
    created = await client.v2.core.event_destinations.create_async(
        {
            "name": "meter errors",
            "type": "webhook_endpoint",
            "event_payload": "thin",
            "enabled_events": [
                "v1.billing.meter.error_report_triggered",
                "v1.billing.meter.no_meter_found",
            ],
            "webhook_endpoint": {"url": receiver.url},
            "include": ["webhook_endpoint.signing_secret"],
        }
    )
    assert created.object == "v2.core.event_destination"
    assert created.webhook_endpoint is not None
    secret = created.webhook_endpoint.signing_secret
    assert secret is not None and secret.startswith("whsec_")
    return secret


async def meter_event(
    client: stripe.StripeClient, customer: str, identifier: str, event_name: str = "api_calls"
) -> Any:
    return await client.v1.billing.meter_events.create_async(
        {
            "event_name": event_name,
            "payload": {"stripe_customer_id": customer, "value": "5"},
            "identifier": identifier,
        }
    )


async def test_invalid_events_are_accepted_counted_nowhere_and_reported(
    client: stripe.StripeClient, emulator: StripeEmulator, receiver: Receiver
) -> None:
    secret = await destination(client, receiver)
    customer = await client.v1.customers.create_async({"email": "a@example.com"})
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": "calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    ok = await meter_event(client, customer.id, "good-1")
    for n in range(3):
        answer = await meter_event(client, "cus_missing", f"bad-{n}")
        assert answer.identifier == f"bad-{n}"  # 200: validated later
    await meter_event(client, "cus_missing", "nometer-1", event_name="nope")
    assert ok.identifier == "good-1"
    assert emulator.state()["meter_events_invalid"] == 4
    assert receiver.requests == []  # the window has not ended yet
    emulator.advance(61)
    assert await emulator.wait_for_webhooks()
    assert len(receiver.requests) == 2
    notifications: list[Any] = [
        client.parse_event_notification(body, headers["stripe-signature"], secret)
        for headers, body in receiver.requests
    ]
    by_type = {n.type: n for n in notifications}
    report = by_type["v1.billing.meter.error_report_triggered"]
    assert report.related_object.id == meter.id
    full: Any = await report.fetch_event_async()
    reason = full.data.reason
    assert reason.error_count == 3
    (kind,) = reason.error_types
    assert kind.code == "meter_event_customer_not_found"
    assert kind.error_count == 3
    assert [s.request.identifier for s in kind.sample_errors] == ["bad-0", "bad-1"]  # sample_size
    assert full.data.developer_message_summary == "There are 3 invalid events"
    missing = by_type["v1.billing.meter.no_meter_found"]
    fetched: Any = await missing.fetch_event_async()
    (nomatch,) = fetched.data.reason.error_types
    assert nomatch.code == "no_meter"
    assert "'nope'" in nomatch.sample_errors[0].error_message
    # the identifier is taken: a resend is refused as a duplicate, and nothing counted
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        await meter_event(client, customer.id, "bad-0")
    assert emulator.meter_total("api_calls", customer.id, 0, 2**40) == 5


async def test_a_bad_signature_does_not_parse(
    client: stripe.StripeClient, emulator: StripeEmulator, receiver: Receiver
) -> None:
    secret = await destination(client, receiver)
    await client.v1.billing.meters.create_async(
        {
            "display_name": "calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    await meter_event(client, "cus_missing", "bad")
    emulator.advance(61)
    assert await emulator.wait_for_webhooks()
    ((headers, body),) = receiver.requests
    with pytest.raises(stripe.SignatureVerificationError):
        client.parse_event_notification(body, headers["stripe-signature"], "whsec_wrong")
    with pytest.raises(ValueError, match="thin event"):
        stripe.Webhook.construct_event(body, headers["stripe-signature"], secret)


async def test_sync_mode_answers_400_with_the_code(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    emulator.set_meter_validation(meter_event_customer_not_found="sync")
    await client.v1.billing.meters.create_async(
        {
            "display_name": "calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await meter_event(client, "cus_missing", "bad")
    assert refused.value.code == "meter_event_customer_not_found"
    assert emulator.state()["meter_events_invalid"] == 0


async def test_summaries_lag_behind_on_the_emulator_clock(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    emulator.set_meter_validation(summary_lag_seconds=120)
    customer = await client.v1.customers.create_async({"email": "a@example.com"})
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": "calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    hour = int(time.time()) // 3600 * 3600 - 3600
    await client.v1.billing.meter_events.create_async(
        {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": customer.id, "value": "7"},
            "timestamp": hour + 10,
        }
    )
    params: Any = {"customer": customer.id, "start_time": hour, "end_time": hour + 3600}
    before = await client.v1.billing.meters.event_summaries.list_async(meter.id, params)
    assert before.data[0].aggregated_value == 0
    emulator.advance(121)
    after = await client.v1.billing.meters.event_summaries.list_async(meter.id, params)
    assert after.data[0].aggregated_value == 7
