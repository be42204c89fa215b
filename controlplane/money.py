"""Money parity: what the control plane would invoice against what the legacy biller invoiced.

Pure functions over integers in the currency's minor unit (cents); the I/O around them is in
:mod:`controlplane.money_parity`. Per org and billing period, with an org absent on one side
counted as 0 on that side:

- ``drift = controlplane - legacy`` in minor units; ``drift percent = |drift| / |legacy| x 100``,
  rounded up to four decimals (0 when both are 0, undefined when only the legacy side is 0);
- **within tolerance**: on both sides and ``|drift| <= [parity] money_tolerance x |legacy|``
  (exact; the default tolerance 0 accepts no cent of drift);
- an org on one side only is a mismatch; a run is **clean** when no org is a mismatch;
- for an org with a Stripe subscription, Stripe's own invoice preview of its current period is
  a third number: the control plane's pricing of the same period is compared with it, before
  credits (Stripe holds the credit balance), and a difference is a **Stripe finding**, reported
  on its own and never hidden by a clean legacy comparison.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import msgspec

from controlplane.config import CatalogConfig
from controlplane.errors import BadValue, InvalidInput, Problem
from controlplane.interfaces import (
    InvoicePreview,
    LegacyInvoice,
    MoneyOrgResult,
    MoneyRun,
)
from controlplane.parity import Ratio, fmt, relative_micros, within
from controlplane.pricing import Price, PricedInvoice, exponent, minor_units

PERIOD_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"
_PERIOD = re.compile(PERIOD_PATTERN)


def month_bounds(period: str) -> tuple[int, int]:
    """A calendar month in UTC, ``YYYY-MM``, as [start, end) unix seconds."""
    if _PERIOD.match(period) is None:
        raise BadValue([Problem(field="period", message=f"{period!r} is not YYYY-MM (UTC month)")])
    year, month = int(period[:4]), int(period[5:])
    if year < 1970:
        raise InvalidInput([Problem(field="period", message=f"{period}: before 1970")])
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    return start, end


def month_of(when: int) -> str:
    """The ``YYYY-MM`` month that unix second `when` falls in (UTC)."""
    t = time.gmtime(when)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def window_problems(start: int | None, end: int | None, bucket_seconds: int) -> list[Problem]:
    """Why [start, end) is not a valid billing period (empty when it is)."""
    problems: list[Problem] = []
    for name, value in (("from", start), ("to", end)):
        if value is None:
            problems.append(Problem(field=name, message="required (unix seconds), or `period`"))
        elif value % bucket_seconds:
            problems.append(
                Problem(
                    field=name, message=f"{value} is not aligned to the {bucket_seconds} s buckets"
                )
            )
    if not problems and start is not None and end is not None and end <= start:
        problems.append(Problem(field="to", message="must be after `from`"))
    return problems


# ---------------------------------------------------------------------------------------------
# the catalog as prices


def configured_catalog(catalog: CatalogConfig) -> dict[str, Any]:
    """`[catalog]` in the shape of a published version's catalog (without provider ids)."""
    credit = catalog.welcome_credit
    return {
        "prices": {
            p.key: {
                "unit_amount": str(p.unit_amount),
                "currency": p.currency.lower(),
                "interval": p.interval,
                "meter": p.meter,
            }
            for p in catalog.prices
        },
        "welcome_credit": None
        if credit is None
        else {
            "amount_minor": int(minor_units(credit.amount, credit.currency)),
            "currency": credit.currency.lower(),
            "expires_after_days": credit.expires_after_days,
        },
    }


class PriceList(msgspec.Struct, frozen=True):
    """The catalog's prices as they bill a monthly period, and what could not be priced."""

    currency: str
    prices: list[Price]
    by_id: dict[str, str]  # the provider's price id -> price key
    notes: list[str]


def price_list(prices: Mapping[str, Mapping[str, Any]]) -> PriceList:
    """Prices from a catalog's ``prices`` (price key -> ``unit_amount`` in major units,
    ``currency``, ``interval``, ``meter``; a published version adds ``id``). Metered prices
    bill the period's usage whatever their interval; licensed fees only when monthly, others
    are left out with a note. Raises InvalidInput for prices in several currencies."""
    currencies = sorted({str(p["currency"]).lower() for p in prices.values()})
    if len(currencies) > 1:
        raise InvalidInput(
            [Problem(field="catalog.prices", message=f"several currencies {currencies}")]
        )
    out: list[Price] = []
    notes: list[str] = []
    by_id: dict[str, str] = {}
    for key, p in prices.items():
        currency = str(p["currency"]).lower()
        meter = p.get("meter")
        if meter is None and p.get("interval", "month") != "month":
            notes.append(f"price {key}: a {p['interval']}ly licensed fee is not priced per month")
            continue
        unit = minor_units(Decimal(str(p["unit_amount"])), currency)
        out.append(Price(key, currency, unit, meter=meter))
        if p.get("id"):
            by_id[str(p["id"])] = key
    return PriceList(currencies[0] if currencies else "usd", out, by_id, notes)


