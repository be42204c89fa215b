"""Billing credits.

``POST /v1/billing/credit_grants``, ``GET /v1/billing/credit_grants`` (``customer``),
``GET /v1/billing/credit_grants/{id}``, ``POST .../{id}/void`` and ``/expire``,
``GET /v1/billing/credit_balance_summary``.

- Billing credits: ``amount[type]=monetary`` with a currency and a positive integer value;
  ``applicability_config[scope]`` is ``price_type=metered`` or ``prices[]`` (at most 20), not
  both; ``category`` paid/promotional; ``priority`` 0-100 (default 50). At finalization they
  reduce metered lines only (``pretax_credit_amounts``), by priority, soonest expiry,
  promotional before paid, oldest first.
"""

from __future__ import annotations

import re

from stripe_emulator.errors import Json, invalid, missing, no_such
from stripe_emulator.invoices import invoice_totals
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    int_param,
    list_page,
    metadata_param,
    obj_param,
    only_keys,
    only_params,
    str_param,
)
from stripe_emulator.state import EmulatorState

MAX_CREDIT_GRANT_PRICES = 20

_CREDIT_GRANT_FIELDS = frozenset(
    {
        "amount",
        "applicability_config",
        "category",
        "customer",
        "effective_at",
        "expires_at",
        "metadata",
        "name",
        "priority",
    }
)


