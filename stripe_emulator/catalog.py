"""Products and prices.

``POST /v1/products``, ``GET /v1/products`` (``active``, ``ids[]``), ``GET`` and ``POST``
``/v1/products/{id}``; ``POST /v1/prices``, ``GET /v1/prices`` (``lookup_keys[]``, ``active``,
``product``, ``currency``, ``type``, ``recurring[...]``), ``GET /v1/prices/{id}``, ``POST
/v1/prices/{id}`` (``active``, ``lookup_key`` + ``transfer_lookup_key``, ``nickname``,
``metadata``).

- Prices: ``product`` (existing) or ``product_data``; exactly one of ``unit_amount`` and
  ``unit_amount_decimal`` (at most 12 decimals), ``billing_scheme=per_unit`` only; amounts can
  never be edited (not an update parameter). ``recurring[interval]`` day/week/month/year, at most
  three years; ``usage_type=metered`` needs ``recurring[meter]`` naming a meter (since basil:
  ``... metered prices must be backed by meters.``) and only metered prices take one. A lookup
  key (at most 200 characters) belongs to one price in the account, active or not: another
  price asking for it gets 400 ``A price (`price_...`) already uses that lookup key.``, unless
  ``transfer_lookup_key=true``, which atomically clears it from the holder (still active; it
  gets ``price.updated`` with ``previous_attributes.lookup_key``) and gives it to this price.
  ``lookup_keys[]`` takes at most 10 keys.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal, InvalidOperation

from stripe_emulator.errors import EmulatedError, Json, invalid, missing, no_such, one_of
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    bool_param,
    currency_param,
    int_param,
    list_page,
    metadata_param,
    obj_param,
    only_keys,
    only_params,
    str_list_param,
    str_param,
)
from stripe_emulator.shapes import PRICE_SHAPE, PRODUCT_SHAPE
from stripe_emulator.state import EmulatorState

MAX_LOOKUP_KEY_LENGTH = 200
MAX_LOOKUP_KEYS = 10
INTERVALS = ("day", "week", "month", "year")
MAX_INTERVAL_COUNT = {"day": 3 * 365, "week": 3 * 52, "month": 36, "year": 3}

_PRODUCT_FIELDS = frozenset(
    {
        "active",
        "description",
        "id",
        "metadata",
        "name",
        "statement_descriptor",
        "tax_code",
        "unit_label",
        "url",
    }
)
_PRODUCT_DATA_FIELDS = frozenset(
    {"active", "metadata", "name", "statement_descriptor", "tax_code", "unit_label"}
)
_PRICE_FIELDS = frozenset(
    {
        "active",
        "billing_scheme",
        "currency",
        "lookup_key",
        "metadata",
        "nickname",
        "product",
        "product_data",
        "recurring",
        "tax_behavior",
        "transfer_lookup_key",
        "unit_amount",
        "unit_amount_decimal",
    }
)
_PRICE_UPDATE_FIELDS = frozenset(
    {"active", "lookup_key", "metadata", "nickname", "transfer_lookup_key"}
)
_RECURRING_FIELDS = frozenset(
    {"interval", "interval_count", "meter", "trial_period_days", "usage_type"}
)


class CatalogMixin(EmulatorState):
    """Products and the prices that bill them."""

    def create_product(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _PRODUCT_FIELDS)
        name = str_param(params, "name", required=True, max_length=250)
        ident = str_param(params, "id", max_length=255)
        if ident in self.products:
            raise EmulatedError(
                400, "Product already exists.", param="id", code="resource_already_exists"
            )
        product = self._new_product(name, params, ident or None)
        self._emit("product.created", product, request)
        return product

    def _new_product(self, name: str, params: Json, ident: str | None = None) -> Json:
        """Validates `params` (the product fields besides name and id), then creates."""
        fields: Json = {}
        for field in ("description", "statement_descriptor", "tax_code", "unit_label", "url"):
            value = str_param(params, field, max_length=5000)
            if value:
                fields[field] = value
        active = bool_param(params, "active")
        metadata = metadata_param(params) or {}
        now = int(self.now())
        product = copy.deepcopy(PRODUCT_SHAPE)
        product.update(
            fields,
            id=ident or self._new_id("prod", 14),
            name=name,
            created=now,
            updated=now,
            active=True if active is None else active,
            metadata=metadata,
        )
        self.products[product["id"]] = product
        return product

    def update_product(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _PRODUCT_FIELDS - {"id"})
        product = self._product(request.args["id"])
        changes: Json = {}
        for field in ("name", "description", "statement_descriptor", "tax_code", "unit_label"):
            if field in params:
                changes[field] = str_param(params, field, max_length=5000) or None
        if "url" in params:
            changes["url"] = str_param(params, "url") or None
        active = bool_param(params, "active")
        if active is not None:
            changes["active"] = active
        metadata = metadata_param(params, product["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        if "name" in changes and not changes["name"]:
            raise invalid("name", "A product's name cannot be empty.")
        return self._update(product, changes, "product.updated", request)

    def retrieve_product(self, request: ApiRequest) -> Json:
        return self._product(request.args["id"])

    def list_products(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"active", "ids"})
        items = list(reversed(self.products.values()))
        active = bool_param(params, "active")
        if active is not None:
            items = [p for p in items if p["active"] is active]
        ids = str_list_param(params, "ids")
        if ids is not None:
            items = [p for p in items if p["id"] in ids]
        return list_page(items, params, "/v1/products")

    def create_price(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _PRICE_FIELDS)
        currency = currency_param(params, "currency", required=True)
        product_id = str_param(params, "product")
        product_data = obj_param(params, "product_data")
        if product_id and product_data:
            raise one_of("product", "product_data")
        if not product_id and not product_data:
            raise EmulatedError(
                400,
                "You must specify either `product` or `product_data` when creating a price.",
                param="product",
            )
        if product_id and product_id not in self.products:
            raise no_such("product", product_id, "product")
        product_name = ""
        if product_data:
            only_keys(product_data, _PRODUCT_DATA_FIELDS, "product_data")
            product_name = str_param(product_data, "name", max_length=250)
            if not product_name:
                raise missing("product_data[name]")
        scheme = str_param(params, "billing_scheme") or "per_unit"
        if scheme != "per_unit":
            raise invalid(
                "billing_scheme",
                "The Stripe emulator supports only billing_scheme=per_unit prices.",
            )
        unit_amount, unit_amount_decimal = _unit_amount(params)
        recurring = self._recurring(obj_param(params, "recurring"))
        lookup_key = str_param(params, "lookup_key", max_length=MAX_LOOKUP_KEY_LENGTH)
        transfer = bool(bool_param(params, "transfer_lookup_key"))
        holder = self._lookup_key_holder(lookup_key, None, transfer)
        tax_behavior = str_param(params, "tax_behavior") or "unspecified"
        if tax_behavior not in ("inclusive", "exclusive", "unspecified"):
            raise invalid(
                "tax_behavior",
                f"Invalid tax_behavior: must be one of inclusive, exclusive or unspecified, "
                f"got '{tax_behavior}'.",
            )
        nickname = str_param(params, "nickname", max_length=5000) or None
        active = bool_param(params, "active")
        metadata = metadata_param(params) or {}
        # all validated: from here on nothing fails, so the whole create is atomic
        if product_data:
            product = self._new_product(product_name, product_data)
            product_id = product["id"]
            self._emit("product.created", product, request)
        if holder is not None:
            self._update(holder, {"lookup_key": None}, "price.updated", request)
        price = copy.deepcopy(PRICE_SHAPE)
        price.update(
            id=self._new_id("price", 24),
            active=True if active is None else active,
            created=int(self.now()),
            currency=currency,
            lookup_key=lookup_key or None,
            metadata=metadata,
            nickname=nickname,
            product=product_id,
            recurring=recurring,
            tax_behavior=tax_behavior,
            type="recurring" if recurring else "one_time",
            unit_amount=unit_amount,
            unit_amount_decimal=unit_amount_decimal,
        )
        self.prices[price["id"]] = price
        if lookup_key:
            self._lookup_keys[lookup_key] = price["id"]
        self._emit("price.created", price, request)
        return price

    def _recurring(self, raw: Json) -> Json | None:
        if not raw:
            return None
        only_keys(raw, _RECURRING_FIELDS, "recurring")
        interval = str_param(raw, "interval")
        if not interval:
            raise missing("recurring[interval]")
        if interval not in INTERVALS:
            raise invalid(
                "recurring[interval]",
                f"Invalid recurring[interval]: must be one of day, week, month or year, got "
                f"'{interval}'.",
            )
        count = int_param(raw, "interval_count")
        count = 1 if count is None else count
        if not 1 <= count <= MAX_INTERVAL_COUNT[interval]:
            raise invalid(
                "recurring[interval_count]",
                "The maximum billing frequency is three years (3 years, 36 months, or 156 weeks).",
            )
        usage_type = str_param(raw, "usage_type") or "licensed"
        if usage_type not in ("licensed", "metered"):
            raise invalid(
                "recurring[usage_type]",
                f"Invalid recurring[usage_type]: must be licensed or metered, got '{usage_type}'.",
            )
        meter = str_param(raw, "meter")
        if usage_type == "metered" and not meter:
            raise EmulatedError(
                400,
                "Starting with Stripe version `2025-03-31.basil`, metered prices must be backed "
                "by meters.",
                param="recurring[meter]",
            )
        if meter and usage_type != "metered":
            raise invalid(
                "recurring[meter]",
                "A meter can only be set on prices with `recurring[usage_type]=metered`.",
            )
        if meter and meter not in self.meters:
            raise no_such("billing meter", meter, "recurring[meter]")
        return {
            "interval": interval,
            "interval_count": count,
            "meter": meter or None,
            "trial_period_days": None,
            "usage_type": usage_type,
        }

    def _lookup_key_holder(self, key: str, owner: str | None, transfer: bool) -> Json | None:
        """The other price holding `key`, if `transfer` allows taking it; else a 400."""
        holder_id = self._lookup_keys.get(key) if key else None
        if holder_id is None or holder_id == owner:
            return None
        if not transfer:
            raise EmulatedError(
                400, f"A price (`{holder_id}`) already uses that lookup key.", param="lookup_key"
            )
        return self.prices[holder_id]

    def update_price(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _PRICE_UPDATE_FIELDS)
        price = self._price(request.args["id"])
        lookup_key = str_param(params, "lookup_key", max_length=MAX_LOOKUP_KEY_LENGTH)
        transfer = bool(bool_param(params, "transfer_lookup_key"))
        holder = self._lookup_key_holder(lookup_key, price["id"], transfer)
        changes: Json = {}
        active = bool_param(params, "active")
        if active is not None:
            changes["active"] = active
        if "nickname" in params:
            changes["nickname"] = str_param(params, "nickname", max_length=5000) or None
        metadata = metadata_param(params, price["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        if lookup_key and lookup_key != price["lookup_key"]:
            changes["lookup_key"] = lookup_key
            if holder is not None:
                self._update(holder, {"lookup_key": None}, "price.updated", request)
            if price["lookup_key"]:
                self._lookup_keys.pop(price["lookup_key"], None)
            self._lookup_keys[lookup_key] = price["id"]
        return self._update(price, changes, "price.updated", request)

    def retrieve_price(self, request: ApiRequest) -> Json:
        return self._price(request.args["id"])

    def list_prices(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(
            params,
            LIST_FIELDS | {"active", "currency", "product", "type", "lookup_keys", "recurring"},
        )
        lookup_keys = str_list_param(params, "lookup_keys", max_items=MAX_LOOKUP_KEYS)
        items = list(reversed(self.prices.values()))
        if lookup_keys is not None:
            wanted = set(lookup_keys)
            items = [p for p in items if p["lookup_key"] in wanted]
        active = bool_param(params, "active")
        if active is not None:
            items = [p for p in items if p["active"] is active]
        currency = currency_param(params, "currency")
        if currency:
            items = [p for p in items if p["currency"] == currency]
        product = str_param(params, "product")
        if product:
            if product not in self.products:
                raise no_such("product", product, "product")
            items = [p for p in items if p["product"] == product]
        kind = str_param(params, "type")
        if kind:
            items = [p for p in items if p["type"] == kind]
        recurring = obj_param(params, "recurring")
        only_keys(recurring, frozenset({"interval", "meter", "usage_type"}), "recurring")
        for key, wanted in recurring.items():
            items = [p for p in items if p["recurring"] and p["recurring"][key] == wanted]
        return list_page(items, params, "/v1/prices")


def _unit_amount(params: Json) -> tuple[int | None, str]:
    """(unit_amount, unit_amount_decimal) of a new price: exactly one of them is given."""
    unit_amount = int_param(params, "unit_amount")
    decimal = str_param(params, "unit_amount_decimal")
    if unit_amount is not None and decimal:
        raise one_of("unit_amount", "unit_amount_decimal")
    if unit_amount is None and not decimal:
        raise EmulatedError(
            400,
            "Prices require an `unit_amount` or `unit_amount_decimal` parameter to be set.",
            param="unit_amount",
        )
    if unit_amount is not None:
        if unit_amount < 0:
            raise invalid("unit_amount", "Invalid unit_amount: must be at least 0.")
        return unit_amount, str(unit_amount)
    if not re.fullmatch(r"\d+(\.\d{1,12})?", decimal):
        raise invalid(
            "unit_amount_decimal",
            f"Invalid decimal: {decimal}. unit_amount_decimal takes at most 12 decimal places.",
        )
    try:
        Decimal(decimal)
    except InvalidOperation as exc:  # pragma: no cover - the pattern above rules it out
        raise invalid("unit_amount_decimal", f"Invalid decimal: {decimal}.") from exc
    return None, decimal