# ---------------------------------------------------------------------------------------------
# comparison


class StripeSide(msgspec.Struct, frozen=True):
    """Stripe's preview of an org's current period, and our pricing of that same period."""

    subscription: str
    preview: InvoicePreview
    computed: PricedInvoice  # the control plane's pricing of the preview's period

    @property
    def drift(self) -> int:
        """Our subtotal less Stripe's (both before credits)."""
        return self.computed.subtotal - self.preview.subtotal

    @property
    def finding(self) -> bool:
        return self.drift != 0


class OrgMoney(msgspec.Struct, frozen=True):
    org_id: str
    controlplane: PricedInvoice | None  # None: nothing to bill on this side
    legacy: LegacyInvoice | None  # None: the legacy biller did not invoice it
    stripe: StripeSide | None
    drift: int  # minor units, controlplane - legacy, absent sides as 0
    relative: int | None  # |drift| / |legacy| in millionths, rounded up; None: undefined
    within_tolerance: bool

    @property
    def side(self) -> str:
        if self.legacy is None:
            return "controlplane"
        if self.controlplane is None:
            return "legacy"
        return "both"


class MoneyComparison(msgspec.Struct, frozen=True):
    start: int
    end: int
    currency: str
    tolerance: Ratio
    catalog_version: int | None  # None: the configured, unpublished catalog
    has_legacy: bool
    orgs: list[OrgMoney]
    notes: list[str]

    @property
    def mismatches(self) -> list[OrgMoney]:
        return [o for o in self.orgs if self.has_legacy and not o.within_tolerance]

    @property
    def stripe_findings(self) -> list[OrgMoney]:
        return [o for o in self.orgs if o.stripe is not None and o.stripe.finding]

    @property
    def controlplane_total(self) -> int:
        return sum(o.controlplane.total for o in self.orgs if o.controlplane is not None)

    @property
    def legacy_total(self) -> int | None:
        if not self.has_legacy:
            return None
        return sum(o.legacy.total_minor for o in self.orgs if o.legacy is not None)

    @property
    def status(self) -> str:
        if not self.has_legacy:
            return "no_legacy"
        return "mismatch" if self.mismatches else "clean"


def compare_money(
    start: int,
    end: int,
    currency: str,
    ours: Mapping[str, PricedInvoice],
    legacy: Mapping[str, LegacyInvoice] | None,
    stripe: Mapping[str, StripeSide],
    tolerance: Decimal,
    *,
    catalog_version: int | None,
    notes: Sequence[str] = (),
) -> MoneyComparison:
    """Compare per-org invoice totals; `legacy` None: no legacy invoices to compare with."""
    tol = Ratio.of(tolerance)
    theirs = legacy or {}
    rows: list[OrgMoney] = []
    for org in sorted(ours.keys() | theirs.keys() | stripe.keys()):
        cp = ours.get(org)
        lg = theirs.get(org)
        cp_total = cp.total if cp is not None else 0
        lg_total = lg.total_minor if lg is not None else 0
        drift = cp_total - lg_total
        ok = cp is not None and lg is not None and within(abs(drift), lg_total, tol)
        rows.append(
            OrgMoney(
                org,
                cp,
                lg,
                stripe.get(org),
                drift,
                relative_micros(abs(drift), lg_total),
                ok if legacy is not None else True,
            )
        )
    return MoneyComparison(
        start, end, currency, tol, catalog_version, legacy is not None, rows, list(notes)
    )


# ---------------------------------------------------------------------------------------------
# answers


def amount(minor: int, currency: str) -> str:
    """`minor` units as an exact decimal string in the major unit ("41.2" for 4120 cents)."""
    digits = exponent(currency)
    value = Decimal(minor).scaleb(-digits)
    return f"{value:.{digits}f}"


def percent(relative: int | None) -> str | None:
    """Millionths as a percent string ("3" for 30000 millionths); None stays None."""
    return None if relative is None else fmt(relative * 100)


def _invoice_lines(invoice: PricedInvoice) -> list[dict[str, Any]]:
    return [
        {
            "price": line.price,
            "meter": line.meter,
            "quantity": line.quantity,
            "unit_amount_decimal": line.unit_amount_decimal,
            "amount_minor": line.amount,
            "credit_minor": line.credit,
        }
        for line in invoice.lines
    ]


