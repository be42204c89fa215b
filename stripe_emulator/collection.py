"""Collecting subscription invoices: payment attempts, retries, and what they do to the
subscription.

``POST /v1/invoices/{id}/pay`` (``payment_method``, ``off_session``).

- A finalized ``charge_automatically`` subscription invoice is paid at once: with nothing to
  pay it is ``paid`` without a charge; otherwise the subscription's ``default_payment_method``,
  else the customer's ``invoice_settings.default_payment_method`` is charged (SUB-14), and with
  neither the attempt fails. A success sends ``invoice.paid`` and ``invoice.payment_succeeded``;
  a failure ``invoice.payment_failed`` (SUB-20), the invoice stays ``open`` with
  ``attempted``, ``attempt_count`` and ``next_payment_attempt``.
- The first invoice (``subscription_create``) decides the new subscription's status through
  ``payment_behavior`` (``subscriptions``). An ``incomplete`` subscription whose first invoice
  is not paid within 23 hours becomes ``incomplete_expired`` and the invoice is voided (SUB-4);
  paid in time (``POST /v1/invoices/{id}/pay``) it becomes ``active`` (SUB-3).
- A renewal that cannot be paid makes the subscription ``past_due`` (SUB-6) and is retried on
  the account's schedule (:attr:`payment_retry_days`, days between attempts; a project choice:
  Stripe's schedule is a setting, SUB-17). When the retries are used up the subscription
  becomes :attr:`failed_subscription`, ``canceled`` (``customer.subscription.deleted``) or
  ``unpaid`` (SUB-6; which one is an account setting). A payment that succeeds makes a
  ``past_due`` or ``unpaid`` subscription ``active`` again. Invoices of an ``unpaid``
  subscription are not attempted (SUB-7).
- Each status change sends ``customer.subscription.updated`` with ``previous_attributes``
  (SUB-20, SUB-21).

Rule ids are rows of ``docs/reference/stripe-behaviour.md``. Both settings are changed with
:meth:`CollectionMixin.set_collection` or ``POST /_emulator/billing``.
"""

from __future__ import annotations

from stripe_emulator.errors import Json, card_error, invalid
from stripe_emulator.invoices import invoice_subscription
from stripe_emulator.params import ApiRequest, bool_param, only_params, str_param
from stripe_emulator.records import DAY, SubscriptionState
from stripe_emulator.state import EmulatorState

INCOMPLETE_SECONDS = 23 * 3600  # SUB-4
DEFAULT_RETRY_DAYS: tuple[float, ...] = (3.0, 5.0, 7.0)
FAILED_SUBSCRIPTION_STATUSES = ("canceled", "unpaid")
_RECOVERABLE = frozenset({"incomplete", "past_due", "unpaid"})