class CreditGrantsMixin(EmulatorState):
    """Credit grants, and their use when an invoice is finalized."""

    def create_credit_grant(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _CREDIT_GRANT_FIELDS)
        customer = str_param(params, "customer", required=True)
        if customer not in self.customers:
            raise no_such("customer", customer, "customer")
        if "amount" not in params:
            raise missing("amount")
        amount = obj_param(params, "amount")
        only_keys(amount, frozenset({"type", "monetary"}), "amount")
        kind = str_param(amount, "type")
        if not kind:
            raise missing("amount[type]")
        if kind != "monetary":
            raise invalid("amount[type]", f"Invalid amount[type]: must be monetary, got '{kind}'.")
        monetary = amount.get("monetary")
        if not isinstance(monetary, dict):
            raise missing("amount[monetary]")
        only_keys(monetary, frozenset({"currency", "value"}), "amount[monetary]")
        currency = str(monetary.get("currency") or "").lower()
        if not currency:
            raise missing("amount[monetary][currency]")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise invalid("amount[monetary][currency]", f"Invalid currency: {currency}.")
        raw_value = monetary.get("value")
        if raw_value is None or raw_value == "":
            raise missing("amount[monetary][value]")
        if not isinstance(raw_value, str) or not re.fullmatch(r"\d+", raw_value):
            raise invalid(
                "amount[monetary][value]",
                f"Invalid integer: {raw_value}",
                code="parameter_invalid_integer",
            )
        value = int(raw_value)
        if value <= 0:
            raise invalid(
                "amount[monetary][value]", "amount[monetary][value] must be a positive integer."
            )
        if "applicability_config" not in params:
            raise missing("applicability_config")
        config = obj_param(params, "applicability_config")
        only_keys(config, frozenset({"scope"}), "applicability_config")
        scope = config.get("scope")
        if not isinstance(scope, dict):
            raise missing("applicability_config[scope]")
        only_keys(scope, frozenset({"price_type", "prices"}), "applicability_config[scope]")
        price_type = scope.get("price_type") or None
        prices = scope.get("prices") or None
        if price_type and prices:
            raise invalid(
                "applicability_config[scope]",
                "You may only specify one of these parameters: price_type, prices.",
            )
        if not price_type and not prices:
            raise missing("applicability_config[scope][price_type]")
        if price_type and price_type != "metered":
            raise invalid(
                "applicability_config[scope][price_type]",
                f"Invalid applicability_config[scope][price_type]: must be metered, got "
                f"'{price_type}'.",
            )
        price_ids: list[str] = []
        if prices:
            param = "applicability_config[scope][prices]"
            if not isinstance(prices, list) or len(prices) > MAX_CREDIT_GRANT_PRICES:
                raise invalid(
                    param, f"Invalid {param}: an array of at most {MAX_CREDIT_GRANT_PRICES}."
                )
            for index, entry in enumerate(prices):
                ident = entry.get("id") if isinstance(entry, dict) else None
                if not ident:
                    raise missing(f"{param}[{index}][id]")
                if ident not in self.prices:
                    raise no_such("price", str(ident), f"{param}[{index}][id]")
                price_ids.append(str(ident))
        category = str_param(params, "category") or "paid"
        if category not in ("paid", "promotional"):
            raise invalid(
                "category", f"Invalid category: must be paid or promotional, got '{category}'."
            )
        now = int(self.now())
        effective_at = int_param(params, "effective_at")
        expires_at = int_param(params, "expires_at")
        if expires_at is not None and expires_at <= (effective_at or now):
            raise invalid("expires_at", "expires_at must be after effective_at (or now).")
        priority = int_param(params, "priority")
        priority = 50 if priority is None else priority
        if not 0 <= priority <= 100:
            raise invalid("priority", "priority must be between 0 and 100.")
        name = str_param(params, "name", max_length=100) or None
        metadata = metadata_param(params) or {}
        grant: Json = {
            "id": self._new_id("credgr_test", 24),
            "object": "billing.credit_grant",
            "amount": {"monetary": {"currency": currency, "value": value}, "type": "monetary"},
            "applicability_config": {
                "scope": {
                    "price_type": price_type,
                    "prices": [{"id": p} for p in price_ids] if price_ids else None,
                }
            },
            "category": category,
            "created": now,
            "customer": customer,
            "customer_account": None,
            "effective_at": now if effective_at is None else effective_at,
            "expires_at": expires_at,
            "livemode": False,
            "metadata": metadata,
            "name": name,
            "priority": priority,
            "test_clock": None,
            "updated": now,
            "voided_at": None,
        }
        self.credit_grants[grant["id"]] = grant
        self._grant_balance[grant["id"]] = value
        self._emit("billing.credit_grant.created", grant, request)
        return grant

    def retrieve_credit_grant(self, request: ApiRequest) -> Json:
        return self._credit_grant(request.args["id"])

    def list_credit_grants(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"customer"})
        items = list(reversed(self.credit_grants.values()))
        customer = str_param(params, "customer")
        if customer:
            items = [g for g in items if g["customer"] == customer]
        return list_page(items, params, "/v1/billing/credit_grants")

    def void_credit_grant(self, request: ApiRequest) -> Json:
        grant = self._credit_grant(request.args["id"])
        if grant["voided_at"] is not None:
            raise invalid("id", "This credit grant has already been voided.")
        now = int(self.now())
        return self._update(
            grant, {"voided_at": now, "updated": now}, "billing.credit_grant.updated", request
        )

    def expire_credit_grant(self, request: ApiRequest) -> Json:
        grant = self._credit_grant(request.args["id"])
        now = int(self.now())
        if grant["expires_at"] is not None and grant["expires_at"] <= now:
            raise invalid("id", "This credit grant has already expired.")
        return self._update(
            grant, {"expires_at": now, "updated": now}, "billing.credit_grant.updated", request
        )

    def credit_balance_summary(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, frozenset({"customer", "filter"}))
        customer = str_param(params, "customer", required=True)
        if customer not in self.customers:
            raise no_such("customer", customer, "customer")
        if "filter" not in params:
            raise missing("filter")
        wanted = obj_param(params, "filter")
        kind = wanted.get("type")
        now = self.now()
        grants = [
            g
            for g in self.credit_grants.values()
            if g["customer"] == customer and self._grant_usable(g, now)
        ]
        if kind == "credit_grant":
            ident = wanted.get("credit_grant")
            if not ident:
                raise missing("filter[credit_grant]")
            grants = [g for g in grants if g["id"] == ident]
        elif kind == "applicability_scope":
            scope = wanted.get("applicability_scope")
            if not isinstance(scope, dict):
                raise missing("filter[applicability_scope]")
            if scope.get("price_type") == "metered":
                grants = [g for g in grants if g["applicability_config"]["scope"]["price_type"]]
            else:
                ids = {p.get("id") for p in scope.get("prices") or [] if isinstance(p, dict)}
                grants = [
                    g
                    for g in grants
                    if {p["id"] for p in g["applicability_config"]["scope"]["prices"] or []} & ids
                ]
        else:
            raise invalid(
                "filter[type]", "Invalid filter[type]: must be applicability_scope or credit_grant."
            )
        totals: dict[str, int] = {}
        for grant in grants:
            currency = grant["amount"]["monetary"]["currency"]
            totals[currency] = totals.get(currency, 0) + self._grant_balance[grant["id"]]
        balances = [
            {
                "available_balance": _monetary(currency, value),
                "ledger_balance": _monetary(currency, value),
            }
            for currency, value in sorted(totals.items())
        ]
        return {
            "object": "billing.credit_balance_summary",
            "balances": balances,
            "customer": customer,
            "customer_account": None,
            "livemode": False,
        }

    def _apply_credits(self, invoice: Json) -> None:
        """Billing credits, at finalization, on meter-backed lines only: grants by priority,
        then soonest expiry, promotional before paid, oldest first."""
        now = self.now()
        grants = [
            g
            for g in self.credit_grants.values()
            if g["customer"] == invoice["customer"]
            and g["amount"]["monetary"]["currency"] == invoice["currency"]
            and self._grant_usable(g, now)
        ]
        grants.sort(
            key=lambda g: (
                g["priority"],
                g["expires_at"] is None,
                g["expires_at"] or 0,
                g["category"] != "promotional",
                g["created"],
            )
        )
        for line in invoice["lines"]["data"]:
            price = self.prices[line["pricing"]["price_details"]["price"]]
            remaining = line["amount"]
            applied: list[Json] = []
            for grant in grants:
                if remaining <= 0:
                    break
                if not _grant_applies(grant, price):
                    continue
                take = min(remaining, self._grant_balance[grant["id"]])
                if take <= 0:
                    continue
                self._grant_balance[grant["id"]] -= take
                remaining -= take
                applied.append(
                    {
                        "amount": take,
                        "credit_balance_transaction": self._new_id("cbtxn", 24),
                        "discount": None,
                        "type": "credit_balance_transaction",
                    }
                )
            line["pretax_credit_amounts"] = applied
        invoice_totals(invoice)

    def _grant_usable(self, grant: Json, now: float) -> bool:
        return (
            grant["voided_at"] is None
            and self._grant_balance.get(grant["id"], 0) > 0
            and (grant["effective_at"] or 0) <= now
            and (grant["expires_at"] is None or grant["expires_at"] > now)
        )


def _grant_applies(grant: Json, price: Json) -> bool:
    scope = grant["applicability_config"]["scope"]
    if scope["price_type"] == "metered":
        recurring = price["recurring"]
        return bool(recurring and recurring["usage_type"] == "metered")
    return any(p["id"] == price["id"] for p in scope["prices"] or ())


def _monetary(currency: str, value: int) -> Json:
    return {"monetary": {"currency": currency, "value": value}, "type": "monetary"}
