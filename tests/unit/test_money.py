"""Money parity maths (controlplane/money.py): periods, the catalog as prices, comparison."""

from __future__ import annotations

from decimal import Decimal

import pytest

from controlplane.errors import BadValue, InvalidInput
from controlplane.interfaces import LegacyInvoice
from controlplane.money import compare_money, month_bounds, month_of, price_list
from controlplane.pricing import Price, PricedInvoice, price_period

JAN, FEB, MAR = 1_767_225_600, 1_769_904_000, 1_772_323_200


def test_month_bounds_are_utc_calendar_months() -> None:
    assert month_bounds("2026-01") == (JAN, FEB)
    assert month_bounds("2026-02") == (FEB, MAR)
    assert month_bounds("2025-12") == (JAN - 31 * 86400, JAN)
    assert month_of(FEB - 1) == "2026-01" and month_of(FEB) == "2026-02"
    for bad in ("2026-13", "2026-1", "26-01", "2026-00", "january"):
        with pytest.raises(BadValue, match="period"):
            month_bounds(bad)


def test_price_list_from_a_published_catalog() -> None:
    prices = price_list(
        {
            "memory": {"id": "price_1", "unit_amount": "0.0004", "currency": "USD",
                       "interval": "month", "meter": "gbs"},
            "base": {"id": "price_2", "unit_amount": "20.00", "currency": "usd",
                     "interval": "month", "meter": None},
            "annual": {"id": "price_3", "unit_amount": "100", "currency": "usd",
                       "interval": "year", "meter": None},
        }
    )  # fmt: skip
    assert prices.currency == "usd"
    assert prices.prices == [
        Price("memory", "usd", Decimal("0.0400"), meter="gbs"),
        Price("base", "usd", Decimal("2000.00")),
    ]
    assert prices.by_id == {"price_1": "memory", "price_2": "base"}
    assert prices.notes == ["price annual: a yearly licensed fee is not priced per month"]
    with pytest.raises(InvalidInput, match="several currencies"):
        price_list(
            {
                "a": {"unit_amount": "1", "currency": "usd", "meter": "m"},
                "b": {"unit_amount": "1", "currency": "eur", "meter": "m"},
            }
        )


def _invoice(org: str, cents: int) -> PricedInvoice:
    return price_period(org, JAN, FEB, [Price("base", "usd", Decimal(cents))], {})


def test_comparison_is_exact_with_the_tolerance() -> None:
    ours = {org: _invoice(org, cents) for org, cents in (("a", 10_050), ("b", 10_051), ("c", 7))}
    legacy = {
        "a": LegacyInvoice("a", 10_000),
        "b": LegacyInvoice("b", 10_000),
        "d": LegacyInvoice("d", 0),
    }
    c = compare_money(
        JAN,
        FEB,
        "usd",
        ours,
        legacy,
        {},
        Decimal("0.005"),
        catalog_version=3,
    )
    rows = {o.org_id: (o.drift, o.relative, o.within_tolerance, o.side) for o in c.orgs}
    assert rows == {
        "a": (50, 5000, True, "both"),  # exactly 0.5 %: within
        "b": (51, 5100, False, "both"),
        "c": (7, None, False, "controlplane"),
        "d": (0, 0, False, "legacy"),  # present on one side only: a mismatch even at 0
    }
    assert c.status == "mismatch" and [o.org_id for o in c.mismatches] == ["b", "c", "d"]
    assert (c.controlplane_total, c.legacy_total) == (20_108, 20_000)


def test_without_legacy_invoices_nothing_is_a_mismatch() -> None:
    c = compare_money(
        JAN,
        FEB,
        "usd",
        {"a": _invoice("a", 5)},
        None,
        {},
        Decimal(0),
        catalog_version=None,
    )
    assert c.status == "no_legacy" and c.mismatches == [] and c.legacy_total is None
