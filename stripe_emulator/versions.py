"""API versions: events rendered in the version a webhook endpoint asked for.

A webhook endpoint's ``api_version`` decides how the events sent to it are rendered (VER-2),
and the event says which version it carries (VER-3). The emulator keeps its objects in the
SDK's pinned version (:data:`API_VERSION`, VER-1) and renders older versions from them. Before
``2025-03-31.basil`` (rule ids are rows of ``docs/reference/stripe-behaviour.md``):

- an invoice names its subscription in ``subscription`` (and ``subscription_details``), not
  in ``parent.subscription_details`` (VER-5);
- an invoice line has ``price``, ``subscription``, ``subscription_item``, ``type`` and
  ``proration``, not ``pricing`` and ``parent`` (VER-5, VER-7);
- a subscription has ``current_period_start``/``_end`` itself, not on its items (VER-6), in
  ``previous_attributes`` too.

Any version the SDK knows (VER-10) is accepted; those from basil on are rendered as the pinned
one apart from ``api_version``.
"""

from __future__ import annotations

import copy
import re

from stripe_emulator.errors import Json, invalid

API_VERSION = "2026-10-28.endive"  # the stripe SDK 16.1.0 pin (VER-1)
BASIL = "2025-03-31"
_VERSION = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})(\.[a-z]+)?$")


def check_version(version: str, param: str = "api_version") -> str:
    """`version` if it is one the emulator can render, else 400 naming `param`."""
    found = _VERSION.match(version)
    if found is None or found["date"] > API_VERSION[:10]:
        raise invalid(
            param,
            f"Invalid Stripe API version: {version}. Use a version such as {API_VERSION} or "
            "2025-02-24.acacia.",
        )
    return version


def render(event: Json, version: str | None, prices: dict[str, Json]) -> Json:
    """`event` as an endpoint pinned to `version` gets it (None: the pinned version)."""
    if version is None or version == event["api_version"]:
        return event
    out = copy.deepcopy(event)
    out["api_version"] = version
    if version[:10] < BASIL:
        data = out["data"]
        obj = data["object"]
        if obj.get("object") == "invoice":
            _invoice_before_basil(obj, prices)
        elif obj.get("object") == "subscription":
            _periods_on_subscription(obj)
            previous = data.get("previous_attributes")
            if isinstance(previous, dict) and isinstance(previous.get("items"), dict):
                # the items changed only in their periods, which were the subscription's then
                _periods_on_subscription(previous)
                del previous["items"]
    return out


def _periods_on_subscription(sub: Json) -> None:
    items = sub.get("items", {}).get("data", [])
    if items:
        sub["current_period_start"] = items[0].get("current_period_start")
        sub["current_period_end"] = items[0].get("current_period_end")
    for item in items:
        item.pop("current_period_start", None)
        item.pop("current_period_end", None)


def _invoice_before_basil(invoice: Json, prices: dict[str, Json]) -> None:
    parent = invoice.pop("parent", None) or {}
    details = parent.get("subscription_details") or {}
    invoice["subscription"] = details.get("subscription")
    invoice["subscription_details"] = {"metadata": details.get("metadata")} if details else None
    for line in invoice.get("lines", {}).get("data", []):
        line_parent = line.pop("parent", None) or {}
        item = line_parent.get("subscription_item_details") or {}
        pricing = line.pop("pricing", None) or {}
        price_id = (pricing.get("price_details") or {}).get("price")
        line["price"] = copy.deepcopy(prices.get(price_id)) if price_id else None
        line["subscription"] = item.get("subscription")
        line["subscription_item"] = item.get("subscription_item")
        line["proration"] = bool(item.get("proration"))
        line["type"] = "subscription" if item else "invoiceitem"
