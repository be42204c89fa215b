"""The ASGI application: the ``/v1`` pipeline over the resources, and the test hooks.

Each ``/v1`` request is authenticated, routed, parsed (form-encoded bodies exactly as the SDK
sends them, ``a[b][c]=v`` and ``items[0][price]=p``; query strings on GET), rate-limited,
delayed (``latency_ms``), then run synchronously, hence atomically, by its resource's handler.
Every reply carries ``Request-Id``. Stripe's rules applied here, to every endpoint:

- ``Authorization: Bearer sk_...`` (or ``rk_...``; or Basic with the key as user name, as
  ``curl -u sk_test_...:`` sends) on every ``/v1`` call, else 401.
- Unknown parameters are refused (``parameter_unknown``), as Stripe does.
- One concurrent call per customer per meter: a meter event that arrives while another for the
  same (event name, customer) is still being processed gets 429 ``lock_timeout``. Processing
  is atomic, so this can only happen while an injected latency is holding the first one.
- Idempotency keys (every POST), following Stripe's v1 rules: the first response is saved once
  the endpoint has begun executing, that is every 2xx and every injected fault that happens
  *after* the write (``fail_after_write_rate``, and the 200 behind a dropped connection), and is
  replayed (status and body, headers ``Idempotent-Replayed: true`` and ``Original-Request``) for
  the same key, endpoint and parameters. Nothing is saved for requests that failed validation
  (4xx), were rate-limited (429) or hit an injected pre-write 500, so those are safe to retry.
  The same key with other parameters or another endpoint gets 400 ``idempotency_error``. Keys
  are forgotten after 24 hours (emulator clock).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from stripe_emulator import hooks
from stripe_emulator.catalog import CatalogMixin
from stripe_emulator.checkout import CheckoutMixin
from stripe_emulator.clocks import ClocksMixin
from stripe_emulator.collection import CollectionMixin
from stripe_emulator.credit_grants import CreditGrantsMixin
from stripe_emulator.credit_notes import CreditNotesMixin
from stripe_emulator.customers import CustomersMixin
from stripe_emulator.errors import (
    MESSAGE_LOCK_TIMEOUT,
    MESSAGE_NO_API_KEY,
    MESSAGE_RATE_LIMIT,
    MESSAGE_UNKNOWN_ERROR,
    EmulatedError,
    Json,
)
from stripe_emulator.invoices import InvoicesMixin
from stripe_emulator.meters import MetersMixin
from stripe_emulator.params import ApiRequest, parse_form
from stripe_emulator.payment_methods import PaymentMethodsMixin
from stripe_emulator.previews import PreviewsMixin
from stripe_emulator.records import Reply, SavedResponse, error_reply, json_reply
from stripe_emulator.state import EmulatorState
from stripe_emulator.subscriptions import SubscriptionsMixin
from stripe_emulator.thin_events import ThinEventsMixin
from stripe_emulator.webhooks import EventsMixin

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_IDEMPOTENCY_KEY_LENGTH = 255

# set while a reply is cut short on purpose (a drop fault), so the server does not log it
DROPPING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stripe_emulator_dropping", default=False
)


class StripeEmulator(
    CustomersMixin,
    PaymentMethodsMixin,
    MetersMixin,
    CatalogMixin,
    SubscriptionsMixin,
    InvoicesMixin,
    CollectionMixin,
    PreviewsMixin,
    CreditGrantsMixin,
    CreditNotesMixin,
    CheckoutMixin,
    ClocksMixin,
    EventsMixin,
    ThinEventsMixin,
    EmulatorState,
):
    """The emulated Stripe account: its objects, its memory windows, its clock and its faults.

    ``app`` is the ASGI application. Everything else is for tests: :meth:`advance` the clock,
    :meth:`set_faults`, read :meth:`state`, :meth:`reset`, seed objects with
    :meth:`add_customer` / :meth:`add_meter` / :meth:`add_webhook_endpoint`, read
    :meth:`meter_total`; billing: :meth:`complete_checkout`, :meth:`close_period`,
    :meth:`finalize_invoice`; webhooks: :meth:`set_webhooks`, :meth:`release_webhooks`,
    :meth:`redeliver`, :meth:`wait_for_webhooks` and the :attr:`deliveries` log.

    Each resource's endpoints come from its mixin, all over
    :class:`~stripe_emulator.state.EmulatorState`; this class adds the request pipeline.
    """

    # -- ASGI ---------------------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        method: str = scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        if path.startswith("/_emulator/"):
            reply = await hooks.handle(self, method, path, query, body)
        else:
            reply = await self._api(method, path, query, headers, body)
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
        )
        if reply.drop:
            # headers promised a body that never comes; returning closes the connection
            DROPPING.set(True)
            await send({"type": "http.response.body", "body": reply.body[:1], "more_body": True})
            return
        await send({"type": "http.response.body", "body": reply.body})

    # -- the API pipeline ---------------------------------------------------------------------

    async def _api(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> Reply:
        self.counters.requests += 1
        self._note_request(time.monotonic())
        request_id = "req_" + self._random_chars(14)
        try:
            _authenticate(headers.get("authorization"))
            route, args = _route(method, path)
            params = _params(method, path, query, body)
            if not self._take_token():
                self.counters.rate_limited += 1
                raise EmulatedError(
                    429, MESSAGE_RATE_LIMIT, code="rate_limit", headers=[("Retry-After", "1")]
                )
        except EmulatedError as exc:
            return error_reply(exc, request_id)
        request = ApiRequest(method, path, params, headers, args, request_id)
        if not route.meter_event and self._due_at <= self.now():
            self._run_due()  # periods that ended, drafts due to finalize, sessions expired
        lane = self._lane(route, params)
        if lane is not None:
            if lane in self._in_flight:
                self.counters.lock_timeouts += 1
                return error_reply(
                    EmulatedError(429, MESSAGE_LOCK_TIMEOUT, code="lock_timeout"), request_id
                )
            self._in_flight.add(lane)
        try:
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            reply = self._execute(route, request, request_id)
        finally:
            if lane is not None:
                self._in_flight.discard(lane)
        if route.meter_event and 200 <= reply.status < 300 and self._draw_drop():
            self.counters.dropped_connections += 1
            reply.drop = True
        return reply

    def _execute(self, route: Route, request: ApiRequest, request_id: str) -> Reply:
        """Everything after the pre-processing faults; synchronous, hence atomic."""
        if request.method != "POST":
            try:
                return json_reply(200, route.handler(self, request), request_id)
            except EmulatedError as exc:
                return error_reply(exc, request_id)
        if self.faults.fail_next or (
            self.faults.fail_rate and self._rng.random() < self.faults.fail_rate
        ):
            self.faults.fail_next = max(0, self.faults.fail_next - 1)
            self.counters.injected_failures += 1
            return error_reply(
                EmulatedError(500, MESSAGE_UNKNOWN_ERROR, type="api_error"), request_id
            )
        key = request.headers.get("idempotency-key")
        try:
            if key is not None:
                replay = self._replay(key, request, request_id)
                if replay is not None:
                    return replay
            obj = route.handler(self, request)
        except EmulatedError as exc:
            return error_reply(exc, request_id)  # validation failed: nothing saved
        reply = json_reply(200, obj, request_id)
        if (
            route.meter_event
            and self.faults.fail_after_write_rate
            and self._rng.random() < self.faults.fail_after_write_rate
        ):
            self.counters.failures_after_write += 1
            reply = error_reply(
                EmulatedError(500, MESSAGE_UNKNOWN_ERROR, type="api_error"), request_id
            )
        if key is not None:
            reply.headers.append((b"idempotency-key", key.encode("latin-1")))
            self._idempotency[key] = SavedResponse(
                request.method, request.path, request.params, reply, request_id, self.now()
            )
        return reply

    def _replay(self, key: str, request: ApiRequest, request_id: str) -> Reply | None:
        if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise EmulatedError(
                400,
                f"Idempotency keys can be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
                type="idempotency_error",
            )
        self._forget_expired()
        saved = self._idempotency.get(key)
        if saved is None:
            return None
        if (saved.method, saved.path) != (request.method, request.path):
            self.counters.idempotency_errors += 1
            raise EmulatedError(
                400,
                "Keys for idempotent requests can only be used for the same endpoint they were "
                f"first used for ('{saved.method} {saved.path}' vs '{request.method} "
                f"{request.path}'). Try using a key other than '{key}' if you meant to execute "
                "a different request.",
                type="idempotency_error",
            )
        if saved.params != request.params:
            self.counters.idempotency_errors += 1
            raise EmulatedError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                type="idempotency_error",
            )
        self.counters.idempotent_replays += 1
        original = saved.reply
        headers = [h for h in original.headers if h[0] != b"request-id"]
        headers += [
            (b"request-id", request_id.encode()),
            (b"original-request", saved.request_id.encode()),
            (b"idempotent-replayed", b"true"),
        ]
        return Reply(original.status, original.body, headers)

    def _lane(self, route: Route, params: Json) -> tuple[str, str] | None:
        if not route.meter_event or not self.faults.latency_ms:
            return None
        event_name = params.get("event_name")
        meter = self._meters_by_event.get(event_name) if isinstance(event_name, str) else None
        payload = params.get("payload")
        if meter is None or not isinstance(payload, dict):
            return None
        customer = payload.get(meter.customer_key)
        return (meter.event_name, customer) if isinstance(customer, str) else None


Handler = Callable[["StripeEmulator", ApiRequest], Json]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    meter_event: bool = False  # subject to lock_timeout, fail_after_write and drops

    def compile(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/billing/meter_events", StripeEmulator.create_meter_event, meter_event=True),
    Route(
        "POST", "/v1/billing/meter_event_adjustments", StripeEmulator.create_meter_event_adjustment
    ),
    Route("GET", "/v1/billing/meters/{id}/event_summaries", StripeEmulator.list_event_summaries),
    Route("POST", "/v1/billing/meters", StripeEmulator.create_meter),
    Route("GET", "/v1/billing/meters", StripeEmulator.list_meters),
    Route("GET", "/v1/billing/meters/{id}", StripeEmulator.retrieve_meter),
    Route("POST", "/v1/billing/meters/{id}/deactivate", StripeEmulator.deactivate_meter),
    Route("POST", "/v1/billing/meters/{id}/reactivate", StripeEmulator.reactivate_meter),
    Route("POST", "/v1/customers", StripeEmulator.create_customer),
    Route("GET", "/v1/customers", StripeEmulator.list_customers),
    Route("GET", "/v1/customers/{id}", StripeEmulator.retrieve_customer),
    Route("POST", "/v1/customers/{id}", StripeEmulator.update_customer),
    Route("GET", "/v1/payment_methods", StripeEmulator.list_payment_methods),
    Route("GET", "/v1/payment_methods/{id}", StripeEmulator.retrieve_payment_method),
    Route("POST", "/v1/payment_methods/{id}/attach", StripeEmulator.attach_payment_method),
    Route("POST", "/v1/payment_methods/{id}/detach", StripeEmulator.detach_payment_method),
    Route("POST", "/v1/products", StripeEmulator.create_product),
    Route("GET", "/v1/products", StripeEmulator.list_products),
    Route("GET", "/v1/products/{id}", StripeEmulator.retrieve_product),
    Route("POST", "/v1/products/{id}", StripeEmulator.update_product),
    Route("POST", "/v1/prices", StripeEmulator.create_price),
    Route("GET", "/v1/prices", StripeEmulator.list_prices),
    Route("GET", "/v1/prices/{id}", StripeEmulator.retrieve_price),
    Route("POST", "/v1/prices/{id}", StripeEmulator.update_price),
    Route("POST", "/v1/subscriptions", StripeEmulator.create_subscription),
    Route("GET", "/v1/subscriptions", StripeEmulator.list_subscriptions),
    Route("GET", "/v1/subscriptions/{id}", StripeEmulator.retrieve_subscription),
    Route("DELETE", "/v1/subscriptions/{id}", StripeEmulator.cancel_subscription),
    Route("GET", "/v1/invoices", StripeEmulator.list_invoices),
    Route("GET", "/v1/invoices/{id}", StripeEmulator.retrieve_invoice),
    Route("POST", "/v1/invoices/{id}/finalize", StripeEmulator.finalize_invoice_request),
    Route("POST", "/v1/invoices/create_preview", StripeEmulator.create_invoice_preview),
    Route("POST", "/v1/invoices/{id}/pay", StripeEmulator.pay_invoice_request),
    Route("GET", "/v1/invoices/{id}/lines", StripeEmulator.list_invoice_lines),
    Route("POST", "/v1/credit_notes", StripeEmulator.create_credit_note),
    Route("GET", "/v1/credit_notes", StripeEmulator.list_credit_notes),
    Route("GET", "/v1/credit_notes/preview", StripeEmulator.preview_credit_note),
    Route("GET", "/v1/credit_notes/{id}", StripeEmulator.retrieve_credit_note),
    Route("POST", "/v1/billing/credit_grants", StripeEmulator.create_credit_grant),
    Route("GET", "/v1/billing/credit_grants", StripeEmulator.list_credit_grants),
    Route("GET", "/v1/billing/credit_grants/{id}", StripeEmulator.retrieve_credit_grant),
    Route("POST", "/v1/billing/credit_grants/{id}/void", StripeEmulator.void_credit_grant),
    Route("POST", "/v1/billing/credit_grants/{id}/expire", StripeEmulator.expire_credit_grant),
    Route("GET", "/v1/billing/credit_balance_summary", StripeEmulator.credit_balance_summary),
    Route("POST", "/v1/checkout/sessions", StripeEmulator.create_checkout_session),
    Route("GET", "/v1/checkout/sessions/{id}", StripeEmulator.retrieve_checkout_session),
    Route("POST", "/v1/checkout/sessions/{id}/expire", StripeEmulator.expire_checkout_session),
    Route("GET", "/v1/setup_intents/{id}", StripeEmulator.retrieve_setup_intent),
    Route("POST", "/v1/webhook_endpoints", StripeEmulator.create_webhook_endpoint),
    Route("GET", "/v1/webhook_endpoints", StripeEmulator.list_webhook_endpoints),
    Route("GET", "/v1/webhook_endpoints/{id}", StripeEmulator.retrieve_webhook_endpoint),
    Route("POST", "/v1/webhook_endpoints/{id}", StripeEmulator.update_webhook_endpoint),
    Route("DELETE", "/v1/webhook_endpoints/{id}", StripeEmulator.delete_webhook_endpoint),
    Route("POST", "/v1/test_helpers/test_clocks", StripeEmulator.create_test_clock),
    Route("GET", "/v1/test_helpers/test_clocks/{id}", StripeEmulator.retrieve_test_clock),
    Route("POST", "/v1/test_helpers/test_clocks/{id}/advance", StripeEmulator.advance_test_clock),
    Route("GET", "/v1/events", StripeEmulator.list_events),
    Route("GET", "/v1/events/{id}", StripeEmulator.retrieve_event),
    Route("POST", "/v2/core/event_destinations", StripeEmulator.create_event_destination),
    Route("GET", "/v2/core/event_destinations", StripeEmulator.list_event_destinations),
    Route("GET", "/v2/core/event_destinations/{id}", StripeEmulator.retrieve_event_destination),
    Route("GET", "/v2/core/events", StripeEmulator.list_v2_events),
    Route("GET", "/v2/core/events/{id}", StripeEmulator.retrieve_v2_event),
)

_EXACT: dict[tuple[str, str], Route] = {
    (r.method, r.pattern): r for r in ROUTES if "{" not in r.pattern
}
_PATTERNS: list[tuple[Route, re.Pattern[str]]] = [
    (r, r.compile()) for r in ROUTES if "{" in r.pattern
]


def _route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    route = _EXACT.get((method, path))
    if route is not None:
        return route, {}
    for candidate, pattern in _PATTERNS:
        if candidate.method == method:
            match = pattern.match(path)
            if match:
                return candidate, match.groupdict()
    raise EmulatedError(
        404,
        f"Unrecognized request URL ({method}: {path}). The Stripe emulator supports only the "
        "endpoints the control plane uses.",
    )


def _params(method: str, path: str, query: str, body: bytes) -> Json:
    """The request's parameters: v2 POSTs carry JSON, v1 POSTs Stripe's form encoding, GETs
    a query string."""
    if method == "POST" and path.startswith("/v2/"):
        try:
            decoded = msgspec.json.decode(body) if body.strip() else {}
        except msgspec.DecodeError:
            raise EmulatedError(400, "The request body is not valid JSON.") from None
        if not isinstance(decoded, dict):
            raise EmulatedError(400, "The request body must be a JSON object.")
        return decoded
    return parse_form(body.decode("utf-8", "replace") if method == "POST" else query)


def _authenticate(authorization: str | None) -> None:
    if not authorization:
        raise EmulatedError(401, MESSAGE_NO_API_KEY)
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() == "basic":  # curl -u sk_test_...: (the key as the user name)
        with contextlib.suppress(ValueError):
            key = base64.b64decode(key, validate=True).decode("latin-1").partition(":")[0]
        scheme = "bearer"
    if scheme.lower() != "bearer" or not key.startswith(("sk_", "rk_")):
        raise EmulatedError(401, f"Invalid API Key provided: {_mask(key)}")


def _mask(key: str) -> str:
    """Stripe's way of naming a key in an error: never the whole key."""
    if len(key) < 12:
        return "*" * len(key)
    prefix = key[: key.find("_", 3) + 1] if key.count("_") >= 2 else key[:3]
    return prefix + "*" * (len(key) - len(prefix) - 4) + key[-4:]


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
