"""The Stripe billing plugin against the Stripe emulator, over loopback HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import stripe
from structlog.testing import capture_logs

from controlplane.errors import BillingError, ConfigError
from controlplane.interfaces import MeterEvent, Outcome, PluginConfig
from controlplane.plugins.billing.stripe import StripeBilling, StripeBillingConfig
from controlplane.registry import spec_for
from controlplane.secrets import EnvSecret
from stripe_emulator import StripeEmulator, serve_emulator

DAY = 86_400
API_KEY = "sk_test_plugin_secret_value_42"
EVENT = "api_calls"


@pytest.fixture
async def emulator() -> AsyncIterator[StripeEmulator]:
    emu = StripeEmulator(seed=3)
    emu.add_customer("cus_org1")
    emu.add_customer("cus_org2")
    emu.add_meter(EVENT, id="mtr_api_calls")
    async with serve_emulator(emu):
        yield emu


BillingFactory = Callable[..., StripeBilling]


@pytest.fixture
async def make_billing(emulator: StripeEmulator) -> AsyncIterator[BillingFactory]:
    started: list[StripeBilling] = []

    def make(**settings: Any) -> StripeBilling:
        config = StripeBillingConfig(
            api_key=settings.pop("api_key", API_KEY),
            api_base=emulator.base_url,
            backoff_base_seconds=0.001,
            backoff_cap_seconds=0.01,
            **settings,
        )
        billing = StripeBilling(config)
        started.append(billing)
        return billing

    yield make
    for billing in started:
        await billing.close()


@pytest.fixture
async def billing(make_billing: BillingFactory) -> StripeBilling:
    plugin = make_billing(max_retries=2)
    await plugin.start()
    return plugin


@pytest.fixture
def bucket() -> int:
    return (int(time.time()) // 3600 - 1) * 3600


def event(bucket: int, identifier: str = "org1:api:1:0", **changes: Any) -> MeterEvent:
    fields: dict[str, Any] = {
        "identifier": identifier,
        "event_name": EVENT,
        "customer": "cus_org1",
        "value": 42,
        "timestamp": bucket,
    }
    fields.update(changes)
    return MeterEvent(**fields)


def counted(emulator: StripeEmulator, bucket: int, customer: str = "cus_org1") -> int:
    return emulator.meter_total(EVENT, customer, bucket, bucket + 3600)


async def test_accepted(billing: StripeBilling, emulator: StripeEmulator, bucket: int) -> None:
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.ACCEPTED
    assert delivery.provider_id is not None and delivery.provider_id.startswith("req_")
    assert counted(emulator, bucket) == 42
    assert await billing.meter_totals("cus_org1", EVENT, bucket, bucket + 3600) == 42


async def test_same_send_again_is_replayed_not_counted_twice(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    first = await billing.send(event(bucket))
    again = await billing.send(event(bucket))
    # same Idempotency-Key and params: Stripe replays the saved first answer
    assert again.outcome is Outcome.ACCEPTED
    assert again.provider_id == first.provider_id
    assert again.replayed and not first.replayed  # it arrived with the first call
    assert counted(emulator, bucket) == 42
    assert emulator.state()["idempotent_replays"] == 1


async def test_duplicate_when_identifier_arrived_under_another_key(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    # an earlier delivery of this identifier under a different idempotency key
    http = stripe.HTTPXClient()
    raw = stripe.StripeClient(
        API_KEY, base_addresses={"api": str(emulator.base_url)}, http_client=http
    )
    try:
        await raw.v1.billing.meter_events.create_async(
            params={
                "event_name": EVENT,
                "identifier": "org1:api:1:0",
                "timestamp": bucket,
                "payload": {"stripe_customer_id": "cus_org1", "value": "42"},
            },
            options={"idempotency_key": "some-other-key"},
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.DUPLICATE
    assert delivery.message == "An event already exists with identifier org1:api:1:0."
    assert counted(emulator, bucket) == 42
    assert emulator.state()["duplicate_identifier_rejections"] == 1  # not retried


async def test_rejected_for_unknown_customer(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_meter_validation(meter_event_customer_not_found="sync")
    delivery = await billing.send(event(bucket, customer="cus_missing"))
    assert delivery.outcome is Outcome.REJECTED
    assert delivery.message == "No such customer: 'cus_missing'"
    assert emulator.state()["requests"] == 1  # permanent: no retries


async def test_unknown_customer_accepted_then_reported_by_default(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    delivery = await billing.send(event(bucket, customer="cus_missing"))
    assert delivery.outcome is Outcome.ACCEPTED  # Stripe validates it later (ME-9, ME-16)
    assert emulator.state()["meter_events_invalid"] == 1
    assert emulator.state()["meter_events_accepted"] == 0


async def test_rejected_for_too_old_timestamp(billing: StripeBilling, bucket: int) -> None:
    delivery = await billing.send(event(bucket - 36 * DAY))
    assert delivery.outcome is Outcome.REJECTED
    assert delivery.message is not None and "35 days" in delivery.message


async def test_key_reused_with_other_params_is_ambiguous_not_rejected(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    assert (await billing.send(event(bucket))).outcome is Outcome.ACCEPTED
    delivery = await billing.send(event(bucket, value=43))
    # Stripe answers 400 idempotency_error: the first request under the key was applied
    assert delivery.outcome is Outcome.AMBIGUOUS
    assert delivery.message is not None and "same parameters" in delivery.message
    assert "may have been applied" in delivery.message
    assert emulator.state()["idempotency_errors"] == 1  # definite answer: not retried
    assert counted(emulator, bucket) == 42


async def test_lost_answer_then_customer_change_is_ambiguous_and_billed_once(
    make_billing: BillingFactory, emulator: StripeEmulator, bucket: int
) -> None:
    """The first attempt is applied but its answer lost; the org's customer then changes and
    the retry carries the new customer under the same key. Stripe has the event: the retry's
    idempotency_error must not turn billed usage into a refusal."""
    billing = make_billing(max_retries=0)
    await billing.start()
    emulator.set_faults(drop_next=1)
    assert (await billing.send(event(bucket))).outcome is Outcome.AMBIGUOUS
    assert counted(emulator, bucket) == 42  # applied at Stripe
    retry = await billing.send(event(bucket, customer="cus_org2"))
    assert retry.outcome is Outcome.AMBIGUOUS, retry
    assert retry.message is not None and "may have been applied" in retry.message
    assert emulator.state()["idempotency_errors"] == 1
    assert counted(emulator, bucket) == 42
    assert counted(emulator, bucket, customer="cus_org2") == 0
    # the first attempt's parameters, sent again, are answered with Stripe's saved 200
    assert (await billing.send(event(bucket))).outcome is Outcome.ACCEPTED
    assert counted(emulator, bucket) == 42


async def test_retry_when_every_attempt_gets_500(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(fail_rate=1.0)
    with capture_logs() as logs:
        delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.RETRY
    assert emulator.state()["injected_failures"] == 3  # first attempt + max_retries=2
    assert [e["event"] for e in logs] == ["stripe.retrying", "stripe.retrying"]
    assert counted(emulator, bucket) == 0


async def test_retry_then_success_on_transient_500(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(fail_next=2)
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.ACCEPTED
    assert counted(emulator, bucket) == 42


async def test_rate_limited_with_long_retry_after_hands_back_retry(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(rate_limit=0.001)  # the bucket is empty: every call gets 429
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.RETRY
    assert delivery.retry_after == 1.0  # Retry-After: 1 is above the 0.01 s cap: not slept here
    assert emulator.state()["rate_limited"] == 1
    assert billing.throttled == 1  # counted for /metrics


async def test_rate_limited_then_accepted(
    make_billing: BillingFactory, emulator: StripeEmulator, bucket: int
) -> None:
    billing = make_billing(max_retries=3)
    billing.config = msgspec.structs.replace(billing.config, backoff_cap_seconds=2.0)
    await billing.start()
    emulator.set_faults(rate_limit=1)  # one token, refilled once a second
    assert (await billing.send(event(bucket, identifier="a"))).outcome is Outcome.ACCEPTED
    started = time.monotonic()
    delivery = await billing.send(event(bucket, identifier="b"))
    assert delivery.outcome is Outcome.ACCEPTED
    assert emulator.state()["rate_limited"] >= 1
    assert time.monotonic() - started >= 0.9  # Retry-After: 1 was honoured
    assert billing.throttled == emulator.state()["rate_limited"]  # retried 429s count too
    assert counted(emulator, bucket) == 2 * 42


async def test_ambiguous_when_every_response_is_dropped(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(drop_rate=1.0)
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.AMBIGUOUS
    state = emulator.state()
    assert state["dropped_connections"] == 3
    assert state["idempotent_replays"] == 2  # the retries reused the key
    assert counted(emulator, bucket) == 42  # applied exactly once


async def test_dropped_then_retried_is_delivered_once(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(drop_next=1)
    delivery = await billing.send(event(bucket))
    assert delivery.outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE)
    assert emulator.state()["dropped_connections"] == 1
    assert counted(emulator, bucket) == 42


async def test_ambiguous_then_resent_later_is_delivered_once(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(drop_rate=1.0)
    assert (await billing.send(event(bucket))).outcome is Outcome.AMBIGUOUS
    emulator.set_faults(drop_rate=0.0)
    assert (await billing.send(event(bucket))).outcome is Outcome.ACCEPTED
    assert counted(emulator, bucket) == 42


async def test_saved_500_after_the_write_is_ambiguous(
    billing: StripeBilling, emulator: StripeEmulator, bucket: int
) -> None:
    emulator.set_faults(fail_after_write_rate=1.0)
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.AMBIGUOUS
    assert counted(emulator, bucket) == 42
    assert emulator.state()["idempotent_replays"] == 1  # stopped at the first replayed 500


async def test_timeout_is_ambiguous(
    make_billing: BillingFactory, emulator: StripeEmulator, bucket: int
) -> None:
    billing = make_billing(max_retries=1, timeout_seconds=0.05)
    await billing.start()
    emulator.set_faults(latency_ms=150)
    delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.AMBIGUOUS
    assert delivery.message is not None and "may have been applied" in delivery.message


async def test_cancel(billing: StripeBilling, emulator: StripeEmulator, bucket: int) -> None:
    await billing.send(event(bucket, identifier="keep", value=5))
    await billing.send(event(bucket, identifier="undo", value=7))
    cancelled = await billing.cancel(EVENT, "undo")
    assert cancelled.outcome is Outcome.ACCEPTED
    assert counted(emulator, bucket) == 5
    assert await billing.meter_totals("cus_org1", EVENT, bucket, bucket + 3600) == 5
    assert (await billing.cancel(EVENT, "never-sent")).outcome is Outcome.REJECTED
    emulator.advance(DAY + 1)
    late = await billing.cancel(EVENT, "keep")
    assert late.outcome is Outcome.REJECTED
    assert late.message is not None and "24 hours" in late.message
    assert counted(emulator, bucket) == 5


async def test_meter_totals_per_customer_and_unknown_meter(
    billing: StripeBilling, bucket: int
) -> None:
    await billing.send(event(bucket, identifier="a", value=3))
    await billing.send(event(bucket + 60, identifier="b", value=4))
    await billing.send(event(bucket, identifier="c", value=100, customer="cus_org2"))
    assert await billing.meter_totals("cus_org1", EVENT, bucket, bucket + 3600) == 7
    assert await billing.meter_totals("cus_org1", EVENT, bucket, bucket + 60) == 3
    assert await billing.meter_totals("cus_org2", EVENT, bucket, bucket + 3600) == 100
    with pytest.raises(BillingError, match="no meter"):
        await billing.meter_totals("cus_org1", "nope", bucket, bucket + 3600)


async def test_api_key_never_appears_in_messages_or_logs(
    make_billing: BillingFactory, emulator: StripeEmulator, bucket: int
) -> None:
    billing = make_billing(api_key="bad_key_do_not_print_me_123")
    await billing.start()
    with capture_logs() as logs:
        delivery = await billing.send(event(bucket))
    assert delivery.outcome is Outcome.RETRY  # the key is wrong, not the event
    assert delivery.message is not None and "api_key" in delivery.message
    assert "do_not_print_me" not in repr(delivery) + repr(logs)
    assert "do_not_print_me" not in repr(billing.config)


def test_config_decodes_from_the_billing_section() -> None:
    spec = spec_for("billing", "stripe")
    assert spec.config is StripeBillingConfig and spec.factory is StripeBilling
    config = msgspec.convert(
        {"backend": "stripe", "api_key": {"env": "STRIPE_KEY"}, "rate_limit": 10},
        StripeBillingConfig,
    )
    assert isinstance(config, PluginConfig) and config.api_base is None
    assert config.api_key == EnvSecret(env="STRIPE_KEY")
    assert StripeBilling(config).rate_limit == 10
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"api_key": "sk_x", "max_retries": -1}, StripeBillingConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"api_key": "sk_x", "retries": 3}, StripeBillingConfig)


async def test_missing_env_secret_fails_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRIPE_KEY_UNSET", raising=False)
    billing = StripeBilling(StripeBillingConfig(api_key=EnvSecret(env="STRIPE_KEY_UNSET")))
    with pytest.raises(ConfigError, match="STRIPE_KEY_UNSET"):
        await billing.start()
    with pytest.raises(BillingError, match="not started"):
        await billing.send(event(0))
