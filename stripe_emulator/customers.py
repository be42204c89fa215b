"""Customers: ``POST /v1/customers``, ``GET /v1/customers/{id}``, ``GET /v1/customers``
(``email``)."""

from __future__ import annotations

import copy
from typing import Any

from stripe_emulator.errors import Json, no_such
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    list_page,
    obj_param,
    only_params,
    str_param,
)
from stripe_emulator.shapes import CUSTOMER_SHAPE
from stripe_emulator.state import EmulatorState

_CUSTOMER_FIELDS = frozenset(
    {"email", "name", "description", "phone", "metadata", "address", "shipping"}
)


class CustomersMixin(EmulatorState):
    """Customers, created over the API or directly by tests."""

    def add_customer(self, id: str | None = None, **fields: Any) -> Json:
        """Create a customer directly (no HTTP), optionally with a chosen id."""
        customer = copy.deepcopy(CUSTOMER_SHAPE)
        customer.update(
            id=id or self._new_id("cus", 14),
            created=int(self.now()),
            invoice_prefix="".join(self._ids.choices("0123456789ABCDEF", k=8)),
        )
        customer.update(fields)
        self.customers[customer["id"]] = customer
        return customer

    def create_customer(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _CUSTOMER_FIELDS)
        fields: Json = {}
        for name in ("email", "name", "description", "phone"):
            value = str_param(params, name, max_length=512)
            if value:
                fields[name] = value
        metadata = obj_param(params, "metadata")
        if metadata:
            fields["metadata"] = metadata
        customer = self.add_customer(**fields)
        self._emit("customer.created", customer, request)
        return customer

    def retrieve_customer(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        customer = self.customers.get(ident)
        if customer is None:
            raise no_such("customer", ident, "id", status=404)
        return customer

    def list_customers(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"email"})
        items = list(reversed(self.customers.values()))  # newest first, as Stripe lists
        email = str_param(params, "email")
        if email:
            items = [c for c in items if c.get("email") == email]
        return list_page(items, params, "/v1/customers")