class CollectionMixin(EmulatorState):
    """Payment attempts on subscription invoices, their retries, and incomplete expiry."""

    payment_retry_days: tuple[float, ...]
    failed_subscription: str
    _payment_due: dict[str, float]  # open invoice id -> its next automatic attempt
    _incomplete_until: dict[str, int]  # incomplete subscription id -> when it expires

    def reset(self) -> None:
        super().reset()
        self.payment_retry_days = DEFAULT_RETRY_DAYS
        self.failed_subscription = "canceled"
        self._payment_due = {}
        self._incomplete_until = {}

    def set_collection(
        self,
        *,
        payment_retry_days: list[float] | tuple[float, ...] | None = None,
        failed_subscription: str | None = None,
    ) -> Json:
        """Change the retry schedule (days between attempts) or what a subscription becomes
        when retries are used up (``canceled`` or ``unpaid``)."""
        if payment_retry_days is not None:
            days = tuple(float(d) for d in payment_retry_days)
            if any(not d > 0 for d in days):
                raise ValueError("payment_retry_days must all be positive")
            self.payment_retry_days = days
        if failed_subscription is not None:
            if failed_subscription not in FAILED_SUBSCRIPTION_STATUSES:
                raise ValueError("failed_subscription must be canceled or unpaid")
            self.failed_subscription = failed_subscription
        return self.collection_settings()

    def collection_settings(self) -> Json:
        return {
            "payment_retry_days": list(self.payment_retry_days),
            "failed_subscription": self.failed_subscription,
        }

    # -- the API ------------------------------------------------------------------------

    def pay_invoice_request(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, frozenset({"payment_method", "off_session"}))
        bool_param(params, "off_session")
        invoice = self._invoice(request.args["id"])
        if invoice["status"] == "draft":
            self.finalize_invoice(invoice["id"], request, collect=False)
        if invoice["status"] != "open":
            raise invalid("invoice", f"Invoice is already {invoice['status']}.")
        ref = str_param(params, "payment_method")
        pm = (
            self.customer_payment_method(ref, invoice["customer"], "payment_method")
            if ref
            else None
        )
        decline = self.collect(invoice, request, payment_method=pm, automatic=False)
        if decline is not None:
            raise card_error(*decline)
        return invoice

    # -- payment attempts -----------------------------------------------------------------

    def charge_method(self, sub: Json | None, customer_id: str) -> str | None:
        """The payment method an invoice is charged with (SUB-14)."""
        if sub is not None and sub.get("default_payment_method"):
            return str(sub["default_payment_method"])
        customer = self.customers.get(customer_id) or {}
        default = (customer.get("invoice_settings") or {}).get("default_payment_method")
        return str(default) if default else None

    def collect(
        self,
        invoice: Json,
        request: ApiRequest | None = None,
        *,
        payment_method: str | None = None,
        automatic: bool = True,
    ) -> tuple[str, str] | None:
        """One payment attempt on an open invoice: None when paid, else (code, decline code).
        The subscription's status follows (see the module docstring)."""
        state = self._invoice_state(invoice)
        sub = state.obj if state else None
        if int(invoice["amount_remaining"]) <= 0:
            self._paid(invoice, state, request)
            return None
        pm = payment_method or self.charge_method(sub, invoice["customer"])
        decline = self.charge_decline(pm)
        if automatic or not invoice["attempted"]:
            # manual attempts after the first do not count toward the retry schedule
            invoice["attempt_count"] = int(invoice["attempt_count"]) + 1
        invoice["attempted"] = True
        if decline is None:
            self._paid(invoice, state, request)
            return None
        if automatic and invoice["billing_reason"] != "subscription_create":
            self._schedule_retry(invoice)
        self._emit("invoice.payment_failed", invoice, request)
        if (
            state is None
            or not state.active  # ended: its status stays as it is
            or not automatic
            or invoice["billing_reason"] == "subscription_create"
        ):
            return decline
        if invoice["next_payment_attempt"] is None:  # retries used up (SUB-6)
            self._retries_exhausted(state, request)
        elif sub is not None and sub["status"] in ("active", "trialing"):
            self._set_status(state, "past_due", request)
        return decline

    def _schedule_retry(self, invoice: Json) -> None:
        done = int(invoice["attempt_count"])  # attempts so far, the first included
        if done <= len(self.payment_retry_days):
            when = self.now() + self.payment_retry_days[done - 1] * DAY
            self._payment_due[invoice["id"]] = when
            invoice["next_payment_attempt"] = int(when)
        else:
            self._payment_due.pop(invoice["id"], None)
            invoice["next_payment_attempt"] = None
        self._reschedule()

    def _paid(
        self, invoice: Json, state: SubscriptionState | None, request: ApiRequest | None
    ) -> None:
        now = int(self.now())
        paid = int(invoice["amount_remaining"])
        invoice.update(
            status="paid",
            amount_paid=int(invoice["amount_paid"]) + max(0, paid),
            amount_remaining=0,
            next_payment_attempt=None,
        )
        invoice["status_transitions"]["paid_at"] = now
        self._payment_due.pop(invoice["id"], None)
        self._reschedule()
        self._emit("invoice.paid", invoice, request)
        self._emit("invoice.payment_succeeded", invoice, request)
        if state is not None and state.obj["status"] in _RECOVERABLE:
            self._incomplete_until.pop(state.obj["id"], None)
            self._set_status(state, "active", request)

    def _retries_exhausted(self, state: SubscriptionState, request: ApiRequest | None) -> None:
        sub = state.obj
        if self.failed_subscription == "unpaid":
            self._set_status(state, "unpaid", request)
            return
        now = int(self.now())
        sub.update(status="canceled", canceled_at=now, ended_at=now)
        sub["cancellation_details"] = {
            "comment": None,
            "feedback": None,
            "reason": "payment_failed",
        }
        self._reschedule()
        self._emit("customer.subscription.deleted", sub, request)

    def _set_status(
        self, state: SubscriptionState, status: str, request: ApiRequest | None
    ) -> None:
        changes: Json = {"status": status}
        if status == "incomplete_expired":
            changes["ended_at"] = int(self.now())
        self._update(state.obj, changes, "customer.subscription.updated", request)
        self._reschedule()

    def _invoice_state(self, invoice: Json) -> SubscriptionState | None:
        sub_id = invoice_subscription(invoice)
        return self.subscriptions.get(sub_id) if sub_id else None

    # -- what falls due -------------------------------------------------------------------

    def _collection_due(self) -> list[float]:
        return [*self._payment_due.values(), *self._incomplete_until.values()]

    def _run_collection(self, now: float) -> None:
        """Retries and expiries that are due, oldest first."""
        due: list[tuple[float, str, str]] = [
            (when, "retry", ident) for ident, when in self._payment_due.items() if when <= now
        ]
        due += [
            (when, "expire", ident) for ident, when in self._incomplete_until.items() if when <= now
        ]
        for _, kind, ident in sorted(due):
            if kind == "retry":
                del self._payment_due[ident]
                invoice = self.invoices[ident]
                state = self._invoice_state(invoice)
                if invoice["status"] == "open" and (
                    state is None or (state.cycling and state.obj["status"] != "unpaid")
                ):
                    self.collect(invoice)
            else:
                del self._incomplete_until[ident]
                self._expire_incomplete(self.subscriptions[ident])

    def _expire_incomplete(self, state: SubscriptionState) -> None:
        """SUB-4: not paid within 23 hours: ``incomplete_expired``, the open invoice voided."""
        sub = state.obj
        if sub["status"] != "incomplete":
            return
        invoice = self.invoices.get(sub["latest_invoice"] or "")
        if invoice is not None and invoice["status"] == "open":
            invoice.update(status="void", next_payment_attempt=None)
            invoice["status_transitions"]["voided_at"] = int(self.now())
            self._emit("invoice.voided", invoice)
        self._set_status(state, "incomplete_expired", None)
