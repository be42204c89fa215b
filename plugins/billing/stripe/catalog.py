"""The price catalog: make Stripe match `[catalog]`, then store the resolved ids as a version
(:meth:`StripeBilling.publish_catalog <controlplane.plugins.billing.stripe.StripeBilling>`, the
:class:`~controlplane.interfaces.CatalogPublisher` capability).

`publish` is idempotent. It finds each object before it creates anything:

- meters by `event_name` (every configured `[[meters]]` entry), created with the `sum`
  formula: the product sends one event per bucket revision holding its total, so Stripe must
  add the values up. An existing meter with another formula (an earlier version published
  `count` meters that way, billing one unit per bucket) is refused with what to do, since a
  meter's formula cannot be changed; an inactive one is reactivated;
- products by id: Stripe products have no lookup key, so each gets the deterministic id
  ``prod_cp_<key>`` (a custom id is allowed on create, and a second create with it fails);
  a changed name is updated in place (a name moves no money);
- prices by `lookup_key` (at most 10 per list call). A price is never edited: when amount,
  currency, interval, product or meter differ, a new price is created with
  ``transfer_lookup_key=true``, which moves the key to it atomically. The old price stays
  active for subscriptions already on it.

Creates carry no fixed idempotency key: after a crash, the next publish finds what was created
(by event name, product id or lookup key) instead of relying on Stripe's 24 h key memory.

The resolved catalog is stored as a new version (with an audit record `catalog.publish`) only
when it differs from the newest version; publishing an unchanged catalog stores nothing.

Amounts are exact: `unit_amount` is a decimal string in the currency's major unit, converted
to minor units (cents) without floats; a whole number of minor units is sent as `unit_amount`,
anything else as `unit_amount_decimal` (at most 12 decimal places, Stripe's limit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
import stripe
import structlog

from controlplane.config import CatalogConfig, CatalogPriceConfig
from controlplane.errors import BillingError, ConfigError
from controlplane.interfaces import (
    AuditEntry,
    CatalogAction,
    CatalogStore,
    PublishResult,
)
from controlplane.meters import MeterConfig
from controlplane.pricing import minor_units

log = structlog.get_logger("catalog")
T = TypeVar("T")

MAX_DECIMALS = 12
PRODUCT_PREFIX = "prod_cp_"


def amount_params(amount: Decimal, currency: str, where: str) -> dict[str, Any]:
    """`unit_amount` (whole minor units) or `unit_amount_decimal` for Stripe."""
    minor = minor_units(amount, currency)
    if minor == minor.to_integral_value():
        return {"unit_amount": int(minor)}
    normal = minor.normalize()
    exponent = normal.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_DECIMALS:
        raise ConfigError(
            f"{where}: {amount} {currency} is {normal} minor units; Stripe takes at most "
            f"{MAX_DECIMALS} decimal places"
        )
    return {"unit_amount_decimal": format(normal, "f")}


def product_id(key: str) -> str:
    return PRODUCT_PREFIX + key


Action = CatalogAction  # one step of a publish (the record is the capability's)


def _plain(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    return dict(obj)


async def stripe_call(what: str, call: Awaitable[T]) -> T:
    """Await a Stripe call, translating its errors into BillingError."""
    try:
        return await call
    except stripe.StripeError as exc:
        raise BillingError(f"Stripe {what}: {exc.user_message or type(exc).__name__}") from exc


def digest(catalog: dict[str, Any]) -> str:
    text = json.dumps(catalog, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class _Publisher:
    def __init__(
        self,
        client: stripe.StripeClient,
        catalog: CatalogConfig,
        meters: Sequence[MeterConfig],
        dry_run: bool,
    ) -> None:
        self.client = client
        self.dry_run = dry_run
        self.actions: list[Action] = []
        self.catalog = catalog
        self.meter_configs = meters

    def act(self, kind: str, what: str, key: str, detail: str = "") -> None:
        self.actions.append(Action(kind, what, key, detail))
        if kind != "keep":
            log.info(
                "catalog.action", kind=kind, what=what, key=key, detail=detail, dry=self.dry_run
            )

    async def meters(self) -> dict[str, dict[str, Any]]:
        page = await stripe_call(
            "list meters", self.client.v1.billing.meters.list_async(params={"limit": 100})
        )
        existing: dict[str, Any] = {}
        async for meter in page.auto_paging_iter():
            existing.setdefault(meter.event_name, meter)
        out: dict[str, dict[str, Any]] = {}
        for m in self.meter_configs:
            out[m.name] = {
                "event_name": m.provider_event_name,
                "id": await self._meter(m, existing),
            }
        return out

    async def _meter(self, m: MeterConfig, existing: dict[str, Any]) -> str | None:
        event_name = m.provider_event_name
        found = existing.get(event_name)
        if found is not None:
            formula = found.default_aggregation.formula
            if formula != m.provider_formula:
                raise ConfigError(
                    f"meters.{m.name}: Stripe meter {found.id} (event_name {event_name}) "
                    f"aggregates with `{formula}`, but the product sends per-bucket totals that "
                    f"must be summed; a meter's formula cannot change: set `event_name` to a "
                    f"new name so that publishing creates a `{m.provider_formula}` meter, "
                    "and deactivate the old one"
                )
            if found.status == "inactive":
                self.act("reactivate", "meter", m.name, f"{found.id} ({event_name})")
                if not self.dry_run:
                    await stripe_call(
                        "reactivate meter",
                        self.client.v1.billing.meters.reactivate_async(found.id),
                    )
            else:
                self.act("keep", "meter", m.name, found.id)
            return str(found.id)
        self.act("create", "meter", m.name, f"event_name {event_name}, {m.provider_formula}")
        if self.dry_run:
            return None
        params: Any = {
            "display_name": m.name,
            "event_name": event_name,
            "default_aggregation": {"formula": m.provider_formula},
        }
        created = await stripe_call(
            "create meter", self.client.v1.billing.meters.create_async(params=params)
        )
        return str(created.id)

    async def products(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for p in self.catalog.products:
            pid = product_id(p.key)
            out[p.key] = {"id": pid, "name": p.name}
            try:
                found = await self.client.v1.products.retrieve_async(pid)
            except stripe.InvalidRequestError as exc:
                if exc.http_status != 404:
                    raise BillingError(
                        f"Stripe retrieve product {pid}: {exc.user_message}"
                    ) from exc
                found = None
            except stripe.StripeError as exc:
                raise BillingError(f"Stripe retrieve product {pid}: {exc.user_message}") from exc
            if found is None:
                self.act("create", "product", p.key, f"{pid} {p.name!r}")
                if not self.dry_run:
                    params: Any = {"id": pid, "name": p.name, "metadata": {"cp_product_key": p.key}}
                    await stripe_call(
                        "create product", self.client.v1.products.create_async(params=params)
                    )
            elif found.name != p.name or not found.active:
                self.act("update", "product", p.key, f"{pid}: name {found.name!r} -> {p.name!r}")
                if not self.dry_run:
                    update: Any = {"name": p.name, "active": True}
                    await stripe_call(
                        "update product", self.client.v1.products.update_async(pid, params=update)
                    )
            else:
                self.act("keep", "product", p.key, pid)
        return out

    async def prices(self, meters: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        keys = [p.lookup_key for p in self.catalog.prices]
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(keys), 10):
            params: Any = {"lookup_keys": keys[i : i + 10], "active": True, "limit": 100}
            page = await stripe_call("list prices", self.client.v1.prices.list_async(params=params))
            for price in page.data:
                plain = _plain(price)
                found[plain["lookup_key"]] = plain
        out: dict[str, dict[str, Any]] = {}
        for i, p in enumerate(self.catalog.prices):
            meter_id = meters[p.meter]["id"] if p.meter else None
            amount = amount_params(p.unit_amount, p.currency, f"catalog.prices[{i}].unit_amount")
            entry: dict[str, Any] = {
                "lookup_key": p.lookup_key,
                "product": product_id(p.product),
                "meter": p.meter,
                "meter_id": meter_id,
                "unit_amount": str(p.unit_amount),
                "currency": p.currency.lower(),
                "interval": p.interval,
                "usage_type": "metered" if p.meter else "licensed",
            }
            current = found.get(p.lookup_key)
            differences = _differences(current, entry, amount) if current else []
            if current and not differences:
                self.act("keep", "price", p.key, str(current["id"]))
                entry["id"] = current["id"]
            else:
                detail = (
                    f"{p.lookup_key}: " + "; ".join(differences) + f" (replaces {current['id']})"
                    if current
                    else f"{p.lookup_key}: {p.unit_amount} {p.currency} per {p.interval}"
                )
                self.act("create", "price", p.key, detail)
                entry["id"] = None if self.dry_run else await self._create_price(p, entry, amount)
            out[p.key] = entry
        return out

    async def _create_price(
        self, p: CatalogPriceConfig, entry: dict[str, Any], amount: dict[str, Any]
    ) -> str:
        recurring: dict[str, Any] = {"interval": p.interval, "usage_type": entry["usage_type"]}
        if entry["meter_id"]:
            recurring["meter"] = entry["meter_id"]
        params: Any = {
            "product": entry["product"],
            "currency": entry["currency"],
            "lookup_key": p.lookup_key,
            "transfer_lookup_key": True,
            "nickname": p.key,
            "metadata": {"cp_price_key": p.key},
            "recurring": recurring,
            **amount,
        }
        created = await stripe_call(
            "create price", self.client.v1.prices.create_async(params=params)
        )
        return str(created.id)

    def welcome_credit(self) -> dict[str, Any] | None:
        credit = self.catalog.welcome_credit
        if credit is None:
            return None
        minor = minor_units(credit.amount, credit.currency)
        if minor != minor.to_integral_value():
            raise ConfigError(
                f"catalog.welcome_credit.amount: {credit.amount} {credit.currency} is not a "
                "whole number of minor units"
            )
        return {
            "amount": str(credit.amount),
            "amount_minor": int(minor),
            "currency": credit.currency.lower(),
            "name": credit.name,
            "expires_after_days": credit.expires_after_days,
        }


def _differences(
    current: dict[str, Any], entry: dict[str, Any], amount: dict[str, Any]
) -> list[str]:
    out: list[str] = []
    recurring = current.get("recurring") or {}
    want = Decimal(str(amount.get("unit_amount", amount.get("unit_amount_decimal"))))
    have_text = current.get("unit_amount_decimal") or current.get("unit_amount")
    have = Decimal(str(have_text)) if have_text is not None else None
    if have != want:
        out.append(f"unit amount {have} -> {want} minor units")
    if current.get("currency") != entry["currency"]:
        out.append(f"currency {current.get('currency')} -> {entry['currency']}")
    if recurring.get("interval") != entry["interval"]:
        out.append(f"interval {recurring.get('interval')} -> {entry['interval']}")
    if recurring.get("usage_type") != entry["usage_type"]:
        out.append(f"usage type {recurring.get('usage_type')} -> {entry['usage_type']}")
    if entry["meter_id"] is not None and recurring.get("meter") != entry["meter_id"]:
        out.append(f"meter {recurring.get('meter')} -> {entry['meter_id']}")
    if current.get("product") != entry["product"]:
        out.append(f"product {current.get('product')} -> {entry['product']}")
    return out


async def publish(
    client: stripe.StripeClient,
    store: CatalogStore,
    catalog: CatalogConfig,
    meters: Sequence[MeterConfig],
    *,
    actor: str,
    dry_run: bool = False,
    now: Callable[[], int],
) -> PublishResult:
    """Make Stripe match `catalog` (with every configured meter), then store it in `store` as
    a new version stamped `now()` (unless nothing changed). With `dry_run`, Stripe is only
    read and nothing is stored."""
    if not catalog.prices:
        raise ConfigError("catalog: no prices configured; an empty catalog is never published")
    publisher = _Publisher(client, catalog, meters, dry_run)
    welcome = publisher.welcome_credit()
    meter_ids = await publisher.meters()
    products = await publisher.products()
    prices = await publisher.prices(meter_ids)
    resolved: dict[str, Any] = {
        "meters": meter_ids,
        "products": products,
        "prices": prices,
        "welcome_credit": welcome,
    }
    newest = await store.catalog_version()
    changed = newest is None or newest.digest != digest(resolved)
    if dry_run or not changed:
        return PublishResult(publisher.actions, dry_run, changed, newest)
    version = await store.publish_catalog(
        resolved,
        digest(resolved),
        actor,
        now(),
        AuditEntry(
            action="catalog.publish",
            subject="catalog",
            actor=actor,
            before={"version": newest.version, "digest": newest.digest} if newest else None,
            after={
                "digest": digest(resolved),
                "prices": {k: v["id"] for k, v in prices.items()},
                "actions": [msgspec.to_builtins(a) for a in publisher.actions if a.kind != "keep"],
            },
        ),
    )
    log.info("catalog.published", version=version.version, actor=actor)
    return PublishResult(publisher.actions, dry_run, True, version)
