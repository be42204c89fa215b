"""Payment methods: Stripe's test cards, attaching them to customers, and charging them.

``GET /v1/payment_methods/{id}``, ``GET /v1/payment_methods`` (``customer``),
``POST /v1/payment_methods/{id}/attach`` (``customer``), ``POST /v1/payment_methods/{id}/detach``.

- A test token (``pm_card_visa``...) used where a payment method is expected makes a new
  ``pm_...`` card from it, as Stripe does (docs.stripe.com/testing, PM-1). By default a payment
  method is not attached to any customer (PM-1).
- The decline family (``pm_card_visa_chargeDeclined`` and the others in PM-2) cannot be
  attached to a customer: attaching answers 402 ``card_error`` with the card's code and
  decline code (PM-3, PM-5).
- ``pm_card_chargeCustomerFail`` attaches, but every charge to it fails with ``card_declined``
  (PM-4).
- Charging an invoice uses the subscription's ``default_payment_method``, else the customer's
  ``invoice_settings.default_payment_method`` (SUB-14); with neither, the payment fails.

Rule ids (PM-n, SUB-n) are rows of ``docs/reference/stripe-behaviour.md``.
"""

from __future__ import annotations

import copy
import dataclasses

from stripe_emulator.errors import Json, card_error, invalid, no_such
from stripe_emulator.params import LIST_FIELDS, ApiRequest, list_page, only_params, str_param
from stripe_emulator.state import EmulatorState


@dataclasses.dataclass(frozen=True, slots=True)
class TestCard:
    """One of Stripe's test payment methods: its card, and what happens when it is used."""

    brand: str
    last4: str
    attach_decline: tuple[str, str] | None = None  # (code, decline_code): attaching fails
    charge_decline: tuple[str, str] | None = None  # attaching works, charges fail


_DECLINED = ("card_declined", "generic_decline")

# docs.stripe.com/testing: "Cards by brand" (PM-1) and "Declined payments" (PM-2, PM-4)
TEST_CARDS: dict[str, TestCard] = {
    "pm_card_visa": TestCard("visa", "4242"),
    "pm_card_visa_debit": TestCard("visa", "5556"),
    "pm_card_mastercard": TestCard("mastercard", "4444"),
    "pm_card_amex": TestCard("amex", "8431"),
    "pm_card_visa_chargeDeclined": TestCard("visa", "0002", attach_decline=_DECLINED),
    "pm_card_visa_chargeDeclinedInsufficientFunds": TestCard(
        "visa", "9995", attach_decline=("card_declined", "insufficient_funds")
    ),
    "pm_card_visa_chargeDeclinedLostCard": TestCard(
        "visa", "9987", attach_decline=("card_declined", "lost_card")
    ),
    "pm_card_visa_chargeDeclinedStolenCard": TestCard(
        "visa", "9979", attach_decline=("card_declined", "stolen_card")
    ),
    "pm_card_chargeDeclinedExpiredCard": TestCard(
        "visa", "0069", attach_decline=("expired_card", "expired_card")
    ),
    "pm_card_chargeDeclinedIncorrectCvc": TestCard(
        "visa", "0127", attach_decline=("incorrect_cvc", "incorrect_cvc")
    ),
    "pm_card_chargeDeclinedProcessingError": TestCard(
        "visa", "0119", attach_decline=("processing_error", "processing_error")
    ),
    "pm_card_visa_chargeDeclinedVelocityLimitExceeded": TestCard(
        "visa", "6975", attach_decline=("card_declined", "card_velocity_exceeded")
    ),
    "pm_card_chargeCustomerFail": TestCard("visa", "0341", charge_decline=_DECLINED),
}

_PAYMENT_METHOD_SHAPE: Json = {
    "id": "pm_",
    "object": "payment_method",
    "allow_redisplay": "unspecified",
    "billing_details": {"address": None, "email": None, "name": None, "phone": None},
    "card": None,
    "created": 0,
    "customer": None,
    "customer_account": None,
    "livemode": False,
    "metadata": {},
    "type": "card",
}


