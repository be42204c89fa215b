"""Catalog amounts are exact, and a bad catalog fails with the setting's path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controlplane import config as config_mod
from controlplane.errors import ConfigError
from controlplane.plugins.billing.stripe.catalog import amount_params, minor_units
from tests.conftest import raw_config


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("20.00", "usd", {"unit_amount": 2000}),
        ("0.0004", "usd", {"unit_amount_decimal": "0.04"}),
        ("0.000000000001", "usd", {"unit_amount_decimal": "0.0000000001"}),
        ("500", "jpy", {"unit_amount": 500}),
        ("1.5", "kwd", {"unit_amount": 1500}),
    ],
)
def test_amounts_become_exact_minor_units(
    amount: str, currency: str, expected: dict[str, Any]
) -> None:
    assert amount_params(Decimal(amount), currency, "x") == expected


def test_more_than_twelve_decimals_of_a_minor_unit_is_refused() -> None:
    with pytest.raises(ConfigError, match="12 decimal places"):
        amount_params(Decimal("0.000000000000001"), "usd", "catalog.prices[0].unit_amount")
    assert minor_units(Decimal("10.00"), "USD") == Decimal("1000.00")


def _catalog(**price: Any) -> dict[str, Any]:
    return {
        "products": [{"key": "pro", "name": "Pro"}],
        "prices": [
            {"key": "m", "product": "pro", "lookup_key": "m", "unit_amount": "0.01", **price}
        ],
    }


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ({"product": "nope"}, r"catalog.prices\[0\].product"),
        ({"meter": "nope"}, r"catalog.prices\[0\].meter"),
        ({"unit_amount": "-1"}, r"catalog.prices\[0\].unit_amount"),
    ],
)
def test_bad_catalog_names_the_setting(tmp_path: Path, price: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.parse(raw_config(tmp_path / "db", catalog=_catalog(**price)))


def test_catalog_decodes_amounts_as_decimals(tmp_path: Path) -> None:
    config = config_mod.parse(raw_config(tmp_path / "db", catalog=_catalog(meter="gbs")))
    assert config.catalog.prices[0].unit_amount == Decimal("0.01")
    assert config.catalog.prices[0].meter == "gbs"
