"""A stateful Stripe emulator: a test double of Stripe for the endpoints the control plane uses.

It is an ASGI app, served by a small built-in HTTP/1.1 server, that the real ``stripe`` SDK
talks to over HTTP::

    client = stripe.StripeClient("sk_test_x", base_addresses={"api": "http://127.0.0.1:12111"})

Run it with ``controlplane stripe-emulator --port 12111`` (see :func:`run`), or in-process from a
test with ``async with serve_emulator(StripeEmulator()) as url: ...``.

Emulated endpoints (form-encoded bodies exactly as the SDK sends them, ``a[b][c]=v`` and
``items[0][price]=p``; query strings on GET):

- ``POST /v1/customers``, ``GET /v1/customers/{id}``, ``GET /v1/customers``
- ``POST /v1/billing/meters``, ``GET /v1/billing/meters``, ``GET /v1/billing/meters/{id}``,
  ``POST /v1/billing/meters/{id}/deactivate`` and ``/reactivate``
- ``POST /v1/billing/meter_events``
- ``POST /v1/billing/meter_event_adjustments`` (``type=cancel``)
- ``GET /v1/billing/meters/{id}/event_summaries``

Stripe rules it enforces:

- ``Authorization: Bearer sk_...`` (or ``rk_...``) on every ``/v1`` call, else 401.
- Unknown parameters are refused (``parameter_unknown``), as Stripe does.
- A meter's ``event_name`` is unique among meters; formula ``sum``, ``count`` or ``last``.
- Meter events: ``event_name`` must name an active meter; the payload must carry the meter's
  customer key naming an existing customer and (except for ``count`` meters) its value key;
  the value is a whole number (an integer string, may be negative, at most 15 digits);
  ``timestamp`` within the past 35 days and at most 5 minutes ahead of the emulator clock;
  ``identifier`` (generated when absent, at most 100 characters) unique for 24 hours: a second
  event with it gets HTTP 400 ``An event already exists with identifier {id}.`` with header
  ``Stripe-Should-Retry: false``. After 24 hours (emulator clock) the identifier is forgotten
  and an event reusing it is accepted and counted again, which is the hazard the control
  plane's ledger guards against. Real Stripe reports some of these (unknown meter or customer)
  asynchronously through error reports; the emulator answers them synchronously with 400, using
  the codes of Stripe's error-report enum (``no_meter``, ``meter_event_customer_not_found``...).
- One concurrent call per customer per meter: a meter event that arrives while another for the
  same (event name, customer) is still being processed gets 429 ``lock_timeout``. Processing
  is atomic, so this can only happen while an injected latency is holding the first one.
- Adjustments cancel an event by identifier only within 24 hours of the emulator receiving it;
  a cancelled event no longer counts in summaries.
- Summaries aggregate non-cancelled events with timestamp in ``[start_time, end_time)`` for one
  customer by the meter's formula; both bounds must be minute-aligned (hour- or day-aligned with
  ``value_grouping_window``). Unlike Stripe, they are immediately consistent.
- Idempotency keys (every POST), following Stripe's v1 rules: the first response is saved once
  the endpoint has begun executing, that is every 2xx and every injected fault that happens
  *after* the write (``fail_after_write_rate``, and the 200 behind a dropped connection), and is
  replayed (status and body, headers ``Idempotent-Replayed: true`` and ``Original-Request``) for
  the same key, endpoint and parameters. Nothing is saved for requests that failed validation
  (4xx), were rate-limited (429) or hit an injected pre-write 500, so those are safe to retry.
  The same key with other parameters or another endpoint gets 400 ``idempotency_error``. Keys
  are forgotten after 24 hours (emulator clock).

Faults, set at construction or at run time (:meth:`StripeEmulator.set_faults`,
``POST /_emulator/faults``), drawn from one seedable ``random.Random``:

- ``rate_limit``: requests per second across all callers, a token bucket holding one second's
  worth (Stripe's limiters are token buckets); beyond it 429 ``rate_limit`` with
  ``Retry-After: 1`` and nothing applied.
- ``fail_rate`` / ``fail_next``: fraction of POSTs (or the next N POSTs) answered 500
  ``api_error`` with nothing applied.
- ``fail_after_write_rate``: fraction of new meter events that are applied and then answered 500
  (saved under the idempotency key, as Stripe does).
- ``drop_rate`` / ``drop_next``: fraction of successful meter-event responses (or the next N),
  fresh or replayed, whose connection is cut after the headers: the client sees a connection
  error although a fresh write was applied.
- ``latency_ms``: sleep before processing each ``/v1`` request.

Test hooks, without auth: ``GET /_emulator/state`` (counters, see :meth:`StripeEmulator.state`;
``?identifiers=1`` adds every identifier's acceptance count), ``POST /_emulator/clock``
(``{"advance": seconds}``), ``POST /_emulator/faults``, ``POST /_emulator/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import math
import random
import re
import socket
import string
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec
import structlog

__all__ = [
    "DEFAULT_PORT",
    "EmulatorServer",
    "Faults",
    "StripeEmulator",
    "main",
    "parse_form",
    "run",
    "serve_emulator",
    "serve_emulator_in_thread",
]

DEFAULT_PORT = 12111  # the port stripe-mock uses, so tools pointed at it find this one
DAY = 86_400
IDENTIFIER_MEMORY_SECONDS = DAY
IDEMPOTENCY_KEY_SECONDS = DAY
CANCEL_WINDOW_SECONDS = DAY
MAX_PAST_SECONDS = 35 * DAY
MAX_FUTURE_SECONDS = 300
MAX_IDENTIFIER_LENGTH = 100
MAX_EVENT_NAME_LENGTH = 100
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_VALUE_DIGITS = 15

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Json = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Response shapes, from Stripe's published OpenAPI fixtures (stripe/openapi fixtures3.json, MIT)

CUSTOMER_SHAPE: Json = {
    "id": "cus_",
    "object": "customer",
    "address": None,
    "balance": 0,
    "created": 0,
    "currency": None,
    "default_source": None,
    "delinquent": False,
    "description": None,
    "discount": None,
    "email": None,
    "invoice_prefix": "",
    "invoice_settings": {
        "custom_fields": None,
        "default_payment_method": None,
        "footer": None,
        "rendering_options": None,
    },
    "livemode": False,
    "metadata": {},
    "name": None,
    "next_invoice_sequence": 1,
    "phone": None,
    "preferred_locales": [],
    "shipping": None,
    "tax_exempt": "none",
    "test_clock": None,
}

METER_SHAPE: Json = {
    "id": "mtr_",
    "object": "billing.meter",
    "created": 0,
    "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
    "default_aggregation": {"formula": "sum"},
    "display_name": "",
    "event_name": "",
    "event_time_window": None,
    "livemode": False,
    "status": "active",
    "status_transitions": {"deactivated_at": None},
    "updated": 0,
    "value_settings": {"event_payload_key": "value"},
}

MESSAGE_UNKNOWN_ERROR = (
    "Sorry, something went wrong on our end (injected by the Stripe emulator). "
    "Please retry the request."
)
MESSAGE_RATE_LIMIT = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
MESSAGE_LOCK_TIMEOUT = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request. If you see "
    "this error frequently and are making multiple concurrent requests to a single object, make "
    "your requests serially or at a lower rate."
)
MESSAGE_NO_API_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
)

_ID_ALPHABET = string.ascii_letters + string.digits

log = structlog.get_logger("stripe_emulator")


class EmulatedError(Exception):
    """A Stripe error response: status, error type, message, and optional param/code/headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # Stripe's own field name
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = tuple(headers)

    def body(self) -> Json:
        error: Json = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}


