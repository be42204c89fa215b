"""Money parity, the service: price a billing period from the ledger with the catalog, read the
legacy biller's invoices and Stripe's previews, compare (:mod:`controlplane.money`), store.

The control plane's side is :func:`controlplane.pricing.price_period` over the ledger's
billable quantities of the period (every row but those excluded as ``free_plan`` and the
re-issued ones, so shadow's pending rows count), with the newest published catalog (the
configured ``[catalog]`` before the first publish). The welcome credit is priced as Stripe
applies it: granted when the org's first stored `pro` period starts, applied to metered lines
only, its balance carried from month to month since the grant, gone once it expires.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec
import structlog

from controlplane.errors import BillingError, ConfigError
from controlplane.interfaces import (
    InvoicePreviewer,
    LegacyCapability,
    LegacyInvoice,
    LegacySource,
    MoneyOrgResult,
    MoneyRun,
    Org,
    Storage,
)
from controlplane.money import (
    MoneyComparison,
    PriceList,
    StripeSide,
    compare_money,
    month_bounds,
    month_of,
    price_list,
    to_run,
)
from controlplane.plans import PRO
from controlplane.pricing import Grant, PricedInvoice, price_period

log = structlog.get_logger("money_parity")
MAX_CREDIT_MONTHS = 36  # how far back a welcome credit's balance is carried


class WelcomeCredit(msgspec.Struct, frozen=True):
    amount_minor: int
    currency: str
    expires_after_days: int | None


class MoneyParity:
    """Compare one billing period's invoices (see the module docstring)."""

    def __init__(
        self,
        *,
        storage: Storage,
        legacy: LegacySource | None,
        previewer: InvoicePreviewer | None,
        configured_catalog: dict[str, Any],
        tolerance: Decimal,
        clock: Callable[[], int],
    ) -> None:
        self.storage = storage
        self.legacy = legacy
        self.previewer = previewer
        self.configured_catalog = configured_catalog
        self.tolerance = tolerance
        self.clock = clock
        self._quantities: dict[tuple[int, int], dict[str, dict[str, int]]] = {}

    async def compare(self, start: int, end: int) -> MoneyComparison:
        """The comparison of the billing period [start, end)."""
        version = await self.storage.catalog_version()
        catalog = version.catalog if version is not None else self.configured_catalog
        if not catalog.get("prices"):
            raise ConfigError("catalog: no prices to price invoices with; configure [catalog]")
        prices = price_list(catalog["prices"])
        credit = _welcome(catalog.get("welcome_credit"))
        notes = list(prices.notes)
        quantities = await self._period(start, end)
        orgs = {org: await self.storage.get_org(org) for org in quantities}
        ours: dict[str, PricedInvoice] = {}
        for org, used in quantities.items():
            grant = await self._grant(orgs[org], credit, start, prices)
            ours[org] = price_period(org, start, end, prices.prices, used, grant)
        legacy = await self._legacy(start, end, notes)
        stripe = await self._stripe(start, end, prices, orgs, notes)
        return compare_money(
            start,
            end,
            prices.currency,
            ours,
            legacy,
            stripe,
            self.tolerance,
            catalog_version=None if version is None else version.version,
            notes=notes,
        )

    async def check(self, start: int, end: int) -> tuple[MoneyComparison, int]:
        """Compare and store the run; returns the comparison and the run's id."""
        comparison = await self.compare(start, end)
        run, orgs = to_run(comparison, self.clock())
        run_id = await self.storage.record_money_run(run, orgs)
        log.info(
            "money_parity.checked",
            period_start=start,
            run_id=run_id,
            status=comparison.status,
            mismatches=run.mismatches,
            stripe_findings=run.stripe_findings,
        )
        return comparison, run_id

    async def runs(self, limit: int = 100) -> list[MoneyRun]:
        return await self.storage.money_runs(limit=limit)

    async def run(self, run_id: int) -> tuple[MoneyRun, list[MoneyOrgResult]] | None:
        return await self.storage.money_run(run_id)

    async def last_closed(self) -> tuple[bool, str]:
        """Check the last closed calendar month now (the run is stored): whether it is clean,
        and why not."""
        start, _ = month_bounds(month_of(self.clock()))
        period = month_of(start - 1)
        comparison, run_id = await self.check(*month_bounds(period))
        if comparison.status == "no_legacy":
            return False, (
                f"{period}: the legacy plugin cannot give invoices ([legacy] invoices_query "
                "or invoices_url), so nothing was compared"
            )
        mismatches = comparison.mismatches
        if mismatches:
            worst = max(mismatches, key=lambda o: abs(o.drift))
            return False, (
                f"{period}: {len(mismatches)} of {len(comparison.orgs)} orgs outside the money "
                f"tolerance (worst {worst.org_id}: drift {worst.drift} minor units; run {run_id})"
            )
        return True, f"{period}: {len(comparison.orgs)} orgs within tolerance (run {run_id})"

    # -- the sides ---------------------------------------------------------------------------

    async def _period(self, start: int, end: int) -> dict[str, dict[str, int]]:
        key = (start, end)
        if key not in self._quantities:
            found: dict[str, dict[str, int]] = {}
            for q in await self.storage.ledger_quantities(start, end):
                found.setdefault(q.org_id, {})[q.meter] = q.quantity
            self._quantities[key] = found
        return self._quantities[key]

    async def _grant(
        self, org: Org | None, credit: WelcomeCredit | None, start: int, prices: PriceList
    ) -> Grant | None:
        """The welcome credit's balance before the period starting at `start`."""
        if credit is None or org is None:
            return None
        granted = next((p.effective_from for p in org.plans if p.plan == PRO), None)
        if granted is None:
            return None
        expires = (
            None
            if credit.expires_after_days is None
            else granted + credit.expires_after_days * 86400
        )
        grant = Grant(credit.amount_minor, credit.currency, granted, expires)
        month_start, month_end = month_bounds(month_of(granted))
        months = 0
        while month_end <= start and grant.balance_minor > 0 and months < MAX_CREDIT_MONTHS:
            used = (await self._period(month_start, month_end)).get(org.org_id, {})
            before = price_period(org.org_id, month_start, month_end, prices.prices, used, grant)
            grant = msgspec.structs.replace(
                grant, balance_minor=grant.balance_minor - before.credit
            )
            month_start, month_end = month_end, month_bounds(month_of(month_end))[1]
            months += 1
        return grant

    async def _legacy(
        self, start: int, end: int, notes: list[str]
    ) -> dict[str, LegacyInvoice] | None:
        if self.legacy is None:
            notes.append("no legacy source is configured ([legacy])")
            return None
        if LegacyCapability.INVOICES not in self.legacy.capabilities():
            notes.append(
                f"the legacy plugin {self.legacy.name!r} cannot give invoices: set "
                "[legacy] invoices_query (sql) or invoices_url (http)"
            )
            return None
        return await self.legacy.invoices(start, end)

    async def _stripe(
        self,
        start: int,
        end: int,
        prices: PriceList,
        orgs: dict[str, Org | None],
        notes: list[str],
    ) -> dict[str, StripeSide]:
        """Stripe's preview for orgs with an active subscription, when the period is current."""
        if self.previewer is None or not start <= self.clock() < end:
            return {}
        out: dict[str, StripeSide] = {}
        for org_id, org in sorted(orgs.items()):
            if org is None or not org.customer or not org.subscription:
                continue
            if org.subscription_status != "active":
                continue
            try:
                preview = await self.previewer.preview_invoice(org.customer, org.subscription)
            except BillingError as exc:
                notes.append(f"org {org_id}: Stripe's invoice preview failed: {exc}")
                continue
            used = (await self._period(preview.period_start, preview.period_end)).get(org_id, {})
            ours = price_period(
                org_id, preview.period_start, preview.period_end, prices.prices, used
            )
            out[org_id] = StripeSide(org.subscription, preview, ours)
        return out


def _welcome(raw: Any) -> WelcomeCredit | None:
    if not raw:
        return None
    return WelcomeCredit(
        int(raw["amount_minor"]), str(raw["currency"]).lower(), raw.get("expires_after_days")
    )
