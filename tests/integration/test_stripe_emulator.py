"""The Stripe emulator, driven by the real stripe SDK over loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe

from stripe_emulator import (
    StripeEmulator,
    parse_form,
    serve_emulator,
    serve_emulator_in_thread,
)

DAY = 86_400
API_KEY = "sk_test_emulator_0123456789"


@pytest.fixture
async def emulator() -> AsyncIterator[StripeEmulator]:
    emu = StripeEmulator(seed=7)
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
def base() -> int:
    """An hour boundary two hours ago: event timestamps go after it, summaries start at it."""
    return (int(time.time()) // 3600 - 2) * 3600


async def setup_meter(
    client: stripe.StripeClient, event_name: str = "api_calls", formula: str = "sum"
) -> tuple[str, str]:
    customer = await client.v1.customers.create_async(params={"email": "org1@example.com"})
    meter = await client.v1.billing.meters.create_async(
        params={
            "display_name": "API calls",
            "event_name": event_name,
            "default_aggregation": {"formula": formula},
        }
    )
    return customer.id, meter.id


async def post_event(
    client: stripe.StripeClient,
    customer: str,
    value: str,
    timestamp: int,
    identifier: str | None = None,
    *,
    event_name: str = "api_calls",
    key: str | None = None,
) -> Any:
    params: Any = {
        "event_name": event_name,
        "payload": {"stripe_customer_id": customer, "value": value},
        "timestamp": timestamp,
    }
    if identifier is not None:
        params["identifier"] = identifier
    options: Any = {"idempotency_key": key} if key else None
    return await client.v1.billing.meter_events.create_async(params=params, options=options)


async def total(
    client: stripe.StripeClient, meter: str, customer: str, start: int, end: int
) -> float:
    page = await client.v1.billing.meters.event_summaries.list_async(
        meter, params={"customer": customer, "start_time": start, "end_time": end}
    )
    assert len(page.data) == 1
    return float(page.data[0].aggregated_value)


# ---------------------------------------------------------------------------------------------
# objects


async def test_customers_and_meters_round_trip(client: stripe.StripeClient) -> None:
    created = await client.v1.customers.create_async(
        params={"email": "a@example.com", "metadata": {"org_id": "org_1"}}
    )
    assert created.id.startswith("cus_") and created.object == "customer"
    assert created.metadata is not None and created.metadata.to_dict() == {"org_id": "org_1"}
    fetched = await client.v1.customers.retrieve_async(created.id)
    assert fetched.email == "a@example.com"
    listed = await client.v1.customers.list_async(params={"email": "a@example.com"})
    assert [c.id for c in listed.data] == [created.id]

    meter = await client.v1.billing.meters.create_async(
        params={
            "display_name": "Memory",
            "event_name": "memory_gb_s",
            "default_aggregation": {"formula": "sum"},
            "value_settings": {"event_payload_key": "gb_s"},
        }
    )
    assert meter.id.startswith("mtr_") and meter.object == "billing.meter"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "gb_s"
    assert (await client.v1.billing.meters.retrieve_async(meter.id)).event_name == "memory_gb_s"
    meters = await client.v1.billing.meters.list_async()
    assert meters["object"] == "list" and [m.id for m in meters.data] == [meter.id]

    with pytest.raises(stripe.InvalidRequestError) as dup:
        await client.v1.billing.meters.create_async(
            params={
                "display_name": "again",
                "event_name": "memory_gb_s",
                "default_aggregation": {"formula": "sum"},
            }
        )
    assert dup.value.param == "event_name"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.customers.retrieve_async("cus_nope")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"


async def test_list_pagination_follows_starting_after(client: stripe.StripeClient) -> None:
    ids = [(await client.v1.customers.create_async()).id for _ in range(5)]
    first = await client.v1.customers.list_async(params={"limit": 2})
    assert first.has_more and len(first.data) == 2
    seen = [c.id async for c in first.auto_paging_iter()]
    assert seen == list(reversed(ids))  # newest first, every one exactly once


async def test_unknown_parameter_and_missing_auth_are_refused(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await client.v1.customers.create_async(params={"colour": "blue"})  # type: ignore[arg-type]
    assert unknown.value.code == "parameter_unknown"

    http = stripe.HTTPXClient(timeout=5)
    try:
        bad = stripe.StripeClient(
            "pk_live_0123456789abcdef",
            base_addresses={"api": str(emulator.base_url)},
            http_client=http,
        )
        with pytest.raises(stripe.AuthenticationError) as denied:
            await bad.v1.customers.list_async()
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert denied.value.http_status == 401
    assert "pk_live_0123456789abcdef" not in str(denied.value)  # keys are masked


# ---------------------------------------------------------------------------------------------
# meter events


async def test_meter_events_sum_per_customer_and_window(
    client: stripe.StripeClient, base: int
) -> None:
    cus_a, meter = await setup_meter(client)
    cus_b = (await client.v1.customers.create_async()).id
    await post_event(client, cus_a, "5", base + 10, "a1")
    await post_event(client, cus_a, "7", base + 3600 + 5, "a2")
    await post_event(client, cus_a, "-2", base + 3600 + 6, "a3")  # negative corrections count
    await post_event(client, cus_b, "100", base + 20, "b1")

    assert await total(client, meter, cus_a, base, base + 7200) == 10
    assert await total(client, meter, cus_a, base, base + 3600) == 5  # end is exclusive
    assert await total(client, meter, cus_a, base + 3600, base + 7200) == 5
    assert await total(client, meter, cus_b, base, base + 7200) == 100

    hourly = await client.v1.billing.meters.event_summaries.list_async(
        meter,
        params={
            "customer": cus_a,
            "start_time": base,
            "end_time": base + 7200,
            "value_grouping_window": "hour",
        },
    )
    assert [(s.start_time, s.aggregated_value) for s in hourly.data] == [
        (base, 5),
        (base + 3600, 5),
    ]
    assert all(s.object == "billing.meter_event_summary" for s in hourly.data)

    with pytest.raises(stripe.InvalidRequestError) as unaligned:
        await total(client, meter, cus_a, base + 1, base + 7200)
    assert unaligned.value.param == "start_time"


async def test_accepted_event_is_shaped_like_stripe(client: stripe.StripeClient, base: int) -> None:
    customer, _ = await setup_meter(client)
    event = await post_event(client, customer, "3", base, "shape-1")
    assert event.object == "billing.meter_event"
    assert event.identifier == "shape-1" and event.timestamp == base
    assert event.payload.to_dict() == {"stripe_customer_id": customer, "value": "3"}
    generated = await post_event(client, customer, "1", base)
    assert generated.identifier  # generated when absent


async def test_duplicate_identifier_is_refused_like_stripe(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    await post_event(client, customer, "5", base, "row-1")
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await post_event(client, customer, "5", base, "row-1")
    error = refused.value
    assert error.http_status == 400
    assert error.user_message == "An event already exists with identifier row-1."
    assert error.headers is not None and error.headers["stripe-should-retry"] == "false"
    assert error.error is not None and error.error.type == "invalid_request_error"
    assert await total(client, meter, customer, base, base + 3600) == 5
    state = emulator.state()
    assert state["duplicate_identifier_rejections"] == 1
    assert state["meter_events_accepted"] == 1


async def test_identifier_is_forgotten_after_24_hours(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    await post_event(client, customer, "5", base, "row-1")
    emulator.advance(DAY - 5)
    with pytest.raises(stripe.InvalidRequestError):
        await post_event(client, customer, "5", base, "row-1")
    emulator.advance(6)  # 24 h + 1 s after Stripe received it
    again = await post_event(client, customer, "5", base, "row-1")
    assert again.identifier == "row-1"
    # the hazard the ledger guards against: Stripe now counts the usage twice
    assert await total(client, meter, customer, base, base + 3600) == 10
    state = emulator.state()
    assert state["identifiers_accepted_more_than_once"] == 1
    assert state["reaccepted_identifiers"] == {"row-1": 2}
    assert state["accepted_again_within_memory"] == 0


async def test_timestamp_window(client: stripe.StripeClient) -> None:
    customer, _ = await setup_meter(client)
    now = int(time.time())
    with pytest.raises(stripe.InvalidRequestError) as old:
        await post_event(client, customer, "1", now - 36 * DAY, "old")
    assert old.value.param == "timestamp"
    assert "35 days" in (old.value.user_message or "")
    with pytest.raises(stripe.InvalidRequestError) as future:
        await post_event(client, customer, "1", now + 6 * 60, "future")
    assert future.value.param == "timestamp"
    assert "5 minutes" in (future.value.user_message or "")
    # just inside both edges is fine
    await post_event(client, customer, "1", now - 34 * DAY, "old-ok")
    await post_event(client, customer, "1", now + 4 * 60, "future-ok")


@pytest.mark.parametrize("value", ["1.5", "abc", "1e3", "", "1234567890123456"])
async def test_value_must_be_a_whole_number(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int, value: str
) -> None:
    customer, _ = await setup_meter(client)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await post_event(client, customer, value, base, "v")
    assert refused.value.param == "payload[value]"
    assert emulator.state()["meter_events_accepted"] == 0


async def test_unknown_event_name_and_customer_are_refused(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    emulator.set_meter_validation(no_meter="sync", meter_event_customer_not_found="sync")
    customer, _ = await setup_meter(client)
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        await post_event(client, customer, "1", base, "x", event_name="nope")
    assert (no_meter.value.user_message or "").startswith("No active meter was found")
    with pytest.raises(stripe.InvalidRequestError) as no_customer:
        await post_event(client, "cus_missing", "1", base, "y")
    assert no_customer.value.user_message == "No such customer: 'cus_missing'"
    assert emulator.state()["meter_events_accepted"] == 0


# ---------------------------------------------------------------------------------------------
# idempotency


async def test_idempotency_key_replays_the_first_response(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    first = await client.v1.customers.create_async(
        params={"email": "x@example.com"}, options={"idempotency_key": "cust-1"}
    )
    second = await client.v1.customers.create_async(
        params={"email": "x@example.com"}, options={"idempotency_key": "cust-1"}
    )
    assert second.id == first.id
    assert len(emulator.customers) == 1
    assert second.last_response is not None
    assert second.last_response.headers["idempotent-replayed"] == "true"

    _, meter = await setup_meter(client)
    await post_event(client, first.id, "4", base, "evt-1", key="evt-1")
    replay = await post_event(client, first.id, "4", base, "evt-1", key="evt-1")
    assert replay.identifier == "evt-1"
    assert await total(client, meter, first.id, base, base + 3600) == 4
    assert emulator.state()["idempotent_replays"] == 2


async def test_idempotency_key_with_other_params_or_endpoint_is_an_error(
    client: stripe.StripeClient, base: int
) -> None:
    customer, _ = await setup_meter(client)
    await post_event(client, customer, "4", base, "evt-1", key="key-1")
    with pytest.raises(stripe.IdempotencyError) as params:
        await post_event(client, customer, "5", base, "evt-1", key="key-1")
    assert params.value.http_status == 400
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.customers.create_async(options={"idempotency_key": "key-1"})


async def test_idempotency_keys_are_forgotten_after_24_hours(
    client: stripe.StripeClient, emulator: StripeEmulator
) -> None:
    first = await client.v1.customers.create_async(options={"idempotency_key": "k"})
    emulator.advance(DAY + 1)
    second = await client.v1.customers.create_async(options={"idempotency_key": "k"})
    assert second.id != first.id


async def test_validation_errors_are_not_saved_under_the_key(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    emulator.set_meter_validation(no_meter="sync")
    customer, _ = await setup_meter(client)
    with pytest.raises(stripe.InvalidRequestError):
        await post_event(client, customer, "1", base, "e", event_name="later", key="k")
    await client.v1.billing.meters.create_async(
        params={
            "display_name": "later",
            "event_name": "later",
            "default_aggregation": {"formula": "sum"},
        }
    )
    accepted = await post_event(client, customer, "1", base, "e", event_name="later", key="k")
    assert accepted.identifier == "e"


# ---------------------------------------------------------------------------------------------
# cancellations


async def test_cancel_within_24_hours_removes_the_event(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    await post_event(client, customer, "5", base, "keep")
    await post_event(client, customer, "7", base + 1, "drop")
    adjustment = await client.v1.billing.meter_event_adjustments.create_async(
        params={"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "drop"}}
    )
    assert adjustment.object == "billing.meter_event_adjustment"
    assert adjustment.status == "complete" and adjustment.cancel is not None
    assert adjustment.cancel.identifier == "drop"
    assert await total(client, meter, customer, base, base + 3600) == 5

    with pytest.raises(stripe.InvalidRequestError):  # twice
        await client.v1.billing.meter_event_adjustments.create_async(
            params={"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "drop"}}
        )
    with pytest.raises(stripe.InvalidRequestError):  # unknown identifier
        await client.v1.billing.meter_event_adjustments.create_async(
            params={"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "nope"}}
        )

    emulator.advance(DAY + 1)
    with pytest.raises(stripe.InvalidRequestError) as late:
        await client.v1.billing.meter_event_adjustments.create_async(
            params={"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "keep"}}
        )
    assert "24 hours" in (late.value.user_message or "")
    assert await total(client, meter, customer, base, base + 3600) == 5


# ---------------------------------------------------------------------------------------------
# faults


async def test_rate_limit_answers_429_and_applies_nothing(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    emulator.set_faults(rate_limit=5)
    results = await asyncio.gather(
        *(post_event(client, customer, "1", base, f"r{i}") for i in range(20)),
        return_exceptions=True,
    )
    limited = [r for r in results if isinstance(r, stripe.RateLimitError)]
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert limited and accepted
    assert len(limited) + len(accepted) == 20
    assert limited[0].http_status == 429
    assert limited[0].headers is not None and limited[0].headers["retry-after"] == "1"
    state = emulator.state()
    assert state["rate_limited"] == len(limited)
    assert state["meter_events_accepted"] == len(accepted)
    emulator.set_faults(rate_limit=None)
    assert await total(client, meter, customer, base, base + 3600) == len(accepted)


async def test_injected_500_applies_nothing_and_is_not_saved(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    emulator.set_faults(fail_rate=1.0)
    with pytest.raises(stripe.APIError) as failed:
        await post_event(client, customer, "3", base, "f1", key="f1")
    assert failed.value.http_status == 500
    emulator.set_faults(fail_rate=0.0)
    assert await total(client, meter, customer, base, base + 3600) == 0
    await post_event(client, customer, "3", base, "f1", key="f1")  # same key: executed afresh
    assert await total(client, meter, customer, base, base + 3600) == 3


async def test_500_after_the_write_is_saved_and_replayed(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    emulator.set_faults(fail_after_write_rate=1.0)
    with pytest.raises(stripe.APIError):
        await post_event(client, customer, "3", base, "w1", key="w1")
    emulator.set_faults(fail_after_write_rate=0.0)
    with pytest.raises(stripe.APIError) as replayed:
        await post_event(client, customer, "3", base, "w1", key="w1")
    assert replayed.value.headers is not None
    assert replayed.value.headers["idempotent-replayed"] == "true"
    assert await total(client, meter, customer, base, base + 3600) == 3


async def test_dropped_connection_after_the_write(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, meter = await setup_meter(client)
    emulator.set_faults(drop_rate=1.0)
    with pytest.raises(stripe.APIConnectionError):
        await post_event(client, customer, "9", base, "d1", key="d1")
    assert emulator.state()["dropped_connections"] == 1
    assert await total(client, meter, customer, base, base + 3600) == 9  # it was applied
    emulator.set_faults(drop_rate=0.0)
    replay = await post_event(client, customer, "9", base, "d1", key="d1")
    assert replay.identifier == "d1"
    assert await total(client, meter, customer, base, base + 3600) == 9


async def test_one_call_in_flight_per_customer_and_meter(
    client: stripe.StripeClient, emulator: StripeEmulator, base: int
) -> None:
    customer, _ = await setup_meter(client)
    other = (await client.v1.customers.create_async()).id
    emulator.set_faults(latency_ms=300)
    results = await asyncio.gather(
        post_event(client, customer, "1", base, "l1"),
        post_event(client, customer, "1", base, "l2"),
        post_event(client, other, "1", base, "l3"),
        return_exceptions=True,
    )
    locked = [r for r in results if isinstance(r, stripe.RateLimitError)]
    assert len(locked) == 1 and locked[0].code is None  # RateLimitError carries no code
    assert locked[0].error is not None and locked[0].error.code == "lock_timeout"
    assert emulator.state()["meter_events_accepted"] == 2


# ---------------------------------------------------------------------------------------------
# test hooks and serving


async def test_http_hooks(emulator: StripeEmulator) -> None:
    async with httpx.AsyncClient(base_url=str(emulator.base_url)) as http:
        before = emulator.now()
        clock = (await http.post("/_emulator/clock", json={"advance": 3600})).json()
        assert clock["now"] >= before + 3600
        faults = (await http.post("/_emulator/faults", json={"fail_rate": 0.5})).json()
        assert faults["fail_rate"] == 0.5 and emulator.faults.fail_rate == 0.5
        bad = await http.post("/_emulator/faults", json={"fail_rate": 2})
        assert bad.status_code == 400
        emulator.add_customer("cus_fixed")
        state = (await http.get("/_emulator/state", params={"identifiers": "1"})).json()
        assert state["customers"] == 1 and state["accepted_by_identifier"] == {}
        assert (await http.post("/_emulator/reset")).status_code == 200
        assert emulator.customers == {} and emulator.faults.fail_rate == 0.0
        assert emulator.now() - time.time() < 5


def test_serve_in_thread_for_synchronous_callers() -> None:
    emulator = StripeEmulator()
    with serve_emulator_in_thread(emulator) as url:
        response = httpx.post(
            f"{url}/v1/customers",
            headers={"Authorization": f"Bearer {API_KEY}"},
            data={"email": "t@example.com", "metadata[org]": "o"},
        )
        assert response.status_code == 200
        assert response.json()["metadata"] == {"org": "o"}
        assert httpx.get(f"{url}/v1/customers").status_code == 401
    assert len(emulator.customers) == 1


def test_parse_form_reads_stripe_encoding() -> None:
    raw = (
        "event_name=e&payload[stripe_customer_id]=cus_1&payload[value]=-3"
        "&items[0][price]=p0&items[1][price]=p1&items[1][quantity]=2&expand[]=a&expand[]=b"
        "&metadata[note]=a%20b"
    )
    assert parse_form(raw) == {
        "event_name": "e",
        "payload": {"stripe_customer_id": "cus_1", "value": "-3"},
        "items": [{"price": "p0"}, {"price": "p1", "quantity": "2"}],
        "expand": ["a", "b"],
        "metadata": {"note": "a b"},
    }


async def test_accepted_meter_events_are_printed_one_line_each(
    capsys: pytest.CaptureFixture[str], base: int
) -> None:
    emulator = StripeEmulator(log_events=True)
    emulator.add_customer("cus_demo")
    emulator.add_meter("api_calls")
    async with serve_emulator(emulator) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post(
            "/v1/billing/meter_events",
            headers={"Authorization": f"Bearer {API_KEY}"},
            data={
                "event_name": "api_calls",
                "identifier": "org1:api_calls:0:0",
                "timestamp": str(base),
                "payload[stripe_customer_id]": "cus_demo",
                "payload[value]": "12",
            },
        )
    assert response.status_code == 200
    lines = [line for line in capsys.readouterr().out.splitlines() if "meter event" in line]
    assert len(lines) == 1
    assert "api_calls" in lines[0] and "customer=cus_demo" in lines[0]
    assert "value=12" in lines[0] and "identifier=org1:api_calls:0:0" in lines[0]


def test_command_line_serves_until_stopped(tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "stripe_emulator", "--port", str(port), "--seed", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert f"http://127.0.0.1:{port}" in banner
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/customers",
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert response.status_code == 200 and response.json()["id"].startswith("cus_")
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


async def test_malformed_payload_is_a_400_not_a_crash(emulator: StripeEmulator) -> None:
    emulator.add_customer("cus_1")
    emulator.add_meter("api_calls")
    async with httpx.AsyncClient(base_url=str(emulator.base_url)) as http:
        response = await http.post(
            "/v1/billing/meter_events",
            headers={"Authorization": f"Bearer {API_KEY}"},
            data={"event_name": "api_calls", "payload[stripe_customer_id][x]": "cus_1"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "payload[stripe_customer_id]"


def test_the_emulator_imports_nothing_from_the_control_plane() -> None:
    """The emulator is a double of Stripe, not of the product: no module of it imports
    `controlplane`, so it runs (and is right or wrong) on its own."""
    import ast
    from pathlib import Path

    import stripe_emulator

    package = Path(stripe_emulator.__file__).parent
    imported: set[str] = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert "stripe_emulator.app" in imported  # the walk saw the package's own imports
    assert not {name for name in imported if name.split(".")[0] == "controlplane"}