def _missing(param: str) -> EmulatedError:
    return EmulatedError(
        400, f"Missing required param: {param}.", param=param, code="parameter_missing"
    )


def _invalid(param: str, message: str, code: str = "parameter_invalid") -> EmulatedError:
    return EmulatedError(400, message, param=param, code=code)


def _no_such(kind: str, ident: str, param: str, status: int = 400) -> EmulatedError:
    return EmulatedError(status, f"No such {kind}: '{ident}'", param=param, code="resource_missing")


# ---------------------------------------------------------------------------------------------
# Request parsing

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def parse_form(raw: str) -> Json:
    """Decode Stripe's form encoding (``a[b][c]=v``, ``items[0][price]=p``, ``a[]=v``).

    Values stay strings, as on the wire; objects whose keys are all indexes become lists.
    """
    root: Json = {}
    nested = False
    for key, value in parse_qsl(raw, keep_blank_values=True):
        bracket = key.find("[")
        if bracket <= 0:
            root[key] = value
            continue
        nested = True
        parts = [key[:bracket], *_BRACKETS.findall(key[bracket:])]
        node: Json = root
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            name = part if part else str(len(node))
            if last:
                node[name] = value
                break
            child = node.get(name)
            if not isinstance(child, dict):
                if child is not None:
                    raise _invalid(key, f"Invalid parameter: {key} mixes a value and an object.")
                child = {}
                node[name] = child
            node = child
    return _listify(root) if nested else root


def _listify(node: Json) -> Json:
    for key, value in node.items():
        if isinstance(value, dict):
            value = _listify(value)
            if value and all(k.isdigit() for k in value):
                node[key] = [value[k] for k in sorted(value, key=int)]
            else:
                node[key] = value
    return node


@dataclasses.dataclass(slots=True)
class ApiRequest:
    """One parsed ``/v1`` request, as the handlers see it."""

    method: str
    path: str
    params: Json
    headers: dict[str, str]
    args: dict[str, str]  # path parameters, e.g. {"id": "mtr_..."}


def _string(params: Json, name: str, *, required: bool = False, max_length: int = 5000) -> str:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _missing(name)
        return ""
    if not isinstance(value, str):
        raise _invalid(name, f"Invalid string: {name} must be a string.")
    if len(value) > max_length:
        raise _invalid(
            name, f"Invalid string: {name} must be at most {max_length} characters long."
        )
    return value


def _integer(params: Json, name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value):
        raise _invalid(name, f"Invalid integer: {value}", code="parameter_invalid_integer")
    return int(value)