def org_api(o: OrgMoney, c: MoneyComparison, lines: bool) -> dict[str, Any]:
    cp, lg = o.controlplane, o.legacy
    out: dict[str, Any] = {
        "org_id": o.org_id,
        "side": o.side,
        "controlplane_minor": None if cp is None else cp.total,
        "legacy_minor": None if lg is None else lg.total_minor,
        "drift_minor": o.drift if c.has_legacy else None,
        "drift_percent": percent(o.relative) if c.has_legacy else None,
        "within_tolerance": o.within_tolerance if c.has_legacy else None,
        "stripe": None,
    }
    if o.stripe is not None:
        s = o.stripe
        out["stripe"] = {
            "subscription": s.subscription,
            "period_start": s.preview.period_start,
            "period_end": s.preview.period_end,
            "subtotal_minor": s.preview.subtotal,
            "total_minor": s.preview.total,
            "computed_subtotal_minor": s.computed.subtotal,
            "drift_minor": s.drift,
            "finding": s.finding,
        }
    if lines:
        out["lines"] = {
            "controlplane": [] if cp is None else _invoice_lines(cp),
            "controlplane_credit_minor": 0 if cp is None else cp.credit,
            "legacy": None
            if lg is None or lg.lines is None
            else [{"description": x.description, "amount_minor": x.amount_minor} for x in lg.lines],
            "stripe": None
            if o.stripe is None
            else [
                {
                    "price": x.price,
                    "quantity": x.quantity,
                    "amount_minor": x.amount,
                    "credit_minor": x.credit,
                }
                for x in o.stripe.preview.lines
            ],
        }
    return out


def comparison_api(
    c: MoneyComparison, *, lines: bool = False, run_id: int | None = None
) -> dict[str, Any]:
    legacy_total = c.legacy_total
    drift = None if legacy_total is None else c.controlplane_total - legacy_total
    return {
        "from": c.start,
        "to": c.end,
        "currency": c.currency,
        "tolerance": str(c.tolerance),
        "catalog_version": c.catalog_version,
        "run_id": run_id,
        "summary": {
            "status": c.status,
            "orgs": len(c.orgs),
            "mismatches": len(c.mismatches),
            "only_controlplane": sum(
                1 for o in c.orgs if o.controlplane is not None and o.legacy is None
            )
            if c.has_legacy
            else 0,
            "only_legacy": sum(
                1 for o in c.orgs if o.controlplane is None and o.legacy is not None
            ),
            "stripe_findings": len(c.stripe_findings),
            "totals": {
                "controlplane_minor": c.controlplane_total,
                "legacy_minor": legacy_total,
                "drift_minor": drift,
                "drift_percent": None
                if legacy_total is None or drift is None
                else percent(relative_micros(abs(drift), legacy_total)),
            },
        },
        "notes": c.notes,
        "orgs": [org_api(o, c, lines) for o in c.orgs],
    }


def to_run(c: MoneyComparison, checked_at: int) -> tuple[MoneyRun, list[MoneyOrgResult]]:
    """The stored record of a comparison."""
    api = comparison_api(c)
    s = api["summary"]
    run = MoneyRun(
        period_start=c.start,
        period_end=c.end,
        checked_at=checked_at,
        currency=c.currency,
        tolerance=str(c.tolerance),
        orgs=s["orgs"],
        mismatches=s["mismatches"],
        only_controlplane=s["only_controlplane"],
        only_legacy=s["only_legacy"],
        stripe_findings=s["stripe_findings"],
        controlplane_minor=c.controlplane_total,
        legacy_minor=c.legacy_total,
        clean=c.status == "clean",
    )
    orgs = [
        MoneyOrgResult(
            o.org_id,
            None if o.controlplane is None else o.controlplane.total,
            None if o.legacy is None else o.legacy.total_minor,
            None if o.stripe is None else o.stripe.preview.total,
            o.within_tolerance,
        )
        for o in c.orgs
    ]
    return run, orgs


def run_api(run: MoneyRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "from": run.period_start,
        "to": run.period_end,
        "checked_at": run.checked_at,
        "currency": run.currency,
        "tolerance": run.tolerance,
        "status": "no_legacy"
        if run.legacy_minor is None
        else ("clean" if run.clean else "mismatch"),
        "orgs": run.orgs,
        "mismatches": run.mismatches,
        "only_controlplane": run.only_controlplane,
        "only_legacy": run.only_legacy,
        "stripe_findings": run.stripe_findings,
        "controlplane_minor": run.controlplane_minor,
        "legacy_minor": run.legacy_minor,
    }


def period_of(
    period: str | None, start: int | None, end: int | None, bucket_seconds: int
) -> tuple[int, int]:
    """The billing period a request names: `period` (YYYY-MM, UTC) or `from` and `to`
    (unix seconds on bucket boundaries), not both. Raises InvalidInput naming the field."""
    if period is not None:
        if start is not None or end is not None:
            raise InvalidInput(
                [Problem(field="period", message="give `period` or `from` and `to`, not both")]
            )
        return month_bounds(period)
    problems = window_problems(start, end, bucket_seconds)
    if problems or start is None or end is None:
        raise InvalidInput(problems)
    return start, end
