"""The meter-event scenarios against Stripe's test mode: what the emulator claims about
asynchronous validation, held against the real thing (docs/reference/stripe-behaviour.md).

Opt in: ``STRIPE_TEST_API_KEY=sk_test_... pytest -m stripe_live tests/live``. Without the key
every test is skipped, saying so. Each run creates its own meter (a unique event name) and
customer in the test-mode account; Stripe reports invalid events minutes later, so a test waits
up to ``STRIPE_LIVE_WAIT_SECONDS`` (600) for the report. ``STRIPE_LIVE_API_BASE`` points the
same tests at another Stripe (e.g. the emulator started with ``--report-window 1``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

KEY = os.environ.get("STRIPE_TEST_API_KEY", "")
BASE = os.environ.get("STRIPE_LIVE_API_BASE", "")
WAIT = float(os.environ.get("STRIPE_LIVE_WAIT_SECONDS", "600"))
REPORT = "v1.billing.meter.error_report_triggered"

pytestmark = [
    pytest.mark.stripe_live,
    pytest.mark.skipif(
        not KEY, reason="STRIPE_TEST_API_KEY is not set: the Stripe test-mode suite is opt-in"
    ),
]


@pytest.fixture(scope="module")
def client() -> stripe.StripeClient:
    if not KEY.startswith(("sk_test_", "rk_test_")) and not BASE:
        pytest.fail("STRIPE_TEST_API_KEY must be a test-mode key (sk_test_... or rk_test_...)")
    return stripe.StripeClient(KEY, base_addresses={"api": BASE} if BASE else None)


@pytest.fixture(scope="module")
def meter(client: stripe.StripeClient) -> Iterator[Any]:
    name = f"cp_live_{uuid.uuid4().hex[:12]}"
    created = client.v1.billing.meters.create(
        {"display_name": name, "event_name": name, "default_aggregation": {"formula": "sum"}}
    )
    yield created
    client.v1.billing.meters.deactivate(created.id)


def send(client: stripe.StripeClient, meter: Any, customer: str, identifier: str) -> Any:
    return client.v1.billing.meter_events.create(
        {
            "event_name": meter.event_name,
            "payload": {"stripe_customer_id": customer, "value": "3"},
            "identifier": identifier,
        }
    )


def wait_for_report(client: stripe.StripeClient, meter: Any, identifier: str) -> Any:
    """The full error-report event naming `identifier` (Stripe reports minutes later)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        page = client.v2.core.events.list({"object_id": meter.id, "types": [REPORT]})
        for thin in page.data:
            full: Any = client.v2.core.events.retrieve(thin.id)
            for kind in full.data.reason.error_types:
                if any(s.request.identifier == identifier for s in kind.sample_errors):
                    return full
        time.sleep(10)
    raise AssertionError(f"no error report named {identifier} within {WAIT} s")


def test_an_unknown_customer_is_accepted_then_reported(
    client: stripe.StripeClient, meter: Any
) -> None:
    identifier = f"cp-live-{uuid.uuid4().hex}"
    accepted = send(client, meter, "cus_doesnotexist000000", identifier)
    assert accepted.identifier == identifier  # 200: validated later (ME-9, ME-16)
    full = wait_for_report(client, meter, identifier)
    assert full.type == REPORT and full.related_object.id == meter.id
    codes = {k.code for k in full.data.reason.error_types}
    assert "meter_event_customer_not_found" in codes  # ME-15
    assert full.data.reason.error_count >= 1
    assert full.data.validation_start < full.data.validation_end  # TE-4


def test_a_reused_identifier_is_refused(client: stripe.StripeClient, meter: Any) -> None:
    customer = client.v1.customers.create({"name": "cp live"})
    identifier = f"cp-live-{uuid.uuid4().hex}"
    send(client, meter, customer.id, identifier)
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        send(client, meter, customer.id, identifier)


def test_a_timestamp_older_than_35_days_is_refused(client: stripe.StripeClient, meter: Any) -> None:
    customer = client.v1.customers.create({"name": "cp live"})
    with pytest.raises(stripe.InvalidRequestError, match="35 days"):
        client.v1.billing.meter_events.create(
            {
                "event_name": meter.event_name,
                "payload": {"stripe_customer_id": customer.id, "value": "1"},
                "timestamp": int(time.time()) - 36 * 86_400,
            }
        )


def test_summaries_eventually_count_a_valid_event(client: stripe.StripeClient, meter: Any) -> None:
    customer = client.v1.customers.create({"name": "cp live"})
    hour = int(time.time()) // 3600 * 3600
    client.v1.billing.meter_events.create(
        {
            "event_name": meter.event_name,
            "payload": {"stripe_customer_id": customer.id, "value": "4"},
            "timestamp": hour + 1,
        }
    )
    params: Any = {"customer": customer.id, "start_time": hour, "end_time": hour + 3600}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        summaries = client.v1.billing.meters.event_summaries.list(meter.id, params).data
        if summaries and summaries[0].aggregated_value == 4:
            return
        time.sleep(10)
    raise AssertionError(f"the summary did not count the event within {WAIT} s (SUM-1)")
