"""Pricing (controlplane/pricing.py): exact per-line amounts, Stripe's rounding, credits."""

from __future__ import annotations

from decimal import Decimal

import pytest

from controlplane.pricing import Grant, Price, line_amount, minor_units, price_period

START, END = 1_767_225_600, 1_769_904_000

MEMORY = Price("memory", "usd", Decimal("0.04"), meter="gbs")
CALLS = Price("calls", "usd", Decimal("0.1"), meter="calls")
BASE = Price("base", "usd", Decimal("2000"))


@pytest.mark.parametrize(
    ("unit", "quantity", "amount"),
    [
        ("0.05", 30, 2),  # Stripe's own example: 1.5 cents rounds up to 2
        ("0.05", 29, 1),  # 1.45 -> 1
        ("0.1", 15, 2),  # 1.5 -> 2 (half up, not half even)
        ("0.1", 25, 3),  # 2.5 -> 3 (half even would give 2)
        ("0.000000000001", 10**15, 1000),
        ("105.5", 1, 106),
        ("0.333333333333", 3, 1),
        ("0", 10**12, 0),
        ("1000", 0, 0),
    ],
)
def test_line_amount_rounds_half_up_per_line(unit: str, quantity: int, amount: int) -> None:
    assert line_amount(Decimal(unit), quantity) == amount


def test_line_amount_is_exact_beyond_decimal_context_precision() -> None:
    # 0.5 x (10^30 + 1) has 31 significant digits: the default Decimal context (28) would
    # drop the half cent before rounding; integer arithmetic keeps it and rounds it up.
    assert line_amount(Decimal("0.5"), 10**30 + 1) == 5 * 10**29 + 1


def test_minor_units_follow_the_currency() -> None:
    assert minor_units(Decimal("0.0004"), "USD") == Decimal("0.04")
    assert minor_units(Decimal("5"), "jpy") == Decimal("5")
    assert minor_units(Decimal("1.5"), "kwd") == Decimal("1500")


def test_each_line_is_rounded_before_the_subtotal() -> None:
    invoice = price_period("org", START, END, [MEMORY, CALLS, BASE], {"gbs": 1_012, "calls": 15})
    assert [(x.price, x.quantity, x.amount) for x in invoice.lines] == [
        ("memory", 1012, 40),  # 40.48 -> 40
        ("calls", 15, 2),  # 1.5 -> 2
        ("base", 1, 2000),
    ]
    # rounded per line: 40 + 2 + 2000, not round(40.48 + 1.5 + 2000) = 2042
    assert (invoice.subtotal, invoice.credit, invoice.total) == (2042, 0, 2042)
    assert invoice.lines[0].unit_amount_decimal == "0.04"


def test_metered_lines_without_usage_bill_zero_and_negative_usage_bills_zero() -> None:
    invoice = price_period("org", START, END, [MEMORY, BASE], {"gbs": -50})
    assert [(x.quantity, x.amount) for x in invoice.lines] == [(0, 0), (1, 2000)]
    assert invoice.total == 2000


def test_credits_apply_to_metered_lines_only_in_line_order() -> None:
    grant = Grant(1_000, "usd")
    invoice = price_period(
        "org", START, END, [BASE, MEMORY, CALLS], {"gbs": 20_000, "calls": 5_000}, grant
    )
    # base is licensed: no credit; memory (800) takes 800, calls (500) the remaining 200
    assert [(x.price, x.amount, x.credit) for x in invoice.lines] == [
        ("base", 2000, 0),
        ("memory", 800, 800),
        ("calls", 500, 200),
    ]
    assert (invoice.subtotal, invoice.credit, invoice.total) == (3300, 1000, 2300)


def test_a_credit_never_exceeds_the_metered_amount() -> None:
    invoice = price_period("org", START, END, [MEMORY, BASE], {"gbs": 100}, Grant(5_000, "usd"))
    assert (invoice.credit, invoice.total) == (4, 2000)


@pytest.mark.parametrize(
    ("grant", "credited"),
    [
        (Grant(500, "usd", effective_at=START, expires_at=END + 1), 400),
        (Grant(500, "usd", expires_at=END), 0),  # expired when the invoice finalizes
        (Grant(500, "usd", expires_at=START + 86400), 0),
        (Grant(500, "usd", effective_at=END + 1), 0),  # not yet effective
        (Grant(500, "eur"), 0),  # another currency
        (Grant(0, "usd"), 0),  # used up
    ],
)
def test_credits_must_be_usable_when_the_invoice_finalizes(grant: Grant, credited: int) -> None:
    invoice = price_period("org", START, END, [MEMORY], {"gbs": 10_000}, grant)
    assert invoice.credit == credited


def test_prices_in_several_currencies_are_refused() -> None:
    with pytest.raises(ValueError, match="several currencies"):
        price_period("org", START, END, [MEMORY, Price("eu", "eur", Decimal(1))], {})
