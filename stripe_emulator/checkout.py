"""Checkout Sessions (setup mode) and the SetupIntents they make.

``POST /v1/checkout/sessions`` (``mode=setup`` only), ``GET /v1/checkout/sessions/{id}``,
``POST /v1/checkout/sessions/{id}/expire``; ``GET /v1/setup_intents/{id}``.

- Checkout Sessions: ``mode=setup`` only; ``currency`` required unless
  ``allowed_payment_method_types``; ``customer`` excludes ``customer_creation`` and
  ``customer_email``; ``expires_at`` 30 minutes to 24 hours ahead (default 24 hours; they then
  expire with ``checkout.session.expired``). Completing one (a test hook, or visiting its
  ``url``) creates a customer only if none was given and ``customer_creation=always`` (setup
  mode creates none otherwise), a succeeded SetupIntent with a new payment method, and sets
  ``status=complete``, ``payment_status=no_payment_required``. The payment method is attached to
  the customer but not made its invoice default (CO-3, CO-4).
"""

from __future__ import annotations

import copy

from stripe_emulator.errors import EmulatedError, Json, card_error, invalid, no_such, one_of
from stripe_emulator.params import (
    ApiRequest,
    currency_param,
    int_param,
    metadata_param,
    obj_param,
    only_keys,
    only_params,
    str_list_param,
    str_param,
)
from stripe_emulator.payment_methods import TEST_CARDS
from stripe_emulator.records import DAY
from stripe_emulator.shapes import CHECKOUT_SESSION_SHAPE, SETUP_INTENT_SHAPE
from stripe_emulator.state import EmulatorState

CHECKOUT_LIFETIME_SECONDS = DAY

_CHECKOUT_FIELDS = frozenset(
    {
        "allowed_payment_method_types",
        "cancel_url",
        "client_reference_id",
        "currency",
        "customer",
        "customer_creation",
        "customer_email",
        "expires_at",
        "metadata",
        "mode",
        "setup_intent_data",
        "success_url",
    }
)