def _only(params: Json, allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed and name != "expand":
            raise EmulatedError(
                400, f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
            )


def _object(params: Json, name: str) -> Json:
    value = params.get(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise _invalid(name, f"Invalid object: {name} must be an object.")
    return value


# ---------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass(slots=True)
class Faults:
    """Injected faults; see the module docstring for what each one does."""

    rate_limit: float | None = None
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    latency_ms: float = 0.0
    fail_after_write_rate: float = 0.0
    fail_next: int = 0
    drop_next: int = 0

    def check(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive (or null for none)")
        for name in ("fail_rate", "drop_rate", "fail_after_write_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.latency_ms < 0 or self.fail_next < 0 or self.drop_next < 0:
            raise ValueError("latency_ms, fail_next and drop_next must not be negative")


@dataclasses.dataclass(slots=True)
class Meter:
    obj: Json
    id: str
    event_name: str
    customer_key: str
    value_key: str
    formula: str

    @property
    def active(self) -> bool:
        return bool(self.obj["status"] == "active")


@dataclasses.dataclass(slots=True)
class AcceptedEvent:
    identifier: str
    meter_id: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    received_at: float
    cancelled: bool = False


@dataclasses.dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    drop: bool = False


@dataclasses.dataclass(slots=True)
class SavedResponse:
    method: str
    path: str
    params: Json
    reply: Reply
    request_id: str
    saved_at: float


@dataclasses.dataclass(slots=True)
class Counters:
    requests: int = 0
    meter_events_accepted: int = 0
    meter_events_cancelled: int = 0
    duplicate_identifier_rejections: int = 0
    idempotent_replays: int = 0
    idempotency_errors: int = 0
    rate_limited: int = 0
    lock_timeouts: int = 0
    injected_failures: int = 0
    failures_after_write: int = 0
    dropped_connections: int = 0
    accepted_again_within_memory: int = 0  # must stay 0: Stripe's own guarantee


Handler = Callable[["StripeEmulator", ApiRequest], Json]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    meter_event: bool = False  # subject to lock_timeout, fail_after_write and drops

    def compile(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


class StripeEmulator:
    """The emulated Stripe account: its objects, its memory windows, its clock and its faults.

    ``app`` is the ASGI application. Everything else is for tests: :meth:`advance` the clock,
    :meth:`set_faults`, read :meth:`state`, :meth:`reset`, seed objects with
    :meth:`add_customer` / :meth:`add_meter`, read :meth:`meter_total`.
    """

    def __init__(
        self,
        *,
        rate_limit: float | None = None,
        fail_rate: float = 0.0,
        drop_rate: float = 0.0,
        latency_ms: float = 0.0,
        fail_after_write_rate: float = 0.0,
        seed: int | None = None,
        log_events: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._initial_faults = Faults(
            rate_limit=rate_limit,
            fail_rate=fail_rate,
            drop_rate=drop_rate,
            latency_ms=latency_ms,
            fail_after_write_rate=fail_after_write_rate,
        )
        self._initial_faults.check()
        self._seed = seed
        self._clock = clock
        self.log_events = log_events
        self.base_url: str | None = None  # set while served by serve_emulator*
        self.reset()

    # -- lifecycle and test hooks -----------------------------------------------------------

    def reset(self) -> None:
        """Forget every object, counter and memory; restore the construction-time faults."""
        self.faults = dataclasses.replace(self._initial_faults)
        self._rng = random.Random(self._seed)
        self._ids = random.Random(None if self._seed is None else self._seed + 1)
        self._offset = 0.0
        self.customers: dict[str, Json] = {}
        self.meters: dict[str, Meter] = {}
        self._meters_by_event: dict[str, Meter] = {}
        self.events: dict[tuple[str, str], list[AcceptedEvent]] = {}  # (meter id, customer)
        self._identifiers: dict[str, AcceptedEvent] = {}  # remembered ones, oldest first
        self._idempotency: dict[str, SavedResponse] = {}  # oldest first
        self._acceptances: dict[str, int] = {}  # identifier -> times accepted, ever
        self._last_accepted: dict[str, float] = {}  # identifier -> emulator time
        self._in_flight: set[tuple[str, str]] = set()
        self.counters = Counters()
        self._tokens = self.faults.rate_limit or 0.0
        self._tokens_at = time.monotonic()
        self._window: deque[float] = deque()
        self._max_per_second = 0

    def now(self) -> float:
        """The emulator clock: real time plus the offset tests advance."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> float:
        """Move the emulator clock forward; returns the new time."""
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        self._offset += seconds
        return self.now()

    def set_faults(self, **changes: Any) -> Faults:
        """Change some faults (the fields of :class:`Faults`); returns the new settings."""
        known = {f.name for f in dataclasses.fields(Faults)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}; known: {sorted(known)}")
        faults = dataclasses.replace(self.faults, **changes)
        if faults.rate_limit == 0:
            faults.rate_limit = None
        faults.check()
        if faults.rate_limit != self.faults.rate_limit:
            self._tokens = faults.rate_limit or 0.0
            self._tokens_at = time.monotonic()
        self.faults = faults
        return faults

    def state(self, *, identifiers: bool = False) -> Json:
        """Counters for assertions (``GET /_emulator/state``).

        ``accepted_again_within_memory`` counts identifiers accepted twice inside their 24 h
        window (always 0: that is Stripe's guarantee); ``identifiers_accepted_more_than_once``
        counts those accepted again after being forgotten (double counting at the provider).
        """
        reaccepted = {k: n for k, n in self._acceptances.items() if n > 1}
        state: Json = dataclasses.asdict(self.counters)
        state.update(
            now=self.now(),
            clock_offset=self._offset,
            customers=len(self.customers),
            meters=len(self.meters),
            max_requests_per_second=self._max_per_second,
            identifiers_remembered=len(self._identifiers),
            identifiers_accepted_more_than_once=len(reaccepted),
            reaccepted_identifiers=reaccepted,
            faults=dataclasses.asdict(self.faults),
        )
        if identifiers:
            state["accepted_by_identifier"] = dict(self._acceptances)
        return state

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

    def add_meter(
        self,
        event_name: str,
        *,
        display_name: str | None = None,
        formula: str = "sum",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        id: str | None = None,
    ) -> Json:
        """Create a meter directly (no HTTP); same rules as ``POST /v1/billing/meters``."""
        if event_name in self._meters_by_event:
            raise EmulatedError(
                400,
                f"A meter with event_name '{event_name}' already exists. An event name can "
                "only be used by one meter.",
                param="event_name",
            )
        if formula not in ("sum", "count", "last"):
            raise _invalid(
                "default_aggregation[formula]",
                f"Invalid default_aggregation[formula]: must be one of sum, count or last, "
                f"got '{formula}'.",
            )
        now = int(self.now())
        obj = copy.deepcopy(METER_SHAPE)
        obj.update(
            id=id or self._new_id("mtr", 24),
            created=now,
            updated=now,
            display_name=display_name or event_name,
            event_name=event_name,
            customer_mapping={"event_payload_key": customer_key, "type": "by_id"},
            default_aggregation={"formula": formula},
            value_settings={"event_payload_key": value_key},
        )
        meter = Meter(obj, obj["id"], event_name, customer_key, value_key, formula)
        self.meters[meter.id] = meter
        self._meters_by_event[event_name] = meter
        return obj

    def meter_total(self, meter: str, customer: str, start: int, end: int) -> int:
        """Aggregated value of `customer`'s non-cancelled events in [start, end) (meter id or
        event name), by the meter's formula."""
        found = self.meters.get(meter) or self._meters_by_event.get(meter)
        if found is None:
            raise KeyError(meter)
        return self._aggregate(found, customer, start, end)

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
            reply = self._hook(method, path, query, body)
        else:
            reply = await self._api(method, path, query, headers, body)
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
        )
        if reply.drop:
            # headers promised a body that never comes; returning closes the connection
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
            params = parse_form(body.decode("utf-8", "replace") if method == "POST" else query)
            if not self._take_token():
                self.counters.rate_limited += 1
                raise EmulatedError(
                    429, MESSAGE_RATE_LIMIT, code="rate_limit", headers=[("Retry-After", "1")]
                )
        except EmulatedError as exc:
            return _error_reply(exc, request_id)
        request = ApiRequest(method, path, params, headers, args)
        lane = self._lane(route, params)
        if lane is not None:
            if lane in self._in_flight:
                self.counters.lock_timeouts += 1
                return _error_reply(
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
                return _json_reply(200, route.handler(self, request), request_id)
            except EmulatedError as exc:
                return _error_reply(exc, request_id)
        if self.faults.fail_next or (
            self.faults.fail_rate and self._rng.random() < self.faults.fail_rate
        ):
            self.faults.fail_next = max(0, self.faults.fail_next - 1)
            self.counters.injected_failures += 1
            return _error_reply(
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
            return _error_reply(exc, request_id)  # validation failed: nothing saved
        reply = _json_reply(200, obj, request_id)
        if (
            route.meter_event
            and self.faults.fail_after_write_rate
            and self._rng.random() < self.faults.fail_after_write_rate
        ):
            self.counters.failures_after_write += 1
            reply = _error_reply(
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

    # -- resources ----------------------------------------------------------------------------

    def create_customer(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _CUSTOMER_FIELDS)
        fields: Json = {}
        for name in ("email", "name", "description", "phone"):
            value = _string(params, name, max_length=512)
            if value:
                fields[name] = value
        metadata = _object(params, "metadata")
        if metadata:
            fields["metadata"] = metadata
        return self.add_customer(**fields)

    def retrieve_customer(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        customer = self.customers.get(ident)
        if customer is None:
            raise _no_such("customer", ident, "id", status=404)
        return customer

    def list_customers(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"email"})
        items = list(reversed(self.customers.values()))  # newest first, as Stripe lists
        email = _string(params, "email")
        if email:
            items = [c for c in items if c.get("email") == email]
        return _page(items, params, "/v1/customers")

    def create_meter(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _METER_FIELDS)
        display_name = _string(params, "display_name", required=True, max_length=250)
        event_name = _string(params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH)
        aggregation = _object(params, "default_aggregation")
        formula = aggregation.get("formula")
        if not formula:
            raise _missing("default_aggregation[formula]")
        mapping = _object(params, "customer_mapping")
        values = _object(params, "value_settings")
        return self.add_meter(
            event_name,
            display_name=display_name,
            formula=str(formula),
            customer_key=str(mapping.get("event_payload_key") or "stripe_customer_id"),
            value_key=str(values.get("event_payload_key") or "value"),
        )

    def retrieve_meter(self, request: ApiRequest) -> Json:
        return self._meter(request.args["id"]).obj

    def list_meters(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _LIST_FIELDS | {"status"})
        items = [m.obj for m in reversed(self.meters.values())]
        status = _string(params, "status")
        if status:
            items = [m for m in items if m["status"] == status]
        return _page(items, params, "/v1/billing/meters")

    def deactivate_meter(self, request: ApiRequest) -> Json:
        meter = self._meter(request.args["id"])
        now = int(self.now())
        meter.obj.update(status="inactive", updated=now)
        meter.obj["status_transitions"] = {"deactivated_at": now}
        return meter.obj

    def reactivate_meter(self, request: ApiRequest) -> Json:
        meter = self._meter(request.args["id"])
        meter.obj.update(status="active", updated=int(self.now()))
        meter.obj["status_transitions"] = {"deactivated_at": None}
        return meter.obj

    def create_meter_event(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _METER_EVENT_FIELDS)
        event_name = _string(params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH)
        if "payload" not in params:
            raise _missing("payload")
        payload = _object(params, "payload")
        for key, value in payload.items():
            if not isinstance(value, str):
                raise _invalid(
                    f"payload[{key}]", f"Invalid payload: payload[{key}] must be a string."
                )
        meter = self._meters_by_event.get(event_name)
        if meter is None or not meter.active:
            raise EmulatedError(
                400,
                f"No active meter was found that matches the event name '{event_name}'.",
                param="event_name",
                code="no_meter",
            )
        now = self.now()
        customer = payload.get(meter.customer_key)
        if not customer:
            raise EmulatedError(
                400,
                f"The payload is missing the key '{meter.customer_key}' that this meter uses to "
                "map events to customers.",
                param=f"payload[{meter.customer_key}]",
                code="meter_event_no_customer_defined",
            )
        if customer not in self.customers:
            raise EmulatedError(
                400,
                f"No such customer: '{customer}'",
                param=f"payload[{meter.customer_key}]",
                code="meter_event_customer_not_found",
            )
        value = _event_value(meter, payload)
        timestamp = _integer(params, "timestamp")
        if timestamp is None:
            timestamp = int(now)
        _check_timestamp(timestamp, now)
        identifier = _string(params, "identifier", max_length=MAX_IDENTIFIER_LENGTH)
        if not identifier:
            identifier = self._new_id("evt", 24)
        self._forget_expired()
        if identifier in self._identifiers:
            self.counters.duplicate_identifier_rejections += 1
            raise EmulatedError(
                400,
                f"An event already exists with identifier {identifier}.",
                param="identifier",
                headers=[("Stripe-Should-Retry", "false")],
            )
        event = AcceptedEvent(
            identifier, meter.id, event_name, customer, value, timestamp, received_at=now
        )
        self._identifiers[identifier] = event
        self.events.setdefault((meter.id, customer), []).append(event)
        self.counters.meter_events_accepted += 1
        self._acceptances[identifier] = self._acceptances.get(identifier, 0) + 1
        previous = self._last_accepted.get(identifier)
        if previous is not None and now - previous < IDENTIFIER_MEMORY_SECONDS:
            self.counters.accepted_again_within_memory += 1  # an emulator bug if ever > 0
        self._last_accepted[identifier] = now
        if self.log_events:
            self._log_event(event)
        return {
            "object": "billing.meter_event",
            "created": int(now),
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": payload,
            "timestamp": timestamp,
        }

    def create_meter_event_adjustment(self, request: ApiRequest) -> Json:
        params = request.params
        _only(params, _ADJUSTMENT_FIELDS)
        event_name = _string(params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH)
        kind = _string(params, "type", required=True)
        if kind != "cancel":
            raise _invalid("type", f"Invalid type: must be cancel, got '{kind}'.")
        identifier = _object(params, "cancel").get("identifier")
        if not identifier:
            raise _missing("cancel[identifier]")
        if not isinstance(identifier, str):
            raise _invalid("cancel[identifier]", "Invalid string: cancel[identifier].")
        self._forget_expired()
        event = self._identifiers.get(identifier)
        if event is not None and self.now() - event.received_at >= CANCEL_WINDOW_SECONDS:
            event = None
        if event is None or event.event_name != event_name:
            if identifier in self._acceptances and event is None:
                message = (
                    f"The meter event with identifier {identifier} was received more than 24 "
                    "hours ago. Meter events can only be cancelled within 24 hours of Stripe "
                    "receiving them."
                )
            else:
                message = (
                    f"No meter event with identifier {identifier} was found for event name "
                    f"'{event_name}'."
                )
            raise _invalid("cancel[identifier]", message)
        if event.cancelled:
            raise _invalid(
                "cancel[identifier]",
                f"The meter event with identifier {identifier} has already been cancelled.",
            )
        event.cancelled = True
        self.counters.meter_events_cancelled += 1
        if self.log_events:
            print(f"[stripe-emulator] meter event cancelled  identifier={identifier}", flush=True)
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "complete",
            "type": "cancel",
        }

    def list_event_summaries(self, request: ApiRequest) -> Json:
        params = request.params
        _only(
            params, _LIST_FIELDS | {"customer", "start_time", "end_time", "value_grouping_window"}
        )
        meter = self._meter(request.args["id"])
        customer = _string(params, "customer", required=True)
        if customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        start = _integer(params, "start_time", required=True)
        end = _integer(params, "end_time", required=True)
        assert start is not None and end is not None
        window = _string(params, "value_grouping_window")
        step = {"": 60, "hour": 3600, "day": DAY}.get(window)
        if step is None:
            raise _invalid(
                "value_grouping_window",
                f"Invalid value_grouping_window: must be hour or day, got '{window}'.",
            )
        unit = {60: "minute", 3600: "hour", DAY: "UTC day"}[step]
        for name, value in (("start_time", start), ("end_time", end)):
            if value % step:
                raise _invalid(name, f"{name} must be aligned with {unit} boundaries.")
        if end <= start:
            raise _invalid("end_time", "end_time must be after start_time.")
        bounds = [(start, end)] if not window else [(s, s + step) for s in range(start, end, step)]
        items = [
            {
                "id": _summary_id(meter.id, customer, s, e),
                "object": "billing.meter_event_summary",
                "aggregated_value": self._aggregate(meter, customer, s, e),
                "end_time": e,
                "livemode": False,
                "meter": meter.id,
                "start_time": s,
            }
            for s, e in bounds
        ]
        return _page(items, params, f"/v1/billing/meters/{meter.id}/event_summaries")

    # -- helpers --------------------------------------------------------------------------------

    def _meter(self, ident: str) -> Meter:
        meter = self.meters.get(ident)
        if meter is None:
            raise _no_such("billing meter", ident, "id", status=404)
        return meter

    def _aggregate(self, meter: Meter, customer: str, start: int, end: int) -> int:
        events = [
            e
            for e in self.events.get((meter.id, customer), ())
            if not e.cancelled and start <= e.timestamp < end
        ]
        if meter.formula == "count":
            return len(events)
        if meter.formula == "last":
            return max(events, key=lambda e: (e.timestamp, e.received_at)).value if events else 0
        return sum(e.value for e in events)

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

    def _forget_expired(self) -> None:
        """Drop identifiers and idempotency keys older than Stripe remembers them."""
        now = self.now()
        identifiers = self._identifiers
        while identifiers:
            oldest = next(iter(identifiers))
            if now - identifiers[oldest].received_at < IDENTIFIER_MEMORY_SECONDS:
                break
            del identifiers[oldest]
        keys = self._idempotency
        while keys:
            oldest = next(iter(keys))
            if now - keys[oldest].saved_at < IDEMPOTENCY_KEY_SECONDS:
                break
            del keys[oldest]

    def _take_token(self) -> bool:
        rate = self.faults.rate_limit
        if rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _note_request(self, now: float) -> None:
        window = self._window
        window.append(now)
        while window[0] <= now - 1.0:
            window.popleft()
        if len(window) > self._max_per_second:
            self._max_per_second = len(window)

    def _draw_drop(self) -> bool:
        if self.faults.drop_next:
            self.faults.drop_next -= 1
            return True
        return bool(self.faults.drop_rate) and self._rng.random() < self.faults.drop_rate

    def _random_chars(self, n: int) -> str:
        return "".join(self._ids.choices(_ID_ALPHABET, k=n))

    def _new_id(self, prefix: str, n: int) -> str:
        return f"{prefix}_{self._random_chars(n)}"

    def _log_event(self, event: AcceptedEvent) -> None:
        when = datetime.fromtimestamp(event.timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        again = self._acceptances[event.identifier]
        note = f"  (accepted {again} times: identifier reused after 24 h)" if again > 1 else ""
        print(
            f"[stripe-emulator] meter event accepted  {event.event_name} "
            f"customer={event.customer} value={event.value} at={when} "
            f"identifier={event.identifier}{note}",
            flush=True,
        )

    # -- test hooks -----------------------------------------------------------------------------

    def _hook(self, method: str, path: str, query: str, body: bytes) -> Reply:
        try:
            data: Json = msgspec.json.decode(body) if body.strip() else {}
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            if (method, path) == ("GET", "/_emulator/state"):
                flags = dict(parse_qsl(query))
                wanted = flags.get("identifiers", "").lower() in ("1", "true", "yes")
                return _json_reply(200, self.state(identifiers=wanted), "")
            if (method, path) == ("POST", "/_emulator/clock"):
                self.advance(float(data.get("advance", 0)))
                return _json_reply(200, {"now": self.now(), "offset": self._offset}, "")
            if (method, path) == ("POST", "/_emulator/faults"):
                faults = self.set_faults(**data)
                return _json_reply(200, dataclasses.asdict(faults), "")
            if (method, path) == ("POST", "/_emulator/reset"):
                self.reset()
                return _json_reply(200, {"reset": True}, "")
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            return _json_reply(400, {"error": {"type": "emulator_error", "message": str(exc)}}, "")
        return _json_reply(
            404, {"error": {"type": "emulator_error", "message": f"no hook {method} {path}"}}, ""
        )


# ---------------------------------------------------------------------------------------------
# Routing table and per-endpoint parameter lists

_LIST_FIELDS = frozenset({"limit", "starting_after", "ending_before"})
_CUSTOMER_FIELDS = frozenset(
    {"email", "name", "description", "phone", "metadata", "address", "shipping"}
)
_METER_FIELDS = frozenset(
    {
        "display_name",
        "event_name",
        "default_aggregation",
        "customer_mapping",
        "value_settings",
        "event_time_window",
    }
)
_METER_EVENT_FIELDS = frozenset({"event_name", "payload", "identifier", "timestamp"})
_ADJUSTMENT_FIELDS = frozenset({"event_name", "type", "cancel"})

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


# ---------------------------------------------------------------------------------------------
# Pure helpers


def _authenticate(authorization: str | None) -> None:
    if not authorization:
        raise EmulatedError(401, MESSAGE_NO_API_KEY)
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key.startswith(("sk_", "rk_")):
        raise EmulatedError(401, f"Invalid API Key provided: {_mask(key)}")


def _mask(key: str) -> str:
    """Stripe's way of naming a key in an error: never the whole key."""
    if len(key) < 12:
        return "*" * len(key)
    prefix = key[: key.find("_", 3) + 1] if key.count("_") >= 2 else key[:3]
    return prefix + "*" * (len(key) - len(prefix) - 4) + key[-4:]


def _event_value(meter: Meter, payload: Json) -> int:
    raw = payload.get(meter.value_key)
    param = f"payload[{meter.value_key}]"
    if raw is None or raw == "":
        if meter.formula == "count":
            return 1
        raise EmulatedError(
            400,
            f"The payload is missing the key '{meter.value_key}' that holds this meter's value.",
            param=param,
            code="meter_event_invalid_value",
        )
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
        raise EmulatedError(
            400,
            f"Invalid value '{raw}' for {param}: meter event values must be whole numbers.",
            param=param,
            code="meter_event_invalid_value",
        )
    if len(raw.lstrip("-").lstrip("0")) > MAX_VALUE_DIGITS:
        raise EmulatedError(
            400,
            f"Invalid value for {param}: at most {MAX_VALUE_DIGITS} significant digits.",
            param=param,
            code="meter_event_value_too_many_digits",
        )
    return int(raw)


def _check_timestamp(timestamp: int, now: float) -> None:
    oldest = math.ceil(now) - MAX_PAST_SECONDS
    newest = int(now) + MAX_FUTURE_SECONDS
    if timestamp < oldest:
        raise EmulatedError(
            400,
            "The event timestamp cannot be more than 35 days in past. Expected a timestamp "
            f"greater than or equal to {oldest}.",
            param="timestamp",
            code="timestamp_too_far_in_past",
        )
    if timestamp > newest:
        raise EmulatedError(
            400,
            "The event timestamp cannot be more than 5 minutes in the future. Expected a "
            f"timestamp less than or equal to {newest}.",
            param="timestamp",
            code="timestamp_in_future",
        )


def _summary_id(meter: str, customer: str, start: int, end: int) -> str:
    digest = hashlib.blake2b(f"{meter}|{customer}|{start}|{end}".encode(), digest_size=12)
    return "mtrusg_" + digest.hexdigest()


def _page(items: list[Json], params: Json, url: str) -> Json:
    limit = _integer(params, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise _invalid("limit", "Invalid limit: must be between 1 and 100.")
    after = _string(params, "starting_after")
    before = _string(params, "ending_before")
    ids = [item["id"] for item in items]
    if after:
        if after not in ids:
            raise _invalid("starting_after", f"No such object: '{after}'", code="resource_missing")
        rest = items[ids.index(after) + 1 :]
        page, has_more = rest[:limit], len(rest) > limit
    elif before:
        if before not in ids:
            raise _invalid("ending_before", f"No such object: '{before}'", code="resource_missing")
        head = items[: ids.index(before)]
        page, has_more = head[-limit:], len(head) > limit
    else:
        page, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _json_reply(status: int, obj: Json, request_id: str) -> Reply:
    body = msgspec.json.encode(obj)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if request_id:
        headers.append((b"request-id", request_id.encode()))
    return Reply(status, body, headers)


def _error_reply(exc: EmulatedError, request_id: str) -> Reply:
    reply = _json_reply(exc.status, exc.body(), request_id)
    reply.headers.extend((k.lower().encode(), v.encode()) for k, v in exc.headers)
    return reply


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


# ---------------------------------------------------------------------------------------------
# Serving: a small HTTP/1.1 server for the ASGI app
#
# The app is plain ASGI and runs under uvicorn too (`uvicorn.run(StripeEmulator().app)`), but
# uvicorn without httptools parses HTTP with h11 in pure Python, which caps the emulator near
# 2,000 requests/s on a small machine. This server handles exactly what HTTP clients of Stripe
# send (Content-Length bodies, keep-alive, pipelining) and writes each response in one piece,
# which is about three times faster, so the emulator is never the bottleneck of a benchmark.

_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    409: b"Conflict",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
}


class _Connection(asyncio.Protocol):
    """One client connection: parse requests in order, run the app, write the replies."""

    def __init__(self, server: EmulatorServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._closed = asyncio.get_running_loop().create_future()
        self._client: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._client = (str(peer[0]), int(peer[1])) if peer else None
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next()

    def close(self) -> None:
        if self._transport is not None and not self._busy:
            self._transport.close()

    def _next(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self._fail(431, b"request head too large")
            return
        try:
            lines = bytes(self._buffer[:end]).split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            headers: list[tuple[bytes, bytes]] = []
            length = 0
            keep_alive = version == b"HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                value = value.strip()
                headers.append((name, value))
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    keep_alive = value.lower() == b"keep-alive" or (
                        keep_alive and value.lower() != b"close"
                    )
                elif name == b"transfer-encoding":
                    self._fail(501, b"chunked request bodies are not supported")
                    return
        except ValueError:
            self._fail(400, b"malformed request")
            return
        if length > _MAX_BODY:
            self._fail(413, b"request body too large")
            return
        start = end + 4
        if len(self._buffer) < start + length:
            return  # wait for the rest of the body
        body = bytes(self._buffer[start : start + length])
        del self._buffer[: start + length]
        self._busy = True
        asyncio.get_running_loop().create_task(
            self._respond(method.decode("latin-1"), target, headers, body, keep_alive)
        )

    async def _respond(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        raw_path, _, query = target.partition(b"?")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self._client,
            "server": self._server.address,
        }
        delivered = False
        status = 500
        out_headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        complete = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._closed
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, out_headers, complete
            if message["type"] == "http.response.start":
                status = int(message["status"])
                out_headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                complete = not message.get("more_body", False)

        try:
            await self._server.app(scope, receive, send)
        except Exception:
            log.exception("stripe_emulator.app_failed")
            status, out_headers, chunks, complete, keep_alive = 500, [], [b""], True, False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        payload = b"".join(chunks)
        head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
        has_length = False
        for name, value in out_headers:
            has_length = has_length or name.lower() == b"content-length"
            head.append(name + b": " + value)
        if not has_length:
            head.append(b"content-length: %d" % len(payload))
        if not keep_alive:
            head.append(b"connection: close")
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + payload)
        if not complete:  # the app cut the response short (a drop fault): so does the socket
            transport.close()
            return
        self._busy = False
        if not keep_alive or self._server.closing:
            transport.close()
        elif self._buffer:
            self._next()

    def _fail(self, status: int, message: bytes) -> None:
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(message), message)
        )
        self._transport.close()


class EmulatorServer:
    """Serves an ASGI app over HTTP/1.1 on a bound socket, on the running event loop."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.connections: set[_Connection] = set()
        self.closing = False
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sockname = sock.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)

    async def stop(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        for _ in range(200):  # let in-flight replies finish (at most about two seconds)
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        if self._server is not None:
            await self._server.wait_closed()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets that say so,
    # and without it Nagle's algorithm stalls replies for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def serve_emulator(
    emulator: StripeEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `emulator` on the running event loop (port 0: a free one); yields the base URL."""
    emulator = emulator or StripeEmulator()
    sock = _bind(host, port)
    server = EmulatorServer(emulator.app)
    try:
        await server.start(sock)
        emulator.base_url = _url(host, sock)
        yield emulator.base_url
    finally:
        await server.stop()
        sock.close()
        emulator.base_url = None


@contextmanager
def serve_emulator_in_thread(
    emulator: StripeEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve `emulator` from a background thread with its own event loop; yields the base URL.

    For synchronous tests, or to keep the emulator off the caller's event loop. Its state is
    then touched from that thread: read it through the HTTP hooks, or while no call is in flight.
    """
    emulator = emulator or StripeEmulator()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        async with serve_emulator(emulator, host=host, port=port):
            ready.set()
            await stop.wait()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=main, name="stripe-emulator", daemon=True)
    thread.start()
    ready.wait()
    try:
        if failure or emulator.base_url is None:
            raise RuntimeError("the Stripe emulator failed to start") from (
                failure[0] if failure else None
            )
        yield emulator.base_url
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=10)


def run(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    rate_limit: float | None = None,
    fail_rate: float = 0.0,
    drop_rate: float = 0.0,
    latency_ms: float = 0.0,
    seed: int | None = None,
    *,
    log_events: bool = True,
) -> None:
    """Serve an emulator until interrupted, printing each accepted meter event to stdout."""
    emulator = StripeEmulator(
        rate_limit=rate_limit,
        fail_rate=fail_rate,
        drop_rate=drop_rate,
        latency_ms=latency_ms,
        seed=seed,
        log_events=log_events,
    )
    faults = ", ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(emulator.faults).items() if v not in (None, 0)
    )

    async def serve() -> None:
        async with serve_emulator(emulator, host=host, port=port) as url:
            print(
                f'[stripe-emulator] listening on {url}  (billing: api_base = "{url}", any '
                f"api_key starting with sk_){'  faults: ' + faults if faults else ''}",
                flush=True,
            )
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> int:
    """``controlplane stripe-emulator`` (also ``python -m controlplane.stripe_emulator``)."""
    parser = argparse.ArgumentParser(
        prog="controlplane stripe-emulator",
        description="Run a stateful Stripe emulator for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fraction of POSTs -> 500")
    parser.add_argument(
        "--drop-rate", type=float, default=0.0, help="fraction of meter events cut off"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="do not print each meter event")
    args = parser.parse_args(argv)
    try:
        run(
            args.host,
            args.port,
            args.rate_limit,
            args.fail_rate,
            args.drop_rate,
            args.latency_ms,
            args.seed,
            log_events=not args.quiet,
        )
    except (ValueError, OSError) as exc:
        print(f"stripe-emulator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
