"""Pricing: the invoice the published catalog produces for one org and one billing period.

Pure and exact (integers and Decimal, never floats). Stripe's rules, as the emulator's invoice
preview applies them (docs/reference/stripe-behaviour.md, rows INV-1 to INV-6):

- amounts are in the currency's minor unit; a price's unit amount may be fractional
  (``unit_amount_decimal``, at most 12 decimal places);
- each line is ``quantity x unit amount``, rounded to a whole minor unit **per line**, half up
  (0.05 cents x 30 = 1.5 -> 2), and the invoice's subtotal is the sum of the rounded lines;
- a metered line's quantity is the period's total usage of its meter (a negative total bills
  0); a licensed line bills quantity 1 once per period;
- billing credits apply to metered lines only, in line order, each line taking at most its own
  amount, from a grant that is effective and not expired when the invoice finalizes.

Taxes, discounts and proration are out of scope: a line here is never prorated and no tax is
added. Licensed fees are priced once per period whatever the price's interval says; the caller
passes only the prices that bill in the period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal

import msgspec

# Stripe's zero-decimal and three-decimal currencies (docs.stripe.com/currencies).
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv"}
    | {"xaf", "xof", "xpf"}
)
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def exponent(currency: str) -> int:
    """Decimal places of the currency's minor unit (0, 2 or 3)."""
    currency = currency.lower()
    return 0 if currency in ZERO_DECIMAL else 3 if currency in THREE_DECIMAL else 2


def minor_units(amount: Decimal, currency: str) -> Decimal:
    """`amount` in the currency's major unit as an exact amount of minor units."""
    return amount.scaleb(exponent(currency))


def line_amount(unit_minor: Decimal, quantity: int) -> int:
    """``quantity x unit_minor`` rounded to a whole minor unit, half up (away from zero), in
    integer arithmetic so no Decimal context can round it first."""
    num, den = unit_minor.as_integer_ratio()
    exact_num = quantity * num
    sign = -1 if exact_num < 0 else 1
    return sign * ((2 * abs(exact_num) + den) // (2 * den))


class Price(msgspec.Struct, frozen=True):
    """A catalog price as it bills: `meter` None is a licensed (flat) fee."""

    key: str
    currency: str
    unit_minor: Decimal  # minor units, may be fractional (unit_amount_decimal)
    meter: str | None = None


class Grant(msgspec.Struct, frozen=True):
    """A billing credit grant as it stands before the invoice: its unused balance."""

    balance_minor: int
    currency: str
    effective_at: int | None = None
    expires_at: int | None = None  # None: never

    def usable_at(self, when: int) -> bool:
        """Effective and not yet expired at `when` (an expiry at `when` has expired)."""
        return (
            self.balance_minor > 0
            and (self.effective_at is None or self.effective_at <= when)
            and (self.expires_at is None or self.expires_at > when)
        )


class Line(msgspec.Struct, frozen=True):
    price: str
    meter: str | None
    quantity: int
    unit_amount_decimal: str  # minor units, as Stripe writes it
    amount: int  # minor units, rounded per line
    credit: int  # minor units of billing credit applied to this line


class PricedInvoice(msgspec.Struct, frozen=True):
    org_id: str
    currency: str
    start: int
    end: int
    lines: list[Line]
    subtotal: int
    credit: int
    total: int


def price_period(
    org_id: str,
    start: int,
    end: int,
    prices: Sequence[Price],
    quantities: Mapping[str, int],
    grant: Grant | None = None,
    *,
    finalized_at: int | None = None,
) -> PricedInvoice:
    """The invoice of `org_id` for [start, end): one line per price, metered lines from
    `quantities` (meter name -> whole units in the period), then `grant` (if usable when the
    invoice finalizes, `finalized_at`, default `end`) applied to metered lines.

    Raises ValueError when the prices are in more than one currency (a Stripe subscription
    bills in one)."""
    currencies = {p.currency.lower() for p in prices}
    if len(currencies) > 1:
        raise ValueError(f"prices in several currencies {sorted(currencies)}: one per invoice")
    currency = currencies.pop() if currencies else "usd"
    when = end if finalized_at is None else finalized_at
    balance = (
        grant.balance_minor
        if grant is not None and grant.currency.lower() == currency and grant.usable_at(when)
        else 0
    )
    lines: list[Line] = []
    for p in prices:
        quantity = 1 if p.meter is None else max(0, quantities.get(p.meter, 0))
        amount = line_amount(p.unit_minor, quantity)
        credit = 0
        if p.meter is not None and balance > 0 and amount > 0:
            credit = min(amount, balance)
            balance -= credit
        lines.append(Line(p.key, p.meter, quantity, decimal_text(p.unit_minor), amount, credit))
    subtotal = sum(line.amount for line in lines)
    credited = sum(line.credit for line in lines)
    return PricedInvoice(
        org_id, currency, start, end, lines, subtotal, credited, subtotal - credited
    )


def decimal_text(value: Decimal) -> str:
    """`value` in plain notation without trailing zeros ("0.04", "150")."""
    text = format(value.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".") or "0"
