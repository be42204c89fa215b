"""The pricing function (controlplane.pricing) equals the Stripe emulator's invoice preview.

For random unit amounts (whole and fractional minor units, up to 12 decimals), random usage,
a random licensed fee and a random welcome credit, the emulator is set up over HTTP with the
real stripe SDK (meter, prices, subscription, credit grant, meter events), asked for
``invoices.create_preview``, and its lines and totals are compared with ``price_period``.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.pricing import Grant, Price, price_period
from stripe_emulator import StripeEmulator, serve_emulator_in_thread

API_KEY = "sk_test_emulator_pricing"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[StripeEmulator, stripe.StripeClient]]:
    emulator = StripeEmulator(seed=21)
    with serve_emulator_in_thread(emulator) as url:
        client = stripe.StripeClient(API_KEY, base_addresses={"api": url}, max_network_retries=0)
        yield emulator, client


units = st.one_of(
    st.integers(min_value=0, max_value=5000).map(Decimal),
    st.decimals(
        min_value=Decimal("0.000000000001"),
        max_value=Decimal("500"),
        places=12,
        allow_nan=False,
        allow_infinity=False,
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    metered_units=st.lists(units, min_size=1, max_size=3),
    usage=st.lists(st.lists(st.integers(0, 10**9), max_size=4), min_size=3, max_size=3),
    licensed=st.one_of(st.none(), st.integers(0, 100_000)),
    credit=st.one_of(st.none(), st.integers(1, 50_000)),
)
def test_price_period_equals_the_emulators_invoice_preview(
    served: tuple[StripeEmulator, stripe.StripeClient],
    metered_units: list[Decimal],
    usage: list[list[int]],
    licensed: int | None,
    credit: int | None,
) -> None:
    emulator, client = served
    emulator.reset()
    customer = client.v1.customers.create(params={"email": "org@example.com"}).id
    product = client.v1.products.create(params={"name": "Pro"}).id
    prices: list[Price] = []
    items: list[Any] = []
    quantities: dict[str, int] = {}
    for i, unit in enumerate(metered_units):
        event = f"usage_{i}"
        meter = client.v1.billing.meters.create(
            params={
                "display_name": event,
                "event_name": event,
                "default_aggregation": {"formula": "sum"},
            }
        ).id
        price = client.v1.prices.create(
            params={
                "product": product,
                "currency": "usd",
                "unit_amount_decimal": format(unit.normalize(), "f"),  # type: ignore[typeddict-item]
                "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
            }
        ).id
        prices.append(Price(price, "usd", unit, meter=event))
        items.append({"price": price})
    if licensed is not None:
        flat = client.v1.prices.create(
            params={
                "product": product,
                "currency": "usd",
                "unit_amount": licensed,
                "recurring": {"interval": "month"},
            }
        ).id
        prices.append(Price(flat, "usd", Decimal(licensed)))
        items.append({"price": flat})
    sub = client.v1.subscriptions.create(params={"customer": customer, "items": items})
    if credit is not None:
        client.v1.billing.credit_grants.create(
            params={
                "customer": customer,
                "category": "promotional",
                "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": credit}},
                "applicability_config": {"scope": {"price_type": "metered"}},
            }
        )
    now = int(emulator.now())
    for i, values in enumerate(usage[: len(metered_units)]):
        for value in values:
            client.v1.billing.meter_events.create(
                params={
                    "event_name": f"usage_{i}",
                    "payload": {"stripe_customer_id": customer, "value": str(value)},
                    "timestamp": now,
                }
            )
        quantities[f"usage_{i}"] = sum(values)

    preview = client.v1.invoices.create_preview(
        params={"customer": customer, "subscription": sub.id}
    )
    start, end = preview.period_start, preview.period_end
    grant = None if credit is None else Grant(credit, "usd")
    ours = price_period("org", start, end, prices, quantities, grant)

    theirs = [
        (
            line.pricing.price_details.price if line.pricing and line.pricing.price_details else "",
            line.quantity,
            line.amount,
            sum(c.amount for c in line.pretax_credit_amounts or ()),
        )
        for line in preview.lines.data
    ]
    assert theirs == [(line.price, line.quantity, line.amount, line.credit) for line in ours.lines]
    assert (preview.subtotal, preview.total) == (ours.subtotal, ours.total)
