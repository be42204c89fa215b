"""Customers: ``POST /v1/customers``, ``POST /v1/customers/{id}`` (update),
``GET /v1/customers/{id}``, ``GET /v1/customers`` (``email``).

``payment_method`` (create) attaches a payment method; ``invoice_settings[
default_payment_method]`` (create, update) sets the one invoices are charged with (SUB-14,
CO-4). It must be attached to the customer; a test token is made and attached first
(``payment_methods``). An update that changes something sends ``customer.updated`` with
``previous_attributes``.
"""

from __future__ import annotations

import copy
from typing import Any

from stripe_emulator.errors import Json, no_such
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    list_page,
    metadata_param,
    obj_param,
    only_keys,
    only_params,
    str_param,
)
from stripe_emulator.shapes import CUSTOMER_SHAPE
from stripe_emulator.state import EmulatorState

_CUSTOMER_FIELDS = frozenset(
    {"email", "name", "description", "phone", "metadata", "address", "shipping"}
)
_TEXT_FIELDS = ("email", "name", "description", "phone")


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
        only_params(params, _CUSTOMER_FIELDS | {"payment_method", "invoice_settings"})
        fields: Json = {}
        for name in _TEXT_FIELDS:
            value = str_param(params, name, max_length=512)
            if value:
                fields[name] = value
        metadata = obj_param(params, "metadata")
        if metadata:
            fields["metadata"] = metadata
        settings = obj_param(params, "invoice_settings")
        only_keys(settings, frozenset({"default_payment_method"}), "invoice_settings")
        attach = str_param(params, "payment_method")
        default = str_param(settings, "default_payment_method")
        if attach:
            self.payment_method_for(attach, "payment_method")  # unknown: refused before creating
        if default and default != attach:
            self.payment_method_for(default, "invoice_settings[default_payment_method]")
        customer = self.add_customer(**fields)
        self._emit("customer.created", customer, request)
        if attach:
            attached = self.customer_payment_method(attach, customer["id"], "payment_method")
            if default == attach:  # the same test token names the one just attached
                default = attached
        if default:
            customer["invoice_settings"]["default_payment_method"] = self.customer_payment_method(
                default, customer["id"], "invoice_settings[default_payment_method]"
            )
        return customer

    def update_customer(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _CUSTOMER_FIELDS | {"invoice_settings"})
        customer = self._customer(request.args["id"])
        changes: Json = {}
        for name in _TEXT_FIELDS:
            if name in params:
                changes[name] = str_param(params, name, max_length=512) or None
        metadata = metadata_param(params, customer["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        if "invoice_settings" in params:
            settings = obj_param(params, "invoice_settings")
            only_keys(settings, frozenset({"default_payment_method"}), "invoice_settings")
            merged = dict(customer["invoice_settings"])
            if "default_payment_method" in settings:
                ref = str_param(settings, "default_payment_method")
                merged["default_payment_method"] = (
                    self.customer_payment_method(
                        ref, customer["id"], "invoice_settings[default_payment_method]"
                    )
                    if ref
                    else None
                )
            changes["invoice_settings"] = merged
        return self._update(customer, changes, "customer.updated", request)

    def retrieve_customer(self, request: ApiRequest) -> Json:
        return self._customer(request.args["id"])

    def list_customers(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"email"})
        items = list(reversed(self.customers.values()))  # newest first, as Stripe lists
        email = str_param(params, "email")
        if email:
            items = [c for c in items if c.get("email") == email]
        return list_page(items, params, "/v1/customers")

    def _customer(self, ident: str) -> Json:
        customer = self.customers.get(ident)
        if customer is None:
            raise no_such("customer", ident, "id", status=404)
        return customer