class PaymentMethodsMixin(EmulatorState):
    """Card payment methods made from Stripe's test tokens."""

    payment_methods: dict[str, Json]
    _cards: dict[str, TestCard]  # payment method id -> the test card it was made from

    def reset(self) -> None:
        super().reset()
        self.payment_methods = {}
        self._cards = {}

    # -- the API ------------------------------------------------------------------------

    def retrieve_payment_method(self, request: ApiRequest) -> Json:
        return self._payment_method(request.args["id"])

    def list_payment_methods(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"customer", "type"})
        customer = str_param(params, "customer")
        items = list(reversed(self.payment_methods.values()))
        if customer:
            items = [pm for pm in items if pm["customer"] == customer]
        return list_page(items, params, "/v1/payment_methods")

    def attach_payment_method(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, frozenset({"customer"}))
        customer = str_param(params, "customer", required=True)
        if customer not in self.customers:
            raise no_such("customer", customer, "customer")
        pm = self.payment_method_for(request.args["id"], "payment_method")
        return self.attach(pm, customer, request)

    def detach_payment_method(self, request: ApiRequest) -> Json:
        only_params(request.params, frozenset())
        pm = self._payment_method(request.args["id"])
        if pm["customer"] is None:
            raise invalid(
                "payment_method",
                f"The payment method you provided is not attached to a customer ({pm['id']}).",
            )
        customer = self.customers.get(pm["customer"])
        if customer and customer["invoice_settings"]["default_payment_method"] == pm["id"]:
            customer["invoice_settings"]["default_payment_method"] = None
        pm["customer"] = None
        self._emit("payment_method.detached", pm, request)
        return pm

    # -- for the other resources ----------------------------------------------------------

    def payment_method_for(self, ref: str, param: str) -> Json:
        """The payment method `ref` names: an existing ``pm_...``, or a new one made from a
        test token (each use of a token makes a new one, as on Stripe)."""
        known = self.payment_methods.get(ref)
        if known is not None:
            return known
        card = TEST_CARDS.get(ref)
        if card is None:
            raise no_such("PaymentMethod", ref, param)
        pm = copy.deepcopy(_PAYMENT_METHOD_SHAPE)
        pm.update(
            id=self._new_id("pm", 24),
            created=int(self.now()),
            card={
                "brand": card.brand,
                "country": "US",
                "exp_month": 12,
                "exp_year": 2034,
                "fingerprint": self._random_chars(16),
                "funding": "credit",
                "last4": card.last4,
            },
        )
        self.payment_methods[pm["id"]] = pm
        self._cards[pm["id"]] = card
        return pm

    def attach(self, pm: Json, customer: str, request: ApiRequest | None = None) -> Json:
        """Attach `pm` to `customer`; a card of the decline family is refused (PM-3)."""
        card = self._cards[pm["id"]]
        if card.attach_decline is not None:
            code, decline = card.attach_decline
            raise card_error(code, decline)
        if pm["customer"] not in (None, customer):
            raise invalid(
                "payment_method",
                "The payment method you provided has already been attached to a customer.",
            )
        if pm["customer"] is None:
            pm["customer"] = customer
            self._emit("payment_method.attached", pm, request)
        return pm

    def customer_payment_method(self, ref: str, customer: str, param: str) -> str:
        """`ref` as a payment method of `customer` (a test token is made and attached first,
        as Stripe accepts them in these parameters); else 400 naming `param` (CO-5)."""
        pm = self.payment_method_for(ref, param)
        if ref in TEST_CARDS:
            self.attach(pm, customer)
        if pm["customer"] != customer:
            raise invalid(
                param,
                f"The customer does not have a payment method with the ID {pm['id']}. The "
                "payment method must be attached to the customer.",
            )
        return str(pm["id"])

    def charge_decline(self, pm_id: str | None) -> tuple[str, str] | None:
        """What charging `pm_id` gives: None when it succeeds, else (code, decline code)."""
        if pm_id is None:
            return ("no_payment_method", "no_payment_method")
        card = self._cards.get(pm_id)
        if card is None:
            return _DECLINED
        return card.charge_decline or card.attach_decline

    def _payment_method(self, ident: str) -> Json:
        pm = self.payment_methods.get(ident)
        if pm is None:
            raise no_such("payment_method", ident, "payment_method", status=404)
        return pm