class CheckoutMixin(EmulatorState):
    """Setup-mode Checkout Sessions; tests complete them."""

    def create_checkout_session(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _CHECKOUT_FIELDS)
        mode = str_param(params, "mode", required=True)
        if mode != "setup":
            raise invalid(
                "mode",
                f"The Stripe emulator supports only mode=setup Checkout Sessions, got '{mode}'.",
            )
        customer = str_param(params, "customer")
        creation = str_param(params, "customer_creation")
        email = str_param(params, "customer_email", max_length=800)
        if customer and creation:
            raise one_of("customer", "customer_creation")
        if customer and email:
            raise one_of("customer", "customer_email")
        if customer and customer not in self.customers:
            raise no_such("customer", customer, "customer")
        if creation and creation not in ("always", "if_required"):
            raise invalid(
                "customer_creation",
                f"Invalid customer_creation: must be always or if_required, got '{creation}'.",
            )
        methods = str_list_param(params, "allowed_payment_method_types")
        currency = currency_param(params, "currency")
        if not currency and not methods:
            raise EmulatedError(
                400,
                "Missing required param: currency. In `setup` mode it is required when "
                "`allowed_payment_method_types` is not set.",
                param="currency",
                code="parameter_missing",
            )
        now = int(self.now())
        expires_at = int_param(params, "expires_at")
        if expires_at is None:
            expires_at = now + CHECKOUT_LIFETIME_SECONDS
        elif not now + 1800 <= expires_at <= now + CHECKOUT_LIFETIME_SECONDS:
            raise invalid(
                "expires_at",
                "The `expires_at` timestamp must be between 30 minutes and 24 hours from now.",
            )
        setup_data = obj_param(params, "setup_intent_data")
        only_keys(setup_data, frozenset({"description", "metadata"}), "setup_intent_data")
        setup_metadata = metadata_param(setup_data) or {}
        session = copy.deepcopy(CHECKOUT_SESSION_SHAPE)
        session_id = "cs_test_" + self._random_chars(58)
        session.update(
            id=session_id,
            cancel_url=str_param(params, "cancel_url") or None,
            client_reference_id=str_param(params, "client_reference_id", max_length=200) or None,
            created=now,
            currency=currency or None,
            customer=customer or None,
            customer_creation=creation or None,
            customer_email=email or None,
            expires_at=expires_at,
            metadata=metadata_param(params) or {},
            payment_method_types=methods or ["card"],
            success_url=str_param(params, "success_url") or None,
            url=(
                f"{self.base_url}/_emulator/checkout/{session_id}"
                if self.base_url
                else f"https://checkout.stripe.com/c/pay/{session_id}"
            ),
        )
        self.checkout_sessions[session_id] = session
        self._setup_data[session_id] = {
            "description": str_param(setup_data, "description") or None,
            "metadata": setup_metadata,
        }
        self._reschedule()
        return session

    def retrieve_checkout_session(self, request: ApiRequest) -> Json:
        return self._checkout_session(request.args["id"])

    def expire_checkout_session(self, request: ApiRequest) -> Json:
        session = self._checkout_session(request.args["id"])
        if session["status"] != "open":
            raise invalid(
                "session", "Only Checkout Sessions with a status of `open` can be expired."
            )
        return self._expire_session(session, request)

    def _expire_session(self, session: Json, request: ApiRequest | None = None) -> Json:
        session.update(status="expired", url=None)
        self._reschedule()
        self._emit("checkout.session.expired", session, request)
        return session

    def complete_checkout(
        self,
        session_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        payment_method: str = "pm_card_visa",
    ) -> Json:
        """What a customer finishing the hosted page does: for a setup session, a customer is
        created if ``customer_creation=always`` and none was given (Stripe creates none for
        ``if_required`` in setup mode), a SetupIntent succeeds with a new payment method made
        from the test token `payment_method` and attached to the customer (CO-1, CO-3; the
        customer's invoice default is left as it was, CO-4), and the session becomes
        ``complete``. A card of the decline family cannot be set up (402 ``card_error``, PM-3)
        and the session stays open. Emits ``customer.created`` (when created),
        ``payment_method.attached``, ``setup_intent.created``, ``setup_intent.succeeded``,
        ``checkout.session.completed``."""
        session = self._checkout_session(session_id)
        if session["status"] != "open":
            raise invalid(
                "session", f"Checkout Session {session_id} is {session['status']}, not open."
            )
        if payment_method not in TEST_CARDS:
            raise invalid("payment_method", f"Not a test payment method: {payment_method!r}.")
        card = TEST_CARDS[payment_method]
        if card.attach_decline is not None:
            raise card_error(*card.attach_decline)
        customer_id = session["customer"]
        if customer_id is None and session["customer_creation"] == "always":
            fields: Json = {"email": email or session["customer_email"] or "customer@example.com"}
            if name:
                fields["name"] = name
            customer = self.add_customer(**fields)
            customer_id = customer["id"]
            self._emit("customer.created", customer)
        known = self.customers.get(customer_id) if customer_id else None
        email = email or (known or {}).get("email") or session["customer_email"]
        pm = self.payment_method_for(payment_method, "payment_method")
        if customer_id:
            self.attach(pm, customer_id)
        now = int(self.now())
        setup = copy.deepcopy(SETUP_INTENT_SHAPE)
        setup_id = self._new_id("seti", 24)
        setup.update(self._setup_data.get(session_id, {}))
        setup.update(
            id=setup_id,
            client_secret=f"{setup_id}_secret_{self._random_chars(32)}",
            created=now,
            customer=customer_id,
            latest_attempt=self._new_id("setatt", 24),
            payment_method=pm["id"],
            payment_method_types=list(session["payment_method_types"]),
        )
        self.setup_intents[setup_id] = setup
        self._emit("setup_intent.created", setup)
        self._emit("setup_intent.succeeded", setup)
        session.update(
            status="complete",
            customer=customer_id,
            setup_intent=setup_id,
            url=None,
            customer_details={
                "address": None,
                "business_name": None,
                "email": email,
                "individual_name": None,
                "name": name or (known or {}).get("name"),
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
        )
        self._reschedule()
        self._emit("checkout.session.completed", session)
        return session

    def retrieve_setup_intent(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        setup = self.setup_intents.get(ident)
        if setup is None:
            raise no_such("setupintent", ident, "intent", status=404)
        return setup
